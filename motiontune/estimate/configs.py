"""Which family serves a config, and the configs of its parts: a local folder's, the Hugging Face cache's, or the
released model's that the family declares (no weights read, nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import TrainConfig

HALF = {"BFLOAT_16": torch.bfloat16, "FLOAT_16": torch.float16}
DTYPES = {"FLOAT_32": torch.float32, **HALF}

_FAMILIES: dict = {}


def family(config: TrainConfig):
    """The config's model family, on the CPU (nothing is loaded: estimate only asks it questions)."""
    from ..models import family_for
    from ..models.fake_memory import quiet

    key = (config.model_type, config.model_dump_json())
    if key not in _FAMILIES:
        with quiet():
            _FAMILIES[key] = family_for(config, torch.device("cpu"))
    return _FAMILIES[key]


def load_dtype(config: TrainConfig) -> torch.dtype:
    """The dtype the transformer loads (and computes) in: its weight_dtype, or train_dtype when quantized."""
    name = config.transformer.weight_dtype or config.train_dtype
    return DTYPES.get(name, DTYPES.get(config.train_dtype, torch.bfloat16))


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def transformer_config(config: TrainConfig, part: str = "transformer") -> tuple[dict, str]:
    """(the diffusers config of a transformer part, where it came from). A family whose config names its sizes
    otherwise adds the names estimate reads (`in_channels`, `num_attention_heads`, ...: `estimate_common_keys`)."""
    cfg, source = _transformer_config(config, part)
    owner = family(config)
    if hasattr(owner, "estimate_common_keys"):
        cfg = {**owner.estimate_common_keys(cfg), **cfg}
    return cfg, source


def _transformer_config(config: TrainConfig, part: str) -> tuple[dict, str]:
    override = getattr(config, part).model_name
    if override and Path(override).is_dir():
        found = _read_json(Path(override) / "config.json")
        if found:
            return found, f"{override}/config.json"
    base = config.base_model_name
    for sub in (part, "transformer"):
        found = _read_json(Path(base) / sub / "config.json")
        if found:
            return found, f"{base}/{sub}/config.json"
    release, parts = family(config).estimate_release(base)
    if release == base:
        return dict(parts["transformer"]), f"the embedded config of {base}"
    try:  # a Hub id already downloaded on this machine
        from huggingface_hub import hf_hub_download

        found = _read_json(Path(hf_hub_download(base, f"{part}/config.json", local_files_only=True)))
        if found:
            return found, f"{base} (local Hugging Face cache)"
    except Exception:
        pass
    return dict(parts["transformer"]), f"the embedded config of {release} (base_model_name {base!r} is not known here)"


def part_configs(config: TrainConfig) -> dict[str, dict]:
    """Every part's config (vae, text encoders): the local folder's where it has one, else the release's."""
    _, parts = family(config).estimate_release(config.base_model_name)
    found = {}
    for name, embedded in parts.items():
        local = _read_json(Path(config.base_model_name) / name / "config.json")
        found[name] = local if local is not None else dict(embedded)
    return {name: {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "transformers_version")}
            for name, cfg in found.items()}
