"""FLOAT_8 and INT_8 compute (`transformer.compute_dtype`): the frozen base Linears of a LoRA run compute their
matmuls through torchao's float8 (emulate mode here: the CPU has no fp8 kernels) and int8 mixed-precision training.

A tiny WAN 2.1 LoRA trains 100 steps in bf16, with FLOAT_8 compute and with INT_8 compute, from the same seed on the
same clip: the mean loss of every window of 10 steps stays within 2 % of bf16's (relative to bf16's), and diffusers'
stock WanPipeline, given the saved LoRA, samples closer to the clip than without it (test_lora_end_to_end.py's
check and helpers)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import base_config, write_config
from motiontune.cli import main
from test_lora_end_to_end import _channel_stats_distance, _make_clip, _sample_latents, _stock_target_latents

STEPS, WINDOW, SIZE = 100, 10, 32


def _losses(workspace: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workspace / "tensorboard"))
    events.Reload()
    return [e.value for e in sorted(events.Scalars("loss"), key=lambda e: e.step)]


@pytest.fixture(scope="module")
def clip_and_model(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("lowp")
    return root, tiny_models("wan-2.1"), _make_clip(root / "data", SIZE)


def _run(clip_and_model, name: str, **keys):
    root, model, clip = clip_and_model
    folder = root / name
    config = base_config(folder, model, clip.parent, resolution=str(SIZE), epochs=STEPS, learning_rate=3e-3,
                         lora_rank=16, lora_alpha=8, train_dtype="BFLOAT_16", timestep_shift=3.0,
                         cache_dir=str(root / "cache"), dataloader_threads=0, backup_after_unit="NEVER",
                         video_config={"max_frames": 9, "target_fps": 16.0}, **keys)
    folder.mkdir()
    assert main(["train", "--config", str(write_config(folder / "config.json", **config))]) == 0
    losses = _losses(folder / "workspace")
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    return losses, Path(config["output_model_destination"])


@pytest.fixture(scope="module")
def bf16(clip_and_model):
    return _run(clip_and_model, "bf16")


@pytest.fixture(scope="module")
def without_lora(clip_and_model):
    """The clip's latents and the stock pipeline's samples without a LoRA (shared by both tests)."""
    from diffusers import WanPipeline

    _, model, clip = clip_and_model
    pipe = WanPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return _stock_target_latents(pipe, clip), _sample_latents(pipe, SIZE)


def _windows(losses: list[float]) -> list[float]:
    return [sum(losses[i:i + WINDOW]) / WINDOW for i in range(0, len(losses), WINDOW)]


@pytest.mark.parametrize("compute", ["FLOAT_8", "INT_8"])
def test_low_precision_compute_trains_like_bf16(compute, bf16, without_lora, clip_and_model, monkeypatch):
    from diffusers import WanPipeline

    monkeypatch.setenv("MOTIONTUNE_EMULATE_FP8", "1")
    losses, lora = _run(clip_and_model, compute, transformer={"compute_dtype": compute})
    reference = _windows(bf16[0])
    gaps = [abs(a - b) / b for a, b in zip(_windows(losses), reference)]
    print(f"{compute}: window means {[round(v, 4) for v in _windows(losses)]}, bf16 {[round(v, 4) for v in reference]}, "
          f"largest gap {max(gaps):.4f}")
    assert losses != bf16[0], "the losses are bf16's exactly: the low-precision layers did not run"
    assert max(gaps) < 0.02

    target, without = without_lora
    pipe = WanPipeline.from_pretrained(clip_and_model[1])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora))
    with_lora = _sample_latents(pipe, SIZE)
    mse_ratio = ((with_lora - target) ** 2).mean().item() / ((without - target) ** 2).mean().item()
    stats_ratio = _channel_stats_distance(with_lora, target) / _channel_stats_distance(without, target)
    print(f"{compute}: MSE ratio with/without LoRA {mse_ratio:.3f}, channel statistics ratio {stats_ratio:.3f}")
    # closer to the clip than the base model, in both measures: the end-to-end test's bar after 1000 steps is 0.75 / 0.85;
    # after these 100 the MSE ratio is about 0.78
    assert mse_ratio < 0.9 and stats_ratio < 0.85


# --- refusals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keys, expected", [
    # quantized storage keeps no train-dtype weight for torchao to cast
    ({"transformer": {"compute_dtype": "FLOAT_8", "weight_dtype": "NFLOAT_4"}},
     ["transformer.compute_dtype = FLOAT_8 with transformer.weight_dtype = NFLOAT_4", "Choose one"]),
    ({"transformer": {"compute_dtype": "INT_8", "weight_dtype": "FLOAT_8"}},
     ["transformer.compute_dtype = INT_8 with transformer.weight_dtype = FLOAT_8"]),
    # WAN 2.1 has no second transformer that trains
    ({"transformer_2": {"compute_dtype": "INT_8"}}, ["transformer_2.compute_dtype = INT_8: transformer_2 does not train"]),
    ({"text_encoder": {"compute_dtype": "INT_8"}}, ['text_encoder.compute_dtype = "INT_8": not supported yet']),
    # OneTrainer's spelling of the same thing gets its translation
    ({"transformer": {"weight_dtype": "INT_W8A8"}}, ["OneTrainer's W8A8 value", "transformer.compute_dtype to 'INT_8'"]),
])
def test_combinations_that_cannot_run_are_refused_by_name(tmp_path, keys, expected):
    from motiontune.config import ConfigError
    from motiontune.configure import load_config

    path = write_config(tmp_path / "c.json", base_model_name=str(tmp_path), concepts=[{"path": "clips"}], **keys)
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    for text in expected:
        assert text in str(error.value)


def test_fp8_compute_is_refused_where_the_device_cannot_run_it(monkeypatch):
    """FLOAT_8 needs compute capability 8.9 (the CPU only emulates it: tests alone may ask for that); INT_8 needs 8.0.
    The device's capability is what torch reports; here it is set to an RTX 3090's (8.6) and a T4's (7.5)."""
    from motiontune.util.low_precision import device_problem

    monkeypatch.delenv("MOTIONTUNE_EMULATE_FP8", raising=False)
    assert "compute capability 8.9" in device_problem("FLOAT_8", torch.device("cpu"), "transformer.compute_dtype")
    assert device_problem("INT_8", torch.device("cpu"), "transformer.compute_dtype") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a test GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    problem = device_problem("FLOAT_8", torch.device("cuda"), "transformer_2.compute_dtype")
    assert "transformer_2.compute_dtype = FLOAT_8" in problem and "has 8.6" in problem and "INT_8" in problem
    assert device_problem("INT_8", torch.device("cuda"), "transformer.compute_dtype") is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "compute capability 8.0" in device_problem("INT_8", torch.device("cuda"), "transformer.compute_dtype")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert device_problem("FLOAT_8", torch.device("cuda"), "transformer.compute_dtype") is None


def test_a_cpu_run_with_fp8_compute_stops_at_setup_with_the_reason(clip_and_model, capsys, monkeypatch):
    """Without the test-only emulation a CPU run asking for FLOAT_8 stops before its first step, naming the key."""
    monkeypatch.delenv("MOTIONTUNE_EMULATE_FP8", raising=False)
    root, model, clip = clip_and_model
    folder = root / "refused"
    config = base_config(folder, model, clip.parent, resolution=str(SIZE), cache_dir=str(root / "cache"),
                         dataloader_threads=0, transformer={"compute_dtype": "FLOAT_8"},
                         video_config={"max_frames": 9, "target_fps": 16.0})
    folder.mkdir()
    assert main(["train", "--config", str(write_config(folder / "config.json", **config))]) == 2
    assert "transformer.compute_dtype = FLOAT_8: float8 matmuls need an NVIDIA GPU" in capsys.readouterr().err
    assert not Path(config["output_model_destination"]).exists()


def test_estimate_runs_torchaos_layers_in_its_simulated_step():
    """`estimate` simulates the step with torchao's own float8 / int8 layers (their GPU path): the weights are the
    same bytes, and the step's activations gain what the 8-bit copies of the operands take while a layer computes."""
    from motiontune.configure import load_config
    from motiontune.estimate import estimate

    def lines(compute):
        sets = ["transformer.weight_dtype=BFLOAT_16"] + ([f"transformer.compute_dtype={compute}"] if compute else [])
        result = estimate(load_config("#wan 2.2 LoRA 8GB", sets))
        assert result.options.compute_dtype == compute
        return {line.name: line.device for line in result.lines}

    plain = lines(None)
    for compute in ("FLOAT_8", "INT_8"):
        low = lines(compute)
        assert low["frozen weights"] == plain["frozen weights"]
        activations = next(name for name in plain if name.startswith("activations"))
        # the largest layer's 8-bit input and weight at least (TI2V-5B's FFN: 3072 x 14336, 1008 tokens)
        assert low[activations] - plain[activations] > 3072 * 14336 + 1008 * 3072
