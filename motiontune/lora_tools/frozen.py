"""`frozen_loras`: LoRA files (speed LoRAs, typically) merged into the frozen base transformer before a new LoRA
trains over it.

They are merged into the base weights, not kept as frozen peft adapters: the run then holds no extra tensor per
adapted layer and computes no extra product per step, the new LoRA's peft adapter is the only one on the transformer
(so its save holds nothing of the frozen ones), and FLOAT_8 / NFLOAT_4 storage, which quantizes the frozen Linear
weights after this, stores the merged weights as any others (a peft adapter over a quantized Linear would need its
own kernel). The merge is the stock loader's: the file goes through the one reader `lora merge` uses (`peft_weights`:
diffusers' converter of the family's pipeline, or ours of the original layout), then the transformer's own
`load_lora_adapter` and `fuse_lora` at the entry's strength, so the base under training is the one diffusers (and
ComfyUI, whose patch is the same sum) samples with those files loaded."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import ConfigError
from ..util.lazy import torch
from .check import comfy_verdict, diffusers_verdict
from .lora_file import DIFFUSERS_PREFIX, LoraFile, LoraFileError
from .merge import peft_weights
from .target import Target

log = logging.getLogger("motiontune")
FROZEN_ADAPTER = "motiontune_frozen"


class FrozenLoraError(ConfigError):
    """A frozen LoRA that cannot be applied; the message names the file, the key and what to do."""


def apply_frozen_loras(config, family) -> None:
    """Merge every `config.frozen_loras` entry into the loaded transformer it adapts (before any adapter is added
    and before the memory options quantize the weights)."""
    for index, item in enumerate(config.frozen_loras):
        where = f"frozen_loras[{index}] ({item.model_name})"
        part = _part(item, family, where)
        module = getattr(family, part)
        try:
            lora = LoraFile.read(item.model_name)
        except LoraFileError as error:
            raise FrozenLoraError(f"{where}: {error}") from None
        target = Target(config.model_type, family, module, part, "the run's base model", config.base_model_name)
        _check_keys(lora, target, where, config)
        modules = merge_into(module, lora, target, item.strength, where)
        log.info("%s: %d modules merged into the frozen %s at strength %g (%s layout)", where, modules, part,
                 item.strength, lora.layout)


def _part(item, family, where: str) -> str:
    """The transformer an entry adapts: its `part`, else the only one, else (WAN 2.2 A14B) what its name says."""
    two = getattr(family, "transformer_2", None) is not None
    if item.part:
        if item.part == "transformer_2" and not two:
            raise FrozenLoraError(f"{where}: part = transformer_2, but {family.config.model_type} has one transformer; "
                                  "remove the key")
        return item.part
    if not two:
        return "transformer"
    stem = Path(item.model_name).stem
    if stem.endswith("_low_noise"):
        return "transformer_2"
    if stem.endswith("_high_noise"):
        return "transformer"
    raise FrozenLoraError(f"{where}: {family.config.model_type} has two experts; say which one this file adapts with "
                          "part: transformer (the high-noise expert) or transformer_2 (the low-noise one)")


def _check_keys(lora: LoraFile, target: Target, where: str, config) -> None:
    """Every key must reach the transformer as the stock loader reads it: a key it would skip is an error naming it,
    unless its tensor is all zeros (it changes nothing: the norm `diff` keys some speed LoRAs carry)."""
    meta = _on_meta(target)
    verdict = diffusers_verdict(lora, meta) if lora.layout == "DIFFUSERS_LORA" or target.pipeline_class() else None
    if verdict is None or not verdict.applies:
        verdict = comfy_verdict(lora, meta)  # the original layout, read by our converter where diffusers has none
    if not verdict.applies:
        raise FrozenLoraError(f"{where}: cannot be read as a frozen LoRA of {config.model_type}: {verdict.note}")
    text = sorted(verdict.not_checked)
    if text:
        raise FrozenLoraError(f"{where}: key {text[0]} (and {len(text) - 1} more) adapts the text encoder; frozen "
                              "LoRAs adapt the transformer: write a copy without them (`motiontune lora check FILE "
                              "--drop 'text encoder'`)")
    skipped = {k: why for k, why in verdict.skipped.items() if bool(lora.tensors[k].any())}
    ignored = len(verdict.skipped) - len(skipped)
    if ignored:
        log.info("%s: %d keys that only hold zeros are not read (they change nothing)", where, ignored)
    if skipped:
        key, why = next(iter(skipped.items()))
        more = f" (and {len(skipped) - 1} more keys)" if len(skipped) > 1 else ""
        raise FrozenLoraError(f"{where}: key {key} does not match the {config.model_type} transformer of "
                              f"{config.base_model_name}: {why}{more}. Is the file for this model (and this expert)? "
                              "`motiontune lora check FILE --config <this config>` lists every key")


def _on_meta(target: Target) -> Target:
    """The same target with its transformer rebuilt on the meta device: the check injects adapters into it."""
    module = target.transformer
    with torch.device("meta"):
        meta = type(module).from_config(module.config)
    return Target(target.model_type, target.family, meta.requires_grad_(False), target.part, target.source, target.base)


def merge_into(module, lora: LoraFile, target: Target, strength: float, where: str) -> int:
    """Fuse the file into `module`'s weights at `strength`, as diffusers' `load_lora_adapter` + `fuse_lora` do.
    Returns the number of modules changed."""
    try:
        state, config = peft_weights(lora, target)
    except LoraFileError as error:
        raise FrozenLoraError(f"{where}: {error}") from None
    metadata = {DIFFUSERS_PREFIX + k: v for k, v in config.items()} if config else None
    module.load_lora_adapter({DIFFUSERS_PREFIX + k: v for k, v in state.items()}, prefix="transformer",
                             adapter_name=FROZEN_ADAPTER, metadata=metadata)
    module.fuse_lora(lora_scale=strength, adapter_names=[FROZEN_ADAPTER])
    module.unload_lora()  # the plain Linear layers back, their weights now holding the LoRA
    return len({k.split(".lora_")[0] for k in state})
