"""Activations, measured on fake tensors: one training step, and one no-grad forward as sampling calls it.

A copy of the transformer with three blocks of each kind runs the family's own `predict`, the real loss and
backward (models/fake_memory.py counts the bytes alive at each moment). Every block of a kind after the first
leaves the same bytes alive for backward, so the full depth's peak is the simulated one plus the second block's
share per further block (a test checks this against simulating the full depth). Fake tensors cost about the same per
op whatever their size, so an estimate's time is its count of simulated ops; each simulation is kept for the process.
"""

from __future__ import annotations

import json

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..config import TrainConfig
from ..models.fake_memory import LiveBytes, fakeify, quiet
from .configs import HALF, family, load_dtype
from .result import Shape
from .weights import block_lists, meta_transformer

SIMULATED_BLOCKS = 3  # blocks of each kind in the simulated copy; deeper models add the second block's share per block


def _fake_transformer(cfg: dict, config: TrainConfig, depth: int, quantized: str | None, mode):
    model = meta_transformer(cfg, config, depth)
    owner = family(config)
    if hasattr(owner, "estimate_prepare"):
        owner.estimate_prepare(model)
    fakeify(model, mode)
    blocks = [b for _, kind in block_lists(model, config) for b in kind]
    if quantized and quantized.endswith(" compute"):
        from ..util.low_precision import convert_linears

        # torchao's GPU path (torch._scaled_mm / torch._int_mm), never its emulation: the bytes a GPU run makes
        with mode, quiet():
            convert_linears(blocks, quantized.split()[0], emulate=False)
    elif quantized:
        from ..util.quantize import quantize_frozen_linears

        with mode, quiet():
            quantize_frozen_linears(blocks, quantized, torch.device("cpu"))
    return model


_STEPS: dict = {}
_RECEIVED: dict = {}  # the same key → bytes of each tensor the block that receives most is given
_MATMULS: dict = {}  # the same key → (distinct half-precision matrix products of the step, new ones every later step)


def _step_key(cfg, depth, config, shape, recompute, text_live, quantized):
    video = config.video_config
    return (json.dumps(cfg, sort_keys=True), depth, shape, recompute, text_live, quantized, config.model_type,
            config.training_method, config.lora_rank, config.layer_filter, config.train_dtype, str(load_dtype(config)),
            video.temporal_consistency_weight > 0, video.use_temporal_attention, video.frame_dropout_probability > 0,
            config.image_conditioning_probability > 0,
            config.model_dump_json())  # and the whole config: a family reads more of it (LTX-2's train_audio, in_context_control)


def simulate_step(cfg: dict, depth: int, config: TrainConfig, shape: Shape, recompute: bool, text_live: bool,
                  quantized: str | None = None) -> tuple[int, list[tuple[int, int]], int]:
    """One training step of a copy with `depth` blocks of each kind, on fake tensors: (peak bytes of the tensors it
    made, [(blocks of the kind in the copy, bytes its second block left alive for backward)] per kind, bytes of
    the tensors one block receives). The peak counts the gradients of trained parameters made by its moment: backward
    frees activations as it makes gradients, so a step's peak holds only some of them (none, early in backward).
    `quantized` (FLOAT_8, NFLOAT_4): the frozen block Linear layers are train/memory.py's quantized ones. Kept for
    the process, and on disk for the next one (util/sim_cache.py)."""
    from ..util.sim_cache import cached

    key = _step_key(cfg, depth, config, shape, recompute, text_live, quantized)
    if key not in _STEPS:
        found = cached("step", key, lambda: _simulate_step(cfg, depth, config, shape, recompute, text_live, quantized))
        _STEPS[key] = (found["peak"], [tuple(share) for share in found["shares"]], found["received"])
        _MATMULS[key] = tuple(found["matmuls"])
        _RECEIVED[key] = list(found["largest"])
    return _STEPS[key]


def _simulate_step(cfg: dict, depth: int, config: TrainConfig, shape: Shape, recompute: bool, text_live: bool,
                   quantized: str | None) -> dict:
    """simulate_step's simulation, with what step_matmuls and block_input_sizes read of it."""
    from ..models.base import Expert
    from ..train.flow import flow_target, noisy_latents
    from ..train.losses import training_loss

    owner = family(config)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = _fake_transformer(cfg, config, depth, quantized, mode)
    if recompute:
        model.enable_gradient_checkpointing()
    model.train()
    expert = Expert("transformer", "", model, (0.0, 1.0))
    if not config.video_config.use_temporal_attention:
        owner.set_frame_local_attention(expert, True)
    batch, (f, h, w) = shape.batch, shape.latent
    channels = cfg.get("out_channels") or cfg["in_channels"]
    with mode:
        x0 = torch.empty(batch, channels, f, h, w)
        noise = torch.empty_like(x0)
        sigma = torch.empty(batch)
    text, conditioning = owner.estimate_step_inputs(cfg, x0, load_dtype(config))  # real text: families unpack it
    text.requires_grad_(text_live)
    tracker = LiveBytes([*model.parameters(), *model.buffers(), x0, noise, sigma, text])
    handles = []
    kinds = block_lists(model, config)
    entries: list[list[int]] = [[] for _ in kinds]  # live bytes as each block starts its first forward
    received: list[int] = []

    def entered(kind, count):
        def hook(_, args):
            if len(entries[kind]) < count:
                entries[kind].append(tracker.current)
                tensors = [t for t in torch.utils._pytree.tree_flatten(args)[0] if isinstance(t, torch.Tensor)]
                received.append(sorted(t.untyped_storage().nbytes() for t in tensors))
        return hook

    for index, (_, blocks) in enumerate(kinds):
        handles += [block.register_forward_pre_hook(entered(index, len(blocks))) for block in blocks]
    half = HALF.get(config.train_dtype)
    with mode, tracker, quiet():
        noisy = noisy_latents(x0, noise, sigma)
        target = flow_target(x0, noise)
        with torch.autocast("cpu", dtype=half or torch.float32, enabled=half is not None):
            prediction = owner.predict(noisy, sigma, text, expert, conditioning)
        kept = conditioning.loss_frames if conditioning is not None else None
        loss, _ = training_loss(prediction, target, noisy, sigma, x0, config.video_config.temporal_consistency_weight, kept)
        loss.backward()
    for handle in handles:
        handle.remove()

    def count_matmuls(run) -> int:  # distinct half-precision matrix products `run` makes, as the step ran them
        counter = LiveBytes()
        with mode, counter, quiet(), torch.autocast("cpu", dtype=half or torch.float32, enabled=half is not None):
            run()
        return len(counter.matmuls)

    varying = owner.estimate_varying_matmuls(cfg, model, count_matmuls) if hasattr(owner, "estimate_varying_matmuls") else 0
    # what the second block of a kind left alive for backward (its saved tensors, its output in place of its input);
    # the first is no model for the rest: its input may need no gradient, so it saves less
    shares = [(len(blocks), e[2] - e[1] if len(e) >= 3 else 0) for (_, blocks), e in zip(kinds, entries)]
    largest = max(received, key=sum, default=[])
    return {"peak": tracker.peak, "shares": shares, "received": sum(largest), "matmuls": [len(tracker.matmuls), varying],
            "largest": largest}


def step_matmuls(cfg: dict, config: TrainConfig, shape: Shape, recompute: bool, text_live: bool,
                 quantized: str | None = None) -> tuple[int, int]:
    """(distinct half-precision matrix products one training step runs, how many of new shapes each further step
    runs: a family whose shapes follow the data, such as HiDream's MoE routing, says so). On the CPU, torch hands
    these to oneDNN, which compiles a kernel per shape and keeps it (estimate/step.py counts their bytes)."""
    simulate_step(cfg, SIMULATED_BLOCKS, config, shape, recompute, text_live, quantized)
    return _MATMULS[_step_key(cfg, SIMULATED_BLOCKS, config, shape, recompute, text_live, quantized)]


def block_input_sizes(cfg: dict, config: TrainConfig, shape: Shape, recompute: bool, text_live: bool,
                      quantized: str | None = None) -> list[int]:
    """Bytes of each tensor one block receives (the block that receives most): what CPU_OFFLOADED checkpointing
    copies, tensor by tensor, into pinned host memory."""
    simulate_step(cfg, SIMULATED_BLOCKS, config, shape, recompute, text_live, quantized)
    return _RECEIVED[_step_key(cfg, SIMULATED_BLOCKS, config, shape, recompute, text_live, quantized)]


def activation_peak(cfg: dict, config: TrainConfig, shape: Shape, recompute: bool, text_live: bool,
                    quantized: str | None = None) -> tuple[int, int, int]:
    """(peak activation bytes of a step at the model's full depth, the gradients made by then included, bytes all
    blocks keep for backward, bytes of the tensors each block receives: what CPU_OFFLOADED copies to host memory per
    block). Every block of a kind after
    the first adds the same bytes by the time backward starts (tests check this against the full depth)."""
    peak, shares, received = simulate_step(cfg, SIMULATED_BLOCKS, config, shape, recompute, text_live, quantized)
    counts = [cfg[key] for key, _ in family(config).block_groups]
    kept = sum(n * share for n, (_, share) in zip(counts, shares))
    peak += sum((n - simulated) * share for n, (simulated, share) in zip(counts, shares))
    return peak, kept, received


_DENOISE: dict = {}


def denoise_peak(cfg: dict, config: TrainConfig, latent: tuple[int, int, int], quantized: str | None) -> int:
    """Peak bytes of the tensors one transformer forward makes as the stock pipeline calls it while sampling (no grad,
    in the transformer's dtype), the weights not counted. Two blocks of each kind are simulated: without grad a
    block's tensors are gone before the next one starts."""
    from ..util.sim_cache import cached

    key = (json.dumps(cfg, sort_keys=True), tuple(latent), quantized, config.model_dump_json())
    if key not in _DENOISE:
        _DENOISE[key] = cached("denoise", key, lambda: _denoise_peak(cfg, config, latent, quantized))
    return _DENOISE[key]


def _denoise_peak(cfg: dict, config: TrainConfig, latent: tuple[int, int, int], quantized: str | None) -> int:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = _fake_transformer(cfg, config, 2, quantized, mode)
    model.eval()
    with mode:
        call = family(config).estimate_sample_call(cfg, latent, load_dtype(config))
    tensors = [v for v in call.values() if isinstance(v, torch.Tensor)]  # a call may also pass sizes and rates
    tracker = LiveBytes([*model.parameters(), *model.buffers(), *tensors])
    with mode, tracker, torch.no_grad(), quiet():
        model(**call, return_dict=False)
    return tracker.peak
