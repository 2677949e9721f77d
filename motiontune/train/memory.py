"""Fitting a run into less device memory: how block activations are kept (gradient checkpointing, on the
device or in host memory), which blocks' frozen weights wait in host memory and stream in (layer
offloading), and FLOAT_8 / NFLOAT_4 storage of frozen Linear weights.

Everything works on the transformer's blocks (`family.fsdp_units`), so a family needs nothing new.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import TrainConfig

log = logging.getLogger("motiontune")

QUANTIZED = ("FLOAT_8", "NFLOAT_4")
FLOAT8_MAX = 448.0  # the largest float8_e4m3fn value
NF4_BLOCK = 64  # values per NF4 scale
# Linear layers whose names contain these keep the train dtype: modulation (AdaLN) and norm projections
# steer every token's scale and shift, and are small.
KEEP_PRECISION = ("norm", "modulation", "adaln")


@dataclass(frozen=True)
class MemoryPlan:
    """The memory options of one transformer part, read from either of OneTrainer's config forms."""

    checkpointing: str  # OFF | ON | CPU_OFFLOADED
    offload_fraction: float  # of the blocks whose frozen weights live in host memory
    prefetch: int  # offloaded blocks allowed on the device at once (the one computing and those loading)
    weight_dtype: str  # the part's weight dtype name (FLOAT_8 / NFLOAT_4: quantized storage)

    @property
    def offloads(self) -> bool:
        """Whether anything waits in host memory (block weights or checkpointed inputs)."""
        return self.offload_fraction > 0 or self.checkpointing == "CPU_OFFLOADED"

    @classmethod
    def of(cls, config: TrainConfig, part_name: str = "transformer") -> "MemoryPlan":
        part = getattr(config, part_name)
        if part.gradient_checkpointing is not None:  # the newer, per-part form
            checkpointing = "OFF" if not part.gradient_checkpointing else "CPU_OFFLOADED" if part.activation_offloading else "ON"
        else:
            checkpointing = config.gradient_checkpointing or "OFF"
            if part.activation_offloading and checkpointing != "OFF":
                checkpointing = "CPU_OFFLOADED"
        fraction = part.offload_fraction or config.layer_offload_fraction or 0.0
        if fraction > 0 and checkpointing == "OFF":
            # without recomputation, backward would keep every block's weights alive on the device
            checkpointing = "ON"
        return cls(checkpointing, fraction, config.layer_offload_prefetch, part.weight_dtype or config.train_dtype)


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


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, counting what quantized tensors really store."""
    return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))


def tensor_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):  # a tensor subclass (NF4): the sum of its inner tensors
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


# --- FLOAT_8 / NFLOAT_4 weights --------------------------------------------------------------------------


def quantize_frozen_linears(blocks: list[torch.nn.Module], kind: str, device: torch.device) -> int:
    """Replace the frozen Linear layers of `blocks` (a LoRA's base layers included) with quantized ones.
    Each weight is quantized on `device` (fast) and returned to where it was."""
    count = 0
    for block in blocks:
        for name, module in list(block.named_modules()):
            if not isinstance(module, torch.nn.Linear) or module.weight.requires_grad:
                continue
            if any(word in name.lower() for word in KEEP_PRECISION):
                continue
            if kind == "NFLOAT_4" and module.weight.numel() % NF4_BLOCK:
                continue  # NF4 quantizes whole blocks of 64 values; real models' layers always divide
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, child, QuantizedLinear(module, kind, device))
            count += 1
    return count


class QuantizedLinear(torch.nn.Module):
    """A frozen Linear stored in 8 bits (float8 e4m3 with one float32 scale per output row) or 4 bits
    (torchao's NF4), dequantized block by block in the compute dtype. Backward keeps the small stored
    weight, not a dequantized copy, so checkpointing OFF saves as much as ON."""

    def __init__(self, linear: torch.nn.Linear, kind: str, device: torch.device):
        super().__init__()
        self.in_features, self.out_features, self.kind = linear.in_features, linear.out_features, kind
        home = linear.weight.device
        weight = linear.weight.detach().to(device)
        if kind == "FLOAT_8":
            scale = weight.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FLOAT8_MAX
            self.register_buffer("weight_fp8", (weight.float() / scale).to(torch.float8_e4m3fn).to(home))
            self.register_buffer("weight_scale", scale.to(home))
        else:
            nf4 = _torchao_nf4()
            # NF4 blocks of 64 values, their scales in 8 bits per group of 256 (QLoRA's double quantization);
            # smaller groups where a small layer's block count needs them
            scaler_group = math.gcd(weight.numel() // NF4_BLOCK, 256)
            quantized = nf4.to_nf4(weight.to(torch.bfloat16), NF4_BLOCK, scaler_group)
            self.weight_nf4 = torch.nn.Parameter(quantized.to(home), requires_grad=False)
        self.bias = linear.bias  # frozen, in the train dtype
        # no plain weight: code that casts its input to `layer.weight.dtype` when the weight is a tensor (T5's
        # feed-forward) then leaves the input in the compute dtype
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "FLOAT_8":
            out = _Float8Linear.apply(x, self.weight_fp8, self.weight_scale)
        else:
            out = _torchao_nf4().linear_nf4(x, self.weight_nf4)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.kind == "FLOAT_8":
            return _dequantize_fp8(self.weight_fp8, self.weight_scale, dtype)
        return self.weight_nf4.get_original_weight().to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.to(torch.float32) * scale).to(dtype)


class _Float8Linear(torch.autograd.Function):
    """x @ W^T with W stored in float8; saves the float8 weight for backward (a quarter of float32's bytes)."""

    @staticmethod
    def forward(ctx, x, weight, scale):
        dtype = _compute_dtype(x)
        ctx.save_for_backward(weight, scale)
        ctx.dtype = dtype
        return F.linear(x.to(dtype), _dequantize_fp8(weight, scale, dtype))

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        return grad.to(ctx.dtype) @ _dequantize_fp8(weight, scale, ctx.dtype), None, None


def _torchao_nf4():
    """torchao's NF4 tensor (pure PyTorch: runs on the CPU and on CUDA; bitsandbytes' 4-bit path in
    diffusers refuses to run without a GPU). Its optional CUDA kernels log noise on import: silenced."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor

    return nf4_tensor


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
            # memory taken on the compute stream; the copy starts once work queued before it is done
            copies = [(entry, torch.empty_like(entry[3], device=self.device)) for entry in self.host[i]]
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                for entry, target in copies:
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
