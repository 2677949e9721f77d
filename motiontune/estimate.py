"""`motiontune estimate`: the memory a run will need on its training device, from the model config alone.

No weights are read. The transformer is built on PyTorch's meta device from its config (a local diffusers
folder's `transformer/config.json`, or the released models' configs embedded below), which gives every
parameter's shape: weights, trainable parameters and optimizer state are counted from those. Activations are
measured, not guessed: a training step (the family's own `predict`, the real loss, backward) runs on a copy of
the transformer with three blocks whose tensors are fake (`FakeTensorMode`: shapes and dtypes, no data), and a
dispatch mode adds up the bytes of every tensor alive at each moment. Every block after the first is the same, so
the full depth's peak is the simulated peak plus the second block's share for each further block (checked against
simulations of the full depth in tests). With FLOAT_8 or NFLOAT_4 weights the simulated blocks hold train/memory.py's own
quantized layers (what they save for backward, their dequantization temporaries), and CPU_OFFLOADED checkpointing
moves the checkpointed block inputs to host memory.

The other moments of a run are estimated apart: a first run encoding clips and captions, and rendering a sample
as models/wan.py does it, its parts taking turns on the device (first frame, denoising, decoding: the decode on
fake tensors through diffusers' own loop, whole frames and in tiles; sampling itself asks `decode_in_tiles`
which to use).

What it does not see: the CUDA context and the caching allocator's slack (a fixed 0.5 GB line), other
programs on the GPU, and memory of the data pipeline (a few cached text embeddings).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .config import TrainConfig
from .config.schema import A14B_MODEL_TYPES

GB = 2**30  # GPU sizes are quoted in GiB (a "24 GB" card holds about 24 × 2^30 bytes)

# --- the released models' configs (diffusers' transformer/config.json), for Hub ids not on this machine ----------

_WAN_COMMON = {
    "patch_size": [1, 2, 2], "attention_head_dim": 128, "text_dim": 4096, "freq_dim": 256, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-06, "image_dim": None, "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024, "pos_embed_seq_len": None,
}
_WAN_1_3B = {**_WAN_COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30, "in_channels": 16, "out_channels": 16}
_WAN_14B = {**_WAN_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40, "in_channels": 16, "out_channels": 16}
_WAN_I2V_14B = {**_WAN_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120}  # WAN 2.1 I2V (CLIP tokens)
_WAN_2_2_I2V = {**_WAN_14B, "in_channels": 36}  # no CLIP image encoder in 2.2
_WAN_5B = {**_WAN_COMMON, "num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30, "in_channels": 48, "out_channels": 48}

# Hub id → transformer config (A14B: each of its two experts has this config)
WAN_TRANSFORMERS = {
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": _WAN_1_3B,
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": _WAN_14B,
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers": _WAN_I2V_14B,
    "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers": _WAN_I2V_14B,
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": _WAN_14B,
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers": _WAN_2_2_I2V,
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": _WAN_5B,
}
# model_type → the config used when base_model_name is neither a local folder nor a known id
DEFAULT_TRANSFORMER = {
    "WAN_2_1_T2V": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "WAN_2_1_I2V": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
    "WAN_2_2_T2V_A14B": "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    "WAN_2_2_I2V_A14B": "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
    "WAN_2_2_TI2V_5B": "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
}
# google/umt5-xxl's encoder, as every WAN pipeline ships it (text_encoder/config.json)
UMT5_XXL = {
    "vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new", "is_gated_act": True, "layer_norm_epsilon": 1e-06, "tie_word_embeddings": False,
    "scalable_attention": True,
}
# AutoencoderKLWan: WAN 2.1's (also used by 2.2 A14B) is the class default; TI2V-5B has the 48-channel 16x one
WAN_VAES = {
    "2.1": {},
    "2.2": {"base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
            "temperal_downsample": [False, True, True], "is_residual": True, "in_channels": 12, "out_channels": 12,
            "patch_size": 2, "scale_factor_spatial": 16},
}
CLIP_VIT_H_PARAMS = 632_076_800  # WAN 2.1 I2V's image encoder (CLIP ViT-H/14 vision tower), float32

TEXT_TOKENS = 512  # WAN pads every prompt to 512 tokens
CLIP_IMAGE_TOKENS = 257  # WAN 2.1 I2V: CLIP's tokens for the first frame
CUDA_OVERHEAD = int(0.5 * GB)  # CUDA context, cuBLAS workspace, allocator slack: not tensors, but not free

# Bytes per weight while one quantized layer is dequantized (measured on the CPU): float8 → a float32 copy, times
# its scale (8); NF4 → two int64 index tensors, the looked-up values, the scaled halves and the stacked bf16 weight
# (14). The simulation runs train/memory.py's own quantized layers, so it sees the float8 steps; torchao unpacks NF4
# inside its tensor subclass, out of the simulation's sight, so those 14 bytes are counted when it does.
DEQUANT_BYTES_PER_WEIGHT = {"FLOAT_8": 8, "NFLOAT_4": 14}
KEEP_PRECISION = ("norm", "modulation", "adaln")  # as train/memory.py: Linear layers that stay unquantized
HALF = {"BFLOAT_16": torch.bfloat16, "FLOAT_16": torch.float16}
DTYPES = {"FLOAT_32": torch.float32, **HALF}
SEED_TABLE = [  # the original guide (the OneTrainer fork's docs/VideoTraining.md, "WAN 2.2 Memory Requirements";
    (8, 1, 8, 384),  # docs/WAN22Training.md has the same table): GPU size → batch × frames × resolution²
    (16, 2, 16, 512),
    (24, 4, 16, 512),
    (48, 8, 32, 768),
]

log = logging.getLogger("motiontune")


class EstimateError(Exception):
    """The estimate cannot be made for this config; the message says why."""


# --- what is estimated ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """The memory options of the trained transformer part(s)."""

    checkpointing: str = "OFF"  # OFF | ON | CPU_OFFLOADED
    offload_fraction: float = 0.0
    prefetch: int = 2
    weight_dtype: str = "BFLOAT_16"  # as stored: FLOAT_8 / NFLOAT_4 are quantized frozen Linear weights
    optimizer: str = "ADAMW"

    @classmethod
    def of(cls, config: TrainConfig, part_name: str = "transformer") -> "Options":
        try:  # the lead implementation reads both OneTrainer forms in one place
            from .train.memory import MemoryPlan

            plan = MemoryPlan.of(config, part_name)
            checkpointing, fraction, prefetch, dtype = plan.checkpointing, plan.offload_fraction, plan.prefetch, plan.weight_dtype
        except ImportError:  # pragma: no cover - before train/memory.py exists
            part = getattr(config, part_name)
            if part.gradient_checkpointing is not None:
                checkpointing = "OFF" if not part.gradient_checkpointing else "CPU_OFFLOADED" if part.activation_offloading else "ON"
            else:
                checkpointing = config.gradient_checkpointing or "OFF"
            fraction = part.offload_fraction or config.layer_offload_fraction or 0.0
            prefetch, dtype = getattr(config, "layer_offload_prefetch", 2), part.weight_dtype or config.train_dtype
            if fraction > 0 and checkpointing == "OFF":
                checkpointing = "ON"
        return cls(checkpointing, fraction, prefetch, dtype, config.optimizer.optimizer)

    def effective(self) -> "Options":
        """Layer offloading turns checkpointing on (as train/memory.py does)."""
        if self.offload_fraction > 0 and self.checkpointing == "OFF":
            return replace(self, checkpointing="ON")
        return self


@dataclass(frozen=True)
class Shape:
    """One training batch: clips per step, frames, pixels; and the latent grid the transformer sees."""

    batch: int
    frames: int
    height: int
    width: int
    latent: tuple[int, int, int]  # F', H', W'
    patch: tuple[int, int, int] = (1, 2, 2)

    @property
    def tokens(self) -> int:
        f, h, w = self.latent
        return (f // self.patch[0]) * (h // self.patch[1]) * (w // self.patch[2])

    def describe(self) -> str:
        f, h, w = self.latent
        return (f"{self.batch} × {self.frames} frames × {self.width}x{self.height} "
                f"(latents {f}×{h}×{w}, {self.tokens} tokens per clip)")


@dataclass
class Line:
    """One row of the breakdown: bytes on the training device, and bytes waiting in host memory."""

    name: str
    device: int
    host: int = 0
    note: str = ""


@dataclass
class Estimate:
    config: TrainConfig
    shape: Shape
    options: Options
    device_kind: str  # "cuda" or "cpu" (on the CPU the device is host memory: the two columns are one)
    lines: list[Line]  # the training step's peak
    phases: dict[str, list[Line]] = field(default_factory=dict)  # "encoding", "captions", "samples": other moments
    per_block_activation: int = 0
    blocks: int = 0
    source: str = ""  # where the transformer config came from
    tiled_decode: int = 0  # bytes of decoding the sample in tiles (the "sample decoding" phase counts whole frames)

    @property
    def device(self) -> int:
        return sum(line.device for line in self.lines)

    @property
    def host(self) -> int:
        return sum(line.host for line in self.lines)

    @property
    def total(self) -> int:
        """Device + host: what the step needs on a machine where they are the same memory (the CPU)."""
        return self.device + self.host

    def phase_peak(self, name: str, gpu_bytes: int | None = None) -> int:
        """A phase's bytes on the device; on a card of `gpu_bytes`, a sample's decoding in tiles when sampling would
        choose them there."""
        peak = sum(line.device for line in self.phases.get(name, []))
        if name == DECODING and gpu_bytes is not None and self.decodes_in_tiles(gpu_bytes):
            peak += self.tiled_decode - self._whole_decode
        return peak

    @property
    def _whole_decode(self) -> int:
        return sum(line.device for line in self.phases.get(DECODING, []) if line.name == DECODE_LINE)

    def decodes_in_tiles(self, gpu_bytes: int) -> bool:
        """Whether sampling decodes in tiles on a card of `gpu_bytes`: models/wan.py does when decoding whole frames
        (with TILE_MARGIN) needs more than the memory the rest of that moment leaves free."""
        if DECODING not in self.phases:
            return False
        rest = self.phase_peak(DECODING) - self._whole_decode
        return TILE_MARGIN * self._whole_decode > gpu_bytes - rest

    def fits(self, gpu_bytes: int) -> bool:
        return self.device <= gpu_bytes


# --- configs of the parts ------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def transformer_config(config: TrainConfig, part: str = "transformer") -> tuple[dict, str]:
    """(the diffusers config of a transformer part, where it came from)."""
    override = getattr(config, part).model_name
    if override and Path(override).is_dir():
        found = _read_json(Path(override) / "config.json")
        if found:
            return found, f"{override}/config.json"
    base = config.base_model_name
    for sub in (part, "transformer"):
        found = _read_json(Path(base) / sub / "config.json")
        if found:
            return found, f"{base}/{sub}/config.json"
    if base in WAN_TRANSFORMERS:
        return dict(WAN_TRANSFORMERS[base]), f"the embedded config of {base}"
    try:  # a Hub id already downloaded on this machine
        from huggingface_hub import hf_hub_download

        found = _read_json(Path(hf_hub_download(base, f"{part}/config.json", local_files_only=True)))
        if found:
            return found, f"{base} (local Hugging Face cache)"
    except Exception:
        pass
    fallback = DEFAULT_TRANSFORMER.get(config.model_type)
    if fallback is None:
        raise EstimateError(f"model_type {config.model_type}: `motiontune estimate` covers the WAN family for now")
    if "14B" in base and config.model_type == "WAN_2_1_T2V":
        fallback = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    return dict(WAN_TRANSFORMERS[fallback]), f"the embedded config of {fallback} (base_model_name {base!r} is not known here)"


def _part_config(config: TrainConfig, sub: str, embedded: dict) -> dict:
    found = _read_json(Path(config.base_model_name) / sub / "config.json")
    return found if found is not None else dict(embedded)


def _clean(cfg: dict, cls) -> dict:
    """The keys a diffusers class's __init__ takes (config.json files carry _class_name, _diffusers_version, ...)."""
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters)
    return {k: v for k, v in cfg.items() if k in accepted}


# --- weights, counted from a meta-device model -----------------------------------------------------------------


@dataclass
class WeightCounts:
    """A transformer's parameters, grouped for the options that change how they are stored."""

    blocks: int
    block_plain: int  # bytes of one block's parameters and buffers that quantization leaves alone
    block_linears: list[tuple[int, int]]  # (out, in) of one block's quantizable frozen Linear weights
    block_linear_elem: int  # their bytes per value unquantized
    outside: int  # bytes of everything outside the blocks (embedders, output head, rotary tables)
    trainable: list[tuple[tuple[int, ...], torch.dtype]]  # shapes and dtypes of what trains on this transformer
    trainable_per_block: list[tuple[tuple[int, ...], torch.dtype]]  # those of one block (for sanity checks)
    largest_linear: int  # values of the largest quantizable Linear
    linear_share: int = 1  # block_linears are this many blocks' (blocks that differ: their average is used)

    def block_bytes(self, weight_dtype: str) -> int:
        linears = sum(quantized_linear_bytes(o, i, weight_dtype, self.block_linear_elem) for o, i in self.block_linears)
        return self.block_plain + linears // self.linear_share

    def frozen_bytes(self, weight_dtype: str) -> int:
        return self.outside + self.blocks * self.block_bytes(weight_dtype)

    @property
    def trainable_count(self) -> int:
        return sum(math.prod(s) for s, _ in self.trainable)

    @property
    def trainable_bytes(self) -> int:
        return sum(math.prod(s) * _elem(d) for s, d in self.trainable)


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def quantized_linear_bytes(out_features: int, in_features: int, weight_dtype: str, plain_elem: int) -> int:
    """Bytes of one frozen Linear weight as train/memory.py stores it (the bias is counted with the rest)."""
    n = out_features * in_features
    if weight_dtype == "FLOAT_8":  # float8_e4m3fn values and one float32 scale per output row
        return n + 4 * out_features
    if weight_dtype == "NFLOAT_4":  # torchao to_nf4: 4-bit codes, an int8 scale per 64, a bf16 factor per 256 scales
        blocks = n // 64
        return n // 2 + blocks + 2 * (blocks // 256) + 2 + 2 * 16
    return n * plain_elem


def _text_encoder_bytes(config: TrainConfig, text: torch.nn.Module, dtype: torch.dtype) -> int:
    """The text encoder's bytes as loaded: its Linear layers as train/memory.py stores them when
    text_encoder.weight_dtype is FLOAT_8 / NFLOAT_4, the rest (token table, norms) in `dtype`."""
    storage = config.text_encoder.weight_dtype
    if storage not in ("FLOAT_8", "NFLOAT_4"):
        return _module_bytes(text, dtype)
    total, quantized, seen = 0, set(text.encoder.modules()), set()
    for module in text.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if isinstance(module, torch.nn.Linear) and module in quantized:
            total += quantized_linear_bytes(module.out_features, module.in_features, storage, _elem(dtype))
            own = [] if module.bias is None else [module.bias]
        fresh = [t for t in own if id(t) not in seen]  # the token table is shared with the encoder's
        seen.update(id(t) for t in fresh)
        total += sum(t.numel() * _elem(dtype) for t in fresh)
    return total


def _load_dtype(config: TrainConfig) -> torch.dtype:
    """The dtype the transformer loads (and computes) in: its weight_dtype, or train_dtype when quantized."""
    name = config.transformer.weight_dtype or config.train_dtype
    return DTYPES.get(name, DTYPES.get(config.train_dtype, torch.bfloat16))


def _meta_transformer(cfg: dict, layers: int | None, config: TrainConfig, trained: bool = True):
    """The transformer on the meta device, in its load dtypes, with the method applied (LoRA adapters or trainable
    weights), exactly as the trainer prepares it."""
    from diffusers import WanTransformer3DModel

    from .methods import METHODS
    from .models.base import Expert

    cfg = _clean(dict(cfg, **({"num_layers": layers} if layers is not None else {})), WanTransformer3DModel)
    with torch.device("meta"):
        model = WanTransformer3DModel(**cfg)
    dtype = _load_dtype(config)
    keep = WanTransformer3DModel._keep_in_fp32_modules if dtype in HALF.values() else []
    for name, param in model.named_parameters():  # diffusers' from_pretrained keeps these modules in float32
        if not any(k in name.split(".") for k in keep):
            param.data = param.data.to(dtype)
    model.requires_grad_(False)
    if trained:  # on the meta device too: adapters made anywhere else would be allocated and initialised for real
        with _quiet(), torch.device("meta"):
            expert = Expert("transformer", "", model, (0.0, 1.0))
            try:
                METHODS[config.training_method].prepare(_family(config), expert, config)
            except ValueError:  # a layer_filter naming blocks this short copy lacks: every block's default targets
                METHODS[config.training_method].prepare(_family(config), expert, config.model_copy(update={"layer_filter": ""}))
    return model


def _family(config: TrainConfig):
    from .models import family_for

    return family_for(config, torch.device("cpu"))


@contextlib.contextmanager
def _quiet():
    """peft and diffusers chatter (and the trainer's own info lines) while models are built for counting."""
    import warnings

    logger = logging.getLogger("motiontune")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


_WEIGHTS: dict = {}


def count_weights(cfg: dict, config: TrainConfig, trained: bool = True) -> WeightCounts:
    """Counted on a one-block copy (every block is the same; the whole depth when layer_filter names blocks), the
    method applied as the trainer applies it."""
    key = (json.dumps(cfg, sort_keys=True), trained, config.training_method, config.lora_rank, config.layer_filter,
           str(_load_dtype(config)))
    if key in _WEIGHTS:
        return _WEIGHTS[key]
    # a layer_filter naming particular blocks ("blocks.3.") makes blocks differ: then count the whole depth
    by_block = any("blocks" in f for f in config.layer_filter.split(","))
    if by_block and trained:
        model = _meta_transformer(cfg, None, config, trained)
        blocks = list(model.blocks)
    else:
        model = _meta_transformer(cfg, 1, config, trained)
        blocks = [model.blocks[0]]
    plain, linears, linear_elem, trainable_block = 0, [], 2, []
    quantizable = set()
    for block in blocks:
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and not any(
                word in name.lower() for word in KEEP_PRECISION
            ):
                quantizable.add(id(module.weight))
                linears.append((module.out_features, module.in_features))
                linear_elem = module.weight.element_size()
        for tensor in (*block.parameters(), *block.buffers()):
            if tensor.requires_grad:
                trainable_block.append((tuple(tensor.shape), tensor.dtype))
            elif id(tensor) not in quantizable:
                plain += tensor.numel() * tensor.element_size()
    in_blocks = {id(t) for b in blocks for t in (*b.parameters(), *b.buffers())}
    outside = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in in_blocks]
    layers = cfg["num_layers"]
    share = len(blocks)  # 1, or every block (counted whole)
    trainable = trainable_block * (layers // share) + [(tuple(t.shape), t.dtype) for t in outside if t.requires_grad]
    counts = WeightCounts(layers, plain // share, linears, linear_elem,
                          sum(t.numel() * t.element_size() for t in outside if not t.requires_grad), trainable,
                          trainable_block if share == 1 else [], max((o * i for o, i in linears), default=0), share)
    _WEIGHTS[key] = counts
    return counts


def optimizer_state_bytes(trainable: list[tuple[tuple[int, ...], torch.dtype]], optimizer: str) -> int:
    """State each optimizer keeps per trained tensor, in the tensor's own dtype (torch makes its moments with
    zeros_like), as the run will hold it after the first step."""
    total = 0
    for shape, dtype in trainable:
        n, elem = math.prod(shape), _elem(dtype)
        if optimizer == "ADAMW":
            total += 2 * n * elem
        elif optimizer == "ADAMW_8BIT":  # torchao: 8-bit codes and a float32 scale per 256 values, both moments
            total += 2 * (n + 4 * math.ceil(n / 256)) if n >= 4096 else 2 * n * elem
        elif optimizer == "ADAFACTOR":  # factored second moment: a row and a column statistic
            total += (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]) * elem if len(shape) >= 2 else n * elem
        elif optimizer == "PRODIGY":  # two moments, the running sum s and the starting weights
            total += 4 * n * elem
    return total


# --- activations, measured on fake tensors ---------------------------------------------------------------------


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Adds up the storage bytes of every tensor created while active and still alive; keeps the peak.
    Gradients of trained parameters are left out (they are counted with the parameters)."""

    def __init__(self, existing=()):
        super().__init__()
        self.bytes: dict[int, int] = {}
        self.refs: dict[int, object] = {}
        self.current = self.peak = 0
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

    def leave_out(self, tensor: torch.Tensor) -> None:
        key = id(tensor.untyped_storage())
        self.current -= self.bytes.get(key, 0)
        if key in self.bytes:
            self.bytes[key] = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for arg in args:  # torchao unpacks an NF4 weight inside its subclass, where this mode does not see
            if type(arg).__name__ == "NF4Tensor":  # the temporaries: they count at this moment
                self.peak = max(self.peak, self.current + DEQUANT_BYTES_PER_WEIGHT["NFLOAT_4"] * arg.numel())
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out


def _fakeify(module: torch.nn.Module, mode) -> None:
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


_ACTIVATIONS: dict = {}


def _activation_key(cfg, layers, config, shape, recompute, text_live, quantized):
    video = config.video_config
    return (json.dumps(cfg, sort_keys=True), layers, shape, recompute, text_live, quantized, config.model_type, config.training_method,
            config.lora_rank, config.layer_filter, config.train_dtype, str(_load_dtype(config)),
            video.temporal_consistency_weight > 0, video.use_temporal_attention, video.frame_dropout_probability > 0,
            config.image_conditioning_probability > 0)


def simulate_step(cfg: dict, layers: int, config: TrainConfig, shape: Shape, recompute: bool,
                  text_live: bool, quantized: str | None = None) -> tuple[int, int]:
    """(peak bytes of tensors made by one training step of a `layers`-block copy of the transformer, bytes its
    first block left alive for backward), on fake tensors: no memory, no compute. Gradients of trained
    parameters are left out (counted with the parameters). `quantized` (FLOAT_8, NFLOAT_4): the frozen block
    Linear layers are train/memory.py's quantized ones, which save less for backward and dequantize on the fly."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .models.base import Conditioning, Expert
    from .train.flow import flow_target, noisy_latents
    from .train.losses import training_loss

    key = _activation_key(cfg, layers, config, shape, recompute, text_live, quantized)
    if key in _ACTIVATIONS:
        return _ACTIVATIONS[key]
    family = _family(config)
    model = _meta_transformer(cfg, layers, config)
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    _fakeify(model, mode)
    if quantized:
        from .train.memory import quantize_frozen_linears

        with mode, _quiet():
            quantize_frozen_linears(list(model.blocks), quantized, torch.device("cpu"))
    if recompute:
        model.enable_gradient_checkpointing()
    model.train()
    expert = Expert("transformer", "", model, (0.0, 1.0))
    if not config.video_config.use_temporal_attention:
        family.set_frame_local_attention(expert, True)
    batch, (f, h, w) = shape.batch, shape.latent
    channels = cfg.get("out_channels") or cfg["in_channels"]
    with mode:
        x0 = torch.empty(batch, channels, f, h, w)
        noise = torch.empty_like(x0)
        sigma = torch.empty(batch)
        text = torch.empty(batch, TEXT_TOKENS, cfg["text_dim"], requires_grad=text_live)
        conditioning = None
        if family.is_i2v:
            latents = torch.empty(batch, cfg["in_channels"] - channels, f, h, w)
            images = torch.empty(batch, CLIP_IMAGE_TOKENS, cfg["image_dim"]) if cfg.get("image_dim") else None
            conditioning = Conditioning(latents, torch.ones(batch, dtype=torch.bool), image_embeds=images)
        elif family.is_ti2v and config.image_conditioning_probability > 0:  # per-token timesteps: the worst case
            conditioning = Conditioning(x0[:, :, :1], torch.ones(batch, dtype=torch.bool), torch.ones(batch, f))
    tracker = _LiveBytes([*model.parameters(), *model.buffers(), x0, noise, sigma, text])
    handles = [p.register_post_accumulate_grad_hook(lambda p: tracker.leave_out(p.grad))
               for p in model.parameters() if p.requires_grad]
    entries: list[int] = []  # live bytes as each block starts its first forward

    def entered(*_):
        if len(entries) < layers:
            entries.append(tracker.current)

    handles += [block.register_forward_pre_hook(entered) for block in model.blocks]
    half = HALF.get(config.train_dtype)
    with mode, tracker, _quiet():
        noisy = noisy_latents(x0, noise, sigma)
        target = flow_target(x0, noise)
        with torch.autocast("cpu", dtype=half or torch.float32, enabled=half is not None):
            prediction = family.predict(noisy, sigma, text, expert, conditioning)
        kept = conditioning.loss_frames if conditioning is not None else None
        loss, _ = training_loss(prediction, target, noisy, sigma, x0, config.video_config.temporal_consistency_weight, kept)
        loss.backward()
    for handle in handles:
        handle.remove()
    # what the second block left alive for backward (its saved tensors, its output in place of its input); the
    # first is no model for the rest: its input needs no gradient, so it saves less
    per_block = entries[2] - entries[1] if layers >= 3 else 0
    _ACTIVATIONS[key] = (tracker.peak, per_block)
    return tracker.peak, per_block


SIMULATED_BLOCKS = 3  # the simulated copy's depth; deeper models add the second block's share per block


def activation_peak(cfg: dict, config: TrainConfig, shape: Shape, recompute: bool, text_live: bool,
                    quantized: str | None = None) -> tuple[int, int]:
    """(peak activation bytes of a step at the model's full depth, bytes each block adds). Every block after
    the first adds the same bytes by the time backward starts, so the peak grows by the second block's share
    per block (tests check this against simulations of the full depth)."""
    layers = cfg["num_layers"]
    if layers <= SIMULATED_BLOCKS:
        peak, per_block = simulate_step(cfg, layers, config, shape, recompute, text_live, quantized)
        return peak, per_block
    peak, per_block = simulate_step(cfg, SIMULATED_BLOCKS, config, shape, recompute, text_live, quantized)
    return peak + (layers - SIMULATED_BLOCKS) * per_block, per_block


_NO_GRAD: dict = {}


def simulate_no_grad(key, build, inputs, method) -> int:
    """Peak bytes of tensors made by a no-grad call (encoders, sampling) on a fake copy of a module."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if key in _NO_GRAD:
        return _NO_GRAD[key]
    model = build()
    mode = FakeTensorMode()
    _fakeify(model, mode)
    with mode:
        args = inputs()
    tracker = _LiveBytes([*model.parameters(), *model.buffers(), *args])
    with mode, tracker, torch.no_grad(), _quiet():
        method(model, *args)
    _NO_GRAD[key] = tracker.peak
    return tracker.peak


def _vae_config(config: TrainConfig) -> dict:
    return _part_config(config, "vae", WAN_VAES["2.2" if config.model_type == "WAN_2_2_TI2V_5B" else "2.1"])


def _vae(config: TrainConfig):
    return _vae_from(_vae_config(config))


def _vae_from(cfg: dict):
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        return AutoencoderKLWan(**_clean(cfg, AutoencoderKLWan)).float()


def _text_encoder(config: TrainConfig, layers: int | None = None):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = _part_config(config, "text_encoder", UMT5_XXL)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "transformers_version")}
    if layers is not None:
        cfg["num_layers"] = layers
    with torch.device("meta"):
        return UMT5EncoderModel(UMT5Config(**cfg)), cfg


def _module_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    return sum(t.numel() * (_elem(dtype) if dtype is not None and t.is_floating_point() else t.element_size())
               for t in (*module.parameters(), *module.buffers()))


# --- rendering a sample: what models/wan.py's `sample` puts on the device ---------------------------------------

# Sampling decodes in tiles when decoding whole frames needs more than the memory free, with this margin for the
# allocator's rounding and fragmentation (models/wan.py at run time, `estimate` for a card of a given size).
TILE_MARGIN = 1.1


def _storage_bytes(tensors) -> int:
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors if isinstance(t, torch.Tensor)}
    return sum(storages.values())


_DECODER_CALLS: dict = {}


def _decoder_calls(cfg: dict, height: int, width: int) -> list[tuple[int, tuple[int, ...]]]:
    """What one call of the VAE's decoder on a (height, width) latent tile reaches, for a tile's first, second and
    later latent frames (its feature cache is full from the third on): (peak bytes above what was live before the
    call, the cache it found counted in, as a stand-in makes none; the output's shape)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    key = (json.dumps(cfg, sort_keys=True), height, width)
    if key in _DECODER_CALLS:
        return _DECODER_CALLS[key]
    vae = _vae_from(cfg)
    mode = FakeTensorMode()
    _fakeify(vae, mode)
    with mode:
        z = torch.empty(1, vae.config.z_dim, 3, height, width)
    tracker = _LiveBytes([*vae.parameters(), *vae.buffers(), z])
    calls = []
    with mode, tracker, torch.no_grad(), _quiet():
        vae.clear_cache()
        x = vae.post_quant_conv(z)
        for k in range(3):
            vae._conv_idx = [0]
            cache = _storage_bytes(vae._feat_map)
            start = tracker.current
            tracker.peak = start
            out = vae.decoder(x[:, :, k : k + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=k == 0)
            calls.append((tracker.peak - start + cache, tuple(out.shape)))
            del out
    _DECODER_CALLS[key] = calls
    return calls


class _DecoderStandIn(torch.nn.Module):
    """In a simulated decode, in place of the VAE's decoder: each call makes the output a real call makes and raises
    the tracker's peak by what a real call of its kind reached (measured by `_decoder_calls` on the largest tile,
    scaled by the tile's area: the decoder's tensors all grow with it)."""

    def __init__(self, calls: list[tuple[int, tuple[int, ...]]], height: int, width: int):
        super().__init__()
        self.calls, self.height, self.width = calls, height, width
        self.tracker: _LiveBytes | None = None
        self.index = 0

    def forward(self, x, feat_cache=None, feat_idx=None, first_chunk=False):
        self.index = 0 if first_chunk else min(self.index + 1, 2)
        extra, shape = self.calls[self.index]
        height, width = x.shape[-2:]
        reached = self.tracker.current + extra * height * width // (self.height * self.width)
        self.tracker.peak = max(self.tracker.peak, reached)
        scale = shape[-1] // self.width
        return x.new_empty(x.shape[0], shape[1], shape[2], height * scale, width * scale)


_DECODE: dict = {}


def decode_peak(vae_cfg: dict, latent: tuple[int, int, int], tiled: bool) -> int:
    """Peak bytes of the tensors AutoencoderKLWan.decode makes for one sample's latents (F', H', W'; the weights not
    counted), as diffusers runs it: whole frames, or (`tiled`) its tiled_decode with the VAE's default tiles (256
    pixels, 192 apart), which diffusers uses only when the frame is larger than a tile. On fake tensors: the decode's
    own loops and concatenations run as written; each decoder call is a stand-in for a real one measured on the
    largest tile, and the blending of overlapping tiles, which writes into a tile in place a row at a time (tensors
    of a row: nothing to count), is skipped (a test compares with simulating everything). A full-size decode takes
    a second or two."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = {k: v for k, v in vae_cfg.items() if not k.startswith("_")}
    key = (json.dumps(cfg, sort_keys=True), tuple(latent), tiled)
    if key in _DECODE:
        return _DECODE[key]
    vae = _vae_from(cfg)
    frames, height, width = latent
    if tiled:
        vae.enable_tiling()
        height = min(height, vae.tile_sample_min_height // vae.spatial_compression_ratio)
        width = min(width, vae.tile_sample_min_width // vae.spatial_compression_ratio)
    mode = FakeTensorMode()
    _fakeify(vae, mode)
    vae.decoder = _DecoderStandIn(_decoder_calls(cfg, height, width), height, width)
    vae.blend_v = vae.blend_h = lambda above, tile, extent: tile
    with mode:
        z = torch.empty(1, vae.config.z_dim, *latent)
    tracker = _LiveBytes([*vae.parameters(), *vae.buffers(), z])
    vae.decoder.tracker = tracker
    with mode, tracker, torch.no_grad(), _quiet():
        vae.decode(z)
    _DECODE[key] = tracker.peak
    return tracker.peak


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on `device` now: on CUDA what the driver has free plus what PyTorch's allocator
    holds unused; on the CPU the system's available memory (Linux; elsewhere, and on other devices, unknown: a very
    large number)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return 2**62


def decode_in_tiles(vae, latent: tuple[int, int, int], device: torch.device) -> tuple[bool, int, int]:
    """Whether a sample's latents (F', H', W') should be decoded in tiles on `device` now, with the VAE there: when
    decoding whole frames would need more than the memory free (with TILE_MARGIN). (tiles?, bytes of decoding whole
    frames, bytes free)."""
    whole = decode_peak(dict(vae.config), latent, tiled=False)
    free = free_bytes(device)
    return TILE_MARGIN * whole > free, whole, free


_DENOISE: dict = {}


def denoise_peak(cfg: dict, config: TrainConfig, latent: tuple[int, int, int], quantized: str | None) -> int:
    """Peak bytes of the tensors one transformer forward makes as the stock pipeline calls it while sampling (no grad,
    batch 1, in the transformer's dtype; TI2V-5B with a timestep per token), the weights not counted. Two blocks
    are simulated: without grad a block's tensors are gone before the next one starts."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    key = (json.dumps(cfg, sort_keys=True), tuple(latent), quantized, config.model_type, config.training_method,
           config.lora_rank, config.layer_filter, str(_load_dtype(config)))
    if key in _DENOISE:
        return _DENOISE[key]
    model = _meta_transformer(cfg, min(2, cfg["num_layers"]), config)
    mode = FakeTensorMode()
    _fakeify(model, mode)
    if quantized:
        from .train.memory import quantize_frozen_linears

        with mode, _quiet():
            quantize_frozen_linears(list(model.blocks), quantized, torch.device("cpu"))
    model.eval()
    dtype = _load_dtype(config)
    f, h, w = latent
    patch = cfg.get("patch_size") or (1, 2, 2)
    with mode:
        hidden = torch.empty(1, cfg["in_channels"], f, h, w, dtype=dtype)
        per_token = config.model_type == "WAN_2_2_TI2V_5B"  # the pipeline's expand_timesteps
        timestep = torch.empty(1, (f // patch[0]) * (h // patch[1]) * (w // patch[2])) if per_token else torch.empty(1)
        text = torch.empty(1, TEXT_TOKENS, cfg["text_dim"], dtype=dtype)
        image = {"encoder_hidden_states_image": torch.empty(1, CLIP_IMAGE_TOKENS, cfg["image_dim"], dtype=dtype)} \
            if cfg.get("image_dim") else {}
    tracker = _LiveBytes([*model.parameters(), *model.buffers(), hidden, timestep, text, *image.values()])
    with mode, tracker, torch.no_grad(), _quiet():
        model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=text, return_dict=False, **image)
    _DENOISE[key] = tracker.peak
    return tracker.peak


# --- the estimate ------------------------------------------------------------------------------------------------


def config_shape(config: TrainConfig) -> Shape:
    """The batch a step trains on, as the data pipeline makes it from the config (the configured resolution; with
    aspect-ratio buckets other sizes of about the same area)."""
    from .data.survey import sampling_grid, training_resolution

    family = _family(config)
    with _quiet():
        height, width = training_resolution(config, family)
        _, frames = sampling_grid(config, family)
    return make_shape(config, config.batch_size, frames, height, width, from_config=True)


def make_shape(config: TrainConfig, batch: int, frames: int, height: int, width: int, from_config: bool = False) -> Shape:
    """A batch of `batch` clips of `frames` frames at height × width, rounded as the trainer rounds them."""
    from .data.buckets import bucket_batch_size

    family = _family(config)
    vae_scale = 16 if config.model_type == "WAN_2_2_TI2V_5B" else 8
    if not from_config:
        multiple = family.spatial_multiple
        height, width = max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple)
        frames = family.valid_frame_count(frames)
    latent = ((frames - 1) // family.temporal_factor + 1, height // vae_scale, width // vae_scale)
    if from_config:
        batch = bucket_batch_size(batch, latent[0], config.video_config.video_batch_size_multiplier)
    return Shape(batch, frames, height, width, latent)


def _trained_parts(config: TrainConfig) -> list[str]:
    if config.model_type in A14B_MODEL_TYPES:
        return {"both": ["transformer", "transformer_2"], "high": ["transformer"], "low": ["transformer_2"]}.get(
            config.expert_choice() or "high")
    return ["transformer"]


def _text_live(config: TrainConfig) -> bool:
    return config.training_method == "EMBEDDING" or bool(config.additional_embeddings) or config.text_encoder.train


def estimate(config: TrainConfig, *, device: str = "cuda", shape: Shape | None = None, options: Options | None = None,
             phases: bool = False) -> Estimate:
    """The peak of a training step on `device` ("cuda": device and host memory apart; "cpu": one memory).
    `options` replaces the config's memory options for every trained transformer part; `phases` also estimates
    the encoding phase (a first run, or latent_caching off) and sample rendering."""
    if not config.model_type.startswith("WAN_"):
        raise EstimateError(f"model_type {config.model_type}: `motiontune estimate` covers the WAN family for now "
                            "(HunyuanVideo and HiDream are not modelled yet)")
    parts = _trained_parts(config)
    options = (options or Options.of(config, parts[0])).effective()
    shape = shape or config_shape(config)
    cfg, source = transformer_config(config, parts[0])
    on_cpu = device == "cpu"
    counts = count_weights(cfg, config)
    frozen_method = config.training_method == "FINE_TUNE"  # every weight trains: nothing to quantize or offload
    plain = {v: k for k, v in DTYPES.items()}[_load_dtype(config)]
    weight_dtype = options.weight_dtype if options.weight_dtype in DEQUANT_BYTES_PER_WEIGHT and not frozen_method else plain
    lines: list[Line] = []

    # weights of the expert on the device; offloaded blocks wait in host memory
    n = counts.blocks
    per_block = counts.block_bytes(weight_dtype)
    offloaded = math.floor(options.offload_fraction * n + 1e-9) if not frozen_method else 0
    resident = n - offloaded + min(options.prefetch, offloaded)
    label = "frozen weights" + (" of the trained expert" if config.model_type in A14B_MODEL_TYPES else "")
    note = f"{n} blocks × {per_block / GB:.3f} GB + {counts.outside / GB:.2f} GB outside the blocks ({weight_dtype})"
    if frozen_method and not counts.block_linears:
        lines.append(Line(label, counts.frozen_bytes(weight_dtype), 0, "every weight trains (below); rotary tables"))
    elif offloaded and not on_cpu:
        lines.append(Line(label, counts.outside + resident * per_block, offloaded * per_block,
                          note + f"; {offloaded} blocks offloaded, at most {min(options.prefetch, offloaded)} of them on the device"))
    else:
        lines.append(Line(label, counts.outside + n * per_block, 0, note))
    other_bytes = 0
    if config.model_type in A14B_MODEL_TYPES:  # the other expert is loaded too and waits in host memory
        other_part = "transformer_2" if parts[0] == "transformer" else "transformer"
        other = count_weights(transformer_config(config, other_part)[0], config, trained=len(parts) == 2)
        other_bytes = other.frozen_bytes(weight_dtype if len(parts) == 2 else plain) + other.trainable_bytes
        lines.append(Line("the other expert", 0 if not on_cpu else other_bytes, other_bytes if not on_cpu else 0,
                          "waits in host memory; " + ("also trained: swapped in for the batches it serves" if len(parts) == 2
                                                      else "not trained: loaded for samples")))

    # what trains: parameters and gradients, and the optimizer state of every trained expert
    trainable = counts.trainable_bytes
    state = optimizer_state_bytes(counts.trainable, options.optimizer) * len(parts)
    what = {"LORA": f"LoRA rank {config.lora_rank}", "FINE_TUNE": "every transformer weight", "EMBEDDING": "nothing"}[config.training_method]
    if trainable:
        lines.append(Line("trained parameters + gradients", 2 * trainable, 0,
                          f"{what}: {counts.trainable_count / 1e6:.1f}M values"))
        lines.append(Line(f"optimizer state ({options.optimizer})", state, 0,
                          f"{len(parts)} expert(s)" if len(parts) > 1 else ""))

    # activations
    text_live = _text_live(config)
    recompute = options.checkpointing != "OFF"
    quantized = weight_dtype if weight_dtype in DEQUANT_BYTES_PER_WEIGHT else None
    peak, per_block_act = activation_peak(cfg, config, shape, recompute, text_live, quantized)
    act_name = {"OFF": "activations (no checkpointing)", "ON": "activations (checkpointing ON)",
                "CPU_OFFLOADED": "activations (checkpointing CPU_OFFLOADED)"}[options.checkpointing]
    act_note = f"{n} blocks × {per_block_act / GB:.3f} GB + {(peak - n * per_block_act) / GB:.2f} GB (one block's recompute, embedders, loss)" \
        if per_block_act else ""
    if options.checkpointing == "CPU_OFFLOADED" and not on_cpu:
        half = _elem(_load_dtype(config))
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        context = TEXT_TOKENS + (CLIP_IMAGE_TOKENS if cfg.get("image_dim") else 0)
        temb_tokens = shape.tokens if (config.model_type == "WAN_2_2_TI2V_5B" and config.image_conditioning_probability > 0) else 1
        saved = shape.batch * (shape.tokens * dim * half + context * dim * half + temb_tokens * 6 * dim * 4)
        host = n * saved
        lines.append(Line(act_name, max(0, peak - n * per_block_act) + 2 * shape.batch * shape.tokens * dim * half, host,
                          f"block inputs in pinned host memory: {n} × {saved / GB:.3f} GB"))
    else:
        lines.append(Line(act_name, peak, 0, act_note))
    if text_live:
        lines += _text_encoder_lines(config, shape, on_cpu)
    if on_cpu and trainable:  # torch's foreach AdamW on the CPU: one temporary the size of a moment during the step
        lines.append(Line("optimizer step temporaries", trainable, 0, "foreach update on the CPU (fused on CUDA: none)"))
    if not on_cpu:
        lines.append(Line("CUDA context + allocator reserve", CUDA_OVERHEAD, 0, "not tensors; an allowance"))
    result = Estimate(config, shape, options, device, lines, per_block_activation=per_block_act, blocks=n, source=source)
    if phases:
        # sampling (models/wan.py) brings the transformer as training holds it (offloaded blocks stream in as they run)
        # with what trains on it; an A14B expert that only samples comes whole, one expert at a time. On the CPU both
        # are in its memory. Gradients are gone by then (set to None after each step); optimizer state stays.
        active = lines[0].device + counts.trainable_bytes
        other_sampled = active if len(parts) == 2 else other_bytes  # 0 without a second expert
        transformers = active + other_bytes if on_cpu else max(active, other_sampled)
        left = sum(line.device for line in lines if line.name.startswith("optimizer state")
                   or (line.name.startswith("text encoder") and "activations" not in line.name))
        result.phases, result.tiled_decode = _other_phases(config, shape, cfg, transformers, left, quantized, on_cpu)
    return result


_TEXT: dict = {}


def _text_encoder_lines(config: TrainConfig, shape: Shape, on_cpu: bool) -> list[Line]:
    """The text encoder on the device during training (embeddings or text-encoder training)."""
    key = (config.base_model_name, shape.batch, on_cpu, str(_load_dtype(config)), config.text_encoder.train,
           config.optimizer.optimizer)
    if key not in _TEXT:
        _TEXT[key] = _text_encoder_lines_uncached(config, shape, on_cpu)
    return [replace(line) for line in _TEXT[key]]


def _text_encoder_lines_uncached(config: TrainConfig, shape: Shape, on_cpu: bool) -> list[Line]:
    encoder, cfg = _text_encoder(config)
    dtype = torch.float32 if on_cpu else _load_dtype(config)  # WanFamily.text_dtype
    weights = _module_bytes(encoder, dtype)
    layers = cfg["num_layers"]

    def saved(k):
        def build():
            model, _ = _text_encoder(config, k)
            model = model.to(dtype).eval()  # as the trainer runs it: loaded in eval mode (no dropout), never switched
            model.requires_grad_(config.text_encoder.train)
            return model

        from torch._subclasses.fake_tensor import FakeTensorMode

        model = build()
        mode = FakeTensorMode()
        _fakeify(model, mode)
        with mode:
            embeds = torch.empty(shape.batch, TEXT_TOKENS, cfg["d_model"], dtype=dtype, requires_grad=True)
            mask = torch.ones(shape.batch, TEXT_TOKENS, dtype=torch.long)
        tracker = _LiveBytes([*model.parameters(), *model.buffers(), embeds, mask])
        with mode, tracker, _quiet():
            hidden = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            kept = tracker.current  # what stays alive for backward through the transformer step
        del hidden
        return kept

    two, three = saved(2), saved(3)
    activations = three + (layers - 3) * (three - two)
    lines = [Line("text encoder weights (trains live)", weights, 0, f"UMT5 in {str(dtype).replace('torch.', '')}"),
             Line("text encoder activations", activations, 0, f"{shape.batch} × {TEXT_TOKENS} tokens, kept for backward")]
    if config.text_encoder.train:
        trained = weights - encoder.shared.weight.numel() * _elem(dtype)  # all but the token table
        lines.append(Line("text encoder gradients + optimizer state", trained + optimizer_state_bytes(
            [((trained // _elem(dtype),), dtype)], config.optimizer.optimizer), 0, ""))
    return lines


DENOISING, DECODING, FIRST_FRAME = "sample denoising", "sample decoding", "sample first frame"
DECODE_LINE = "VAE decoding the sample"


def _other_phases(config: TrainConfig, shape: Shape, cfg: dict, transformers: int, left: int, quantized: str | None,
                  on_cpu: bool) -> tuple[dict[str, list[Line]], int]:
    """Encoding (the VAE and the text encoder, before training, when something is not cached), and rendering a sample
    as models/wan.py does it: on an accelerator its parts take turns on the device (the VAE encoding a given first
    frame, the transformer denoising, the VAE decoding) beside what training leaves there (`left`: optimizer state, a
    live text encoder). (the phases, bytes of the sample's decoding in tiles: 0 without samples)."""
    phases = {}
    vae_bytes = _module_bytes(_vae(config), torch.float32)
    text, _ = _text_encoder(config)
    text_bytes = _text_encoder_bytes(config, text, torch.float32 if on_cpu else _load_dtype(config))
    vae_cfg = _vae_config(config)
    vae_key = json.dumps(vae_cfg, sort_keys=True)

    def encoded(frames: int, height: int, width: int) -> int:
        return simulate_no_grad(("encode", vae_key, frames, height, width), lambda: _vae(config),
                                lambda: (torch.empty(1, 3, frames, height, width),),
                                lambda model, x: model.encode(x).latent_dist.mean)

    encode = encoded(shape.frames, shape.height, shape.width)
    reserve = [] if on_cpu else [Line("CUDA context + allocator reserve", CUDA_OVERHEAD)]
    clip = [Line("CLIP image encoder (float32)", 4 * CLIP_VIT_H_PARAMS)] if config.model_type == "WAN_2_1_I2V" else []
    encoding = [Line("VAE weights (float32)", vae_bytes),
                Line(f"VAE encoding one clip ({shape.frames} × {shape.width}x{shape.height})", encode)]
    phases["encoding"] = encoding + clip + reserve
    storage = config.text_encoder.weight_dtype or str(_load_dtype(config)).replace("torch.", "")
    phases["captions"] = [Line("text encoder weights", text_bytes, 0, f"UMT5 ({storage}); the VAE waits in host memory")] + reserve
    samples = list(config.samples) if config.samples and config.sample_after_unit != "NEVER" else []
    if not samples:
        return phases, 0

    def size(sample) -> Shape:
        return make_shape(config, 1, sample.frames, sample.height, sample.width)

    largest = size(max(samples, key=lambda s: s.frames * s.height * s.width))
    what = f"{largest.frames} × {largest.width}x{largest.height}"
    kept = [Line("left on the device by training", left, 0,
                 "optimizer state" + (", the live text encoder" if _text_live(config) else ""))] if left else []
    vae = [Line("VAE weights (float32)", vae_bytes)]
    transformer = [Line("the transformer", transformers, 0,
                        "one A14B expert at a time, each brought in when the pipeline calls it"
                        if config.model_type in A14B_MODEL_TYPES and not on_cpu else "")]
    with_image = [s for s in samples if s.image]
    if with_image:  # the pipeline encodes the first frame (I2V: with the other frames empty; TI2V-5B: alone)
        first = size(max(with_image, key=lambda s: s.frames * s.height * s.width))
        frames = 1 if config.model_type == "WAN_2_2_TI2V_5B" else first.frames
        phases[FIRST_FRAME] = vae + clip + [
            Line("VAE encoding the first frame", encoded(frames, first.height, first.width), 0,
                 f"{frames} × {first.width}x{first.height}" + (" (the other frames empty)" if frames > 1 else ""))
        ] + kept + (transformer if on_cpu else []) + reserve
    phases[DENOISING] = transformer + [
        Line("one transformer forward", denoise_peak(cfg, config, largest.latent, quantized), 0, f"{what}, no grad"),
    ] + kept + (vae + clip if on_cpu else []) + reserve
    whole, tiled = decode_peak(vae_cfg, largest.latent, False), decode_peak(vae_cfg, largest.latent, True)
    phases[DECODING] = vae + [
        Line(DECODE_LINE, whole, 0, f"{what}, whole frames; in tiles {_gb(tiled)} GB (used when whole frames do not fit)"),
    ] + kept + (transformer + clip if on_cpu else []) + reserve
    return phases, tiled


# --- what to change so it fits -----------------------------------------------------------------------------------

# (what changes, its cost in speed or quality, the order in which to reach for it)
COSTS = {
    "ON": (1.0, "recomputes each block in backward (about a third slower)"),
    "CPU_OFFLOADED": (1.5, "checkpointing ON, and block inputs copied to host memory and back"),
    "FLOAT_8": (2.0, "frozen weights rounded to 8 bits: a small quality cost"),
    "ADAMW_8BIT": (2.0, "optimizer moments in 8 bits"),
    "NFLOAT_4": (4.0, "frozen weights in 4 bits (QLoRA's NF4): a larger quality cost"),
}
OFFLOAD_STEPS = (0.25, 0.5, 0.75, 1.0)


def _offload_cost(fraction: float) -> float:
    """Offloaded blocks' weights cross PCIe twice a step (forward and recompute): slower the more are offloaded."""
    return 1.0 + 4.0 * fraction


@dataclass
class Change:
    options: Options
    estimate: Estimate
    cost: float
    changes: list[str]  # human-readable
    overrides: list[str]  # --set KEY=VALUE that make it

    def describe(self) -> str:
        return ", ".join(self.changes)


def _overrides(config: TrainConfig, base: Options, new: Options) -> tuple[list[str], list[str], float]:
    """The --set overrides (in the config's own OneTrainer form) that turn `base` into `new`, what they mean,
    and their cost."""
    parts = _trained_parts(config)
    newer = config.memory_config_form.startswith("newer") or config.memory_config_form == "default"
    sets, words, cost = [], [], 0.0
    if new.checkpointing != base.checkpointing:
        cost += COSTS[new.checkpointing][0] - (COSTS[base.checkpointing][0] if base.checkpointing in COSTS else 0)
        words.append(f"gradient checkpointing {new.checkpointing}")
        for part in parts if newer else []:
            sets.append(f"{part}.gradient_checkpointing=true")
            sets.append(f"{part}.activation_offloading={'true' if new.checkpointing == 'CPU_OFFLOADED' else 'false'}")
        if not newer:
            sets.append(f"gradient_checkpointing={new.checkpointing}")
    if new.offload_fraction != base.offload_fraction:
        cost += _offload_cost(new.offload_fraction)
        words.append(f"layer offloading {new.offload_fraction:g}")
        sets += [f"{part}.offload_fraction={new.offload_fraction:g}" for part in parts] if newer else \
            [f"layer_offload_fraction={new.offload_fraction:g}"]
    if new.weight_dtype != base.weight_dtype:
        cost += COSTS[new.weight_dtype][0]
        words.append(f"{new.weight_dtype} weights")
        sets += [f"{part}.weight_dtype={new.weight_dtype}" for part in parts]
    if new.optimizer != base.optimizer:
        cost += COSTS[new.optimizer][0]
        words.append(f"{new.optimizer} optimizer")
        sets.append(f"optimizer.optimizer={new.optimizer}")
    return sets, words, cost


def _candidates(config: TrainConfig, base: Options) -> list[Options]:
    checkpointing = {"OFF": ["OFF", "ON", "CPU_OFFLOADED"], "ON": ["ON", "CPU_OFFLOADED"]}.get(base.checkpointing, [base.checkpointing])
    dtypes = [base.weight_dtype]
    if config.training_method != "FINE_TUNE":  # a fine-tune trains the weights quantization would freeze
        dtypes += [d for d in ("FLOAT_8", "NFLOAT_4") if d != base.weight_dtype and not (base.weight_dtype == "NFLOAT_4")]
    fractions = [base.offload_fraction] + ([f for f in OFFLOAD_STEPS if f > base.offload_fraction]
                                           if config.training_method != "FINE_TUNE" else [])
    optimizers = [base.optimizer] + (["ADAMW_8BIT"] if base.optimizer == "ADAMW" and config.training_method == "FINE_TUNE" else [])
    return [Options(c, f, base.prefetch, d, o) for c in checkpointing for d in dtypes for f in fractions for o in optimizers]


def cheapest_changes(config: TrainConfig, gpu_bytes: int, shape: Shape | None = None, limit: int = 3) -> list[Change]:
    """Memory options that make a step fit in `gpu_bytes`, cheapest first (empty: nothing fits at this shape).
    Candidates are tried in order of cost, so a config that fits cheaply costs few simulations."""
    base = Options.of(config, _trained_parts(config)[0])
    ranked = []
    for options in _candidates(config, base):
        if options != base:
            sets, words, cost = _overrides(config, base, options.effective() if options.offload_fraction else options)
            ranked.append((cost, options, sets, words))
    ranked.sort(key=lambda entry: entry[0])
    found: list[Change] = []
    for cost, options, sets, words in ranked:
        if any(set(change.changes) <= set(words) for change in found):
            continue  # adds to a cheaper change that already fits
        result = estimate(config, shape=shape, options=options)
        if result.fits(gpu_bytes):
            found.append(Change(options, result, cost, words, sets))
            if len(found) == limit:
                break
    return found


def smallest_floor(config: TrainConfig, shape: Shape | None = None) -> Estimate:
    """The estimate with every memory option at its strongest (how low this shape can go)."""
    base = Options.of(config, _trained_parts(config)[0])
    strongest = Options("CPU_OFFLOADED", 1.0 if config.training_method != "FINE_TUNE" else base.offload_fraction, 1,
                        "NFLOAT_4" if config.training_method != "FINE_TUNE" else base.weight_dtype,
                        "ADAMW_8BIT" if config.training_method == "FINE_TUNE" and base.optimizer == "ADAMW" else base.optimizer)
    return estimate(config, shape=shape, options=strongest)


# --- the report --------------------------------------------------------------------------------------------------


def _gb(value: int) -> str:
    return f"{value / GB:.1f}"


def _table(rows: list[list[str]], header: list[str], left: tuple[int, ...] = ()) -> list[str]:
    """Columns aligned: the first, the last and those in `left` to the left, the others (figures) to the right."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row):
        return "  ".join(str(c).ljust(w) if i in (0, len(row) - 1, *left) else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def report(config: TrainConfig, name: str, gpu_gb: float | None = None, seed_table: bool = False) -> str:
    """The text `motiontune estimate` prints."""
    result = estimate(config, phases=True)
    options = result.options
    out = [f"{name}: {config.model_type}, {config.training_method}"
           + (f" rank {config.lora_rank}" if config.training_method == "LORA" else "")
           + f", {config.train_dtype}, checkpointing {options.checkpointing}"
           + (f", layer offloading {options.offload_fraction:g}" if options.offload_fraction else "")
           + (f", {options.weight_dtype} weights" if options.weight_dtype in DEQUANT_BYTES_PER_WEIGHT else "")
           + f", {options.optimizer}",
           f"  batch: {result.shape.describe()}",
           f"  model: {result.source} (no weights read)",
           "",
           "Training step, at its peak (GB = 2^30 bytes):"]
    rows = [[line.name, _gb(line.device), _gb(line.host) if line.host else "", line.note] for line in result.lines]
    rows.append(["total", _gb(result.device), _gb(result.host) if result.host else "", ""])
    out += ["  " + r for r in _table(rows, ["part", "device", "host", ""])]
    for phase, title in PHASE_TITLES.items():
        if phase in result.phases:
            lines = result.phases[phase]
            out += ["", title]
            out += ["  " + r for r in _table([[l.name, _gb(l.device), l.note] for l in lines] +
                                             [["total", _gb(sum(l.device for l in lines)), ""]], ["part", "device", ""])]
    sizes = [gpu_gb] if gpu_gb else [8, 16, 24, 48]
    out += ["", f"Does the training step fit {gpu_gb:g} GB? And the other moments of the run?" if gpu_gb
            else "Does the training step fit? And the other moments of the run?"]
    fit_rows, hows = [], []
    for size in sizes:
        budget = int(size * GB)
        others = other_moments(result, budget)
        if result.fits(budget):
            fit_rows.append([f"{size:g} GB", "yes", others, f"{_gb(budget - result.device)} GB to spare"])
            continue
        changes = cheapest_changes(config, budget)
        if changes:
            best = changes[0]
            fit_rows.append([f"{size:g} GB", "no", others, f"fits with {best.describe()} ({_gb(best.estimate.device)} GB)"])
            hows.append(f"  {size:g} GB: " + " ".join(f"--set {s}" for s in best.overrides))
            if gpu_gb and len(changes) > 1:
                hows += [f"  or: {c.describe()} ({_gb(c.estimate.device)} GB): " + " ".join(f"--set {s}" for s in c.overrides)
                         for c in changes[1:]]
        else:
            floor = smallest_floor(config)
            fit_rows.append([f"{size:g} GB", "no", others, f"not with any memory option (at least {_gb(floor.device)} GB at "
                             "this batch): fewer frames, a lower resolution or a smaller batch"])
    header = ["GPU", "step fits", "other moments", "cheapest change for the step"]
    out += ["  " + r for r in _table(fit_rows, header, left=(2,))]
    if hows:
        out += ["", "The changes, as overrides for `motiontune train`:"] + hows
    if seed_table:
        out += ["", "OneTrainer's WAN 2.2 table (GPU: batch × frames × resolution²), with this config's model and method:"]
        out += ["  " + r for r in _table(seed_rows(config), ["GPU", "seed's setting", "as configured", "fits",
                                                              "cheapest change that fits"])]
    return "\n".join(out)


PHASE_TITLES = {
    "encoding": "Encoding clips, before training (a first run, or latent_caching off):",
    "captions": "Encoding captions, before training (a first run):",
    FIRST_FRAME: "Rendering a sample, encoding its first frame (the transformer waits in host memory):",
    DENOISING: "Rendering a sample, denoising (the VAE waits in host memory):",
    DECODING: "Rendering a sample, decoding (the transformer waits in host memory):",
}


def other_moments(result: Estimate, gpu_bytes: int) -> str:
    """Whether every moment of the run other than the training step fits a card of `gpu_bytes`; those that do not."""
    over = [f"{name} {_gb(peak)} GB" for name in result.phases if (peak := result.phase_peak(name, gpu_bytes)) > gpu_bytes]
    if over:
        return "no: " + ", ".join(over)
    return "yes" + (" (decoding samples in tiles)" if result.decodes_in_tiles(gpu_bytes) else "")


def seed_rows(config: TrainConfig) -> list[list[str]]:
    rows = []
    for size, batch, frames, side in SEED_TABLE:
        shape = make_shape(config, batch, frames, side, side)
        result = estimate(config, shape=shape)
        budget = int(size * GB)
        setting = f"{batch} × {frames} × {side}²" + (f" ({shape.frames} frames)" if shape.frames != frames else "")
        if result.fits(budget):
            rows.append([f"{size} GB", setting, f"{_gb(result.device)} GB", "yes", ""])
            continue
        changes = cheapest_changes(config, budget, shape, limit=1)
        if changes:
            rows.append([f"{size} GB", setting, f"{_gb(result.device)} GB", "no",
                         f"{changes[0].describe()}: {_gb(changes[0].estimate.device)} GB"])
        else:
            floor = smallest_floor(config, shape)
            rows.append([f"{size} GB", setting, f"{_gb(result.device)} GB", "no",
                         f"nothing fits (at least {_gb(floor.device)} GB)"])
    return rows
