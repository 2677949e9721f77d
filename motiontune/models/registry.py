"""Which family serves which `model_type`. Every module in models/ that defines a family is found here, so a new
family is one new file and nothing else names its model types."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from pathlib import Path

import torch

from ..config import TrainConfig
from .base import ModelFamily


@cache
def families() -> tuple[type[ModelFamily], ...]:
    """Every family class, each from its own module in this package."""
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{__package__}.{module.name}")
    return tuple(family for family in _subclasses(ModelFamily) if family.MODEL_TYPES)


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def model_types() -> tuple[str, ...]:
    """Every model_type some family serves, family by family."""
    return tuple(model_type for family in families() for model_type in family.MODEL_TYPES)


def family_class(model_type: str) -> type[ModelFamily]:
    for family in families():
        if model_type in family.MODEL_TYPES:
            return family
    raise ValueError(f"model_type {model_type!r} is served by no family; known: {', '.join(model_types())}")


def family_for(config: TrainConfig, device: torch.device) -> ModelFamily:
    """The family that serves `config.model_type`, for one run on `device` (nothing is loaded yet)."""
    return family_class(config.model_type)(config, device)


def compression_factors(config: TrainConfig) -> tuple[int, int]:
    """(spatial, temporal) factors applied before the VAE: 1 when the ratio is the VAE's own (or less)."""
    native = family_class(config.model_type).vae_compression(config.model_type)
    ratios = (config.video_config.spatial_compression_ratio, config.video_config.temporal_compression_ratio)
    return tuple(max(1, ratio // own) for ratio, own in zip(ratios, native))


def tiny_models() -> tuple[str, ...]:
    """The names of every family's tiny test models."""
    return tuple(name for family in families() for name in family.TINY_MODELS)


def tiny_family(name: str) -> type[ModelFamily]:
    for family in families():
        if name in family.TINY_MODELS:
            return family
    raise ValueError(f"unknown family {name!r}; choose one of: {', '.join(tiny_models())}")
