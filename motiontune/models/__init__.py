"""Which family module serves which `model_type`."""

from __future__ import annotations

import torch

from ..config import TrainConfig
from .base import ModelFamily, ModelLoadError, SampleRequest


def family_for(config: TrainConfig, device: torch.device) -> ModelFamily:
    if config.model_type.startswith("WAN_"):
        from .wan import WanFamily

        return WanFamily(config, device)
    if config.model_type == "HUNYUAN_VIDEO":
        from .hunyuan import HunyuanVideoFamily

        return HunyuanVideoFamily(config, device)
    if config.model_type.startswith("HI_DREAM_"):
        from .hidream import HiDreamFamily

        return HiDreamFamily(config, device)
    raise ValueError(f"model_type {config.model_type!r} has no family module yet")


__all__ = ["ModelFamily", "ModelLoadError", "SampleRequest", "family_for"]
