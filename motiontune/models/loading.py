"""Loading helpers every family uses: parts of a diffusers folder or Hub repo, safetensors only, with errors
that say what to do."""

from __future__ import annotations

import gc
from pathlib import Path

from ..util.host_memory import return_free_memory
from ..util.lazy import torch


class ModelLoadError(Exception):
    """A model part that could not be loaded; the message says which, from where, and what to do."""


def transformer_dtype(config) -> torch.dtype:
    """The dtype the transformer loads and computes in: its weight_dtype, or train_dtype when its weights are
    to be stored as FLOAT_8 / NFLOAT_4 (quantized after loading, see train/memory.py)."""
    from ..util.dtypes import TORCH_DTYPES  # torch itself: not imported until a family needs a dtype

    return TORCH_DTYPES.get(config.transformer.weight_dtype or config.train_dtype, TORCH_DTYPES[config.train_dtype])


def vae_dtype(config) -> torch.dtype:
    """The dtype the VAE loads, encodes and decodes in: vae.weight_dtype, float32 when unset (as the stock examples
    run it). bfloat16 encodes about 1.7x faster on a CPU with bf16 instructions and halves the VAE's memory; the
    latents move by about 1-2 % of their size (benchmarks/RESULTS.md)."""
    from ..util.dtypes import TORCH_DTYPES

    return TORCH_DTYPES[config.vae.weight_dtype or "FLOAT_32"]


def free_accelerator_memory(device: torch.device) -> None:
    """After an encoder is released: its device memory back to the driver, the host's freed pages to the system."""
    # collecting matters only where cached blocks can go back to the driver; on the CPU it just costs time
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    return_free_memory()


def read_model_index(base: str) -> dict:
    import json

    index = Path(base) / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(base, "model_index.json")).read_text())
    except Exception:
        return {}


# `motiontune check` (motiontune/check) sets this: parts are then built from their configs on fake tensors, no file read
part_builder = None


def load_part(cls, source: str, subfolder: str | None, dtype: torch.dtype | None = None):
    """from_pretrained, weights from .safetensors only (pickle files run code), and an error that says what to do."""
    if part_builder is not None:
        return part_builder(cls, source, subfolder, dtype)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    if dtype is not None:  # a model with weights, not a tokenizer or scheduler
        kwargs.update(torch_dtype=dtype, use_safetensors=True)
    try:
        return cls.from_pretrained(source, **kwargs)
    except Exception as error:
        where = f"{source}/{subfolder}" if subfolder else source
        local = Path(source).exists()
        advice = (
            "Check that the folder is a complete diffusers model (model_index.json and one folder per part, "
            "weights as .safetensors)."
            if local
            else "It is not a local folder, so it was looked up on the Hugging Face Hub: check the id and your network, "
            "or download the model and set base_model_name to its folder."
        )
        raise ModelLoadError(f"could not load {cls.__name__} from {where!r}: {error}\n{advice}") from None
