"""Encode what training needs, once: planned clips → VAE latents, captions and prompts → text
embeddings, through the on-disk cache. Encoders load only when something is missing from it. This is
the only place where data meets the model's encoders; the training step reads only these tensors."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import TrainConfig
from ..models import ModelFamily
from ..train.distributed import Ranks
from .cache import Cache, encoder_identity
from .survey import Survey, plan_entry, sampling_grid
from .video import MediaError, decode_clips
from .workers import map_isolated

log = logging.getLogger("motiontune")


@dataclass
class EncodedClip:
    source: Path
    latents: torch.Tensor  # (C, F', H', W'), normalised, on the CPU
    captions: tuple[str, ...]
    repeats: float
    timestamps: tuple[float, ...]
    image_embeds: torch.Tensor | None = None  # the first frame through the family's image encoder (WAN 2.1 I2V)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape)


class Encoding:
    """Cache-backed encoding for one run; `calls` counts what was actually encoded.

    With several ranks and the cache on, each rank encodes its share of what is missing, then all read
    the rest from the cache: no entry is written by two ranks. With the cache off, each encodes all."""

    def __init__(self, family: ModelFamily, config: TrainConfig, cache: Cache, ranks: Ranks | None = None):
        self.family, self.config, self.cache = family, config, cache
        self.ranks = ranks or Ranks()
        self.split = self.ranks.several and cache.enabled and self._cache_is_shared()
        base = config.base_model_name
        self.vae_identity = encoder_identity(base, family.ENCODER_PARTS["vae"], "float32")
        storage = config.text_encoder.weight_dtype if config.text_encoder.weight_dtype in ("FLOAT_8", "NFLOAT_4") else ""
        self.text_identity = encoder_identity(base, family.ENCODER_PARTS["text"],
                                              f"{config.model_type}:{family.text_dtype}" + (f":{storage}" if storage else ""))
        self.calls: Counter = Counter()
        self.used: dict[str, set[str]] = {"latents": set(), "text": set()}  # every key this run asked for
        self._text_loaded = False

    def _cache_is_shared(self) -> bool:
        """Whether every rank sees the same cache folder (nodes without a shared disk each encode everything)."""
        marker = Path(self.cache.directory) / f".shared-{os.getpid()}-{time.time_ns()}"
        marker = Path(self.ranks.from_main(str(marker)))
        if self.ranks.main:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        self.ranks.barrier()
        shared = self.ranks.all_agree(marker.exists())
        self.ranks.barrier()
        if self.ranks.main:
            marker.unlink(missing_ok=True)
            if not shared:
                log.warning("cache_dir %s is not the same folder on every rank: each rank encodes all clips itself; "
                            "put cache_dir on a shared disk to split the work", self.cache.directory)
        return shared

    def window_variant(self, epoch: int) -> int:
        """Which draw of random windows (or of temporal augmentation) an epoch uses; 0 for fixed windows."""
        video = self.config.video_config
        if video.frame_sample_strategy != "random" and not video.temporal_augmentation:
            return 0
        return epoch if video.window_variants == 0 else epoch % video.window_variants

    def clips(self, survey: Survey, variant: int = 0) -> list[EncodedClip]:
        """Every planned clip of every usable file; a file that fails to decode is reported and skipped."""
        _, max_frames = sampling_grid(self.config, self.family)
        entries = survey.usable
        augment = self.config.video_config.temporal_augmentation
        plans = [
            plan_entry(e, self.config, self.family, max_frames, variant, augment) if variant or augment else e.clips
            for e in entries
        ]
        keys = []
        for entry, plan in zip(entries, plans):
            fingerprint = self.cache.file_fingerprint(entry.item.path)
            keys.append([Cache.latent_key(fingerprint, clip, entry.size, self.vae_identity) for clip in plan])
        if self.ranks.main:
            self.cache.save_fingerprints()
        self.used["latents"].update(k for file_keys in keys for k in file_keys)
        values = self._read_all("latents", [key for file_keys in keys for key in file_keys], self._extras)
        missing = [i for i, file_keys in enumerate(keys) if any(values[k] is None for k in file_keys)]
        encoded_before = self.calls["video"]
        mine = self._my_share(missing, lambda i: keys[i])
        if mine:
            self._encode_missing([entries[i] for i in mine], [plans[i] for i in mine], [keys[i] for i in mine], values)
        if self.split and missing:
            self.ranks.barrier()  # the other ranks' shares are in the cache now
            values.update({key: self.cache.get("latents", key, self._extras) for key, value in values.items() if value is None})
        encoded = []
        for entry, plan, file_keys in zip(entries, plans, keys):
            for clip, key in zip(plan, file_keys):
                if values.get(key) is not None:
                    item = entry.item
                    latents, image = (values[key]["value"], values[key]["image"]) if self._extras else (values[key], None)
                    encoded.append(EncodedClip(item.path, latents, item.captions, item.repeats, clip, image))
        if not encoded:
            raise MediaError("no clip could be decoded (reasons above)")
        log.info("%d clips from %d files (%d encoded now, the rest from the cache)",
                 len(encoded), len({c.source for c in encoded}), self.calls["video"] - encoded_before)
        return encoded

    def _encode_missing(self, entries, plans, keys, values) -> None:
        self.family.load_vae()
        jobs = [(e.info, plan, e.size) for e, plan in zip(entries, plans)]
        decoded = map_isolated(_decode_job, jobs, self.config.dataloader_threads)
        progress = tqdm(total=sum(len(k) for k in keys), desc="encoding clips", unit="clip", leave=False)
        for entry, plan, file_keys, (_, result) in zip(entries, plans, keys, decoded):
            if isinstance(result, Exception):
                reason = str(result) if isinstance(result, MediaError) else f"{entry.item.path}: {type(result).__name__}: {result}"
                log.warning("skipped %s", reason)
                progress.update(len(file_keys))
                continue
            for frames, clip, key in zip(result, plan, file_keys):
                if values[key] is None:
                    latents = self.family.encode_video(frames)
                    extras = {"image": self.family.encode_first_frame(frames[0])} if self._extras else None
                    values[key] = {"value": latents, **extras} if extras else latents
                    self.calls["video"] += 1
                    self.cache.put("latents", key, latents, {"file": str(entry.item.path), "instants": clip}, extras)
                progress.update()
        progress.close()

    def texts(self, texts: set[str], batch: int = 8) -> dict[str, torch.Tensor]:
        """Each text's embedding, as the stock pipeline computes it."""
        keys = {text: Cache.text_key(text, self.text_identity) for text in texts}
        self.used["text"].update(keys.values())
        by_key = self._read_all("text", list(keys.values()))
        embeddings = {text: by_key[key] for text, key in keys.items()}
        everything_missing = sorted(text for text, value in embeddings.items() if value is None)
        missing = [everything_missing[i] for i in self._my_share(range(len(everything_missing)), lambda i: [everything_missing[i]])]
        if missing and not self._text_loaded:
            self.family.park_vae()  # one encoder on the device at a time: an 8 GB GPU holds either, not both
            self.family.load_text_encoder()
            self._text_loaded = True
        for start in range(0, len(missing), batch):
            chunk = missing[start : start + batch]
            for text, row in zip(chunk, self.family.encode_prompts(chunk)):
                embeddings[text] = row
                self.calls["text"] += 1
                self.cache.put("text", keys[text], row, {"text": text})
        if self.split and everything_missing:
            self.ranks.barrier()
            embeddings.update({text: self.cache.get("text", keys[text]) for text in everything_missing if embeddings[text] is None})
        return embeddings

    @property
    def _extras(self) -> tuple[str, ...]:
        """Tensors a clip's cache entry holds beside its latents."""
        return ("image",) if self.family.encodes_first_frame else ()

    def _read_all(self, kind: str, keys: list[str], extras: tuple[str, ...] = ()) -> dict:
        """What the cache holds for `keys`; with several ranks, every rank reads before any writes, so all
        see the same gaps and deal them out alike."""
        if self.split:
            self.ranks.barrier()
        values = {key: self.cache.get(kind, key, extras) for key in keys}
        if self.split:
            self.ranks.barrier()
        return values

    def _my_share(self, items, keys_of) -> list:
        """This rank's items, dealt round-robin; an item whose keys an earlier item already covers is dealt to
        nobody (identical clips in two files are encoded once)."""
        if not self.split:
            return list(items)
        mine, seen, dealt = [], set(), 0
        for item in items:
            keys = set(keys_of(item)) - seen
            if not keys:
                continue
            seen |= keys
            if dealt % self.ranks.world_size == self.ranks.rank:
                mine.append(item)
            dealt += 1
        return mine

    def release(self, keep_vae: bool, keep_text: bool = False) -> None:
        """Encoders off the training device before the transformer arrives (the text encoder stays when it
        encodes captions during training)."""
        if self._text_loaded and not keep_text:
            self.family.release_text_encoder()
            self._text_loaded = False
        if keep_vae:
            self.family.park_vae()
        else:
            self.family.release_vae()


def _decode_job(job):
    info, clips, size = job
    return decode_clips(info, clips, size)
