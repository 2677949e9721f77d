"""The on-disk cache of VAE latents and text embeddings.

An entry's name is a hash of everything that decides its content: the file's bytes, the clip plan
(instants, size, crop), the encoder's identity (where it came from, its config files, its weight files'
sizes and dates, its dtype) and the cache format version. Change any of them and that entry is made
anew; nothing else is. Entries are written atomically (temporary file, then rename) and checked on
read: a corrupt or non-finite entry is reported, removed and made again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..util.files import write_then_rename
from ..util.processes import process_alive

log = logging.getLogger("motiontune")

FORMAT_VERSION = 1
_SMALL_FILE = 4 * 1024 * 1024  # config, tokenizer and vocabulary files are hashed; weights are not read


def digest(material) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def encoder_identity(source: str, parts: tuple[str, ...], dtype: str) -> str:
    """What decides an encoder's outputs, without loading it: its source, the content of its small files
    (configs, tokenizer) and the size and date of its weight files. A Hub id is known by its name only."""
    material = {"source": source, "dtype": dtype, "parts": {}}
    root = Path(source)
    for part in parts:
        folder = root / part
        if not folder.is_dir():
            continue
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            name = str(path.relative_to(folder))
            if stat.st_size <= _SMALL_FILE:
                files[name] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                files[name] = [stat.st_size, stat.st_mtime_ns]
        material["parts"][part] = files
    return digest(material)


class Cache:
    """`enabled` False keeps nothing on disk (every run encodes again)."""

    def __init__(self, directory: str | Path, enabled: bool = True):
        self.directory = Path(directory)
        self.enabled = enabled
        self._fingerprints: dict[str, list] = {}
        if enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._index = self.directory / "files.json"
            if self._index.is_file():
                try:
                    self._fingerprints = json.loads(self._index.read_text())
                except json.JSONDecodeError:
                    self._fingerprints = {}
            self._remove_stale_temporaries()

    # --- keys ------------------------------------------------------------------------------------
    def file_fingerprint(self, path: Path) -> str:
        """The file's content hash; size and modification time skip re-hashing an unchanged file."""
        path = Path(path).resolve()
        stat = path.stat()
        known = self._fingerprints.get(str(path))
        if known and known[:2] == [stat.st_size, stat.st_mtime_ns]:
            return known[2]
        sha = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        self._fingerprints[str(path)] = [stat.st_size, stat.st_mtime_ns, sha.hexdigest()]
        return sha.hexdigest()

    def save_fingerprints(self) -> None:
        if self.enabled:
            write_then_rename(self._index, lambda path: path.write_text(json.dumps(self._fingerprints)))

    @staticmethod
    def latent_key(fingerprint: str, timestamps, size, encoder: str, crop: tuple[int, int] | None = None,
                   flip: bool = False) -> str:
        """`crop`: (top, left) of a jittered crop in the picture scaled to cover `size` (None: centred)."""
        return digest({
            "v": FORMAT_VERSION, "kind": "latent", "file": fingerprint,
            "instants": [round(t, 6) for t in timestamps], "size": list(size),
            "crop": "center" if crop is None else list(crop), "flip": bool(flip), "encoder": encoder,
        })

    @staticmethod
    def text_key(text: str, encoder: str) -> str:
        return digest({"v": FORMAT_VERSION, "kind": "text", "text": text, "encoder": encoder})

    # --- entries ---------------------------------------------------------------------------------
    def path(self, kind: str, key: str) -> Path:
        return self.directory / kind / key[:2] / f"{key}.safetensors"

    def get(self, kind: str, key: str, extras: tuple[str, ...] = ()) -> torch.Tensor | None:
        """The entry's value, or None when it is missing or unusable. With `extras` (names of tensors stored
        beside the value, such as a clip's first-frame image embedding), a dict of the value and those."""
        if not self.enabled:
            return None
        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            stored = load_file(str(path))
            missing = [name for name in ("value", *extras) if name not in stored]
            if missing:
                raise ValueError(f"it lacks {', '.join(missing)}")
            if not all(torch.isfinite(stored[name]).all() for name in ("value", *extras)):
                raise ValueError("it holds NaN or infinite values")
        except Exception as error:
            log.warning("cache entry %s was unusable (%s); making it again", path, error)
            path.unlink(missing_ok=True)
            return None
        return {name: stored[name] for name in ("value", *extras)} if extras else stored["value"]

    def put(self, kind: str, key: str, value: torch.Tensor, about: dict | None = None,
            extras: dict[str, torch.Tensor] | None = None) -> None:
        if not self.enabled:
            return
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"about": json.dumps(about or {}, default=str)}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in {"value": value, **(extras or {})}.items()}
        write_then_rename(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))

    def keys(self, kind: str) -> set[str]:
        folder = self.directory / kind
        return {p.stem for p in folder.glob("*/*.safetensors")} if folder.is_dir() else set()

    def remove_unused(self, used: dict[str, set[str]]) -> int:
        """Delete every entry no current clip or caption uses; returns how many."""
        removed = 0
        for kind in ("latents", "text"):
            for key in self.keys(kind) - used.get(kind, set()):
                self.path(kind, key).unlink()
                removed += 1
        return removed

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of runs that were killed mid-write (their process is gone)."""
        for path in self.directory.rglob("*.tmp"):
            pid = path.suffixes[-2].lstrip(".") if len(path.suffixes) >= 2 else ""
            if not pid.isdigit() or not process_alive(int(pid)):
                path.unlink(missing_ok=True)
