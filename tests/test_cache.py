"""The latent and text cache: nothing is encoded twice, nothing stale is served, a kill never corrupts it."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import forked_command
from conftest import DATA, base_config, write_config
from motiontune.cli import main
from motiontune.models.wan import WanFamily


@pytest.fixture
def loads(monkeypatch) -> Counter:
    """Counts real encoder loads (the methods still run)."""
    counter = Counter()
    for name in ("load_vae", "load_text_encoder"):
        original = getattr(WanFamily, name)

        def counted(self, _original=original, _name=name):
            counter[_name] += 1
            return _original(self)

        monkeypatch.setattr(WanFamily, name, counted)
    return counter


def train_once(tmp_path: Path, config: dict) -> dict:
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0
    return json.loads((Path(config["workspace_dir"]) / "result.json").read_text())["encoder_calls"]


def test_each_entry_is_encoded_once_and_only_changes_are_re_encoded(tmp_path, tiny_models, dataset, loads):
    video = {"max_frames": 5, "target_fps": 8.0, "clips_per_file": 2}
    config = base_config(tmp_path, tiny_models("wan-2.1"), dataset, epochs=2, video_config=video)
    # the WebM is 1 s long: its two uniform windows (0-0.5 s and 0.5-1 s) are distinct; 4 clips in all
    assert train_once(tmp_path, config) == {"video": 4, "text": 2}  # two epochs, each clip encoded once
    assert loads == {"load_vae": 1, "load_text_encoder": 1}

    loads.clear()
    assert train_once(tmp_path, config) == {}  # a second run encodes nothing...
    assert loads == {}  # ...and loads neither the VAE nor the text encoder

    faster = base_config(tmp_path, tiny_models("wan-2.1"), dataset, epochs=1, video_config={**video, "target_fps": 10.0})
    assert train_once(tmp_path, faster) == {"video": 4}  # new instants: every latent, no text
    larger = base_config(tmp_path, tiny_models("wan-2.1"), dataset, epochs=1, resolution="48", video_config=video)
    assert train_once(tmp_path, larger) == {"video": 4}
    (dataset / "shapes_200px_30fps.txt").write_text("moving shapes on black\n")
    assert train_once(tmp_path, config) == {"text": 1}  # one caption changed: exactly one embedding


def test_train_encodes_in_a_child_process_and_trains_what_in_process_encoding_trains(tmp_path, tiny_models, dataset,
                                                                                     loads, monkeypatch, capfd):
    """The training process never loads the VAE or the text encoder when a child encodes (encode_in_child, the
    default); a clip the child cannot decode is reported and skipped; the LoRA equals the one in-process encoding
    trains (the same clip skipped there)."""
    import encoder_process_plants
    from motiontune.data import encoder_process, latents
    from motiontune.testing.process_memory import process_memory

    video = {"max_frames": 5, "target_fps": 8.0}
    loras = {}
    for child in (True, False):
        run = tmp_path / ("child" if child else "same")
        config = base_config(run, tiny_models("wan-2.1"), dataset, epochs=1, video_config=video, encode_in_child=child,
                             dataloader_threads=0)  # decoding in the process that encodes: where the plant is
        if child:
            monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), *sys.path]))
            monkeypatch.setattr(encoder_process, "BEFORE", ["encoder_process_plants:webm_fails_to_decode",
                                                            "encoder_process_plants:encoder_holds_a_gigabyte"])
        else:
            monkeypatch.setattr(latents, "decode_clips", latents.decode_clips)  # restored after the test
            encoder_process_plants.webm_fails_to_decode()
        loads.clear()
        run.mkdir()
        if child:  # the training process is this one: its peak from here on, not an earlier test's
            Path("/proc/self/clear_refs").write_text("5")
        # the WebM's clip is left out; the child encodes every usable file's caption (each rank's child deals the same
        # texts), the training process only those of the clips it trains
        assert train_once(run, config) == {"video": 1, "text": 2 if child else 1}
        err = capfd.readouterr().err  # the child writes to the same terminal (file descriptor 2)
        assert f"skipped {dataset / 'big_buck_bunny_432_433.webm'}: decoding failed (planted" in err
        if child:
            assert loads == {}  # neither encoder was ever loaded by the training process
            assert "1 clip(s) the encoding process could not encode are skipped" in err
            # each process's own peak (result.json): the child's planted gigabyte is in its figure; train's is this
            # process's own high-water mark (a parent's wait4 / RUSAGE_CHILDREN figure would be the child's)
            peaks = json.loads((run / "workspace" / "result.json").read_text())["peak_rss"]
            assert peaks["encoding_process"] > 2**30 and peaks["training_process"] < peaks["encoding_process"]
            # the kernel's resident counters are kept per thread and folded in every 64 pages, so two readings of the
            # peak can differ by a few pages either way (seen: 24 KB lower after the run)
            assert -2**20 < process_memory()["VmHWM"] - peaks["training_process"] < 2**26
        else:
            assert loads == {"load_vae": 1, "load_text_encoder": 1}
        loras[child] = load_file(str(run / "lora.safetensors"))
    assert loras[True].keys() == loras[False].keys()
    assert all(torch.equal(loras[True][k], loras[False][k]) for k in loras[True])
    assert any(v.abs().sum() > 0 for k, v in loras[True].items() if "lora_B" in k or "lora_up" in k)  # it trained


def test_an_error_of_the_encoding_process_stops_training_with_its_message(tmp_path, tiny_models, dataset, capsys):
    """A model without a VAE: the child's load error is train's own model error (exit 3), not a traceback."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_models("wan-2.1"), model)
    shutil.rmtree(model / "vae")
    config = base_config(tmp_path, model, dataset, epochs=1, video_config={"max_frames": 5, "target_fps": 8.0},
                         encode_in_child=True)
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 3
    err = capsys.readouterr().err
    assert "model error: (in the encoding process)" in err and "vae" in err.lower()
    assert not (tmp_path / "lora.safetensors").exists()


def test_a_changed_file_is_re_encoded_and_a_touched_one_is_not(tmp_path, tiny_models, dataset):
    config = base_config(tmp_path, tiny_models("wan-2.1"), dataset, epochs=1, video_config={"max_frames": 5, "target_fps": 8.0})
    assert train_once(tmp_path, config) == {"video": 2, "text": 2}
    os.utime(dataset / "shapes_200px_30fps.mp4")  # new date, same bytes: the content hash says unchanged
    assert train_once(tmp_path, config) == {}
    (dataset / "big_buck_bunny_432_433.webm").write_bytes((DATA / "transparent.webm").read_bytes())
    assert train_once(tmp_path, config) == {"video": 1}


def test_corrupt_and_nan_entries_are_reported_and_made_again(tmp_path, tiny_models, dataset, capsys):
    config = base_config(tmp_path, tiny_models("wan-2.1"), dataset, epochs=1, video_config={"max_frames": 5, "target_fps": 8.0})
    train_once(tmp_path, config)
    entries = sorted((tmp_path / "cache" / "latents").glob("*/*.safetensors"))
    assert len(entries) == 2
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # torn
    value = load_file(str(entries[1]))["value"]
    save_file({"value": torch.full_like(value, float("nan"))}, str(entries[1]))
    assert train_once(tmp_path, config) == {"video": 2}
    assert capsys.readouterr().err.count("was unusable") == 2
    assert all(torch.isfinite(load_file(str(e))["value"]).all() for e in entries)


def test_random_windows_cycle_through_cached_variants(tmp_path, tiny_models, dataset):
    video = {"max_frames": 5, "target_fps": 8.0, "frame_sample_strategy": "random", "window_variants": 2}
    config = base_config(tmp_path, tiny_models("wan-2.1"), dataset, epochs=4, video_config=video)
    assert train_once(tmp_path, config) == {"video": 4, "text": 2}  # 2 files x 2 variants, epochs 3-4 from the cache
    assert train_once(tmp_path, {**config, "epochs": 1}) == {}


def test_killed_cache_run_leaves_no_corrupt_entry(tmp_path, tiny_models, dataset, capsys):
    video = {"max_frames": 9, "target_fps": 8.0, "clips_per_file": 30}
    config = base_config(tmp_path, tiny_models("wan-2.1"), dataset, resolution="64", video_config=video, dataloader_threads=0)
    path = write_config(tmp_path / "config.json", **config)
    command = ["cache", "--config", str(path)]
    latents = tmp_path / "cache" / "latents"
    process = forked_command.start(command, tmp_path / "killed.log")  # a process of its own, to SIGKILL
    deadline = time.time() + 120
    while time.time() < deadline and len(list(latents.glob("*/*.safetensors"))) < 3:
        time.sleep(0.01)
    process.kill()
    process.join()
    written = len(list(latents.glob("*/*.safetensors")))
    total = 30 + 30  # 30 windows from each file (the 1 s WebM's are 5 frames long)
    assert 3 <= written < total, "the kill did not land mid-run"

    capsys.readouterr()
    assert main(command) == 0  # the same command again, to the end
    out = capsys.readouterr().out
    assert f"{total} clip latents" in out and f"({total - written} and" in out
    entries = list(latents.glob("*/*.safetensors"))
    assert len(entries) == total and not list((tmp_path / "cache").rglob("*.tmp"))
    assert all(torch.isfinite(load_file(str(e))["value"]).all() for e in entries)


def test_clear_removes_only_what_the_config_no_longer_uses(tmp_path, tiny_models, dataset, capsys):
    config = base_config(tmp_path, tiny_models("wan-2.1"), dataset, video_config={"max_frames": 5, "target_fps": 8.0})
    path = write_config(tmp_path / "a.json", **config)
    assert main(["cache", "--config", str(path)]) == 0
    assert main(["cache", "--config", str(path), "--set", "video_config.target_fps=10", "--clear"]) == 0
    out = capsys.readouterr().out
    assert "removed 2 entries" in out  # the two 8 fps latents; the captions are still in use
    assert len(list((tmp_path / "cache" / "latents").glob("*/*.safetensors"))) == 2
    assert len(list((tmp_path / "cache" / "text").glob("*/*.safetensors"))) == 2


@pytest.mark.parametrize("model_type", ["HUNYUAN_VIDEO", "HI_DREAM_FULL", "HUNYUAN_VIDEO_1_5", "LTX_2"])
def test_a_new_text_row_layout_is_a_new_text_key(model_type, tmp_path, monkeypatch):
    """Families that pack a prompt's tensors into one cached row (models/packing.py) name the layout in the text
    key: captions cached in another layout are encoded again, never read with the wrong header. WAN caches the
    encoder's output as is: its key names no layout."""
    from motiontune.configure import load_config
    from motiontune.data.cache import Cache
    from motiontune.data.latents import Encoding
    from motiontune.models import family_for
    from motiontune.models.packing import FORMAT

    def identity(model_type):
        config = load_config(str(write_config(tmp_path / "c.json", model_type=model_type, base_model_name=str(tmp_path),
                                              concepts=[{"path": "."}], cache_dir=str(tmp_path / "cache"))))
        family = family_for(config, torch.device("cpu"))
        return family, Encoding(family, config, Cache(config.cache_dir, True), None).text_identity

    family, packed = identity(model_type)
    assert family.TEXT_FORMAT == FORMAT
    monkeypatch.setattr(type(family), "TEXT_FORMAT", "packed-1")
    assert identity(model_type)[1] != packed
    assert WanFamily.TEXT_FORMAT == ""


def test_a_bfloat16_vae_encodes_in_bfloat16_into_its_own_cache_entries(tmp_path, tiny_models, dataset):
    """vae.weight_dtype BFLOAT_16 (how musubi-tuner and finetrainers encode by default): latents of a bf16 VAE, close
    to float32's but not the same, cached under their own key (switching re-encodes, switching back reads the
    cache), and samples decode through the bf16 VAE."""
    import av
    import numpy as np

    from motiontune.configure import load_config

    from test_training import frame_count

    sample = {"prompt": "moving shapes", "frames": 5, "height": 32, "width": 32, "steps": 2}
    fp32 = base_config(tmp_path, tiny_models("wan-2.1"), dataset, epochs=1)
    bf16 = {**fp32, "train_dtype": "BFLOAT_16", "vae": {"weight_dtype": "BFLOAT_16"}, "samples": [sample],
            "sample_after_unit": "EPOCH", "sample_after": 1}
    first = train_once(tmp_path, fp32)
    assert first["video"] >= 2
    # its own latents; of the texts only the sample's prompt is new
    assert train_once(tmp_path, bf16) == {"video": first["video"], "text": 1}
    assert frame_count(tmp_path / "workspace" / "samples" / "epoch1-0.mp4") == (5, 32, 32)
    assert train_once(tmp_path, fp32) == {}  # the float32 entries are still there

    with av.open(str(dataset / "shapes_200px_30fps.mp4")) as container:
        frames = np.stack([f.to_ndarray(format="rgb24")[:64, :64] for _, f in zip(range(5), container.decode(video=0))])
    latents = {}
    for name, keys in (("fp32", fp32), ("bf16", bf16)):
        family = WanFamily(load_config(str(write_config(tmp_path / f"{name}.json", **keys))), torch.device("cpu"))
        family.load_vae()
        assert family.vae.dtype == (torch.bfloat16 if name == "bf16" else torch.float32)
        latents[name] = family.encode_video(frames)
    assert latents["bf16"].dtype == torch.float32  # what follows the VAE stays float32
    error = ((latents["bf16"] - latents["fp32"]).pow(2).mean() / latents["fp32"].pow(2).mean()).sqrt().item()
    assert 1e-4 < error < 0.05, error  # really bf16, and close


def test_a_float16_vae_that_overflows_says_what_to_set(tmp_path, tiny_models, dataset):
    """float16's range is narrow: a VAE whose activations pass 65504 gives infinite latents, which must never reach
    the cache; the error names the setting to change."""
    import numpy as np

    from motiontune.configure import load_config

    keys = {**base_config(tmp_path, tiny_models("wan-2.1"), dataset), "vae": {"weight_dtype": "FLOAT_16"}}
    family = WanFamily(load_config(str(write_config(tmp_path / "fp16.json", **keys))), torch.device("cpu"))
    family.load_vae()
    frames = np.full((5, 32, 32, 3), 200, dtype=np.uint8)
    assert torch.isfinite(family.encode_video(frames)).all()  # in range: fine
    with torch.no_grad():
        family.vae.encoder.conv_in.weight.mul_(1e5)  # activations far past float16's largest value
    with pytest.raises(ValueError, match="set vae.weight_dtype to BFLOAT_16 or FLOAT_32"):
        family.encode_video(frames)
