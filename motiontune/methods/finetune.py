"""Full fine-tune: the transformer's own weights train (all, or those a `layer_filter` names), and are
saved as a diffusers transformer folder or as one safetensors file in the original WAN (ComfyUI) layout."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import TrainConfig
from ..models import ModelFamily
from ..models.base import Expert
from ..util.dtypes import TORCH_DTYPES
from .base import output_paths, saving

SHARDED = True  # under torchrun, FSDP2 splits the transformer's weights, gradients and optimizer state


def prepare(family: ModelFamily, expert: Expert, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Make the expert's weights trainable in place (no second copy); return them."""
    filters = [f.strip() for f in config.layer_filter.split(",") if f.strip()]
    trainable = []
    for name, parameter in expert.module.named_parameters():
        wanted = (not filters or any(f in name for f in filters)) and family.may_train(name)
        parameter.requires_grad_(wanted)
        if wanted:
            trainable.append(parameter)
    if not trainable:
        raise ValueError(f"layer_filter = {config.layer_filter!r} matches no weight of the transformer")
    return trainable


def trained_embeddings(config: TrainConfig) -> list:
    return []


def untrained(expert: Expert):
    """Not offered: a fine-tune changes the weights themselves, and a frozen copy would double the memory; config checks refuse PRIOR_PREDICTION concepts before a run starts."""
    raise NotImplementedError("PRIOR_PREDICTION concepts need training_method LORA")


def save(family: ModelFamily, config: TrainConfig, destination: Path, output_format: str | None = None,
         states: dict[str, dict] | None = None) -> list[Path]:
    """`states`: each expert's whole state dict when its weights are sharded across ranks (gathered by the caller)."""
    output_format = output_format or config.output_model_format
    paths = output_paths(family, destination, folder=output_format == "DIFFUSERS")
    dtype = TORCH_DTYPES[config.output_dtype or config.transformer.weight_dtype or config.train_dtype]
    states = states or {}
    return [_save_one(family, expert, paths[expert.name], output_format, dtype, states.get(expert.name))
            for expert in family.trained_experts() if expert.module is not None] + (
        save_text_encoders(family, destination, output_format, dtype) if config.text_encoder.train else [])


def save_text_encoders(family: ModelFamily, destination: Path, output_format: str, dtype: torch.dtype) -> list[Path]:
    """A trained text encoder beside the transformer: `<destination>_text_encoder` as a transformers folder
    (DIFFUSERS; `UMT5EncoderModel.from_pretrained`), or `<stem>_text_encoder.safetensors` with the transformers
    names ComfyUI's text-encoder files use (COMFY_TRANSFORMER). Added embedding tokens are not part of it."""
    destination = Path(destination)
    paths = []
    for key, (_, encoder) in family.text_encoders().items():
        suffix = "_text_encoder" if len(family.text_encoders()) == 1 else f"_text_encoder_{key}"
        wrapper = encoder.get_input_embeddings()
        table = getattr(wrapper, "table", None)
        target = (destination.with_name(destination.name + suffix) if output_format == "DIFFUSERS"
                  else destination.with_name(destination.stem + suffix + ".safetensors"))
        try:
            if table is not None:  # an embedding's token vectors ride on the table: save the plain table
                encoder.set_input_embeddings(table)
            with saving(target, "text encoder", "save") as written:
                if output_format == "DIFFUSERS":
                    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in encoder.state_dict().items()}
                    encoder.save_pretrained(written, state_dict=state, safe_serialization=True)
                else:
                    state, seen = {}, set()
                    for k, v in encoder.state_dict().items():  # tied tables (shared / encoder.embed_tokens) once
                        if v.data_ptr() not in seen:
                            seen.add(v.data_ptr())
                            state[k] = v.detach().to("cpu", dtype).clone().contiguous()
                    save_file(state, str(written))
        finally:
            if table is not None:
                encoder.set_input_embeddings(wrapper)
        paths.append(target)
    return paths


def _save_one(family: ModelFamily, expert: Expert, destination: Path, output_format: str, dtype: torch.dtype,
              state: dict | None) -> Path:
    state = expert.module.state_dict() if state is None else state
    with saving(destination, "model", "save") as written:
        if output_format == "DIFFUSERS":  # a transformer folder: WanTransformer3DModel.from_pretrained(folder)
            # the files written directly: diffusers' save_pretrained takes no state dict (it saved the module's own
            # tensors, from the GPU and in their own dtype, whatever output_dtype said), nor sharded ones
            weights = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
            written.mkdir()
            expert.module.save_config(written)
            save_file(weights, str(written / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        elif output_format == "COMFY_TRANSFORMER":
            save_file(family.single_file_state_dict(expert.module, dtype, state), str(written))
        else:
            raise ValueError(f"unknown output_model_format {output_format!r} for a fine-tune")
    return destination
