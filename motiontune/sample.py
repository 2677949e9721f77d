"""Sampling during training: prompts encoded once up front, videos rendered by the stock pipeline."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .config import TrainConfig
from .data.video import write_video
from .models import ModelFamily, SampleRequest

log = logging.getLogger("motiontune")


def sample_prompts(config: TrainConfig) -> set[str]:
    return {s.prompt for s in config.samples} | {s.negative_prompt for s in config.samples if s.cfg_scale > 1.0}


def prepare_samples(config: TrainConfig, family: ModelFamily, embeddings: dict) -> list[tuple[SampleRequest, float]]:
    """Sample requests with their prompts already encoded (`embeddings`), so the text encoder can leave
    memory before training."""
    requests = []
    for sample in config.samples:
        multiple = family.spatial_multiple
        height = max(multiple, sample.height // multiple * multiple)
        width = max(multiple, sample.width // multiple * multiple)
        frames = family.valid_frame_count(sample.frames)
        if (height, width, frames) != (sample.height, sample.width, sample.frames):
            log.info("sample %r: %dx%d, %d frames → %dx%d, %d frames (the model's valid sizes)",
                     sample.prompt, sample.width, sample.height, sample.frames, width, height, frames)
        use_cfg = sample.cfg_scale > 1.0
        image = None
        if sample.image:  # resized by the pipeline to the sample's size, as at inference
            from PIL import Image

            image = np.asarray(Image.open(sample.image).convert("RGB"))  # checked when the config loaded
        last_image = None
        if sample.last_image:
            from PIL import Image

            last_image = np.asarray(Image.open(sample.last_image).convert("RGB"))
        # control, its mask, pose, face: their first frames, as many as the sample has (the pipeline resizes them)
        videos = {}
        for role in ("control", "control_mask", "pose", "face", "background", "character_mask"):
            if getattr(sample, role):
                from .data.video import decode_clips, probe

                info = probe(getattr(sample, role))
                videos[role] = decode_clips(info, [info.frame_times[:frames]])[0]
        for mask in ("control_mask", "character_mask"):
            if mask in videos and len(videos[mask]) == 1:  # a picture: the mask of every frame
                videos[mask] = np.repeat(videos[mask], frames, axis=0)
        reference = None
        if sample.reference:
            from PIL import Image

            reference = np.asarray(Image.open(sample.reference).convert("RGB"))
        request = SampleRequest(
            prompt_embeds=embeddings[sample.prompt][None],
            negative_prompt_embeds=embeddings[sample.negative_prompt][None] if use_cfg else None,
            frames=frames,
            height=height,
            width=width,
            steps=sample.steps,
            cfg_scale=sample.cfg_scale,
            seed=sample.seed,
            image=image,
            last_image=last_image,
            control=videos.get("control"),
            control_mask=videos.get("control_mask"),
            pose=videos.get("pose"),
            face=videos.get("face"),
            reference=reference,
            background=videos.get("background"),
            character_mask=videos.get("character_mask"),
            fps=sample.fps,
        )
        requests.append((request, sample.fps))
    return requests


def render_samples(family: ModelFamily, requests, directory: Path, tag: str, write: bool = True):
    """Render every request; `write` False renders without writing (a sharded model's other ranks). Returns the
    written paths and (index, exception) for each sample that failed: a sample never stops the run."""
    paths, failures = [], []
    for index, (request, fps) in enumerate(requests):
        path = directory / f"{tag}-{index}.mp4"
        try:
            result = family.sample(request)
            frames, audio, rate = result if isinstance(result, tuple) else (result, None, 0)  # with its sound track
            if write:
                write_video(path, frames, fps, audio, rate)
                paths.append(path)
        except Exception as error:  # out of memory, a pipeline that rejects a size, a full disk...
            failures.append((index, error))
    return paths, failures
