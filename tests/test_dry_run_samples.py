"""A sample whose pipeline encodes a condition before it denoises, on the fake GPU at tiny size: WAN 2.1 VACE's
control video and reference picture. The parts take turns on the device while a sample renders (models/base.py
`taking_turns`); the full-size dry run of `#wan 2.1 VACE control LoRA` with a sample found the VAE still parked in
host memory while `WanVACEPipeline` encoded the control video on the GPU (a GPU run's first sample would stop)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from motiontune.check import check_several
from motiontune.check.report import report

DATA = Path(__file__).parent / "data"


def test_a_vace_sample_encodes_its_control_with_the_vae_on_the_device(tiny_models, tmp_path):
    reference = tmp_path / "reference.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(reference)
    sample = {"prompt": "a clip", "frames": 9, "height": 32, "width": 32, "steps": 1, "seed": 1, "fps": 8,
              "control": str(DATA / "shapes_200px_30fps.mp4"), "reference": str(reference)}
    preset = "#wan 2.1 VACE control LoRA"
    [result] = check_several([(preset, [f"base_model_name={tiny_models('wan-2.1-vace')}", "resolution=32",
                                        "video_config.max_frames=9", f"samples={json.dumps([sample])}"])])
    print(report(preset, result))
    assert result["findings"] == []
    assert [s["status"] for s in result["stages"]] == ["ok"] * 7
