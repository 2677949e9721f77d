"""`motiontune lora merge`: a LoRA merged into the base transformer, written as a diffusers transformer folder or as
one original-layout file (the family's `single_file_state_dict`, what COMFY_TRANSFORMER fine-tunes write, which
ComfyUI's diffusion-model loader and diffusers' `from_single_file` read).

The file reaches the transformer as the stock pipeline would load it (its `lora_state_dict` converter, then
`load_lora_adapter`) and is merged by peft (`fuse_lora`), so the merged weights are the ones diffusers gives."""

from __future__ import annotations

from pathlib import Path

from ..util.lazy import torch
from .convert import comfy_to_peft, diffusers_to_peft
from .lora_file import DIFFUSERS_PREFIX, LoraFile, LoraFileError
from .target import Target

MERGE_ADAPTER = "merged"


def peft_weights(lora: LoraFile, target: Target) -> tuple[dict, dict | None]:
    """(peft-named weights, peft config or None: the loader's own) as the stock diffusers loader reads the file."""
    if "LoHa" in lora.kinds():
        raise LoraFileError(f"{lora.path}: a LoHa; diffusers reads no LoHa, so merge (which merges as diffusers loads) "
                            "does not either: load it with peft and use its merge_and_unload (docs/formats.md)")
    if lora.layout == "DIFFUSERS_LORA":
        return diffusers_to_peft(lora)
    if "LoRA" not in lora.kinds() or len(lora.kinds()) > 1:
        raise LoraFileError(f"{lora.path}: a ComfyUI {'/'.join(sorted(lora.kinds()))} file; diffusers reads those in "
                            "the DIFFUSERS_LORA layout: merge the run's DIFFUSERS_LORA file")
    pipeline = target.pipeline_class()
    if pipeline is None:  # no converter in diffusers for this family: ours, the inverse of the writer
        return comfy_to_peft(lora, target)
    converted = pipeline.lora_state_dict(dict(lora.tensors))
    converted = converted[0] if isinstance(converted, tuple) else converted
    return {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in converted.items() if k.startswith(DIFFUSERS_PREFIX)}, None


def merged_transformer(lora: LoraFile, target: Target, strength: float = 1.0):
    """The base transformer (float32) with the LoRA fused into its weights and the adapter removed."""
    state, config = peft_weights(lora, target)
    transformer = target.load_real(torch.float32)
    metadata = {DIFFUSERS_PREFIX + k: v for k, v in config.items()} if config else None
    transformer.load_lora_adapter({DIFFUSERS_PREFIX + k: v.float() for k, v in state.items()}, prefix="transformer",
                                  adapter_name=MERGE_ADAPTER, metadata=metadata)
    transformer.fuse_lora(lora_scale=strength, adapter_names=[MERGE_ADAPTER])
    transformer.unload_lora()
    return transformer


def stored_dtype(target: Target):
    """The dtype the base transformer's weights are stored in (the merged file is written in it)."""
    from safetensors import safe_open

    base = Path(target.base)
    folder = base / target.part if (base / target.part).is_dir() else base
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as opened:
            for key in opened.keys():
                return opened.get_tensor(key).dtype
    return torch.float32


def merge(lora: LoraFile, target: Target, out: Path, strength: float = 1.0) -> str:
    """Write the merged transformer at `out`: one original-layout file when it ends in .safetensors, else a diffusers
    folder. Returns what was written."""
    from safetensors.torch import save_file

    from ..util.files import replacing

    dtype = stored_dtype(target)
    transformer = merged_transformer(lora, target, strength)
    out = Path(out)
    with replacing(out) as written:
        if out.suffix == ".safetensors":
            save_file(target.family.single_file_state_dict(transformer, dtype), str(written),
                      metadata=target.family.single_file_metadata(transformer))
            return f"one original-layout file ({str(dtype).removeprefix('torch.')})"
        transformer.to(dtype).save_pretrained(str(written))
        return f"a diffusers transformer folder ({str(dtype).removeprefix('torch.')})"
