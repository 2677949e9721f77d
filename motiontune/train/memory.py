"""Fitting a run into less device memory, and time: how block activations are kept (gradient checkpointing, on
the device or in host memory), which blocks' frozen weights wait in host memory and stream in (layer
offloading), FLOAT_8 / NFLOAT_4 storage of frozen Linear weights (util/quantize.py), and compiled blocks.

Everything works on the transformer's blocks (`family.fsdp_units`), so a family needs nothing new.
"""

from __future__ import annotations

import logging
import math

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..config import ConfigError, TrainConfig
from ..config.schema import MemoryPlan
# QuantizedLinear, tensor_bytes: read here by tests, benchmarks and estimate
from ..util.quantize import QUANTIZED, QuantizedLinear, module_bytes, quantize_frozen_linears, tensor_bytes  # noqa: F401
from ..util import low_precision

log = logging.getLogger("motiontune")


def prepare_memory(family, expert, config: TrainConfig, device: torch.device) -> "BlockOffloader | None":
    """Apply `expert`'s memory options. Call after the method wrapped it (LoRA) and before it moves to the
    device: quantized and offloaded weights then never sit on the device whole."""
    plan = MemoryPlan.of(config, expert.name)
    blocks = family.fsdp_units(expert.module)
    if plan.weight_dtype in QUANTIZED:
        before = module_bytes(expert.module)
        count = quantize_frozen_linears(blocks, plan.weight_dtype, device)
        log.info("%s: %d frozen Linear layers stored as %s (%.0f MB → %.0f MB)", expert.name, count, plan.weight_dtype,
                 before / 1e6, module_bytes(expert.module) / 1e6)
    if plan.compute_dtype:
        _low_precision_compute(expert, blocks, plan.compute_dtype, config, device)
    if plan.checkpointing != "OFF":
        host = HostCheckpoint(device) if plan.checkpointing == "CPU_OFFLOADED" else None
        expert.module.enable_gradient_checkpointing(**({"gradient_checkpointing_func": host} if host else {}))
        expert.module._motiontune_host_checkpoint = host  # its byte count, for logs and tests
    offloader = None
    if plan.offload_fraction > 0:
        offloader = BlockOffloader(blocks, plan.offload_fraction, plan.prefetch, device)
        log.info("%s: %d of %d blocks offloaded to host memory (at most %d of them on the device at once)", expert.name,
                 len(offloader.offloaded), len(blocks), offloader.prefetch)
    log.info("%s: gradient checkpointing %s", expert.name, plan.checkpointing)
    return offloader


def _low_precision_compute(expert, blocks, kind: str, config: TrainConfig, device: torch.device) -> None:
    """The blocks' Linear matmuls in float8 / int8 (util/low_precision.py), refused where the device cannot run them."""
    key = f"{expert.name}.compute_dtype"
    problem = low_precision.device_problem(kind, device, key)
    if problem:
        raise ConfigError(problem)
    count = low_precision.convert_linears(blocks, kind)
    what = "frozen base Linear layers" if config.training_method != "FINE_TUNE" else "Linear layers"
    emulated = " (torchao's emulate mode: fp8 rounding, high-precision matmuls)" \
        if kind == "FLOAT_8" and low_precision.fp8_emulated() else ""
    log.info("%s: %d %s compute in %s%s; their weights stay %s", expert.name, count, what, kind, emulated,
             config.train_dtype)
    if device.type == "cuda" and not config.compile:
        log.info("%s: %s compute is fastest with compile: true (torch.compile fuses torchao's scaling and casts)",
                 expert.name, kind)


def compile_blocks(family, expert) -> None:
    """torch.compile each transformer block in place (after sharding, as FSDP2 wants). The blocks share their
    code, so the first step compiles one graph for all of them (and again for each new latent shape)."""
    blocks = family.fsdp_units(expert.module)
    for block in blocks:
        block.compile()
    log.info("%s: %d blocks compiled with torch.compile (the first step and each new clip shape compile)",
             expert.name, len(blocks))


# --- CPU_OFFLOADED checkpointing -------------------------------------------------------------------------


class HostCheckpoint:
    """Block checkpointing whose saved block inputs wait in (pinned) host memory: diffusers calls this in
    place of `torch.utils.checkpoint.checkpoint(block, *args)`. Only tensors a block receives are moved;
    those a caller keeps anyway (text states, rotary tables) cost a host copy and save nothing."""

    def __init__(self, device: torch.device):
        self.device = device
        self.anchor = torch.empty((), requires_grad=True)  # makes backward reach blocks whose inputs need no grad
        self.host_bytes = 0  # bytes of block inputs held in host memory now (bookkeeping for logs and tests)
        self.peak_host_bytes = 0

    def __call__(self, function, *args, **kwargs):
        def run(*inputs):
            return function(*inputs, **kwargs)

        return _HostCheckpointFunction.apply(run, self, self.anchor, *args)


class _HostCheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, owner, anchor, *args):
        ctx.run, ctx.owner = run, owner
        ctx.device_type = owner.device.type
        ctx.autocast = (torch.is_autocast_enabled(ctx.device_type), torch.get_autocast_dtype(ctx.device_type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(owner.device) if ctx.device_type == "cuda" else None
        ctx.grad_wanted = [torch.is_tensor(a) and a.requires_grad for a in args]
        pin = ctx.device_type == "cuda"
        stored, ctx.stored_bytes = [], 0
        for a in args:
            if torch.is_tensor(a) and a.device.type != "cpu":
                host = torch.empty(a.shape, dtype=a.dtype, pin_memory=pin)
                host.copy_(a.detach(), non_blocking=pin)  # the host buffer is read only after the copy stream-wise
                ctx.stored_bytes += tensor_bytes(host)
                a = host
            elif torch.is_tensor(a):
                a = a.detach()  # already in host memory (training on the CPU): kept as it is
                ctx.stored_bytes += tensor_bytes(a)
            stored.append(a)
        ctx.stored = stored
        owner.host_bytes += ctx.stored_bytes
        owner.peak_host_bytes = max(owner.peak_host_bytes, owner.host_bytes)
        with torch.no_grad():
            return run(*args)

    @staticmethod
    def backward(ctx, *grads):
        device = ctx.owner.device
        inputs = []
        for a, wanted in zip(ctx.stored, ctx.grad_wanted):
            if torch.is_tensor(a):
                a = a.to(device, non_blocking=True).detach().requires_grad_(wanted)
            inputs.append(a)
        ctx.owner.host_bytes -= ctx.stored_bytes
        ctx.stored = None
        rng_devices = [device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=rng_devices), torch.enable_grad(), \
                torch.autocast(ctx.device_type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            torch.set_rng_state(ctx.cpu_rng)  # dropout draws as in the forward pass
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, device)
            outputs = ctx.run(*inputs)
        outputs = (outputs,) if torch.is_tensor(outputs) else tuple(outputs)
        pairs = [(o, g) for o, g in zip(outputs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, *(a.grad if torch.is_tensor(a) and wanted else None
                                    for a, wanted in zip(inputs, ctx.grad_wanted)))


# --- layer offloading ------------------------------------------------------------------------------------


class BlockOffloader:
    """`fraction` of the blocks keep their frozen weights in host memory; each is brought to the device just
    before its forward (and again for its recomputation in backward) and dropped when the run has moved on.
    At most `prefetch` offloaded blocks are on the device at once: the one computing and the next ones,
    copied ahead on a side stream on CUDA. Trainable parameters (LoRA) never move.

    On the CPU the same bookkeeping runs: an offloaded block's weights are swapped for empty placeholders,
    so a block used while not loaded fails at once instead of silently computing."""

    def __init__(self, blocks: list[torch.nn.Module], fraction: float, prefetch: int, device: torch.device):
        self.blocks, self.device = blocks, device
        count = math.floor(fraction * len(blocks) + 1e-9)
        # spread out, so resident blocks compute while the next offloaded one is copied
        self.offloaded = sorted({int(i * len(blocks) / count) for i in range(count)}) if count else []
        self.prefetch = max(1, prefetch)
        self.resident: set[int] = set()  # offloaded blocks on the device now
        self.max_resident = 0
        self.loads = 0
        self._last, self._direction = None, 1
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self._ready: dict[int, torch.cuda.Event] = {}
        # (module, "_parameters" | "_buffers", name, host copy) for every frozen tensor of an offloaded block
        self.host: dict[int, list] = {}
        for i in self.offloaded:
            entries = []
            for module in blocks[i].modules():
                for kind in ("_parameters", "_buffers"):
                    for name, tensor in getattr(module, kind).items():
                        if tensor is None or (kind == "_parameters" and tensor.requires_grad):
                            continue
                        host = tensor.detach().to("cpu")
                        entries.append((module, kind, name, host.pin_memory() if cuda else host))
            self.host[i] = entries
            self._drop(i)
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda module, args, i=i: self.before(i))

    @property
    def resident_blocks(self) -> int:
        """Blocks whose weights are on the device now: the ones never offloaded and the offloaded ones loaded."""
        return len(self.blocks) - len(self.offloaded) + len(self.resident)

    def before(self, i: int) -> None:
        """Block `i` is about to run: make it resident, start loading the next ones, drop the rest."""
        if self._last is not None and i != self._last:
            self._direction = 1 if i > self._last or i == 0 else -1  # forward, or checkpointed backward
        self._last = i
        wanted = [i] if i in self.offloaded else []
        upcoming = [j for j in self.offloaded if (j - i) * self._direction > 0]
        upcoming.sort(key=lambda j: abs(j - i))
        wanted += upcoming[: self.prefetch - len(wanted)]
        for j in list(self.resident):
            if j not in wanted:
                self._drop(j)
        for j in wanted:
            if j not in self.resident:
                self._load(j)
        copied = self._ready.pop(i, None)  # an event until the block's first use after loading
        if copied is not None:
            torch.cuda.current_stream(self.device).wait_event(copied)
        self.max_resident = max(self.max_resident, self.resident_blocks)

    def _load(self, i: int) -> None:
        self.loads += 1
        self.resident.add(i)
        if self.copy_stream is None:
            copies = [(entry, entry[3].to(self.device)) for entry in self.host[i]]
        else:
            # memory taken on the compute stream; the copy starts once work queued before it is done. A quantized
            # weight that is a tensor subclass (torchao's NF4) moves whole on the compute stream: its empty_like
            # leaves its lookup table in host memory, which its dequantization then indexes with device codes
            copies = [(entry, entry[3].to(self.device) if is_traceable_wrapper_subclass(entry[3])
                       else torch.empty_like(entry[3], device=self.device)) for entry in self.host[i]]
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                for entry, target in copies:
                    if not is_traceable_wrapper_subclass(entry[3]):
                        target.copy_(entry[3], non_blocking=True)
                self._ready[i] = torch.cuda.Event()
                self._ready[i].record(self.copy_stream)
        for (module, kind, name, _), tensor in copies:
            _put(module, kind, name, tensor)

    def _drop(self, i: int) -> None:
        self.resident.discard(i)
        self._ready.pop(i, None)
        for module, kind, name, host in self.host[i]:
            _put(module, kind, name, torch.empty(0, dtype=host.dtype, device=self.device))


def _put(module: torch.nn.Module, kind: str, name: str, tensor: torch.Tensor) -> None:
    """Swap a frozen parameter or buffer (a new Parameter object: tensor subclasses such as NF4 too)."""
    if kind == "_parameters":
        tensor = torch.nn.Parameter(tensor, requires_grad=False)
    getattr(module, kind)[name] = tensor
