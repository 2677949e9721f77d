"""The estimate of one training step at its peak, part by part, and (`phases`) of the other moments of a run."""

from __future__ import annotations

import math
from dataclasses import replace

from ..config import TrainConfig
from . import cuda
from .configs import DTYPES, family, load_dtype, transformer_config
from .moments import other_phases, text_encoder_lines, text_live
from .result import GB, QUANTIZED, Estimate, Line, Options, Shape
from .shapes import config_shape
from .host import host_moments
from .simulation import activation_peak, block_input_sizes, step_matmuls
from .weights import count_weights, elem, optimizer_state_bytes


def trained_parts(config: TrainConfig) -> list[str]:
    """The transformer parts this run trains (WAN 2.2 A14B: one or both experts), as the family lists them."""
    return list(getattr(family(config), "expert_names", ["transformer"]))


def _second_expert(config: TrainConfig) -> bool:
    return bool(getattr(family(config), "is_a14b", False))


# Resident bytes a compiled oneDNN matmul kernel keeps while it is in the primitive cache (its code and descriptors,
# malloc'ed outside any tensor): 0.6 MiB; 0.61 is the slope of the resident memory left after each step of
# benchmarks/memory.py's HiDream run against the kernels cached, from 208 after its first step to the cache's 1024
# from its eighth on (0.56-0.67 MiB per new shape of a lone bf16 matmul; torch 2.13's oneDNN 3.12, AVX-512 bf16)
ONEDNN_KERNEL_BYTES = 6 * 2**20 // 10
ONEDNN_CACHE_CAPACITY = 1024  # oneDNN's default primitive cache capacity (ONEDNN_PRIMITIVE_CACHE_CAPACITY)


def _gathered(counts, shards: int) -> Line:
    """What FSDP2 holds whole on a process besides its shard (train/distributed.py: one unit per block, the root
    holding the rest; default policy, so whole weights in their own dtype). A block's weights are all-gathered just
    before it runs and freed after it (forward, and the recompute and backward); the next block's all-gather is
    issued while one runs, so two blocks' weights are whole at once, and in backward a block's whole gradient lives
    until its reduce-scatter. The root's parameters (embedders, head) stay whole from forward through backward."""
    block = max((kind.trained for kind in counts.kinds), default=0)
    return Line(f"FSDP2 whole blocks ({shards} processes)", 3 * block + counts.outside_trainable, 0,
                f"2 blocks' weights and 1 block's gradient × {block / GB:.3f} GB, "
                f"+ {counts.outside_trainable / GB:.2f} GB outside the blocks")


def _onednn_kernels(cfg, config, shape, recompute, live, quantized) -> list[Line]:
    """On the CPU torch runs half-precision matrix products through oneDNN, which compiles a kernel for every new
    shape and keeps the last 1024 for the rest of the process. A step's products of fixed shapes are compiled once;
    shapes that follow the data (HiDream's MoE sends a different number of tokens to each expert every step) bring
    new kernels every step until the cache is full, which is where a long run stays."""
    import os

    fixed, varying = step_matmuls(cfg, config, shape, recompute, live, quantized)
    capacity = int(os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
                   or os.environ.get("DNNL_PRIMITIVE_CACHE_CAPACITY") or ONEDNN_CACHE_CAPACITY)
    kernels = capacity if varying else min(capacity, fixed)
    if not kernels:
        return []
    note = f"{fixed} matmul shapes in a step" + (f"; {varying} new ones every step (MoE routing) until the cache holds "
                                                 f"{capacity}" if varying else "")
    return [Line("oneDNN matmul kernels (CPU)", kernels * ONEDNN_KERNEL_BYTES, 0, note)]


def estimate(config: TrainConfig, *, device: str = "cuda", shape: Shape | None = None, options: Options | None = None,
             phases: bool = False, processes: int = 1) -> Estimate:
    """The peak of a training step on `device` ("cuda": device and host memory apart; "cpu": one memory).
    `options` replaces the config's memory options for every trained transformer part; `phases` also estimates
    the encoding phase (a first run, or latent_caching off) and sample rendering. `processes`: the run's torchrun
    world size; a fine-tune is then sharded with FSDP2 (train/distributed.py) and the estimate is one process's."""
    if processes < 1:
        from .result import EstimateError

        raise EstimateError(f"processes {processes}: a run has at least one process")
    parts = trained_parts(config)
    options = (options or Options.of(config, parts[0])).effective()
    shape = shape or config_shape(config)
    # per process: with experts_on split a process holds one expert; with context parallel it runs 1/degree of the tokens
    split = config.experts_on == "split" and len(parts) == 2
    degree = config.context_parallel.degree
    here = 1 if split else len(parts)  # experts trained in this process
    # FSDP2 shards what a fine-tune trains (weights, gradients, optimizer state) over every process; LoRA and
    # embeddings are replicated (each process holds a single run's memory)
    shards = processes if config.training_method == "FINE_TUNE" and not split else 1
    step_shape = shape if degree == 1 else replace(shape, latent=(math.ceil(shape.latent[0] / degree), *shape.latent[1:]))
    cfg, source = transformer_config(config, parts[0])
    on_cpu = device == "cpu"
    counts = count_weights(cfg, config)
    frozen_method = config.training_method == "FINE_TUNE"  # every weight trains: nothing to quantize or offload
    plain = {v: k for k, v in DTYPES.items()}[load_dtype(config)]
    weight_dtype = options.weight_dtype if options.weight_dtype in QUANTIZED and not frozen_method else plain
    lines: list[Line] = []

    # weights of the expert on the device; offloaded blocks wait in host memory
    n = counts.blocks
    per_block = counts.block_bytes(weight_dtype)
    offloaded = math.floor(options.offload_fraction * n + 1e-9) if not frozen_method else 0
    resident = n - offloaded + min(options.prefetch, offloaded)
    label = "frozen weights" + (" of the trained expert" if _second_expert(config) else "")
    note = f"{n} blocks × {per_block / GB:.3f} GB + {counts.outside / GB:.2f} GB outside the blocks ({weight_dtype})"
    if frozen_method and not any(kind.linears for kind in counts.kinds):
        lines.append(Line(label, counts.frozen_bytes(weight_dtype), 0, "every weight trains (below); rotary tables"))
    elif offloaded and not on_cpu:
        lines.append(Line(label, counts.outside + resident * per_block, offloaded * per_block,
                          note + f"; {offloaded} blocks offloaded, at most {min(options.prefetch, offloaded)} of them on the device"))
    else:
        lines.append(Line(label, counts.frozen_bytes(weight_dtype), 0, note))
    other_bytes = other_loaded = 0
    if split:
        lines.append(Line("the other expert", 0, 0, "held and trained by the other half of the processes (experts_on split)"))
    elif _second_expert(config):  # the other expert is loaded too and waits in host memory
        other_part = "transformer_2" if parts[0] == "transformer" else "transformer"
        other = count_weights(transformer_config(config, other_part)[0], config, trained=len(parts) == 2)
        other_bytes = other.frozen_bytes(weight_dtype if len(parts) == 2 else plain) + other.trainable_bytes
        other_loaded = other.frozen_bytes(plain) + other.trainable_bytes
        lines.append(Line("the other expert", 0 if not on_cpu else other_bytes, other_bytes if not on_cpu else 0,
                          "waits in host memory; " + ("also trained: swapped in for the batches it serves" if len(parts) == 2
                                                      else "not trained: loaded for samples")))

    # what trains: its parameters, and the optimizer state of every trained expert (gradients: at their moments, below)
    trainable = counts.trainable_bytes // shards
    state = optimizer_state_bytes(counts.trainable, config, options.optimizer) * here // shards
    what = {"LORA": f"LoRA rank {config.lora_rank}", "FINE_TUNE": "every transformer weight", "EMBEDDING": "nothing"}[config.training_method]
    sharded = f"; 1/{shards} of them on each of {shards} processes (FSDP2)" if shards > 1 else ""
    if trainable:
        lines.append(Line("trained parameters", trainable, 0, f"{what}: {counts.trainable_count / 1e6:.1f}M values{sharded}"))
        lines.append(Line(f"optimizer state ({options.optimizer})", state, 0,
                          (f"{here} expert(s)" if here > 1 else "one expert per process (experts_on split)" if split else "")
                          + (f"1/{shards} of it (FSDP2)" if shards > 1 else "")))
    if shards > 1:
        lines.append(_gathered(counts, shards))

    # activations, with the gradients backward has made by their peak (few: it frees activations as it makes them)
    live = text_live(config)
    recompute = options.checkpointing != "OFF"
    # the block Linears as the trainer makes them: quantized storage, or FLOAT_8 / INT_8 compute (torchao's layers)
    quantized = weight_dtype if weight_dtype in QUANTIZED else \
        f"{options.compute_dtype} compute" if options.compute_dtype else None
    peak, kept, received = activation_peak(cfg, config, step_shape, recompute, live, quantized)
    if degree > 1:  # simulated on whole latent frames; a process holds exactly 1/degree of the tokens (linear in them)
        share = shape.tokens / degree / step_shape.tokens
        peak, kept, received = int(peak * share), int(kept * share), int(received * share)
    per_block_act = kept // max(1, n)
    act_name = {"OFF": "activations (no checkpointing)", "ON": "activations (checkpointing ON)",
                "CPU_OFFLOADED": "activations (checkpointing CPU_OFFLOADED)"}[options.checkpointing]
    act_note = f"{n} blocks × {per_block_act / GB:.3f} GB + {(peak - kept) / GB:.2f} GB (one block's recompute, embedders, loss)" \
        if kept else ""
    if options.checkpointing == "CPU_OFFLOADED" and not on_cpu:
        # block inputs wait in host memory; the device keeps the running block's input and output
        hidden = shape.batch * step_shape.tokens * cfg["num_attention_heads"] * cfg["attention_head_dim"] * elem(load_dtype(config))
        device_act = max(0, peak - kept) + 2 * hidden
        lines.append(Line(act_name, device_act, n * received,
                          f"block inputs in pinned host memory: {n} × {received / GB:.3f} GB"))
    else:
        device_act = peak
        lines.append(Line(act_name, peak, 0, act_note))
    if degree > 1:
        act_name_note = f"{shape.tokens // degree} of the clip's {shape.tokens} tokens per process"
        lines[-1].note = (lines[-1].note + "; " if lines[-1].note else "") + act_name_note
        # the plan splits after the patch embedding and gathers the output: both are whole clips on every process
        width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        whole = shape.batch * shape.tokens * (width + cfg.get("out_channels", 16) * math.prod(shape.patch)) * elem(load_dtype(config))
        lines.append(Line(f"context parallel {config.context_parallel.attention} x{degree}: whole-clip tensors", whole, 0,
                          "the embedded tokens before the split and the prediction gathered after it"))
        device_act += whole
    if live:
        lines += text_encoder_lines(config, shape, on_cpu)
    if on_cpu:
        lines += _onednn_kernels(cfg, config, shape, recompute, live, quantized)
    held = 0  # gradients alive under a later forward: accumulated micro-batches, or A14B's first expert's
    if trainable and config.gradient_accumulation_steps > 1:
        held = trainable if on_cpu else trainable // len(parts)  # on an accelerator one expert is there at a time
        held = trainable if split else held  # split: this process holds its one expert
    elif trainable and here > 1 and on_cpu:
        held = trainable // len(parts)
    if held:
        lines.append(Line("gradients held between micro-batches", held, 0,
                          "kept until the optimizer step while the next forward runs"))
    if trainable:
        # after backward: every gradient, and on the CPU torch's foreach AdamW makes a temporary the size of a moment
        # (fused on CUDA: none); the activations are gone by then, so only what exceeds their peak adds
        update = trainable + (trainable if on_cpu else 0)
        lines.append(Line("gradients at the optimizer step", max(0, update - device_act - held), 0,
                          f"{update / GB:.2f} GB (every gradient" + (", the foreach update's temporary" if on_cpu else "")
                          + "), beyond the activations' peak"))
    if not on_cpu:
        lines += cuda.step_lines(step_shape, cfg, device_act)
    result = Estimate(config, shape, options, device, lines, per_block_activation=per_block_act, blocks=n,
                      source=source, headroom=0.0 if on_cpu else cuda.HEADROOM, processes=shards)
    if not on_cpu:  # on the CPU the device is host memory: the step's own lines say it all
        inputs = block_input_sizes(cfg, config, shape, recompute, live, quantized) \
            if options.checkpointing == "CPU_OFFLOADED" else []
        result.host_moments = host_moments(config, counts, plain=plain, weight_dtype=weight_dtype, offloaded=offloaded,
                                           other_loaded=other_loaded, other_held=other_bytes, checkpoint_inputs=inputs,
                                           blocks=n)
    if phases:
        # sampling brings the transformer as training holds it (offloaded blocks stream in as they run) with what
        # trains on it; an A14B expert that only samples comes whole, one expert at a time. On the CPU both are in
        # its memory. Gradients are gone by then (set to None after each step); optimizer state stays.
        # under FSDP2 the process's shard, its blocks gathered in turn as the pipeline calls them
        active = lines[0].device + trainable + sum(line.device for line in lines if line.name.startswith("FSDP2"))
        other_sampled = active if len(parts) == 2 else other_bytes  # 0 without a second expert
        transformers = active + other_bytes if on_cpu else max(active, other_sampled)
        left = sum(line.device for line in lines if line.name.startswith("optimizer state")
                   or (line.name.startswith("text encoder") and "activations" not in line.name))
        reserve = [] if on_cpu else [cuda.context_line()]
        result.phases, result.tiled_decode = other_phases(config, shape, cfg, transformers, left, quantized, on_cpu, reserve)
    return result
