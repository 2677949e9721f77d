"""The fake CUDA runtime a dry run runs on: what PyTorch's CUDA build would provide, stood in for on a CPU-only build.

Fake tensors (no memory, no compute) can live on a "cuda" device in any build, but autograd asks the CUDA device guard
and hooks, which a CPU-only build lacks: a tiny C++ library registers do-nothing ones (c10's own FakeGuardImpl). It is
compiled once with the machine's C++ compiler and must be loaded before torch is imported, so a dry run runs in a
process of its own (child.py). The Python side of the CUDA API (streams, events, RNG state, memory figures, CUDA
generators) is patched for the run's duration (`cuda_stand_ins`); what these stand-ins cannot check is `NOT_COVERED`.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

NOT_COVERED = [
    "CUDA kernels: no value is computed on the device (fake tensors carry shapes, dtypes and devices only), so a "
    "kernel's own limits (flash attention's head sizes, fused optimizers' dtypes) are not exercised",
    "CUDA streams and events (layer offloading's copy stream): stood in for by objects that do nothing, so a missing "
    "wait between streams is not seen",
    "pinned host memory: a pinned copy is a plain host copy here, so pinning failures (or running out of pinnable "
    "memory) are not seen",
    "the CUDA random generators' state: stood in for by CPU generators of the same seed",
    "memory: no byte is allocated, so out-of-memory errors are `motiontune estimate`'s to predict; the free memory a "
    "sample's decode asks for is the --gpu-gb given",
    "the data pipeline before the VAE (decoding files, the cache on disk): it runs on the CPU in a real run too",
]

GUARD_SOURCE = r"""
#include <c10/core/impl/FakeGuardImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>

// motiontune's dry run: one fake CUDA device, so autograd can run on fake CUDA tensors in a CPU-only build.
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);

namespace {
struct DryRunCUDAHooks : public at::CUDAHooksInterface {
  DryRunCUDAHooks(at::CUDAHooksArgs) {}
  bool hasCUDA() const override { return true; }
  bool isAvailable() const override { return true; }
  bool isBuilt() const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  c10::DeviceIndex current_device() const override { return 0; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
};
}  // namespace

namespace at {
C10_REGISTER_TYPED_CLASS(CUDAHooksRegistry, "CUDAHooks", DryRunCUDAHooks);
}  // namespace at
"""


class DryRunError(Exception):
    """The dry run itself cannot start (no C++ compiler, a CUDA build of PyTorch without a GPU...)."""


def _torch_lib() -> Path:
    return Path(importlib.util.find_spec("torch").origin).parent / "lib"


def guard_library() -> Path | None:
    """The compiled fake CUDA guard for this PyTorch (built on first use), or None when PyTorch has CUDA itself."""
    import torch
    from torch.utils.cpp_extension import include_paths

    if torch.version.cuda is not None:
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "motiontune" / "fake_cuda" / torch.__version__
    library = cache / "fake_cuda.so"
    if library.is_file():
        return library
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise DryRunError("`motiontune check` on a CPU-only PyTorch builds a small library once and needs a C++ "
                          "compiler for it: install g++ (apt-get install g++), or set CXX to one")
    cache.mkdir(parents=True, exist_ok=True)
    source = cache / "fake_cuda.cpp"
    source.write_text(GUARD_SOURCE)
    partial = cache / f".fake_cuda.{os.getpid()}.so"
    command = [compiler, "-shared", "-fPIC", "-std=c++20", "-O1",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *(f"-I{path}" for path in include_paths()), str(source),
               f"-L{_torch_lib()}", "-lc10", "-ltorch_cpu", "-o", str(partial)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise DryRunError(f"building the fake CUDA library with {compiler} failed:\n{done.stderr[-2000:]}")
    os.replace(partial, library)
    return library


def preload(library: str | os.PathLike) -> None:
    """Load the fake CUDA library into this process; it must come before `import torch` (torch asks for the CUDA
    hooks once, as it starts)."""
    if "torch" in sys.modules:
        raise DryRunError("the fake CUDA library must be loaded before torch is imported")
    for name in ("libc10.so", "libtorch_cpu.so"):
        ctypes.CDLL(str(_torch_lib() / name), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)


_HIDDEN = ("/torch/", "/motiontune/check/", "contextlib.py", "<frozen")
_shown: dict = {}  # code object → its short path, or None where its frames are left out (asked once per code: every op asks)


def short_stack(skip: tuple[str, ...] = (), depth: int = 4) -> list[str]:
    """The innermost frames of the caller outside torch and this package, "path:line in function", innermost first."""
    frames, frame = [], sys._getframe(1)
    while frame is not None and len(frames) < depth:
        code = frame.f_code
        if skip:
            shown = None if any(part in code.co_filename for part in (*_HIDDEN, *skip)) else _short_path(code.co_filename)
        else:
            if code not in _shown:
                _shown[code] = None if any(part in code.co_filename for part in _HIDDEN) else _short_path(code.co_filename)
            shown = _shown[code]
        if shown is not None:
            frames.append(f"{shown}:{frame.f_lineno} in {code.co_name}")
        frame = frame.f_back
    return frames


def _short_path(path: str) -> str:
    for marker in ("/site-packages/", "/motiontune/", "/tests/"):
        if marker in path:
            head = marker.strip("/") + "/" if marker != "/site-packages/" else ""
            return head + path.split(marker, 1)[1]
    return path


class _NullStream:
    """torch.cuda.Stream / current_stream: nothing is queued, so nothing waits."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullEvent(_NullStream):
    def record(self, *args):
        pass

    def wait(self, *args):
        pass


def dry_generator_class():
    """torch.Generator whose `device` says what it was made for: a CPU generator underneath (a CPU-only build has no
    CUDA generator), so a dry run can see one made for the CPU being used for CUDA noise."""
    import torch

    class DryGenerator(torch.Generator):
        def __new__(cls, device="cpu"):
            return super().__new__(cls, "cpu")

        def __init__(self, device="cpu"):
            self._device = torch.device(device)
            if self._device.type == "cuda" and self._device.index is None:
                self._device = torch.device("cuda", 0)
            self.origin = short_stack()

        @property
        def device(self):
            return self._device

    return DryGenerator


@contextlib.contextmanager
def cuda_stand_ins(free_bytes: int):
    """torch.cuda's Python API as a one-GPU machine answers it, for the duration of a dry run."""
    import torch

    state = lambda *args, **kwargs: torch.zeros(16, dtype=torch.uint8)  # noqa: E731  (a CUDA RNG state is a CPU tensor)
    patches = {
        "is_available": lambda: True, "_lazy_init": lambda: None, "is_initialized": lambda: True,
        "current_device": lambda: 0, "device_count": lambda: 1, "is_bf16_supported": lambda *a, **k: True,
        "get_rng_state": state, "get_rng_state_all": lambda: [state()], "set_rng_state": lambda *a, **k: None,
        "set_rng_state_all": lambda *a, **k: None, "manual_seed": lambda *a: None, "manual_seed_all": lambda *a: None,
        "Stream": _NullStream, "Event": _NullEvent, "current_stream": lambda *a, **k: _NullStream(),
        "stream": lambda *a, **k: contextlib.nullcontext(), "empty_cache": lambda: None, "synchronize": lambda *a: None,
        "mem_get_info": lambda *a: (free_bytes, free_bytes), "memory_allocated": lambda *a: 0,
        "memory_reserved": lambda *a: 0, "max_memory_allocated": lambda *a: 0, "reset_peak_memory_stats": lambda *a: None,
    }
    saved = {name: getattr(torch.cuda, name, None) for name in patches}
    generator = torch.Generator
    try:
        for name, value in patches.items():
            setattr(torch.cuda, name, value)
        torch.Generator = dry_generator_class()
        yield
    finally:
        torch.Generator = generator
        for name, value in saved.items():
            if value is None:
                delattr(torch.cuda, name)
            else:
                setattr(torch.cuda, name, value)


def describe_error(error: BaseException) -> str:
    """An exception as one line, with the innermost motiontune frame it came through."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/motiontune/" in f.filename
              and "/motiontune/check/" not in f.filename]
    where = f" (at {_short_path(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}{where}"
