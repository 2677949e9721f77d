"""What a CUDA run holds that the CPU simulation does not see, and the headroom "fits" keeps.

The simulation already runs, as a GPU run does: autocast (its cache keeps one bf16 copy of each float32 trained
weight, a LoRA's, for the whole forward; float32 frozen modules are cast per use), and train/memory.py's FLOAT_8 /
NFLOAT_4 layers with their dequantized copy of one layer at a time. Outside its sight:
- the CUDA context with the kernels it loads, and cuBLAS / cuDNN handles with their workspaces: a fixed allowance;
- flash / memory-efficient attention's backward keeps a float32 accumulator for dQ (and a float32 row statistic)
  beside the tensors it returns, which the CPU's kernel does not;
- the caching allocator: freed blocks stay reserved for reuse, and a block split for a smaller tensor cannot hold
  a larger one, so the memory a step reserves exceeds the bytes alive at its peak. PyTorch's own figures
  (`max_memory_reserved` / `max_memory_allocated`) for transformer training run about 1.05-1.3; the weights and
  optimizer state are allocated once and tightly, so the share is taken of what comes and goes: activations.
"""

from __future__ import annotations

from .result import GB, Line, Shape

CONTEXT = int(0.5 * GB)  # CUDA context, cuBLAS/cuDNN handles and workspaces (0.3-0.6 GB on recent drivers)
FRAGMENTATION = 0.15  # reserved beyond the bytes alive, as a share of the step's activations
HEADROOM = 0.05  # the share of a card "fits" leaves free: other programs, the display, allocator spikes


def context_line() -> Line:
    return Line("CUDA context + libraries' workspaces", CONTEXT, 0, "not tensors; an allowance")


def step_lines(shape: Shape, cfg: dict, activations: int) -> list[Line]:
    """The CUDA terms of a training step whose activations peak at `activations` bytes."""
    inner = cfg.get("num_attention_heads", 0) * cfg.get("attention_head_dim", 0)
    attention = 4 * shape.batch * shape.tokens * inner  # float32 dQ accumulator of the attention in backward
    reserve = int(FRAGMENTATION * (activations + attention))
    return [context_line(),
            Line("attention backward workspace", attention, 0, "flash / memory-efficient kernels' float32 dQ"),
            Line("allocator fragmentation + reserve", reserve, 0, f"{FRAGMENTATION:.0%} of the activations")]
