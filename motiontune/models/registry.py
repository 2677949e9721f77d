"""Which family serves which `model_type`. Every module in models/ that defines a family is found here, so a new
family is one new file and nothing else names its model types."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from pathlib import Path

from ..config import TrainConfig
from ..util.lazy import torch
from .base import ModelFamily


@cache
def families() -> tuple[type[ModelFamily], ...]:
    """Every family class, each from its own module in this package. Only modules that name MODEL_TYPES are imported:
    the helpers beside them (fake_memory.py, wan_decode.py) import torch at once, which a survey does without."""
    folder = Path(__file__).parent
    for module in pkgutil.iter_modules([str(folder)]):
        source = folder / f"{module.name}.py"
        # without sources (an install of .pyc files only) every module is imported: slower, never wrong
        if not source.is_file() or "MODEL_TYPES" in source.read_text(encoding="utf-8"):
            importlib.import_module(f"{__package__}.{module.name}")
    # a family declares its own MODEL_TYPES (a subclass made elsewhere, a test's, say, serves nothing)
    return tuple(family for family in _subclasses(ModelFamily)
                 if "MODEL_TYPES" in vars(family) and family.__module__.startswith(f"{__package__}."))


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def model_types() -> tuple[str, ...]:
    """Every model_type some family serves, family by family."""
    return _all("MODEL_TYPES")


def family_class(model_type: str) -> type[ModelFamily]:
    return _declaring("MODEL_TYPES", model_type)


def family_for(config: TrainConfig, device: torch.device | None) -> ModelFamily:
    """The family that serves `config.model_type`, for one run on `device` (nothing is loaded yet); None for a
    family that only answers the survey's questions."""
    return family_class(config.model_type)(config, device)


def compression_factors(config: TrainConfig) -> tuple[int, int]:
    """(spatial, temporal) factors applied before the VAE: 1 when the ratio is the VAE's own (or less)."""
    native = family_class(config.model_type).vae_compression(config.model_type)
    ratios = (config.video_config.spatial_compression_ratio, config.video_config.temporal_compression_ratio)
    return tuple(max(1, ratio // own) for ratio, own in zip(ratios, native))


def tiny_models() -> tuple[str, ...]:
    """The names of every family's tiny test models."""
    return _all("TINY_MODELS")


def tiny_model(model_type: str) -> str:
    """The tiny model that stands in for `model_type` in tests."""
    return family_class(model_type).tiny_model(model_type)


def tiny_family(name: str) -> type[ModelFamily]:
    return _declaring("TINY_MODELS", name)


def _all(attribute: str) -> tuple[str, ...]:
    return tuple(name for family in families() for name in getattr(family, attribute))


@cache  # asked per file while planning (compression_factors)
def _declaring(attribute: str, name: str) -> type[ModelFamily]:
    """The family whose `attribute` (MODEL_TYPES or TINY_MODELS) lists `name`."""
    for family in families():
        if name in getattr(family, attribute):
            return family
    raise ValueError(f"{name!r} is none of the {attribute} the families declare: {', '.join(_all(attribute))}")
