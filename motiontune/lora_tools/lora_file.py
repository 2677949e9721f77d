"""A LoRA file as entries: each adapted module with its tensors (`lora_A.weight`, `alpha`, `hada_w1_a`, ...), the
layout its names are in, what it adapts, its kind, rank and alpha."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..util.lazy import torch

COMFY_PREFIX = "diffusion_model."  # COMFY_LORA: original-layout names
DIFFUSERS_PREFIX = "transformer."  # DIFFUSERS_LORA: peft names under the pipeline's component
METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the peft config (alpha) of a DIFFUSERS_LORA file
# the last parts of a key that name an adapter's tensor rather than the module it adapts
ADAPTER_PARTS = ("lora_", "hada_", "lokr_")
LEAVES = ("alpha", "dora_scale", "diff", "diff_b")
TEXT_ENCODER_PREFIXES = ("text_encoder", "text_encoders.", "lora_te", "te.", "te1.", "te2.", "text_model.")


class LoraFileError(ValueError):
    """A file that is not a LoRA this tool can read; the message names the file and what to do."""


def split_key(key: str) -> tuple[str, str]:
    """`diffusion_model.blocks.0.self_attn.q.lora_A.weight` → (`diffusion_model.blocks.0.self_attn.q`, `lora_A.weight`)."""
    parts = key.split(".")
    for at, part in enumerate(parts):
        if part.startswith(ADAPTER_PARTS):
            return ".".join(parts[:at]), ".".join(parts[at:])
    if parts[-1] in LEAVES:
        return ".".join(parts[:-1]), parts[-1]
    return key, ""


def modality(module: str) -> str:
    """What a module's adapter changes: the text encoder, the sound (LTX-2's audio stream and the cross-modal attention
    that touches it), or the video (images for HiDream)."""
    if module.startswith(TEXT_ENCODER_PREFIXES):
        return "text encoder"
    return "audio" if "audio" in module else "video"


@dataclass
class Entry:
    """One adapted module of the file and its tensors, by suffix."""

    module: str  # as named in the file, prefix included
    tensors: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        suffixes = self.tensors.keys()
        if any(s.startswith("hada_") for s in suffixes):
            return "LoHa"
        if any(s.startswith("lokr_") for s in suffixes):
            return "LoKr"
        if "dora_scale" in suffixes or "lora_magnitude_vector" in suffixes:
            return "DoRA"
        return "LoRA"

    @property
    def rank(self) -> int | None:
        for suffix, dim in (("lora_A.weight", 0), ("lora_down.weight", 0), ("hada_w1_b", 0), ("lokr_w2_b", 0), ("lokr_w1_b", 0)):
            if suffix in self.tensors:
                return self.tensors[suffix].shape[dim]
        return None

    @property
    def alpha(self) -> float | None:
        alpha = self.tensors.get("alpha")
        return None if alpha is None else float(alpha.float().item())

    @property
    def modality(self) -> str:
        return modality(self.module.removeprefix(COMFY_PREFIX).removeprefix(DIFFUSERS_PREFIX))


@dataclass
class LoraFile:
    path: Path
    tensors: dict  # key → tensor, as stored
    metadata: dict  # the safetensors header's strings

    @classmethod
    def read(cls, path: str | Path) -> "LoraFile":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise LoraFileError(f"{path}: no such file; give a LoRA .safetensors file")
        if path.suffix != ".safetensors":
            raise LoraFileError(f"{path}: not a .safetensors file (other formats can run code when read); convert it first")
        try:
            with safe_open(str(path), "pt") as opened:
                tensors = {key: opened.get_tensor(key) for key in opened.keys()}
                metadata = opened.metadata() or {}
        except (SafetensorError, OSError) as error:
            raise LoraFileError(f"{path}: not a readable safetensors file ({error})") from None
        if not tensors:
            raise LoraFileError(f"{path}: holds no tensors")
        return cls(path, tensors, metadata)

    @property
    def layout(self) -> str:
        """COMFY_LORA (original-layout names), DIFFUSERS_LORA (peft names under `transformer.`) or OTHER."""
        keys = [k for k in self.tensors if modality(k) != "text encoder"]
        if keys and all(k.startswith(COMFY_PREFIX) for k in keys):
            return "COMFY_LORA"
        if keys and all(k.startswith(DIFFUSERS_PREFIX) for k in keys):
            return "DIFFUSERS_LORA"
        return "OTHER"

    def entries(self) -> dict[str, Entry]:
        """module → its entry, in the file's order."""
        found: dict[str, Entry] = {}
        for key, tensor in self.tensors.items():
            module, suffix = split_key(key)
            found.setdefault(module, Entry(module)).tensors[suffix] = tensor
        return found

    @property
    def adapter_metadata(self) -> dict | None:
        """The peft config diffusers saved (keys without their `transformer.` prefix), if any."""
        raw = self.metadata.get(METADATA_KEY)
        if not raw:
            return None
        return {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in json.loads(raw).items() if k.startswith(DIFFUSERS_PREFIX)}

    def kinds(self) -> set[str]:
        return {entry.kind for entry in self.entries().values()}


def save_lora(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """Write atomically: a temporary file beside `path`, then a rename."""
    from safetensors.torch import save_file

    from ..util.files import replacing

    with replacing(Path(path)) as written:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(written), metadata=metadata or None)


def as_meta(tensors: dict) -> dict:
    """The same tensors on the meta device (shapes and dtypes only), scalars kept: converters read `alpha.item()`."""
    return {k: v if v.numel() <= 1 else torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}
