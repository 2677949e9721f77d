"""FLOAT_8 / NFLOAT_4 storage of frozen Linear weights, and what tensors really store. Used on the
transformers a run trains (train/memory.py) and on WAN's text encoder (models/wan.py)."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

QUANTIZED = ("FLOAT_8", "NFLOAT_4")
FLOAT8_MAX = 448.0  # the largest float8_e4m3fn value
NF4_BLOCK = 64  # values per NF4 scale
# Linear layers whose names contain these keep the train dtype: modulation (AdaLN) and norm projections
# steer every token's scale and shift, and are small.
KEEP_PRECISION = ("norm", "modulation", "adaln")


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, counting what quantized tensors really store."""
    return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))


def tensor_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):  # a tensor subclass (NF4): the sum of its inner tensors
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


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
