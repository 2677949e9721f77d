"""Memory of a computation measured on fake tensors: shapes and dtypes, no data, no compute.

A module's parameters are swapped for fake ones (`fakeify`), the computation runs under PyTorch's `FakeTensorMode`,
and `LiveBytes` adds up the storage bytes of every tensor alive at each moment and keeps the peak. Sampling asks
this (models/wan_decode.py: whether a decode fits); `motiontune estimate` measures whole training steps with it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

# torchao unpacks an NF4 weight inside its tensor subclass, out of a dispatch mode's sight: 14 bytes per weight
# of that layer at that moment (two int64 index tensors, the looked-up values, the scaled halves, the bf16 weight;
# measured on the CPU)
NF4_UNPACK_BYTES_PER_WEIGHT = 14

# matrix products torch's CPU build hands to oneDNN in half precision; oneDNN compiles a kernel for each new shape
# and keeps it (`LiveBytes.matmuls` collects the shapes: motiontune/estimate counts what the kernels take)
_ONEDNN_MATMULS = ("mm", "addmm", "bmm", "baddbmm")
_HALF = (torch.bfloat16, torch.float16)
_DEVICE = torch.ops.prim.device.default


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Adds up the storage bytes of every tensor created while active and still alive; keeps the peak.

    An op whose tensor arguments are all real runs for real, outside the fake mode: families unpack the header of
    a cached text tensor (`.tolist()`), which a fake tensor cannot answer. Factory ops (no tensor argument) and
    anything touching a fake tensor stay fake."""

    all_ops = 0  # ops dispatched by every tracker of this process (tests count an estimate's work with it)

    def __init__(self, existing=()):
        super().__init__()
        self.bytes: dict[int, int] = {}
        self.refs: dict[int, object] = {}
        self.current = self.peak = 0
        self.matmuls: set = set()  # the distinct half-precision matrix products run: (op, shapes and layouts, ...)
        self.ops = 0  # ops dispatched while active: the work a simulation did (its time is about proportional)
        for tensor in existing:
            self._track(tensor, count=False)

    def _track(self, tensor: torch.Tensor, count: bool = True) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a wrapper subclass (NF4): its inner tensors are counted
            return
        key = id(storage)
        if key in self.bytes:
            return
        size = storage.nbytes() if count else 0
        self.bytes[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)

        def gone(_, key=key):
            self.current -= self.bytes.pop(key, 0)
            self.refs.pop(key, None)

        self.refs[key] = weakref.ref(storage, gone) if count else storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        LiveBytes.all_ops += 1
        if func is _DEVICE:  # asked of a tensor at almost every op (autograd, autocast): makes no tensor
            return func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        tensors = [t for t in torch.utils._pytree.tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func.overloadpacket.__name__ in _ONEDNN_MATMULS and tensors and tensors[0].dtype in _HALF:
            self.matmuls.add((func, tuple((tuple(t.shape), t.is_contiguous()) for t in tensors),
                              tuple(sorted(kwargs))))
        for arg in tensors:
            if type(arg).__name__ == "NF4Tensor":
                self.peak = max(self.peak, self.current + NF4_UNPACK_BYTES_PER_WEIGHT * arg.numel())
        if tensors and not any(isinstance(t, FakeTensor) or hasattr(t, "__tensor_flatten__") for t in tensors):
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for tensor in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out


def fakeify(module: torch.nn.Module, mode: FakeTensorMode) -> None:
    """Swap every parameter and buffer for a fake CPU tensor of the same shape and dtype (no memory)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                with mode:
                    fake = torch.empty(param.shape, dtype=param.dtype)
                sub._parameters[name] = torch.nn.Parameter(fake, requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                with mode:
                    sub._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)


def storage_bytes(tensors) -> int:
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors if isinstance(t, torch.Tensor)}
    return sum(storages.values())


@contextlib.contextmanager
def quiet(logger_name: str = "motiontune", least: int = logging.WARNING):
    """peft and diffusers chatter (and the named logger's lines below `least`: by default the trainer's own info
    lines) while models are built for counting or checking."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(least)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


_NO_GRAD: dict = {}


def simulate_no_grad(key, build, inputs, method) -> int:
    """Peak bytes of the tensors a no-grad call makes (encoders, sampling) on a fake copy of a module, the module's
    own weights and the inputs not counted. `key` caches the answer (for the process, and on disk: util/sim_cache.py)."""
    from ..util.sim_cache import cached

    if key not in _NO_GRAD:
        _NO_GRAD[key] = cached("no_grad", key, lambda: _simulate_no_grad(build, inputs, method))
    return _NO_GRAD[key]


def _simulate_no_grad(build, inputs, method) -> int:
    model = build()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakeify(model, mode)
    with mode:
        args = inputs()
    tracker = LiveBytes([*model.parameters(), *model.buffers(), *args])
    with mode, tracker, torch.no_grad(), quiet():
        method(model, *args)
    return tracker.peak


def init_kwargs(cfg: dict, cls) -> dict:
    """The keys of a config.json that a diffusers class's __init__ takes (files also carry _class_name, ...)."""
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters)
    return {k: v for k, v in cfg.items() if k in accepted}
