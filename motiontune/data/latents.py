"""Decode the planned clips (in worker processes) and encode them once: frames → VAE latents,
captions → text embeddings. This is the only place where data meets the model's encoders; the
training step reads only these tensors."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import TrainConfig
from ..models import ModelFamily
from .survey import FileEntry, Survey, plan_entry
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

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape)


def _decode_job(job):
    info, clips, size = job
    return decode_clips(info, clips, size)


def encode_clips(survey: Survey, family: ModelFamily, config: TrainConfig, epoch: int = 0) -> list[EncodedClip]:
    """Every planned clip of every usable file, encoded. Epoch > 0 re-plans (random windows move);
    a file that fails to decode is reported and skipped."""
    entries = survey.usable
    max_frames = family.valid_frame_count(config.video_config.max_frames)
    plans = [e.clips if epoch == 0 else plan_entry(e, config, family, max_frames, epoch) for e in entries]
    jobs = [(e.info, clips, e.size) for e, clips in zip(entries, plans)]
    encoded: list[EncodedClip] = []
    decoded = map_isolated(_decode_job, jobs, config.dataloader_threads)
    for entry, clips, (_, result) in tqdm(zip(entries, plans, decoded), total=len(jobs), desc="encoding clips", unit="file", leave=False):
        if isinstance(result, Exception):
            _skip(entry, result)
            continue
        for frames, timestamps in zip(result, clips):
            encoded.append(EncodedClip(entry.item.path, family.encode_video(frames), entry.item.captions, entry.item.repeats, timestamps))
    if not encoded:
        raise MediaError("no clip could be decoded (reasons above)")
    log.info("encoded %d clips from %d files", len(encoded), len({c.source for c in encoded}))
    return encoded


def _skip(entry: FileEntry, error: Exception) -> None:
    reason = str(error) if isinstance(error, MediaError) else f"{entry.item.path}: {type(error).__name__}: {error}"
    log.warning("skipped %s", reason)


def encode_captions(clips: list[EncodedClip], family: ModelFamily, extra: tuple[str, ...] = (), batch: int = 8) -> dict[str, torch.Tensor]:
    """Every distinct caption's embedding, computed once."""
    captions = sorted({c for clip in clips for c in clip.captions} | set(extra))
    embeddings = {}
    for start in range(0, len(captions), batch):
        chunk = captions[start : start + batch]
        for caption, row in zip(chunk, family.encode_prompts(chunk)):
            embeddings[caption] = row
    return embeddings
