"""`motiontune demo`: a tiny built-in WAN model trained on the bundled clips, start to finish in minutes on a CPU."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config.load import apply_override
from ..configure import parse_config

CLIPS = Path(__file__).parent / "clips"
log = logging.getLogger("motiontune")


def demo_config(out: Path) -> dict:
    """The demo's config; the same keys a user writes in a JSON file."""
    return {
        "model_type": "WAN_2_1_T2V",
        "base_model_name": str(out / "tiny-wan-2.1"),
        "concepts": [{"name": "demo clips", "path": str(CLIPS)}],
        "resolution": "128x96",
        "batch_size": 1,
        "learning_rate": 1e-3,
        "epochs": 60,
        "train_dtype": "FLOAT_32",
        "lora_rank": 16,
        "lora_alpha": 16,
        "timestep_distribution": "LOGIT_NORMAL",
        "timestep_shift": 3.0,
        "workspace_dir": str(out / "workspace"),
        "cache_dir": str(out / "cache"),
        "output_model_destination": str(out / "demo-lora.safetensors"),
        "sample_after": 0,
        "sample_after_unit": "EPOCH",
        "samples": [
            {"prompt": "moving shapes, a red circle and a blue square, on a white background",
             "frames": 17, "height": 96, "width": 128, "steps": 20, "cfg_scale": 1.0, "seed": 7, "fps": 8}
        ],
        "video_config": {"max_frames": 17, "target_fps": 8.0, "max_duration": 3.0},
    }


def run_demo(out: Path, overrides: list[str] = ()):
    from ..testing.tiny_models import make_tiny_model
    from ..train.loop import train

    data = demo_config(out)
    for assignment in overrides:
        apply_override(data, assignment)
    config = parse_config(data, Path("demo config"))
    model = Path(config.base_model_name)
    if not (model / "model_index.json").is_file():
        log.info("building the tiny WAN 2.1 model in %s", model)
        make_tiny_model("wan-2.1", model)
    return train(config)
