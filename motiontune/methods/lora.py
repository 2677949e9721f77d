"""LoRA and its relatives (`peft_type` LOHA, LOKR; `lora_decompose`: DoRA): peft's adapters on each trained
transformer, and saving them in each output format."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from ..config import TrainConfig
from ..models import ModelFamily
from ..models.base import Expert
from .base import SaveError, output_paths, saving  # noqa: F401  (SaveError: where callers found it before)

log = logging.getLogger("motiontune")

ADAPTER = "default"
SHARDED = False  # small adapters: replicated on every rank, their gradients summed
# the names of peft's adapter parameters: LoRA's (DoRA's magnitude `lora_magnitude_vector` too), LoHa's, LoKr's
ADAPTER_PARAMETERS = ("lora_", "hada_", "lokr_")


def adapter_config(config: TrainConfig, targets: list[str]):
    """peft's config for the run's `peft_type`; every kind starts with a zero update (the base model exactly)."""
    if config.peft_type == "LOHA":  # ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha / r
        return LoHaConfig(r=config.lora_rank, alpha=config.lora_alpha, target_modules=targets, init_weights=True)
    if config.peft_type == "LOKR":  # ΔW = w1 ⊗ (w2_a w2_b) · alpha / r
        return LoKrConfig(r=config.lokr_dim, alpha=config.lora_alpha, target_modules=targets, init_weights=True,
                          decompose_both=config.lokr_decompose_both, decompose_factor=config.lokr_decompose_factor)
    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, init_lora_weights=True, use_dora=config.lora_decompose)


def prepare(family: ModelFamily, expert: Expert, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Wrap the expert's default (or `layer_filter`) targets with the adapter; return its trainable parameters."""
    targets = family.lora_target_modules(expert.module, config.layer_filter)
    if config.peft_type == "LOKR" and config.output_model_format == "COMFY_LORA":
        # a Kronecker product per part cannot be joined into the one entry an original-layout fused module has
        fused = [t for t in targets if len(family.comfy_lora_parts(t)) > 1]
        targets = [t for t in targets if t not in fused]
        if fused:
            log.warning("peft_type LOKR with COMFY_LORA: %d modules that %s's original layout fuses (%s, ...) are not "
                        "adapted, as their Kronecker factors cannot be joined into one ComfyUI entry; DIFFUSERS_LORA "
                        "adapts them", len(fused), family.NAME, fused[0])
    if not targets:
        raise ValueError(
            f"layer_filter = {config.layer_filter!r} matches no Linear layer of the transformer that this adapter may "
            "adapt; use substrings of module names such as 'attn1,attn2,ffn', or leave it empty for the default set"
        )
    expert.module.add_adapter(adapter_config(config, targets), adapter_name=ADAPTER)
    parameters = [p for n, p in expert.module.named_parameters() if any(a in n for a in ADAPTER_PARAMETERS)]
    for parameter in parameters:  # adapters train in float32 whatever the base weights are
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
    return parameters


@contextlib.contextmanager
def untrained(expert: Expert):
    """The base model's prediction: the adapters switched off, then on again."""
    expert.module.disable_adapters()
    try:
        yield
    finally:
        expert.module.enable_adapters()


def lora_state_dict(expert: Expert) -> dict[str, torch.Tensor]:
    """peft names without the adapter name: `blocks.0.attn1.to_q.lora_A.weight`, `...hada_w1_a`, `...lokr_w1`,
    `...lora_magnitude_vector`"""
    state = get_peft_model_state_dict(expert.module, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def trained_embeddings(config: TrainConfig) -> list:
    return []


def save(family: ModelFamily, config: TrainConfig, destination: Path, output_format: str | None = None,
         states: dict | None = None) -> list[Path]:
    paths = output_paths(family, destination)
    # experts_on split: each process saves the expert it holds
    return [_save_one(family, expert, config, paths[expert.name], output_format)
            for expert in family.trained_experts() if expert.module is not None]


def _save_one(family: ModelFamily, expert: Expert, config: TrainConfig, destination: Path, output_format: str | None) -> Path:
    """Write one expert's LoRA atomically (a temporary file in the same folder, then a rename)."""
    output_format = output_format or config.output_model_format
    state = lora_state_dict(expert)
    with saving(destination, "LoRA") as written:
        if output_format == "DIFFUSERS_LORA":
            # The adapter metadata keeps lora_alpha, so the stock loader scales by alpha / rank.
            metadata = expert.module.peft_config[ADAPTER].to_dict()
            family.save_diffusers_lora(str(written.parent), written.name, state, metadata)
        elif output_format == "COMFY_LORA":
            save_file(comfy_state_dict(family, expert.module, state), str(written),
                      metadata={"peft_type": config.peft_type + (" (DoRA)" if config.lora_decompose else "")})
        else:
            raise ValueError(f"unknown output_model_format {output_format!r}")
        if extra := family.lora_metadata(config):  # settings a loader reads from the file (IC-LoRA's downscale)
            _add_metadata(written, extra)
    return destination


def _add_metadata(path: Path, extra: dict[str, str]) -> None:
    """Rewrite a safetensors file with `extra` beside the metadata it has."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        metadata = {**(file.metadata() or {}), **extra}
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    save_file(tensors, str(path), metadata=metadata)


def comfy_state_dict(family: ModelFamily, module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter in the original layout, which ComfyUI (and, for LoRA, diffusers' converters) read, with ComfyUI's
    names: `diffusion_model.<original module>.lora_A.weight` / `.lora_B.weight` (+ `.dora_scale` for DoRA),
    `.hada_w1_a` / `.hada_w1_b` / `.hada_w2_a` / `.hada_w2_b` (LoHa), `.lokr_w1[_a/_b]` / `.lokr_w2[_a/_b]` (LoKr), and
    `.alpha` where the family's readers all scale by it (ComfyUI: scale = alpha / rank of the entry, 1 without
    `.alpha`); else the scale is folded into the first factor. The scale is peft's own, read from each adapted layer
    of `module`. docs/formats.md has the check of each formula.

    Where the original layout fuses several adapted modules into one (HunyuanVideo's q, k, v), that module gets one
    entry: the parts' down factors stacked, their up factors block-diagonal, so each part's update lands only on its
    own output rows (for LoHa both pairs, which the Hadamard product keeps apart); a part without an adapter adds
    zero rows. LoKr cannot be joined so (prepare leaves such modules out)."""
    adapters: dict[str, dict[str, torch.Tensor]] = {}  # adapted module → {"lora_A.weight": ..., "hada_w1_a": ...}
    for key, tensor in state.items():
        name, suffix = _split_adapter_key(key)
        adapters.setdefault(name, {})[suffix] = tensor
    fused: dict[str, list[str]] = {}  # original module → the modules it holds, in its order
    for name in adapters:
        fused.setdefault(family.comfy_lora_key(name), family.comfy_lora_parts(name))
    converted = {}
    for original, parts in fused.items():
        present = [p for p in parts if p in adapters]
        keeps_alpha = family.comfy_lora_keeps_alpha(present[0])
        found = adapters[present[0]]
        if "hada_w1_a" in found:
            entry = _loha_entry(module, parts, adapters)
        elif any(k.startswith("lokr_") for k in found):
            if len(parts) > 1:
                raise SaveError(f"{original}: a LoKr on the parts of a fused module cannot be saved as one ComfyUI entry; "
                                "save it as DIFFUSERS_LORA")
            entry = dict(found)
        else:
            entry = _lora_entry(module, parts, adapters)
        scale = _scaling(module, present[0])
        rank = _entry_rank(entry)
        if keeps_alpha and rank is not None:
            converted[f"{original}.alpha"] = torch.tensor(scale * rank)  # the reader's alpha / rank is peft's scaling
        else:  # no `.alpha`: the reader applies scale 1 (LoKr of full factors always does)
            first = next(k for k in ("lora_B.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a") if k in entry)
            entry[first] = entry[first] * scale
        for suffix, tensor in entry.items():
            converted[f"{original}.{suffix}"] = tensor.contiguous()
    return converted


def _split_adapter_key(key: str) -> tuple[str, str]:
    """`blocks.0.attn1.to_q.hada_w1_a` → (`blocks.0.attn1.to_q`, `hada_w1_a`)."""
    parts = key.split(".")
    at = next(i for i, part in enumerate(parts) if part.startswith(ADAPTER_PARAMETERS))
    return ".".join(parts[:at]), ".".join(parts[at:])


def _scaling(module: torch.nn.Module, name: str) -> float:
    """peft's factor on the product of the adapter's matrices (alpha / r for every kind)."""
    return float(module.get_submodule(name).scaling[ADAPTER])


def _entry_rank(entry: dict[str, torch.Tensor]) -> int | None:
    """The rank ComfyUI divides alpha by; None where it applies no alpha (a LoKr of two full factors)."""
    for key, dim in (("lora_A.weight", 0), ("hada_w1_b", 0), ("lokr_w2_b", 0), ("lokr_w1_b", 0)):
        if key in entry:
            return entry[key].shape[dim]
    return None


def _rows(module: torch.nn.Module, name: str) -> int:
    return module.get_submodule(name).out_features


def _lora_entry(module: torch.nn.Module, parts: list[str], adapters: dict) -> dict[str, torch.Tensor]:
    """LoRA (and DoRA): A stacked, B block-diagonal, `dora_scale` one value per output row."""
    present = [p for p in parts if p in adapters]
    entry = {
        "lora_A.weight": torch.cat([adapters[p]["lora_A.weight"] for p in present]),
        "lora_B.weight": torch.block_diag(*(adapters[p]["lora_B.weight"] if p in adapters else torch.zeros(_rows(module, p), 0)
                                            for p in parts)),
    }
    if any("lora_magnitude_vector" in adapters[p] for p in present):
        entry["dora_scale"] = torch.cat([_dora_scale(module, p, adapters.get(p)) for p in parts])
    return entry


def _base_weight(module: torch.nn.Module, name: str) -> torch.Tensor:
    layer = module.get_submodule(name)
    layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    return layer.weight.detach().to("cpu", torch.float32)


def _dora_scale(module: torch.nn.Module, name: str, adapter: dict | None) -> torch.Tensor:
    """ComfyUI's DoRA with a (rows, 1) `dora_scale` (its output axis) makes W' = (W + ΔW) · dora_scale / ‖W‖, each norm
    over a row of the base weight W; peft's DoRA is W' = (W + ΔW) · m / ‖W + ΔW‖. So dora_scale = m · ‖W‖ / ‖W + ΔW‖
    gives ComfyUI peft's weight exactly; a part without an adapter keeps W with dora_scale = ‖W‖."""
    weight = _base_weight(module, name)
    norm = weight.norm(dim=1)
    if adapter is None:
        return norm[:, None]
    delta = _scaling(module, name) * adapter["lora_B.weight"] @ adapter["lora_A.weight"]
    magnitude = adapter["lora_magnitude_vector"].float()
    return (magnitude * norm / (weight + delta).norm(dim=1))[:, None]


def _loha_entry(module: torch.nn.Module, parts: list[str], adapters: dict) -> dict[str, torch.Tensor]:
    present = [p for p in parts if p in adapters]
    entry = {}
    for pair in ("w1", "w2"):
        entry[f"hada_{pair}_a"] = torch.block_diag(*(adapters[p][f"hada_{pair}_a"] if p in adapters
                                                     else torch.zeros(_rows(module, p), 0) for p in parts))
        entry[f"hada_{pair}_b"] = torch.cat([adapters[p][f"hada_{pair}_b"] for p in present])
    return entry
