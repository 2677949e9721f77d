"""`torch`, imported when a function first uses it rather than when a module that names it is imported.

The family modules and the data modules are read for a few facts long before any model runs (`motiontune inspect`
asks a family for its VAE compression and frame rule); importing torch, and with it what it pulls in, would cost
those commands seconds. A module writes `from ..util.lazy import torch` and uses `torch` as usual inside its
functions; what runs at import time (decorators, base classes, default values) must not touch it, so functions use
`@no_grad` below instead of `@torch.no_grad()`. tests/test_large_datasets.py checks that inspect stays torch-free.
"""

from __future__ import annotations

import functools
import importlib


class LazyModule:
    """Stands for the module `name`, imported on the first attribute asked of it."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str):  # only called for what is not yet in this object's __dict__
        value = getattr(importlib.import_module(self._name), attribute)
        setattr(self, attribute, value)  # the next access is a plain attribute lookup
        return value

    def __repr__(self) -> str:
        return f"<lazily imported module {self._name!r}>"


torch = LazyModule("torch")


def no_grad(function):
    """`@torch.no_grad()`, with torch imported when the function runs."""

    @functools.wraps(function)
    def without_grad(*args, **kwargs):
        with torch.no_grad():
            return function(*args, **kwargs)

    return without_grad
