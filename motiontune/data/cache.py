"""The on-disk cache of VAE latents, text embeddings and masks on the latent grid.

An entry's name is a hash of everything that decides its content: the file's bytes, the clip plan
(instants, size, crop), the encoder's identity (where it came from, its config files, its weight files'
sizes and dates, its dtype) and the cache format version. Change any of them and that entry is made
anew; nothing else is. Entries are written atomically (a temporary file, then a hard link to the entry's
name, which also keeps two ranks or nodes from both writing one) and checked on read: a corrupt or non-finite entry is reported, removed and made again. A run keeps only references to
its entries (`Entry`) and reads each when a step needs it, so its memory does not grow with the dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from ..util.lazy import torch
from ..util.processes import HOST, process_alive
from .video import MediaError

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


class FileFacts:
    """Facts learnt about dataset files (a content hash, a probe), kept in one JSON file and trusted while a
    file's size and modification time are unchanged, so an unchanged file is not read again. `path` None
    keeps them in memory only. `version` names the code that made them: other versions' facts are dropped."""

    def __init__(self, path: Path | None, version: int = 0):
        self.path, self.version = path, version
        self._facts: dict[str, list] = {}
        self._changed = False
        if path is not None and path.is_file():
            try:
                stored = json.loads(path.read_text())
                if stored.get("version") == version:
                    self._facts = stored["files"]
            except (json.JSONDecodeError, AttributeError, KeyError):
                pass  # unreadable: learnt again

    def get(self, file: Path):
        stat = os.stat(file)
        known = self._facts.get(os.path.abspath(file))
        return known[2] if known and known[:2] == [stat.st_size, stat.st_mtime_ns] else None

    def put(self, file: Path, fact) -> None:
        stat = os.stat(file)
        # keyed by the absolute path, not the resolved one: resolving every file of a large dataset costs more
        # than the rest of a warm survey, and a file reached two ways is at worst learnt twice
        self._facts[os.path.abspath(file)] = [stat.st_size, stat.st_mtime_ns, fact]
        self._changed = True

    def save(self) -> None:
        """Written only when something was learnt (atomically: ranks and nodes may write it at once)."""
        if self.path is not None and self._changed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(self.path, json.dumps({"version": self.version, "files": self._facts}))
            self._changed = False


class Entry:
    """A reference to a checked cache entry, read when a step needs it."""

    __slots__ = ("path", "extras", "shape")

    def __init__(self, path: Path, extras: tuple[str, ...], shape: tuple[int, ...]):
        self.path, self.extras, self.shape = path, extras, shape

    def load(self) -> torch.Tensor | dict[str, torch.Tensor]:
        from safetensors.torch import load_file  # here, not at the top: it imports torch, which a survey does without

        try:
            stored = load_file(str(self.path))
        except Exception as error:  # removed or damaged while the run was going
            raise CacheError(f"cache entry {self.path} could not be read during training ({error}); was the cache "
                             "cleared while this run used it? Run again: missing entries are made again") from None
        return {name: stored[name] for name in ("value", *self.extras)} if self.extras else stored["value"]


class CacheError(MediaError):
    """A cache entry a run relies on went missing or bad under it (reported as a data error)."""


class Cache:
    """`enabled` False keeps nothing on disk (every run encodes again)."""

    def __init__(self, directory: str | Path, enabled: bool = True):
        self.directory = Path(directory)
        self.enabled = enabled
        self._fingerprints = FileFacts(self.directory / "files.json" if enabled else None)
        if enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temporaries()

    # --- keys ------------------------------------------------------------------------------------
    def file_fingerprint(self, path: Path) -> str:
        """The file's content hash; size and modification time skip re-hashing an unchanged file."""
        known = self._fingerprints.get(path)
        if known:
            return known
        sha = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        self._fingerprints.put(path, sha.hexdigest())
        return sha.hexdigest()

    def save_fingerprints(self) -> None:
        self._fingerprints.save()

    @staticmethod
    def latent_key(fingerprint: str, timestamps, size, encoder: str, crop: tuple[int, int] | None = None,
                   flip: bool = False, audio: dict | None = None, look: dict | None = None) -> str:
        """`crop`: (top, left) of a jittered crop in the picture scaled to cover `size` (None: centred). `audio`: how
        the clip's sound is read (rate, channels, window) for a family that generates sound. `look`: the clip's
        other image changes (rotation, colour: ImageVariant.pixel_changes)."""
        material = {
            "v": FORMAT_VERSION, "kind": "latent", "file": fingerprint,
            "instants": [round(t, 6) for t in timestamps], "size": list(size),
            "crop": "center" if crop is None else list(crop), "flip": bool(flip), "encoder": encoder,
        }
        if audio is not None:  # absent otherwise: the other families' entries keep their names
            material["audio"] = audio
        if look:  # absent without rotation or colour changes: those clips keep their entries
            material["look"] = look
        return digest(material)

    @staticmethod
    def mask_key(fingerprint: str, timestamps, size, clip_size: tuple[int, int], crop: tuple[int, int] | None,
                 flip: bool, grid: tuple[int, ...], pooling: str, look: dict | None = None) -> str:
        """A clip's mask: the mask file's content, the clip's instants, size, crop and flip, the clip's own
        (width, height) (the mask is scaled as its frames are), and the latent grid it is pooled to. Not the VAE:
        editing a mask makes the mask again, never the latents. `look`: the mask's rotation and circular shrink
        (ImageVariant.mask_changes), absent when there are none."""
        material = {
            "v": FORMAT_VERSION, "kind": "mask", "mask": fingerprint,
            "instants": [round(t, 6) for t in timestamps], "size": list(size), "clip": list(clip_size),
            "crop": "center" if crop is None else list(crop), "flip": bool(flip), "grid": list(grid), "pooling": pooling,
        }
        if look:
            material["look"] = look
        return digest(material)

    @staticmethod
    def condition_key(fingerprint: str, role: str, timestamps, size, clip_size: tuple[int, int],
                      crop: tuple[int, int] | None, flip: bool, rotate: float, encoder: str) -> str:
        """A clip's condition in `role` (data/conditions.py) as its family encodes it: the condition file's content
        (not the clip's: editing a condition makes it again, never the latents), the clip's instants, size, own
        (width, height), crop, flip and rotation, and the encoder."""
        return digest({
            "v": FORMAT_VERSION, "kind": "condition", "role": role, "file": fingerprint,
            "instants": [round(t, 6) for t in timestamps], "size": list(size), "clip": list(clip_size),
            "crop": "center" if crop is None else list(crop), "flip": bool(flip), "rotate": rotate, "encoder": encoder,
        })

    @staticmethod
    def stand_in_key(role: str, frames: int, size, encoder: str) -> str:
        """What a family uses in `role` for a clip without a condition there (`ModelFamily.encode_stand_in`): it
        depends on the clip's frame count and size alone, so clips alike share it."""
        return digest({"v": FORMAT_VERSION, "kind": "stand-in", "role": role, "frames": frames, "size": list(size),
                       "encoder": encoder})

    @staticmethod
    def text_key(text: str, encoder: str) -> str:
        return digest({"v": FORMAT_VERSION, "kind": "text", "text": text, "encoder": encoder})

    # --- entries ---------------------------------------------------------------------------------
    def path(self, kind: str, key: str) -> Path:
        return self.directory / kind / key[:2] / f"{key}.safetensors"

    def get(self, kind: str, key: str, extras: tuple[str, ...] = ()) -> Entry | None:
        """A reference to the entry, or None when it is missing or unusable. It is read whole once here, to
        check it (torn, NaN), and not kept. With `extras` (names of tensors stored beside the value, such as a
        clip's first-frame image embedding), the reference loads a dict of the value and those."""
        if not self.enabled:
            return None
        path = self.path(kind, key)
        if not path.is_file():
            return None
        from safetensors.torch import load_file

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
        return Entry(path, extras, tuple(stored["value"].shape))

    def put(self, kind: str, key: str, value: torch.Tensor, about: dict | None = None,
            extras: dict[str, torch.Tensor] | None = None) -> Entry | None:
        """Write the entry; the reference to it (None when the cache is off)."""
        from safetensors.torch import save_file

        if not self.enabled:
            return None
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = _temporary(path)
        metadata = {"about": json.dumps(about or {}, default=str)}
        tensors = {"value": value, **(extras or {})}
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(temporary), metadata=metadata)
        _publish(temporary, path)
        return Entry(path, tuple(extras or ()), tuple(value.shape))

    def keys(self, kind: str) -> set[str]:
        folder = self.directory / kind
        return {p.stem for p in folder.glob("*/*.safetensors")} if folder.is_dir() else set()

    def remove_unused(self, used: dict[str, set[str]]) -> int:
        """Delete every entry no current clip or caption uses; returns how many."""
        removed = 0
        for kind in ("latents", "text", "masks", "conditions"):
            for key in self.keys(kind) - used.get(kind, set()):
                self.path(kind, key).unlink()
                removed += 1
        return removed

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of runs that were killed mid-write: on this machine, those whose process is gone; from
        other machines sharing the folder (whose processes cannot be seen from here), those untouched for a day."""
        for path in self.directory.rglob("*.tmp"):
            host, _, pid = path.name.rsplit(".", 2)[-2].rpartition("-")
            try:
                if host == HOST:
                    stale = not pid.isdigit() or not process_alive(int(pid))
                else:
                    stale = time.time() - path.stat().st_mtime > 24 * 3600
            except FileNotFoundError:  # its writer just put it in place
                continue
            if stale:
                path.unlink(missing_ok=True)


def _temporary(path: Path) -> Path:
    """Where a file is written before it is put in place: named by machine and process, so a run that finds it
    later can tell whether its writer is gone."""
    return path.with_name(f"{path.name}.{HOST}-{os.getpid()}.tmp")


def _publish(temporary: Path, path: Path) -> None:
    """Put a finished entry in place in one step. A hard link, unlike a rename, fails when the entry exists: ranks and
    nodes deal the entries out so that each is written once, and if another process got there first, its entry
    stays and the duplicate work is reported."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        log.warning("cache entry %s was already written by another process (the same clip was encoded twice)", path)
    except OSError:  # a filesystem without hard links: a rename is atomic too
        os.replace(temporary, path)
        return
    temporary.unlink()


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = _temporary(path)
    temporary.write_text(text)
    os.replace(temporary, path)
