"""What a new user runs first: the original guide's snippets as pasted, batches that reach both A14B experts with a
live text side, samples that fail without costing the model, resuming a finished run, and messages instead of
tracebacks. (Every shipped preset, end to end, is in test_presets.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import DATA, write_config
from motiontune.cli import main

# The three snippets of the original guide (the OneTrainer fork's docs/VideoTraining.md), verbatim.
GUIDE_SNIPPETS = {
    "LORA": {"training_method": "LORA", "batch_size": 2, "learning_rate": 0.0003, "transformer": {"train": True},
             "text_encoder": {"train": False}},
    "FINE_TUNE": {"training_method": "FINE_TUNE", "batch_size": 1, "learning_rate": 0.0001, "transformer": {"train": True},
                  "text_encoder": {"train": True, "learning_rate": 0.00005}},
    "EMBEDDING": {"training_method": "EMBEDDING", "batch_size": 4, "learning_rate": 0.001, "embedding_learning_rate": 0.005},
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Four clips of different shapes and lengths (so a batch of 4 holds several noise levels)."""
    from fractions import Fraction

    from motiontune.testing.clips import write_timestamped_clip

    folder = tmp_path_factory.mktemp("clips")
    for name, caption in (("shapes_200px_30fps.mp4", "moving shapes <embedding>"), ("big_buck_bunny_432_433.webm", "a rabbit"),
                          ("transparent.webm", "a shape")):
        (folder / name).write_bytes((DATA / name).read_bytes())
        (folder / name).with_suffix(".txt").write_text(caption + "\n")
    write_timestamped_clip(folder / "timestamps.mp4", [Fraction(i, 10) for i in range(12)])
    (folder / "timestamps.txt").write_text("a square\n")
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the module: entries are keyed by content and settings, so runs share what they encode."""
    return tmp_path_factory.mktemp("cache")


def _paths(tmp_path: Path, model: Path, data: Path, **keys) -> dict:
    """Only what a user must add to a pasted snippet (model, data, where to write) and what keeps it tiny."""
    return {"base_model_name": str(model), "concepts": [{"path": str(data)}], "workspace_dir": str(tmp_path / "workspace"),
            "cache_dir": str(data.parent / "cache"), "output_model_destination": str(tmp_path / "out" / "model"),
            "resolution": "32", "epochs": 1, "video_config": {"max_frames": 5, "target_fps": 8.0}, **keys}


def _result(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "workspace" / "result.json").read_text())


@pytest.mark.parametrize("method", GUIDE_SNIPPETS)
def test_the_guides_snippets_run_as_pasted(method, tmp_path, tiny_models, clips):
    config = write_config(tmp_path / "config.json", **GUIDE_SNIPPETS[method], **_paths(tmp_path, tiny_models("wan-2.1"), clips))
    assert main(["train", "--config", str(config)]) == 0
    saved = Path(_result(tmp_path)["lora"])
    # each method saves in its own format although the snippet names none
    if method == "FINE_TUNE":
        assert (saved / "config.json").is_file() and list(saved.glob("*.safetensors"))
    elif method == "EMBEDDING":
        assert load_file(str(saved))["umt5xxl"].shape[0] == 1
    else:
        assert any(k.startswith("diffusion_model.") for k in load_file(str(saved)))


@pytest.mark.parametrize("method", ["EMBEDDING", "FINE_TUNE"])
def test_a_batch_reaching_both_a14b_experts_trains_the_text_side_through_each(method, tmp_path, tiny_models, clips, capsys):
    """The text side encoded once and backpropagated once per expert used to fail ('backward through the graph a
    second time'); each expert now gets its own encoding, and both step."""
    keys = dict(model_type="WAN_2_2_T2V_A14B", experts="both", boundary_ratio=0.5, training_method=method, batch_size=4,
                learning_rate=1e-3, timestep_distribution="UNIFORM", epochs=2, transformer={"train": method == "FINE_TUNE"},
                transformer_2={"train": method == "FINE_TUNE"})
    if method == "FINE_TUNE":
        keys["text_encoder"] = {"train": True, "learning_rate": 5e-5}
    config = write_config(tmp_path / "config.json", **_paths(tmp_path, tiny_models("wan-2.2-a14b"), clips, **keys))
    assert main(["train", "--config", str(config)]) == 0
    experts = _result(tmp_path)["experts"]
    assert experts["high_noise"]["steps"] + experts["low_noise"]["steps"] > 2  # 2 steps: at least one reached both
    assert experts["high_noise"]["samples"] + experts["low_noise"]["samples"] == 2 * 4  # 4 clips, 2 epochs
    assert "samples and steps per part: high_noise" in capsys.readouterr().err


def test_a_bfloat16_hidream_sample_renders_after_the_model_is_saved(tmp_path, tiny_models, clips):
    """The HiDream presets train in BFLOAT_16; their VAE decodes in float32 (it crashed on bfloat16 latents)."""
    sample = {"prompt": "a rabbit", "frames": 1, "height": 32, "width": 32, "steps": 2, "cfg_scale": 1.0}
    config = write_config(tmp_path / "config.json", **_paths(
        tmp_path, tiny_models("hi-dream"), clips, model_type="HI_DREAM_DEV", train_dtype="BFLOAT_16", lora_rank=4,
        output_model_destination=str(tmp_path / "lora.safetensors"), samples=[sample], sample_after=1,
        sample_after_unit="EPOCH", video_config={"max_frames": 1, "target_fps": 1.0}))
    assert main(["train", "--config", str(config)]) == 0
    result = _result(tmp_path)
    assert result["sample_errors"] == [] and Path(result["samples"][0]).stat().st_size > 0


def test_a_failed_sample_is_logged_and_the_model_still_saved(tmp_path, tiny_models, clips, capsys):
    """A sample that cannot be written (a file stands where the samples folder goes, as a full disk would stop it)
    costs nothing but itself: the run ends with exit 0, the model saved, the failure in the log and result.json."""
    sample = {"prompt": "a rabbit", "frames": 5, "height": 32, "width": 32, "steps": 2}
    config = write_config(tmp_path / "config.json", **_paths(
        tmp_path, tiny_models("wan-2.1"), clips, lora_rank=4, output_model_destination=str(tmp_path / "lora.safetensors"),
        samples=[sample], sample_after_unit="EPOCH"))
    (tmp_path / "workspace").mkdir()
    (tmp_path / "workspace" / "samples").write_text("in the way")
    assert main(["train", "--config", str(config)]) == 0
    result = _result(tmp_path)
    assert Path(result["lora"]).is_file() and result["samples"] == []
    assert len(result["sample_errors"]) == 1 and "'a rabbit'" in result["sample_errors"][0]
    err = capsys.readouterr().err
    assert "training goes on" in err and "Traceback" not in err


def test_a_sample_image_that_is_not_an_image_is_refused_before_training(tmp_path, capsys):
    not_an_image = tmp_path / "first-frame.png"
    not_an_image.write_text("not a picture")
    sample = {"prompt": "a rabbit", "image": str(not_an_image)}
    config = write_config(tmp_path / "config.json", model_type="WAN_2_2_TI2V_5B", concepts=[{"path": str(tmp_path)}],
                          samples=[sample], workspace_dir=str(tmp_path / "ws"))
    assert main(["train", "--config", str(config)]) == 2
    assert "samples[0].image" in capsys.readouterr().err and not (tmp_path / "ws").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_models, clips) -> Path:
    """A short LoRA run that backed up after each of its 2 epochs (4 steps each)."""
    tmp = tmp_path_factory.mktemp("finished")
    config = write_config(tmp / "config.json", **_paths(
        tmp, tiny_models("wan-2.1"), clips, lora_rank=4, epochs=2, backup_after=1, backup_after_unit="EPOCH",
        output_model_destination=str(tmp / "lora.safetensors")))
    assert main(["train", "--config", str(config)]) == 0
    return tmp


def test_resume_of_a_finished_run_says_there_is_nothing_left(finished_run, capsys):
    config = finished_run / "config.json"
    written = (finished_run / "lora.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--resume"]) == 0
    out = capsys.readouterr()
    assert "nothing left to train" in out.err and "Nothing left to train" in out.out
    assert (finished_run / "lora.safetensors").stat().st_mtime_ns == written  # neither saved nor sampled again


def test_resume_names_the_next_step_epoch_and_batch_counted_from_1(finished_run, tmp_path, capsys):
    first = sorted((finished_run / "workspace" / "backup").glob("step-*"))[0]
    config = json.loads((finished_run / "config.json").read_text())
    config["output_model_destination"] = str(tmp_path / "lora.safetensors")
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config)), "--resume", str(first)]) == 0
    assert "at step 5, epoch 2, batch 1 (each counted from 1)" in capsys.readouterr().err


def test_compression_ratios_below_the_vaes_own_are_said_to_change_nothing(tmp_path, capsys):
    """The original guide's "common values" (4 and 2) are below WAN's own 8x / 4x: said at the start of a run
    (here one that then stops at its missing data), not silently ignored."""
    config = write_config(tmp_path / "config.json", concept_file_name=str(tmp_path / "none.json"), workspace_dir=str(tmp_path / "ws"),
                          video_config={"spatial_compression_ratio": 4, "temporal_compression_ratio": 2})
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "spatial_compression_ratio = 4 changes nothing" in err and "temporal_compression_ratio = 2 changes nothing" in err


def test_a_preset_takes_concepts_from_set_and_a_missing_concept_file_leaves_no_workspace(tmp_path, capsys):
    from motiontune.configure import load_config

    config = load_config("#wan 2.2 LoRA", ['concepts=[{"path": "my_clips"}]'])
    assert config.concept_file_name is None and config.concepts[0].path == "my_clips"
    workspace = tmp_path / "ws"
    code = main(["train", "--config", "#wan 2.2 LoRA", "--set", f"workspace_dir={workspace}",
                 "--set", f"concept_file_name={tmp_path / 'missing.json'}"])
    assert code == 2 and "missing.json" in capsys.readouterr().err and not workspace.exists()


def test_config_messages_name_the_key(tmp_path, capsys):
    both = write_config(tmp_path / "both.json", concepts=[{"path": "x"}], concept_file_name="c.json")
    assert main(["train", "--config", str(both)]) == 2
    err = capsys.readouterr().err
    assert "set only one of `concepts` and `concept_file_name`" in err and '"path"' not in err  # no dump of the config
    dtype = write_config(tmp_path / "dtype.json", weight_dtype="FLOAT_8", concepts=[{"path": "x"}])
    assert main(["train", "--config", str(dtype)]) == 2
    err = capsys.readouterr().err
    assert "'transformer.weight_dtype'" in err and "embedding_weight_dtype" not in err


def test_an_unreadable_backup_gives_one_message_not_a_traceback(finished_run, tmp_path, capsys):
    import shutil

    backup = tmp_path / "backup"
    shutil.copytree(sorted((finished_run / "workspace" / "backup").glob("step-*"))[0], backup)
    (backup / "state.pt").write_bytes(b"truncated")
    command = ["train", "--config", str(finished_run / "config.json"), "--resume", str(backup)]
    capsys.readouterr()
    assert main(command) == 1
    quiet = capsys.readouterr().err
    assert "Traceback" not in quiet and "error: train failed" in quiet and "-v" in quiet
    with pytest.raises(Exception):  # -v lets the error through: Python prints its traceback
        main(["-v", *command])


def test_paths_with_a_tilde_are_in_the_home_folder(tmp_path, tiny_models, clips, monkeypatch):
    """A JSON config has no shell to expand `~`: motiontune does, for every path it reads (data, model, workspace,
    cache, output), so `~/clips` is the home folder's and no folder named `~` appears."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(clips, home / "clips")
    shutil.copytree(tiny_models("wan-2.1"), home / "models" / "tiny")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "config.json", model_type="WAN_2_1_T2V", base_model_name="~/models/tiny",
                          concepts=[{"path": "~/clips"}], resolution="32", epochs=1, train_dtype="FLOAT_32", lora_rank=4,
                          workspace_dir="~/runs/ws", cache_dir="~/runs/cache", output_model_destination="~/loras/tilde.safetensors",
                          sample_after_unit="NEVER", video_config={"max_frames": 5, "target_fps": 8.0},
                          dataloader_threads=0)  # the encoding child stays: it too must read the expanded paths
    assert main(["train", "--config", str(config)]) == 0
    assert load_file(str(home / "loras" / "tilde.safetensors"))
    assert (home / "runs" / "ws" / "result.json").is_file() and any((home / "runs" / "cache").iterdir())
    assert not list(tmp_path.glob("~*"))  # nothing written under a folder literally named `~`
