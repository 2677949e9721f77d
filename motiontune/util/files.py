"""Writing files so that a crash or a full disk never leaves half of one under the real name."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from safetensors import SafetensorError

from .processes import HOST, process_alive

# What a full disk or a missing permission raises, depending on the writer (Python, safetensors, torch.save).
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


def read_json_file(path: Path):
    """The JSON in a file (a byte-order mark allowed, as Windows editors write one); ValueError saying where the
    syntax breaks when it is not JSON."""
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None


def write_error_reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error)
    return text.split("I/O error: ")[-1] if "I/O error: " in text else text


@contextlib.contextmanager
def replacing(destination: Path, prefix: str = ".saving-") -> Iterator[Path]:
    """Yield a path to write a file or a folder at; once written, it is flushed to disk and takes the name
    `destination` (an old folder there goes only then). If writing fails, `destination` is untouched and
    the temporary is removed. The temporary (`prefix`, this machine, this process) is beside `destination`;
    those a killed process left there (a backup of a fine-tune can be tens of GB) go first."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(destination.parent, prefix)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=f"{prefix}{HOST}-{os.getpid()}-") as scratch:
        written = Path(scratch) / destination.name
        yield written
        for path in [written] if written.is_file() else sorted(p for p in written.rglob("*") if p.is_file()):
            fsync_file(path)  # on disk before it takes the real name
        if written.is_dir() and destination.exists():
            shutil.rmtree(destination)
        os.replace(written, destination)
        fsync_dir(destination.parent)


def remove_leftovers(folder: Path, prefix: str) -> list[Path]:
    """Remove the temporaries `replacing` left in `folder` when its process was killed: those of this machine
    whose process is gone (or is this one). Another machine's (a shared filesystem) stay: its processes cannot be
    seen from here."""
    pattern = re.compile(rf"{re.escape(prefix)}([^-]*)-(\d+)-[^-]+")
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = pattern.fullmatch(path.name)
        # this process's own pid: a run before it with the same pid (a container's pid 1, restarted), since this
        # process writes one file at a time and is not writing now
        pid = int(match[2]) if match else 0
        if match and match[1] == HOST and (pid == os.getpid() or not process_alive(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def temporary_name(path: Path) -> Path:
    """Where `path` is written before its rename: `<name>.<pid>.tmp`, so leftovers of a killed process are
    known by their pid."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def write_then_rename(path: Path, write: Callable[[Path], object]) -> None:
    """`write(temporary)`, then one rename: readers see the old file or the new one. Not flushed to disk:
    for caches and status files, where a lost write costs nothing."""
    temporary = temporary_name(path)
    write(temporary)
    os.replace(temporary, path)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
