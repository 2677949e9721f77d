"""LoRA: adapters on each trained transformer with peft, and saving them in each output format."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from ..config import TrainConfig
from ..models import ModelFamily
from ..models.base import Expert
from ..train.backup import WRITE_ERRORS, write_error_reason

ADAPTER = "default"


class SaveError(Exception):
    """A LoRA could not be written (disk full, no permission); the previous file is untouched."""


def prepare(family: ModelFamily, expert: Expert, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Wrap the expert's default (or `layer_filter`) targets with LoRA; return its trainable parameters."""
    targets = family.lora_target_modules(expert.module, config.layer_filter)
    if not targets:
        raise ValueError(
            f"layer_filter = {config.layer_filter!r} matches no Linear layer of the transformer; "
            "use substrings of module names such as 'attn1,attn2,ffn', or leave it empty for the default set"
        )
    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        init_lora_weights=True,  # B = 0: training starts from the base model exactly
    )
    expert.module.add_adapter(lora_config, adapter_name=ADAPTER)
    parameters = [p for n, p in expert.module.named_parameters() if "lora_" in n]
    for parameter in parameters:  # adapters train in float32 whatever the base weights are
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
    return parameters


def lora_state_dict(expert: Expert) -> dict[str, torch.Tensor]:
    """peft names without the adapter name: `blocks.0.attn1.to_q.lora_A.weight`, ..."""
    state = get_peft_model_state_dict(expert.module, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def output_paths(family: ModelFamily, destination: Path, folder: bool = False) -> dict[str, Path]:
    """One output per expert: the destination itself for one transformer, `<name>_high_noise` and
    `<name>_low_noise` beside it for WAN 2.2 A14B's two experts."""
    experts = family.trained_experts()
    destination = Path(destination)
    if len(experts) == 1:
        return {experts[0].name: destination}
    suffix = "" if folder else destination.suffix
    stem = destination.name if folder else destination.stem
    return {e.name: destination.with_name(f"{stem}_{e.label}{suffix}") for e in experts}


def save(family: ModelFamily, config: TrainConfig, destination: Path, output_format: str | None = None) -> list[Path]:
    paths = output_paths(family, destination)
    return [_save_one(family, expert, config, paths[expert.name], output_format) for expert in family.trained_experts()]


def _save_one(family: ModelFamily, expert: Expert, config: TrainConfig, destination: Path, output_format: str | None) -> Path:
    """Write one expert's LoRA atomically (a temporary file in the same folder, then a rename)."""
    output_format = output_format or config.output_model_format
    state = lora_state_dict(expert)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".saving-") as scratch:
            written = os.path.join(scratch, "lora.safetensors")
            if output_format == "DIFFUSERS_LORA":
                # The adapter metadata keeps lora_alpha, so the stock loader scales by alpha / rank.
                metadata = expert.module.peft_config[ADAPTER].to_dict()
                family.save_diffusers_lora(scratch, "lora.safetensors", state, metadata)
            elif output_format == "COMFY_LORA":
                save_file(comfy_state_dict(family, state, config.lora_alpha), written)
            else:
                raise ValueError(f"unknown output_model_format {output_format!r}")
            with open(written, "rb") as handle:  # on disk before it takes the real name
                os.fsync(handle.fileno())
            os.replace(written, destination)
    except WRITE_ERRORS as error:
        raise SaveError(
            f"could not save the LoRA to {destination}: {write_error_reason(error)}. "
            "Any earlier file there is unchanged; free some space or pick another output_model_destination."
        ) from None
    return destination


def comfy_state_dict(family: ModelFamily, state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """ComfyUI's names (`diffusion_model.<original module>.lora_A/B.weight`) plus one `.alpha` per module."""
    converted = {}
    for key, tensor in state.items():
        module, suffix = key.rsplit(".lora_", 1)
        comfy_module = family.comfy_lora_key(module)
        converted[f"{comfy_module}.lora_{suffix}"] = tensor
        converted[f"{comfy_module}.alpha"] = torch.tensor(float(alpha))
    return converted
