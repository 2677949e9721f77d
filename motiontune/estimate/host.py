"""Host memory (RAM) at the moments of a run on an accelerator: what waits there while the device works.

- loading: every transformer the run loads arrives in host memory in its load dtype (both WAN 2.2 A14B experts,
  also when one trains); FLOAT_8 / NFLOAT_4 storage is applied per expert after that (train/memory.py), so the
  loading moment holds them whole;
- the training step: the other expert, the blocks layer offloading keeps in host memory, the block inputs
  CPU_OFFLOADED checkpointing copies there, the VAE parked for samples (or for clips encoded again each epoch);
- a first run's encoding: the VAE and the text encoders, loaded in host memory before they move to the device.
Pinned buffers (offloaded blocks, CPU_OFFLOADED block inputs) come from CUDA's caching host allocator, which rounds
every allocation up to a power of two (PyTorch's CachingHostAllocator, for reuse), so each pinned tensor is counted
at its rounded size. Every moment carries the process itself (Python, PyTorch, the CUDA libraries): an allowance.
"""

from __future__ import annotations

from ..config import TrainConfig
from .configs import family
from .moments import encoder_facts
from .result import GB, Line
from .weights import WeightCounts, quantized_linear_bytes

PROCESS = 3 * GB  # Python, PyTorch, diffusers and the CUDA libraries mapped in a training process (2-4 GB seen)
HOST_HEADROOM = 0.10  # the share of the host's RAM a plan leaves to the system and other programs

LOADING, HOST_STEP, HOST_ENCODING = "loading the model", "training step", "encoding (a first run)"


def pinned(nbytes: int) -> int:
    """What a pinned host buffer of `nbytes` takes: CUDA's caching host allocator rounds to a power of two."""
    return 1 << max(0, nbytes - 1).bit_length() if nbytes > 0 else 0


def pinned_block_bytes(counts: WeightCounts, weight_dtype: str) -> int:
    """One offloaded block's host copy, each frozen Linear weight pinned on its own (blocks of several kinds:
    their average); the block's small tensors (norms, biases, adapters stay on the device) counted as they are."""
    total = 0
    for kind in counts.kinds:
        linears = sum(pinned(quantized_linear_bytes(o, i, weight_dtype, kind.linear_elem)) for o, i in kind.linears)
        total += kind.count * (kind.plain + linears // kind.share)
    return total // max(1, counts.blocks)


def encoder_bytes(config: TrainConfig) -> tuple[int, int]:
    """(the VAE's bytes with an image encoder, the text encoders' bytes), as loaded for a run on an accelerator."""
    vae, _, text = encoder_facts(config, on_cpu=False)
    return vae + getattr(family(config), "estimate_image_encoder_bytes", lambda: 0)(), text


def frozen_lora_bytes(config: TrainConfig) -> int:
    """Host memory while one of `frozen_loras` is merged (lora_tools/frozen.py): the file's tensors as read and the
    adapter diffusers loads from them, about the file's size each; one file at a time. Merged into the base weights,
    they add nothing to the device or to the steps (a frozen peft adapter would: its factors and one more product per
    adapted layer)."""
    import os

    sizes = [os.path.getsize(item.model_name) for item in config.frozen_loras if os.path.isfile(item.model_name)]
    return 2 * max(sizes, default=0)


def host_moments(config: TrainConfig, counts: WeightCounts, *, plain: str, weight_dtype: str, offloaded: int,
                 other_loaded: int, other_held: int, checkpoint_inputs: list[int], blocks: int) -> dict[str, list[Line]]:
    """Host memory at each moment (bytes in `Line.host`). `other_loaded` / `other_held`: the other expert as loaded
    and as it waits during steps (0 without one); `checkpoint_inputs`: bytes of each tensor a block receives, copied
    to pinned host memory per block under CPU_OFFLOADED (empty otherwise)."""
    process = Line("the process (Python, PyTorch, CUDA libraries)", 0, PROCESS, "an allowance")
    vae, text = encoder_bytes(config)
    moments = {LOADING: [Line("the transformer as loaded", 0, counts.frozen_bytes(plain) + counts.trainable_bytes,
                              f"{plain}, before its memory options apply")]}
    if other_loaded:
        moments[LOADING].append(Line("the other expert as loaded", 0, other_loaded, f"{plain}; both experts load"))
    merging = frozen_lora_bytes(config)
    if merging:
        moments[LOADING].append(Line("a frozen LoRA being merged", 0, merging, "its file read and its adapter, the "
                                     "largest of frozen_loras; merged into the weights, so nothing after loading"))
    moments[LOADING].append(process)

    step = []
    if other_held:
        step.append(Line("the other expert", 0, other_held, "waits in host memory"))
    if offloaded:
        per_block = pinned_block_bytes(counts, weight_dtype)
        step.append(Line("offloaded blocks (pinned)", 0, offloaded * per_block,
                         f"{offloaded} × {per_block / GB:.3f} GB, each weight rounded up to a power of two"))
    if checkpoint_inputs:
        per_block = sum(pinned(size) for size in checkpoint_inputs)
        step.append(Line("block inputs, CPU_OFFLOADED (pinned)", 0, blocks * per_block,
                         f"{blocks} × {per_block / GB:.3f} GB ({sum(checkpoint_inputs) / GB:.3f} GB of tensors, "
                         "each rounded up to a power of two)"))
    samples = bool(config.samples) and config.sample_after_unit != "NEVER"
    moving = config.video_config.temporal_augmentation or config.video_config.frame_sample_strategy == "random"
    if samples or moving:
        step.append(Line("the VAE, parked", 0, vae, "kept for " + ("samples" if samples else "clips encoded each epoch")))
    moments[HOST_STEP] = step + [process]

    moments[HOST_ENCODING] = [Line("the VAE", 0, vae, "waits here while the text encoders work"),
                              Line("the text encoders", 0, text, "loaded here, then on the device in their turn"),
                              process]
    return moments


def host_usable(host_bytes: int) -> int:
    return int(host_bytes * (1 - HOST_HEADROOM))
