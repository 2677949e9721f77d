"""FLOAT_8 / INT_8 compute (`compute_dtype`): the Linear matmuls inside a transformer's blocks run in float8 or int8
through torchao's training recipes, while the weights themselves stay in the train dtype. Used on the transformers
a run trains (train/memory.py) and in `estimate`'s simulated step.

- FLOAT_8: torchao's float8 training (`torchao.float8`), its TENSORWISE recipe (its default and fastest: one dynamic
  scale per tensor, cuBLAS's fp8 kernel), e4m3 for inputs and weights, e5m2 for gradients. Needs compute capability
  8.9+ (Ada, Hopper, Blackwell). `MOTIONTUNE_EMULATE_FP8=1` runs torchao's emulate mode instead (the fp8 rounding,
  then a high-precision matmul) on any device: for tests and debugging, never faster.
- INT_8: torchao's int8 mixed-precision training (`torchao.prototype.quantized_training`): both operands of each
  matmul (forward, input gradient, and the weight gradient of a fine-tune) are quantized per row to int8 with a
  float scale, multiplied as integers and scaled back (W8A8 with dynamic activation scales).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from .quantize import KEEP_PRECISION

COMPUTE_DTYPES = ("FLOAT_8", "INT_8")
EMULATE_ENV = "MOTIONTUNE_EMULATE_FP8"
# fp8 and int8 kernels take matrices whose sides are multiples of 16 (cuBLAS's fp8 gemm, torch._int_mm's int8 one)
ALIGN = 16


def fp8_emulated() -> bool:
    return os.environ.get(EMULATE_ENV, "") not in ("", "0")


def device_problem(kind: str, device: torch.device, key: str) -> str | None:
    """Why `kind` compute cannot run on `device` (None when it can), in words naming `key`."""
    if kind == "FLOAT_8":
        if fp8_emulated():
            return None
        if device.type != "cuda":
            return (f"{key} = FLOAT_8: float8 matmuls need an NVIDIA GPU of compute capability 8.9 or later (RTX 40xx, "
                    f"L4/L40, H100, B200), and this run trains on {device.type}; remove {key} (or set it to INT_8 "
                    f"on the CPU)")
        if older := _older_card(device, (8, 9)):
            return (f"{key} = FLOAT_8: float8 matmuls need compute capability 8.9 or later (RTX 40xx, L4/L40, H100, "
                    f"B200); {older}. Set {key} to INT_8 (compute capability 8.0+) or remove it")
        return None
    if device.type == "cuda":
        if older := _older_card(device, (8, 0)):
            return (f"{key} = INT_8: torchao's int8 matmul kernel needs compute capability 8.0 or later (RTX 30xx, "
                    f"A100 and newer) to use int8 tensor cores; {older}, where it would be slower than bf16. "
                    f"Remove {key}")
        return None
    if device.type != "cpu":
        return f"{key} = INT_8: int8 matmuls run on NVIDIA GPUs and the CPU, not on {device.type}; remove {key}"
    return None


def _older_card(device: torch.device, needed: tuple[int, int]) -> str | None:
    """"<card> has <capability>" when the card's compute capability is below `needed`, else None."""
    capability = torch.cuda.get_device_capability(device)
    if capability >= needed:
        return None
    return f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}"


def _torchao():
    logging.getLogger("torchao").setLevel(logging.ERROR)  # its optional CUDA kernels log noise on import
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear
    from torchao.prototype.quantized_training.int8_mixed_precision import (
        Int8MixedPrecisionTrainingConfig, Int8MixedPrecisionTrainingLinear)

    return Float8Linear, Float8LinearConfig, Int8MixedPrecisionTrainingLinear, Int8MixedPrecisionTrainingConfig


def _in_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """torchao's float8 Linear casts its input to CUDA's autocast dtype only, and its int8 one to none: cast it as
    F.linear would under the autocast of the input's own device (the CPU in tests and in estimate's simulation)."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(device))
    return x


def low_precision_classes():
    Float8Linear, _, Int8Linear, _ = _torchao()

    class LowPrecisionFloat8Linear(Float8Linear):
        def forward(self, x):
            return super().forward(_in_autocast_dtype(x))

    class LowPrecisionInt8Linear(Int8Linear):
        def forward(self, x):
            return super().forward(_in_autocast_dtype(x))

    return LowPrecisionFloat8Linear, LowPrecisionInt8Linear


_CLASSES = None


def _classes():
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = low_precision_classes()
    return _CLASSES


def is_low_precision(module: torch.nn.Module) -> bool:
    return isinstance(module, _classes())


def convert_linears(blocks: list[torch.nn.Module], kind: str, emulate: bool | None = None) -> int:
    """Swap the Linear layers inside `blocks` for torchao's `kind` ones (same weight and bias objects, so optimizers,
    FSDP and saved state dicts see the same parameters). LoRA adapters (peft's lora_A / lora_B and the other adapter
    kinds' layers) keep the train dtype; so do norm and modulation projections, as with FLOAT_8 storage, and layers
    whose sides are not multiples of 16 (the kernels' tiles). Returns how many layers now compute in `kind`."""
    _, Float8LinearConfig, _, Int8Config = _torchao()
    float8_class, int8_class = _classes()
    emulate = fp8_emulated() if emulate is None else emulate
    if kind == "FLOAT_8":
        config = Float8LinearConfig.from_recipe_name("tensorwise")
        if emulate:
            config = dataclasses.replace(config, emulate=True)
        # what torchao's convert_to_float8_training does first: its fix of an inductor fp8 miscompile (compile: true)
        from torchao.float8._inductor_patch import _patch_inductor_min_max_codegen

        _patch_inductor_min_max_codegen()
    else:
        config = Int8Config(module_swap=True)
    count = 0
    for block in blocks:
        for name, module in list(block.named_modules()):
            if type(module) is not torch.nn.Linear:  # plain Linears only: not a quantized or already swapped one
                continue
            lowered = name.lower()
            if any(word in lowered for word in KEEP_PRECISION) or "lora_" in lowered or "hada_" in lowered \
                    or "lokr_" in lowered:
                continue
            if module.in_features % ALIGN or module.out_features % ALIGN:
                continue
            if kind == "FLOAT_8":
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, child, float8_class.from_float(module, config=config))
            else:
                module.__class__ = int8_class  # torchao's own module swap: the same object, its forward changed
                module.config = config
            count += 1
    return count
