"""The model families (one module each) and the registry that finds the one serving a `model_type`."""

from .base import ModelFamily, SampleRequest
from .loading import ModelLoadError
from .registry import compression_factors, family_class, family_for, model_types

__all__ = ["ModelFamily", "ModelLoadError", "SampleRequest", "compression_factors", "family_class", "family_for",
           "model_types"]
