"""Simulated memory figures kept on disk, so that a new process (`motiontune estimate`, the planner, the web UI)
reuses what an earlier one simulated instead of running the fake-tensor simulation again.

A figure is a pure function of its key (the model's config, shapes, dtypes, the memory options the caller puts in
it) and of the program that simulates it. The file's name hashes both: the key, and a fingerprint of motiontune's
own source files and the versions of torch, diffusers, transformers, peft and torchao, so a changed program never
reads a figure an older one wrote. Values are JSON (numbers and lists); a file that cannot be read or written is
simply not used (the figure is simulated as before).

MOTIONTUNE_ESTIMATE_CACHE: the folder ($XDG_CACHE_HOME/motiontune/estimate, else ~/.cache/motiontune/estimate, by
default), or "off" to simulate every time (the test suite sets "off": several of its tests count simulated ops).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

ENV = "MOTIONTUNE_ESTIMATE_CACHE"


def folder() -> Path | None:
    """Where figures are kept, or None when the cache is off."""
    setting = os.environ.get(ENV, "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    if setting:
        return Path(setting)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "motiontune" / "estimate"


@functools.lru_cache(maxsize=1)
def fingerprint() -> str:
    """The program that makes the figures: every source file of the package (any change to the simulation, the
    families or the methods they apply changes it), and the libraries whose code runs in the simulation."""
    from importlib import metadata

    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    for name in ("torch", "diffusers", "transformers", "peft", "torchao"):
        try:
            digest.update(f"{name}={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name}=none".encode())
    return digest.hexdigest()


def cached(kind: str, key: Any, compute: Callable[[], Any], encode: Callable[[Any], Any] = lambda v: v,
           decode: Callable[[Any], Any] = lambda v: v) -> Any:
    """compute(), or the figure an earlier process kept for (`kind`, `key`). `key`'s repr must say everything the
    figure depends on (the in-process caches' keys do); `encode` / `decode` turn the value into JSON and back."""
    where, said = folder(), repr((kind, key))
    if where is None or " at 0x" in said:  # off, or a key naming an object by its address: this process only
        return compute()
    name = hashlib.sha256((said + fingerprint()).encode()).hexdigest()[:40]
    path = where / f"{kind}-{name}.json"
    try:
        return decode(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        pass
    value = compute()
    try:
        where.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(encode(value)))
        os.replace(temporary, path)  # whole or absent: a reader never sees half a file
    except OSError:
        pass
    return value
