"""Encode every clip once (frames → VAE latents, captions → text embeddings) and keep them for the run.

This is the only place where data meets the model's encoders; the training step reads only these
tensors. (Keeping them on disk across runs is the cache's job.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import TrainConfig
from ..models import ModelFamily
from .dataset import Item
from .video import MediaError, decode_frames, plan_timestamps, probe

log = logging.getLogger("motiontune")


@dataclass
class EncodedClip:
    source: Path
    latents: torch.Tensor  # (C, F', H', W'), normalised, on the CPU
    captions: tuple[str, ...]
    repeats: float
    frames: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape)


def training_size(config: TrainConfig, family: ModelFamily) -> tuple[int, int]:
    """The resolution rounded down to the multiple the VAE and patching need (with a notice)."""
    height, width = config.resolution_hw()
    multiple = family.spatial_multiple
    rounded = (max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple))
    if rounded != (height, width):
        log.info("resolution %s → %dx%d (width x height must be multiples of %d)", config.resolution, rounded[1], rounded[0], multiple)
    return rounded


def valid_max_frames(config: TrainConfig, family: ModelFamily) -> int:
    requested = config.video_config.max_frames
    valid = family.valid_frame_count(requested)
    if valid != requested:
        log.info(
            "video_config.max_frames %d → %d: WAN's VAE takes 4n+1 frames, so clips use %d frames",
            requested, valid, valid,
        )
    return valid


def encode_clips(items: list[Item], family: ModelFamily, config: TrainConfig) -> list[EncodedClip]:
    """Decode and encode each file; a file that cannot be used is reported and skipped."""
    size = training_size(config, family)
    max_frames = valid_max_frames(config, family)
    video = config.video_config
    clips, skipped = [], []
    for item in tqdm(items, desc="encoding clips", unit="file", leave=False):
        try:
            info = probe(item.path)
            timestamps = plan_timestamps(info, video.target_fps, max_frames, video.max_duration, family.valid_frame_count)
            if not timestamps:
                raise MediaError(f"{item.path}: too short for even one frame at target_fps {video.target_fps}")
            frames = decode_frames(item.path, timestamps, size)
        except MediaError as error:
            skipped.append(str(error))
            continue
        clips.append(EncodedClip(item.path, family.encode_video(frames), item.captions, item.repeats, len(frames)))
    for reason in skipped:
        log.warning("skipped %s", reason)
    if not clips:
        raise MediaError(f"none of the {len(items)} dataset files could be used (reasons above)")
    log.info("encoded %d clips (%d skipped) at %dx%d", len(clips), len(skipped), size[1], size[0])
    return clips


def encode_captions(clips: list[EncodedClip], family: ModelFamily, batch: int = 8) -> dict[str, torch.Tensor]:
    """Every distinct caption's embedding, computed once."""
    captions = sorted({c for clip in clips for c in clip.captions})
    embeddings = {}
    for start in range(0, len(captions), batch):
        chunk = captions[start : start + batch]
        for caption, row in zip(chunk, family.encode_prompts(chunk)):
            embeddings[caption] = row
    return embeddings
