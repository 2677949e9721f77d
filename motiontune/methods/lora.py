"""LoRA: adapters on each trained transformer with peft, and saving them in each output format."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from ..config import TrainConfig
from ..models import ModelFamily
from ..models.base import Expert
from .base import SaveError, output_paths, saving  # noqa: F401  (SaveError: where callers found it before)

ADAPTER = "default"
SHARDED = False  # small adapters: replicated on every rank, their gradients summed


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


@contextlib.contextmanager
def untrained(expert: Expert):
    """The base model's prediction: the adapters switched off, then on again."""
    expert.module.disable_adapters()
    try:
        yield
    finally:
        expert.module.enable_adapters()


def lora_state_dict(expert: Expert) -> dict[str, torch.Tensor]:
    """peft names without the adapter name: `blocks.0.attn1.to_q.lora_A.weight`, ..."""
    state = get_peft_model_state_dict(expert.module, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def trained_embeddings(config: TrainConfig) -> list:
    return []


def save(family: ModelFamily, config: TrainConfig, destination: Path, output_format: str | None = None,
         states: dict | None = None) -> list[Path]:
    paths = output_paths(family, destination)
    return [_save_one(family, expert, config, paths[expert.name], output_format) for expert in family.trained_experts()]


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
            save_file(comfy_state_dict(family, expert.module, state, config.lora_alpha), str(written))
        else:
            raise ValueError(f"unknown output_model_format {output_format!r}")
    return destination


def comfy_state_dict(family: ModelFamily, module: torch.nn.Module, state: dict[str, torch.Tensor],
                     alpha: float) -> dict[str, torch.Tensor]:
    """The LoRA in the original layout, which ComfyUI and diffusers' converters both read:
    `diffusion_model.<original module>.lora_A.weight` / `.lora_B.weight`, and `.alpha` where the family's readers
    all scale by it (ComfyUI: scale = alpha / rank of the entry, 1 without `.alpha`).

    Where the original layout fuses several adapted modules into one (HunyuanVideo's q, k, v), that module gets one
    LoRA: the parts' A matrices stacked, their B matrices block-diagonal, so each part's update lands only on its own
    output rows; a part without an adapter adds zero rows. Where a reader ignores `.alpha` (diffusers' HiDream and
    HunyuanVideo loaders even refuse the key), alpha / rank is folded into lora_B and no `.alpha` is written."""
    adapters: dict[str, dict[str, torch.Tensor]] = {}  # adapted module → {"A": ..., "B": ...}
    for key, tensor in state.items():
        name, suffix = key.rsplit(".lora_", 1)  # suffix "A.weight" / "B.weight"
        adapters.setdefault(name, {})[suffix[0]] = tensor
    fused: dict[str, list[str]] = {}  # original module → the modules it holds, in its order
    for name in adapters:
        fused.setdefault(family.comfy_lora_key(name), family.comfy_lora_parts(name))
    converted = {}
    for original, parts in fused.items():
        present = [p for p in parts if p in adapters]
        down = torch.cat([adapters[p]["A"] for p in present])
        up = torch.block_diag(*(adapters[p]["B"] if p in adapters else torch.zeros(module.get_submodule(p).out_features, 0)
                                for p in parts))
        # the stacked entry's rank is the parts' ranks summed: alpha grows with it, keeping alpha / rank
        entry_alpha = float(alpha) * len(present)
        if family.comfy_lora_keeps_alpha(present[0]):
            converted[f"{original}.alpha"] = torch.tensor(entry_alpha)
        else:
            up = up * (entry_alpha / down.shape[0])
        converted[f"{original}.lora_A.weight"] = down.contiguous()
        converted[f"{original}.lora_B.weight"] = up.contiguous()
    return converted
