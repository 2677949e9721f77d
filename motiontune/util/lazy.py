"""torch, numpy and PyAV, imported when a function first uses them rather than when a module that names them is
imported.

The family modules and the data modules are read for a few facts long before anything is decoded or any model runs:
`motiontune inspect` of an unchanged folder plans from the stored probes and asks the family for its VAE compression
and frame rule. Importing torch (and what it pulls in) would cost that command seconds, numpy and PyAV a fifth of
what is left. A module writes `from ..util.lazy import np, torch` and uses them as usual inside its functions; what
runs at import time (decorators, base classes, default values) must not touch them, so functions use `@no_grad`
below instead of `@torch.no_grad()`. tests/test_large_datasets.py checks that inspect imports none of them.
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
np = LazyModule("numpy")
av = LazyModule("av")


def no_grad(function):
    """`@torch.no_grad()`, with torch imported when the function runs."""

    @functools.wraps(function)
    def without_grad(*args, **kwargs):
        with torch.no_grad():
            return function(*args, **kwargs)

    return without_grad
