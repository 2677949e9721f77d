"""Helpers shared by the end-to-end tests that sample with the stock diffusers pipelines."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def stock_samples(pipe, seeds: Iterable[int], **call) -> torch.Tensor:
    """The pipeline's output latents for each seed, in one batched call: one generator per sample, so each sample
    starts from the noise a one-seed call with that seed draws (diffusers' randn_tensor draws per generator); the
    results equal the per-seed calls' to float rounding (at most 8e-7 on the WAN, HiDream and HunyuanVideo
    pipelines). On the tiny models 8 seeds x 20 steps take under a second either way (WAN 2.1 0.5 s -> 0.2 s): the
    tests' time is their training.

    Image-to-video pipelines repeat the CLIP image embedding (WAN 2.1 I2V / FLF2V) by the prompt count, not by the
    samples per prompt, and refuse a precomputed one beside the image: they get the prompt once per sample."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    if "image" in call:
        call["prompt"] = [call["prompt"]] * len(generators)
    else:
        count = "num_images_per_prompt" if type(pipe).__name__.startswith("HiDream") else "num_videos_per_prompt"
        call[count] = len(generators)
    out = pipe(**call, output_type="latent", generator=generators)
    return out.images if hasattr(out, "images") else out.frames
