"""Shared fixtures: tiny real-architecture models saved as diffusers folders, and small clips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
# estimate's figures are simulated afresh in the suite (tests count simulated ops), never read from a user's disk cache
os.environ.setdefault("MOTIONTUNE_ESTIMATE_CACHE", "off")


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs `-n 2`), one torch thread per test process and per subprocess it starts.
    The tiny models gain nothing from intra-op threads, and with several processes sharing the cores, OpenMP
    threads that wait for each other cost several times the work (HiDream's preset run: 5x the CPU time)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family name → folder of a tiny random model (built once per test session)."""
    from motiontune.testing.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    cache = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = make_tiny_model(family, root / family)
        return cache[family]

    return get


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Two real clips with a caption each: a 10 s MP4 and a 1 s WebM."""
    folder = tmp_path / "clips"
    folder.mkdir()
    for name, caption in (("shapes_200px_30fps.mp4", "moving shapes"), ("big_buck_bunny_432_433.webm", "a rabbit")):
        (folder / name).write_bytes((DATA / name).read_bytes())
        (folder / name).with_suffix(".txt").write_text(caption + "\n")
    return folder


def write_config(path: Path, **keys) -> Path:
    path.write_text(json.dumps(keys, indent=2))
    return path


def base_config(tmp_path: Path, model: Path, data: Path, **overrides) -> dict:
    """A small, fast config on a tiny model; tests override what they exercise."""
    config = {
        "model_type": "WAN_2_1_T2V",
        "base_model_name": str(model),
        "concepts": [{"path": str(data)}],
        "resolution": "32",
        "epochs": 2,
        "learning_rate": 1e-3,
        "train_dtype": "FLOAT_32",
        "lora_rank": 4,
        "lora_alpha": 4,
        "workspace_dir": str(tmp_path / "workspace"),
        "cache_dir": str(tmp_path / "cache"),
        "output_model_destination": str(tmp_path / "lora.safetensors"),
        "sample_after_unit": "NEVER",
        "video_config": {"max_frames": 9, "target_fps": 8.0},
        # encoding in the training process: a child process per run would add its start-up to every test that trains;
        # tests/test_cache.py runs the child (the default for users)
        "encode_in_child": False,
        # probing and decoding in the test's process: a pool of spawned workers per phase costs an interpreter start
        # each; tests/test_dataset_problems.py runs the pool (the default for users) with a decoder that crashes
        "dataloader_threads": 0,
    }
    config.update(overrides)
    return config
