"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import logging
import math
import warnings

import torch

from ..config import TrainConfig

_SCHEDULES = {"CONSTANT": "constant_with_warmup", "COSINE": "cosine", "LINEAR": "linear"}


def make_optimizer(parameters, config: TrainConfig, learning_rate: float | None = None) -> torch.optim.Optimizer:
    """`parameters`: tensors, or param groups (dicts with their own "lr"); none at all gives an optimizer that
    never changes anything (an expert that stays frozen while an embedding trains)."""
    settings = config.optimizer
    groups = list(parameters) or [{"params": []}]
    lr = learning_rate or config.learning_rate
    kind = settings.optimizer
    if kind == "ADAMW":
        flat = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
        fused = bool(flat) and all(p.is_cuda for p in flat)  # the fused CUDA kernel: one launch for all tensors
        return torch.optim.AdamW(groups, lr=lr, betas=(settings.beta1, settings.beta2), eps=settings.eps,
                                 weight_decay=settings.weight_decay, fused=fused or None)
    if kind == "ADAMW_8BIT":
        # torchao's: both moments in 8 bits with a scale per 256 values, on the CPU and CUDA alike
        logging.getLogger("torchao").setLevel(logging.ERROR)  # its optional CUDA kernels log noise on import
        from torchao.optim import AdamW8bit

        warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching")  # compile-cache advice for torchao

        return AdamW8bit(groups, lr=lr, betas=(settings.beta1, settings.beta2), eps=settings.eps,
                         weight_decay=settings.weight_decay)
    if kind == "ADAFACTOR":  # the second moment factored into row and column statistics, no first moment
        return torch.optim.Adafactor(groups, lr=lr, weight_decay=settings.weight_decay)
    if kind == "PRODIGY":  # finds its own step size: set learning_rate 1.0 (the multiplier on it)
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=lr, betas=(settings.beta1, settings.beta2), eps=settings.eps,
                       weight_decay=settings.weight_decay)
    return torch.optim.SGD(groups, lr=lr, weight_decay=settings.weight_decay)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, config: TrainConfig) -> int:
    """The optimizer state the run will hold once every parameter has stepped (state is made at the first step)."""
    kind = config.optimizer.optimizer
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            n, size = p.numel(), p.element_size()  # moments take the parameter's dtype (bf16 in a bf16 fine-tune)
            if kind == "ADAMW":
                total += 2 * size * n
            elif kind == "ADAMW_8BIT":  # small tensors keep full moments, as torchao does below 4096 values
                total += 2 * (n + 4 * math.ceil(n / 256)) if n >= 4096 else 2 * size * n
            elif kind == "ADAFACTOR":
                # torch's factored second moment: one value per row and one per column of each trailing matrix
                total += size * (n // p.shape[-1] + n // p.shape[-2] if p.dim() >= 2 else n)
            elif kind == "PRODIGY":
                total += 4 * size * n  # two moments, its running sum s and the starting weights
    return total


def make_scheduler(optimizer, config: TrainConfig, total_steps: int):
    from diffusers.optimization import get_scheduler  # here: `estimate` counts optimizer state without diffusers

    return get_scheduler(
        _SCHEDULES[config.learning_rate_scheduler],
        optimizer,
        num_warmup_steps=config.learning_rate_warmup_steps,
        num_training_steps=max(total_steps, 1),
    )
