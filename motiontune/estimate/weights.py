"""Weights, what trains and its optimizer state, counted from a transformer built on the meta device.

The family names its transformer class and its kinds of block; the method is applied by the trainer's own code
(methods/), quantized layers are counted at the bytes train/memory.py stores, optimizer state by train/optim.py.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import torch

from ..config import TrainConfig
from ..models.fake_memory import init_kwargs, quiet
from ..util.quantize import KEEP_PRECISION
from .configs import HALF, family, load_dtype


_BUILT: dict = {}


def meta_transformer(cfg: dict, config: TrainConfig, depth: int | None = None, trained: bool = True):
    """The transformer on the meta device, in its load dtypes, with the method applied (LoRA adapters or trainable
    weights) exactly as the trainer prepares it. `depth`: that many blocks of each kind (None: as configured).
    A fresh copy each call (callers fake, quantize or hook it); building one takes seconds, copying it little, and a
    report simulates the same model with several memory options."""
    import copy

    key = (json.dumps(cfg, sort_keys=True), depth, trained, config.model_dump_json())
    if key not in _BUILT:
        if len(_BUILT) >= 8:  # a planner or the web UI goes through many configs: keep the latest few
            _BUILT.pop(next(iter(_BUILT)))
        _BUILT[key] = _build_meta_transformer(cfg, config, depth, trained)
    return copy.deepcopy(_BUILT[key])


def _build_meta_transformer(cfg: dict, config: TrainConfig, depth: int | None, trained: bool):
    import diffusers

    from ..methods import METHODS
    from ..models.base import Expert

    owner = family(config)
    cls = getattr(diffusers, owner.transformer_class_name)
    if depth is not None:
        short = dict(cfg, **{key: min(depth, cfg.get(key, depth)) for key, _ in owner.block_groups})
        cfg = owner.estimate_shorten(cfg, short) if hasattr(owner, "estimate_shorten") else short
    with torch.device("meta"):
        model = cls(**init_kwargs(cfg, cls))
    dtype = load_dtype(config)
    keep = (cls._keep_in_fp32_modules or []) if dtype in HALF.values() else []
    for name, param in model.named_parameters():  # diffusers' from_pretrained keeps these modules in float32
        if not any(k in name.split(".") for k in keep):
            param.data = param.data.to(dtype)
    model.requires_grad_(False)
    if trained:  # on the meta device too: adapters made anywhere else would be allocated and initialised for real
        with quiet(), torch.device("meta"):
            expert = Expert("transformer", "", model, (0.0, 1.0))
            try:
                METHODS[config.training_method].prepare(owner, expert, config)
            except ValueError:  # a layer_filter naming blocks this short copy lacks: every block's default targets
                METHODS[config.training_method].prepare(owner, expert, config.model_copy(update={"layer_filter": ""}))
    return model


def block_lists(model, config: TrainConfig) -> list[tuple[str, list[torch.nn.Module]]]:
    """(config key of the count, the blocks) for each kind of block the family declares."""
    return [(key, list(getattr(model, attribute))) for key, attribute in family(config).block_groups]


@dataclass
class BlockKind:
    """One kind of block (all of a kind are the same): how many, and its parameters grouped by storage."""

    count: int
    plain: int  # bytes of one block's parameters and buffers that quantization leaves alone
    linears: list[tuple[int, int]]  # (out, in) of its quantizable frozen Linear weights (`share` blocks' worth)
    linear_elem: int  # their bytes per value unquantized
    share: int = 1  # linears are this many blocks' (blocks that differ: their average is used)
    trained: int = 0  # bytes of one block's trained parameters (their average over `share` blocks)

    def bytes(self, weight_dtype: str) -> int:
        linears = sum(quantized_linear_bytes(o, i, weight_dtype, self.linear_elem) for o, i in self.linears)
        return self.plain + linears // self.share


@dataclass
class WeightCounts:
    """A transformer's parameters, grouped for the options that change how they are stored."""

    kinds: list[BlockKind]
    outside: int  # bytes of everything outside the blocks (embedders, output head, rotary tables)
    trainable: list[tuple[tuple[int, ...], torch.dtype]]  # shapes and dtypes of what trains on this transformer
    outside_trainable: int = 0  # bytes of what trains outside the blocks

    @property
    def blocks(self) -> int:
        return sum(kind.count for kind in self.kinds)

    def block_bytes(self, weight_dtype: str) -> int:
        """One block's bytes (blocks of several kinds: their average)."""
        return sum(kind.count * kind.bytes(weight_dtype) for kind in self.kinds) // max(1, self.blocks)

    def frozen_bytes(self, weight_dtype: str) -> int:
        return self.outside + sum(kind.count * kind.bytes(weight_dtype) for kind in self.kinds)

    @functools.cached_property  # a LoRA has thousands of tensors, and a planner asks many times
    def trainable_count(self) -> int:
        return sum(math.prod(s) for s, _ in self.trainable)

    @functools.cached_property
    def trainable_bytes(self) -> int:
        return sum(math.prod(s) * elem(d) for s, d in self.trainable)


@functools.lru_cache(maxsize=None)
def elem(dtype: torch.dtype) -> int:
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


def _kind(blocks: list[torch.nn.Module], count: int, trainable: list) -> BlockKind:
    plain, linears, linear_elem, quantizable, trained = 0, [], 2, set(), 0
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
                trainable.append((tuple(tensor.shape), tensor.dtype))
                trained += tensor.numel() * tensor.element_size()
            elif id(tensor) not in quantizable:
                plain += tensor.numel() * tensor.element_size()
    return BlockKind(count, plain // len(blocks), linears, linear_elem, len(blocks), trained // len(blocks))


_WEIGHTS: dict = {}


def count_weights(cfg: dict, config: TrainConfig, trained: bool = True) -> WeightCounts:
    """Counted on a copy with one block of each kind (every block of a kind is the same; the whole depth when
    layer_filter names blocks), the method applied as the trainer applies it."""
    from ..util.sim_cache import cached

    key = (json.dumps(cfg, sort_keys=True), trained, config.model_dump_json())  # the method reads much of the config
    if key not in _WEIGHTS:
        _WEIGHTS[key] = cached("weights", key, lambda: _count_weights(cfg, config, trained), _encode_counts, _decode_counts)
    return _WEIGHTS[key]


def _encode_counts(counts: WeightCounts) -> dict:
    return {"kinds": [dict(vars(kind), linears=[list(pair) for pair in kind.linears]) for kind in counts.kinds],
            "outside": counts.outside, "outside_trainable": counts.outside_trainable,
            "trainable": [[list(shape), str(dtype).removeprefix("torch.")] for shape, dtype in counts.trainable]}


def _decode_counts(found: dict) -> WeightCounts:
    kinds = [BlockKind(**dict(kind, linears=[tuple(pair) for pair in kind["linears"]])) for kind in found["kinds"]]
    trainable = [(tuple(shape), getattr(torch, dtype)) for shape, dtype in found["trainable"]]
    return WeightCounts(kinds, found["outside"], trainable, found["outside_trainable"])


def _count_weights(cfg: dict, config: TrainConfig, trained: bool) -> WeightCounts:
    # a layer_filter naming particular blocks ("blocks.3.") makes blocks differ: then count the whole depth
    whole = trained and any("blocks" in f for f in config.layer_filter.split(","))
    model = meta_transformer(cfg, config, None if whole else 1, trained)
    kinds, trainable, in_blocks = [], [], set()
    for count_key, blocks in block_lists(model, config):
        count = cfg[count_key]
        if count == 0 or not blocks:
            continue
        own: list = []
        kinds.append(_kind(blocks, count, own))
        trainable += own * (count // len(blocks))
        in_blocks |= {id(t) for b in blocks for t in (*b.parameters(), *b.buffers())}
    outside = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in in_blocks]
    trainable += [(tuple(t.shape), t.dtype) for t in outside if t.requires_grad]
    return WeightCounts(kinds, sum(t.numel() * t.element_size() for t in outside if not t.requires_grad), trainable,
                        sum(t.numel() * t.element_size() for t in outside if t.requires_grad))


class _Shapes:
    """Stands in for an optimizer where train/optim.py reads only its param groups' shapes and dtypes."""

    def __init__(self, trainable):
        self.param_groups = [{"params": [torch.empty(s, dtype=d, device="meta") for s, d in trainable]}]


def optimizer_state_bytes(trainable: list[tuple[tuple[int, ...], torch.dtype]], config: TrainConfig,
                          optimizer: str | None = None) -> int:
    """The optimizer state the run holds after its first step: train/optim.py's own count."""
    from ..train.optim import optimizer_state_bytes as counted

    if optimizer and optimizer != config.optimizer.optimizer:
        config = config.model_copy(update={"optimizer": config.optimizer.model_copy(update={"optimizer": optimizer})})
    key = (tuple(trainable), config.optimizer.optimizer)  # train/optim.py reads only the kind of optimizer
    if key not in _STATE:
        _STATE[key] = counted(_Shapes(trainable), config)
    return _STATE[key]


_STATE: dict = {}


def module_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """A module's parameters and buffers; floating ones in `dtype` when given."""
    return sum(t.numel() * (elem(dtype) if dtype is not None and t.is_floating_point() else t.element_size())
               for t in (*module.parameters(), *module.buffers()))


def stored_text_encoder_bytes(config: TrainConfig, encoder: torch.nn.Module, dtype: torch.dtype) -> int:
    """A text encoder's bytes as loaded: with text_encoder.weight_dtype FLOAT_8 / NFLOAT_4 its encoder's Linear layers
    as train/memory.py stores them, the rest (token table, norms) in `dtype`."""
    storage = config.text_encoder.weight_dtype
    if storage not in ("FLOAT_8", "NFLOAT_4") or not hasattr(encoder, "encoder"):
        return module_bytes(encoder, dtype)
    total, quantized, seen = 0, set(encoder.encoder.modules()), set()
    for module in encoder.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if isinstance(module, torch.nn.Linear) and module in quantized:
            total += quantized_linear_bytes(module.out_features, module.in_features, storage, elem(dtype))
            own = [] if module.bias is None else [module.bias]
        fresh = [t for t in own if id(t) not in seen]  # the token table is shared with the encoder's
        seen.update(id(t) for t in fresh)
        total += sum(t.numel() * elem(dtype) for t in fresh)
    return total
