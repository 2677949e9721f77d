"""OneTrainer's concept types beside STANDARD: PRIOR_PREDICTION concepts (the target is the model's own prediction
with the LoRA switched off: regularisation without a second dataset) and VALIDATION concepts (never trained on;
their loss at fixed noise levels and noise is logged)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, base_config, write_config
from motiontune.cli import main
from stock_checks import stock_samples


def clip_folder(root: Path, name: str, caption: str) -> Path:
    folder = root / name
    folder.mkdir()
    source = DATA / ("shapes_200px_30fps.mp4" if name == "shapes" else "big_buck_bunny_432_433.webm")
    (folder / source.name).write_bytes(source.read_bytes())
    (folder / source.name).with_suffix(".txt").write_text(caption + "\n")
    return folder


@pytest.fixture
def folders(tmp_path):
    return clip_folder(tmp_path, "shapes", "moving shapes"), clip_folder(tmp_path, "rabbit", "a rabbit")


def scalars(workspace: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workspace / "tensorboard"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def train(tmp_path: Path, name: str, model: Path, concepts: list[dict], **keys) -> Path:
    """Train into tmp_path/name; → its workspace."""
    run = tmp_path / name
    config = base_config(run, model, run, concepts=concepts, **keys)
    assert main(["train", "--config", str(write_config(tmp_path / f"{name}.json", **config))]) == 0
    return run / "workspace"


def test_a_prior_prediction_concept_costs_nothing_until_the_lora_moves(tmp_path, tiny_models, folders):
    """With an untrained LoRA (B = 0) the model's prediction is the frozen model's exactly, so a run of only
    PRIOR_PREDICTION clips has a loss of 0 at every step (the temporal term included, at the shipped presets'
    bfloat16) and its LoRA never moves."""
    shapes, rabbit = folders
    workspace = train(tmp_path, "prior-only", tiny_models("wan-2.1"),
                      [{"path": str(shapes), "type": "PRIOR_PREDICTION"}, {"path": str(rabbit), "type": "PRIOR_PREDICTION"}],
                      train_dtype="BFLOAT_16", batch_size=2, epochs=2,
                      video_config={"max_frames": 9, "target_fps": 8.0, "temporal_consistency_weight": 0.5})
    logged = scalars(workspace)
    assert logged["loss"] == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0}  # two clip shapes: a batch each, two epochs
    assert logged["loss/temporal_consistency"] == logged["loss"]
    lora = load_file(str(workspace.parent / "lora.safetensors"))
    ups = [t for k, t in lora.items() if "lora_up" in k or "lora_B" in k]
    assert ups and all(bool((t == 0).all()) for t in ups)


def _drift(model: Path, lora: Path, prompt: str) -> float:
    """How far the LoRA moves the stock pipeline's samples for `prompt` from the base model's (MSE of latents)."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(model), dtype=torch.float32)

    def sample():
        return stock_samples(pipe, range(2), prompt=prompt, height=32, width=32, num_frames=9, num_inference_steps=8,
                             guidance_scale=1.0)

    base = sample()
    pipe.load_lora_weights(str(lora))
    return float((sample() - base).pow(2).mean())


def test_a_prior_prediction_concept_keeps_what_the_model_did_for_its_prompt(tmp_path, tiny_models, folders):
    """A LoRA learns the shapes clip; with the rabbit clip as a PRIOR_PREDICTION concept beside it, the samples
    for the rabbit's prompt drift clearly less from the base model's than without it."""
    shapes, rabbit = folders
    model = tiny_models("wan-2.1")
    keys = dict(epochs=40, learning_rate=2e-3, timestep_shift=3.0)
    alone = train(tmp_path, "alone", model, [{"path": str(shapes)}], **keys)
    # balancing 1 for both: half the steps see the rabbit, so the shapes get 40 steps in both runs
    guarded = train(tmp_path, "guarded", model, [{"path": str(shapes)}, {"path": str(rabbit), "type": "PRIOR_PREDICTION"}],
                    **keys)
    drift_alone = _drift(model, alone.parent / "lora.safetensors", "a rabbit")
    drift_guarded = _drift(model, guarded.parent / "lora.safetensors", "a rabbit")
    print(f"drift on the prior concept's prompt: {drift_alone:.4g} alone, {drift_guarded:.4g} with it "
          f"(ratio {drift_guarded / drift_alone:.2f})")
    assert drift_guarded < 0.5 * drift_alone


def test_validation_clips_never_train_and_their_loss_is_reproducible(tmp_path, tiny_models, folders):
    shapes, rabbit = folders
    concepts = [{"path": str(shapes), "name": "shapes"}, {"path": str(rabbit), "name": "held out", "type": "VALIDATION"}]
    keys = dict(epochs=3, validation=True, validate_after=1, validate_after_unit="STEP")

    # weights that do not move (a learning rate far below float32's resolution): the same value at every step
    still = train(tmp_path, "still", tiny_models("wan-2.1"), concepts, learning_rate=1e-30, **keys)
    result = json.loads((still / "result.json").read_text())
    assert result["steps"] == 3 and result["experts"]["transformer"]["samples"] == 3  # the shapes clip alone, 3 epochs
    logged = scalars(still)
    held_out = logged["loss/validation_step/held out"]
    assert sorted(held_out) == [1, 2, 3] and len(set(held_out.values())) == 1
    assert logged["loss/validation_step/total_average"] == held_out
    assert 0 < held_out[1] < 10

    # weights that learn: the value follows them
    moving = scalars(train(tmp_path, "moving", tiny_models("wan-2.1"), concepts, learning_rate=1e-2, **keys))
    assert len(set(moving["loss/validation_step/held out"].values())) == 3


def test_every_clip_held_out_or_no_validation_concept_is_refused_with_what_to_do(tmp_path, tiny_models, folders, capsys):
    shapes, _ = folders
    model = tiny_models("wan-2.1")
    config = base_config(tmp_path, model, shapes, concepts=[{"path": str(shapes), "type": "VALIDATION"}])
    assert main(["train", "--config", str(write_config(tmp_path / "a.json", **config))]) == 2
    assert "every clip belongs to a VALIDATION concept, so nothing trains" in capsys.readouterr().err
    config = base_config(tmp_path, model, shapes, concepts=[{"path": str(shapes)}], validation=True)
    assert main(["train", "--config", str(write_config(tmp_path / "b.json", **config))]) == 2
    assert "`validation` is true but no concept is of type VALIDATION" in capsys.readouterr().err
