"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from ..config import TrainConfig

_SCHEDULES = {"CONSTANT": "constant_with_warmup", "COSINE": "cosine", "LINEAR": "linear"}


def make_optimizer(parameters, config: TrainConfig, learning_rate: float | None = None) -> torch.optim.Optimizer:
    """`parameters`: tensors, or param groups (dicts with their own "lr"); none at all gives an optimizer that
    never changes anything (an expert that stays frozen while an embedding trains)."""
    settings = config.optimizer
    flat = [p for g in parameters for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(flat) and all(p.is_cuda for p in flat)  # the fused CUDA kernel: one launch for all tensors
    return torch.optim.AdamW(
        list(parameters) or [{"params": []}],
        lr=learning_rate or config.learning_rate,
        betas=(settings.beta1, settings.beta2),
        eps=settings.eps,
        weight_decay=settings.weight_decay,
        fused=fused or None,
    )


def make_scheduler(optimizer, config: TrainConfig, total_steps: int):
    return get_scheduler(
        _SCHEDULES[config.learning_rate_scheduler],
        optimizer,
        num_warmup_steps=config.learning_rate_warmup_steps,
        num_training_steps=max(total_steps, 1),
    )
