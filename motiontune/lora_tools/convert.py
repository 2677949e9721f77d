"""`motiontune lora convert`: a LoRA file between the two layouts motiontune writes.

COMFY_LORA → DIFFUSERS_LORA: each original-layout entry back onto the transformer's modules (the family's
`comfy_lora_parts`): a fused entry's lora_B is split by the parts' rows and each part keeps the columns (and lora_A
rows) its block uses, so a file motiontune wrote gets back its own ranks; alpha / rank is kept per module in the peft
config. DIFFUSERS_LORA → COMFY_LORA: peft injects the file's config into the transformer (meta device) and
methods/lora.py's own writer names, fuses and scales the entries as training saves them."""

from __future__ import annotations

import contextlib
import tempfile
from collections import Counter
from pathlib import Path

from ..util.lazy import torch
from .lora_file import DIFFUSERS_PREFIX, LoraFile, LoraFileError, save_lora
from .target import Target

FORMATS = ("DIFFUSERS_LORA", "COMFY_LORA")


def comfy_to_peft(lora: LoraFile, target: Target) -> tuple[dict, dict]:
    """(peft-named LoRA weights of the transformer, their peft config as a dict) from an original-layout file."""
    state, ranks, alphas = {}, {}, {}
    for module, entry in lora.entries().items():
        if entry.kind != "LoRA":
            raise LoraFileError(f"{lora.path}: {module} is a {entry.kind} entry; convert handles LoRA (a DoRA's ComfyUI "
                                "scale is tied to the base weights, LoHa and LoKr have no diffusers loader): keep the "
                                "run's DIFFUSERS_LORA file, or save the run in that format")
        parts = target.comfy_entries.get(module)
        if parts is None:
            raise LoraFileError(f"{lora.path}: {module} names no module of {target.family.NAME}'s original layout; "
                                "`motiontune lora check` lists such keys")
        down = entry.tensors.get("lora_A.weight", entry.tensors.get("lora_down.weight"))
        up = entry.tensors.get("lora_B.weight", entry.tensors.get("lora_up.weight"))
        if down is None or up is None:
            raise LoraFileError(f"{lora.path}: {module} lacks lora_A or lora_B")
        rank = down.shape[0]
        alpha = entry.alpha if entry.alpha is not None else float(rank)  # no `.alpha`: ComfyUI's scale is 1
        row = 0
        for part in parts:
            rows = target.linear(part).out_features
            part_up = up[row:row + rows]
            row += rows
            part_down = down
            if len(parts) > 1:  # a fused entry: this part's columns of the block-diagonal lora_B
                used = part_up.abs().sum(0) != 0
                if not used.any():
                    continue  # a part the LoRA leaves alone
                part_up, part_down = part_up[:, used], down[used]
            state[f"{part}.lora_A.weight"] = part_down.contiguous()
            state[f"{part}.lora_B.weight"] = part_up.contiguous()
            ranks[part] = part_down.shape[0]
            alphas[part] = alpha * ranks[part] / rank  # each part keeps the entry's alpha / rank
    return state, lora_config_dict(ranks, alphas)


def lora_config_dict(ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """peft's LoraConfig for modules with these ranks and alphas: the commonest as r / lora_alpha, the rest as patterns."""
    from peft import LoraConfig

    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(ranks),
                        rank_pattern={m: r for m, r in ranks.items() if r != rank},
                        alpha_pattern={m: a for m, a in alphas.items() if a != alpha})
    return config.to_dict()


def diffusers_to_peft(lora: LoraFile) -> tuple[dict, dict]:
    """(peft-named weights, peft config dict) of a DIFFUSERS_LORA file; without saved config, alpha = rank, as the
    stock loader then assumes."""
    state = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in lora.tensors.items() if k.startswith(DIFFUSERS_PREFIX)}
    if not state:
        raise LoraFileError(f"{lora.path}: no `transformer.` keys: not a DIFFUSERS_LORA file")
    config = lora.adapter_metadata
    if config is None:
        ranks = {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight")}
        if not ranks:
            raise LoraFileError(f"{lora.path}: a LyCORIS file without its peft config (`lora_adapter_metadata`): "
                                "its alpha is unknown")
        config = lora_config_dict(ranks, {m: float(r) for m, r in ranks.items()})
    return state, config


def peft_config(config: dict):
    """The peft config object a saved config dict describes (LoRA, LoHa or LoKr)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    kind = {"LOHA": LoHaConfig, "LOKR": LoKrConfig}.get(str(config.get("peft_type", "LORA")).split(".")[-1], LoraConfig)
    accepted = set(kind.__dataclass_fields__)
    return kind(**{k: v for k, v in config.items() if k in accepted and k != "peft_type"})


def peft_to_comfy(state: dict, config: dict, target: Target, lora_path: Path) -> dict:
    """The original-layout (ComfyUI) tensors of peft-named weights, written by methods/lora.py's `comfy_state_dict`."""
    from peft import inject_adapter_in_model

    from ..methods import lora as lora_method

    if any("lora_magnitude_vector" in k for k in state):  # DoRA's ComfyUI scale needs the base weights' norms
        target.load_real(torch.float32)
    modules = sorted({lora_method._split_adapter_key(k)[0] for k in state})
    missing = [m for m in modules if target.linear(m) is None]
    if missing:
        raise LoraFileError(f"{lora_path}: {missing[0]} (and {len(missing) - 1} more) is not a Linear layer of the "
                            f"{target.model_type} transformer ({target.source})")
    adapter = peft_config(config)
    adapter.target_modules = modules  # exactly the file's modules
    inject_adapter_in_model(adapter, target.transformer, adapter_name=lora_method.ADAPTER, low_cpu_mem_usage=True)
    try:
        return lora_method.comfy_state_dict(target.family, target.transformer, {k: v.float() for k, v in state.items()})
    finally:
        target.transformer.unload_lora()  # the plain Linear layers back


def convert(lora: LoraFile, target: Target, to: str, out: Path) -> int:
    """Write `lora` in layout `to` at `out`; the number of tensors written."""
    if to not in FORMATS:
        raise ValueError(f"--to {to!r}: say one of {', '.join(FORMATS)}")
    if lora.layout == to:
        raise LoraFileError(f"{lora.path} is already {to}")
    dtype = next(iter(lora.tensors.values())).dtype
    if to == "DIFFUSERS_LORA":
        if lora.layout != "COMFY_LORA":
            raise LoraFileError(f"{lora.path}: its keys are neither all `diffusion_model.` nor all `transformer.`; "
                                "convert reads the two layouts motiontune writes")
        state, config = comfy_to_peft(lora, target)
        with _temporary_folder(out) as folder:  # the family's own writer (diffusers' save_lora_weights)
            target.family.save_diffusers_lora(str(folder), out.name, state, config)
            written = LoraFile.read(folder / out.name)
            save_lora(written.tensors, out, written.metadata)
        return len(written.tensors)
    state, config = diffusers_to_peft(lora)
    tensors = peft_to_comfy(state, config, target, lora.path)
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_lora(tensors, out, {"peft_type": str(config.get("peft_type", "LORA")).split(".")[-1]})
    return len(tensors)


@contextlib.contextmanager
def _temporary_folder(beside: Path):
    """A scratch folder beside `beside` (same filesystem), removed afterwards."""
    Path(beside).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(beside).parent, prefix=".converting-") as folder:
        yield Path(folder)
