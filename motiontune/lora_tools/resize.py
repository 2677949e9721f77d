"""`motiontune lora resize`: a LoRA to a lower rank, by the SVD of each module's weight change B·A.

The best rank-R approximation of ΔW (Eckart-Young) keeps its R largest singular values; what is left out is the
error, ‖ΔW - ΔW_R‖ / ‖ΔW‖ per module and over the file (all modules' changes as one vector). The SVD of B·A is taken
through QR factors of B and Aᵀ, so only an r x r matrix is decomposed. alpha / rank (each entry's scale) is kept:
`.alpha` becomes scale · R, a DIFFUSERS_LORA file's peft config gets r = R and lora_alpha = scale · R.

LoRA, and DoRA as peft stores it (DIFFUSERS_LORA: the magnitude stays, peft renormalises the smaller ΔW) resize;
LoKr resizes its split second factor the same way (‖w1 ⊗ E‖ = ‖w1‖ ‖E‖: the module's relative error is that factor's).
Refused, with the reason: LoHa, and a ComfyUI DoRA (its `dora_scale` holds the norms of W + ΔW for the ΔW it was
written with)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..util.lazy import torch
from .lora_file import METADATA_KEY, DIFFUSERS_PREFIX, Entry, LoraFile, LoraFileError

REFUSED = {
    "LoHa": "a LoHa's change (w1_a·w1_b) ⊙ (w2_a·w2_b) has rank up to r², and no SVD gives smaller Hadamard factors "
            "of it",
}


@dataclass
class Resized:
    tensors: dict
    metadata: dict
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # module → (‖ΔW - ΔW_R‖, ‖ΔW‖)

    @property
    def relative_error(self) -> float:
        left = sum(e * e for e, _ in self.errors.values())
        total = sum(n * n for _, n in self.errors.values())
        return math.sqrt(left / total) if total else 0.0


def low_rank(up, down, rank: int):
    """(up', down', error, norm): the rank-`rank` factors of up·down nearest to it, and the Frobenius norms of what is
    left out and of up·down."""
    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    root = s[:rank].sqrt()
    new_up = q_up @ (u[:, :rank] * root)
    new_down = (root[:, None] * vh[:rank]) @ q_down.T
    return new_up.to(up.dtype), new_down.to(down.dtype), s[rank:].norm().item(), s.norm().item()


def resize(lora: LoraFile, rank: int) -> Resized:
    if rank < 1:
        raise ValueError(f"--rank {rank}: give a rank of 1 or more")
    for kind, reason in REFUSED.items():
        if kind in lora.kinds():
            raise LoraFileError(f"{lora.path}: a {kind} file cannot be resized: {reason}")
    if "DoRA" in lora.kinds() and lora.layout == "COMFY_LORA":
        raise LoraFileError(f"{lora.path}: a ComfyUI DoRA file cannot be resized: its dora_scale holds the norms of "
                            "W + ΔW for the ΔW it was written with, which a smaller ΔW changes (and the base weights are "
                            "not in the file); resize the run's DIFFUSERS_LORA file, whose peft magnitude stays valid")
    config = lora.adapter_metadata
    resized = Resized(dict(lora.tensors), dict(lora.metadata))
    scales, ranks = {}, {}  # module → its scale, its rank in the resized file
    for module, entry in lora.entries().items():
        factors = _factors(entry)
        if factors is None:
            continue
        up_key, down_key = factors
        up, down = entry.tensors[up_key], entry.tensors[down_key]
        scales[module] = scale = _scale(module, entry, config, down.shape[0])
        factor = abs(scale) * _kron_norm(entry)
        if down.shape[0] <= rank:  # already small enough: kept, exactly
            ranks[module] = down.shape[0]
            resized.errors[module] = (0.0, factor * (up.double() @ down.double()).norm().item())
            continue
        ranks[module] = rank
        new_up, new_down, error, norm = low_rank(up, down, rank)
        resized.tensors[f"{module}.{up_key}"] = new_up.contiguous()
        resized.tensors[f"{module}.{down_key}"] = new_down.contiguous()
        resized.errors[module] = (factor * error, factor * norm)
        if "alpha" in entry.tensors:
            resized.tensors[f"{module}.alpha"] = torch.tensor(scale * rank, dtype=entry.tensors["alpha"].dtype)
    if not ranks:
        raise LoraFileError(f"{lora.path}: no module has a pair of low-rank factors to shorten (lora_B·lora_A, or a "
                            "LoKr's split lokr_w2_a·lokr_w2_b); a LoKr whose factors are whole matrices has no rank to lower")
    if max(ranks.values()) <= rank and not any(e for e, _ in resized.errors.values()):
        raise LoraFileError(f"{lora.path}: every module already has rank {max(ranks.values(), default=0)} or less; "
                            f"nothing to resize to {rank}")
    if config is not None:
        resized.metadata[METADATA_KEY] = json.dumps(_peft_config(config, scales, ranks, rank), indent=2, sort_keys=True)
    return resized


def _factors(entry: Entry) -> tuple[str, str] | None:
    """The (up, down) pair of keys whose product an SVD may shorten; None when the entry has none."""
    for up, down in (("lora_B.weight", "lora_A.weight"), ("lora_up.weight", "lora_down.weight"),
                     ("lokr_w2_a", "lokr_w2_b")):
        if up in entry.tensors and down in entry.tensors:
            return up, down
    return None


def _kron_norm(entry: Entry) -> float:
    """‖w1‖ for a LoKr (its change is w1 ⊗ w2), 1 otherwise."""
    t = entry.tensors
    if "lokr_w1" in t:
        return t["lokr_w1"].double().norm().item()
    if "lokr_w1_a" in t:
        return (t["lokr_w1_a"].double() @ t["lokr_w1_b"].double()).norm().item()
    return 1.0


def _scale(module: str, entry: Entry, config: dict | None, rank: int) -> float:
    """The entry's scale on up·down: `.alpha` / rank, or the peft config's alpha / r, or 1 (alpha folded in)."""
    if entry.alpha is not None:
        return entry.alpha / rank
    if config is None:
        return 1.0
    name = module.removeprefix(DIFFUSERS_PREFIX)
    alpha = config.get("alpha_pattern", {}).get(name, config.get("lora_alpha", config.get("alpha", rank)))
    r = config.get("rank_pattern", {}).get(name, config.get("r", rank))
    return alpha / r


def _peft_config(config: dict, scales: dict[str, float], ranks: dict[str, int], rank: int) -> dict:
    """The saved peft config (with its `transformer.` prefix) at the new ranks, each module's scale kept."""
    alpha_key = "alpha" if "alpha" in config and "lora_alpha" not in config else "lora_alpha"
    values = list(scales.values())
    common = max(set(values), key=values.count) if values else 1.0
    names = {m: m.removeprefix(DIFFUSERS_PREFIX) for m in scales}
    updated = dict(config, r=rank, **{alpha_key: common * rank})
    updated["rank_pattern"] = {names[m]: r for m, r in ranks.items() if r != rank}
    updated["alpha_pattern"] = {names[m]: scales[m] * ranks[m] for m in scales if scales[m] * ranks[m] != common * rank}
    return {DIFFUSERS_PREFIX + k: v for k, v in updated.items()}
