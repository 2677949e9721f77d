"""What keeps a dataset of thousands of clips cheap: probes remembered in the cache folder, cache entries read
when a step needs them (not held in memory), and an `inspect` summary that stays a screenful. Timing is measured
by benchmarks/large_dataset.py, not here."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from fractions import Fraction

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DATA, base_config, write_config
from motiontune.cli import main
from motiontune.config import TrainConfig
from motiontune.data.cache import Cache, CacheError
from motiontune.data.latents import Encoding
from motiontune.data.survey import survey_dataset
from motiontune.models.wan import WanFamily
from motiontune.testing.clips import write_mixed_dataset, write_timestamped_clip


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """30 synthetic files: videos of three codecs, four sizes and frame rates, images, one broken."""
    folder = tmp_path_factory.mktemp("mixed") / "clips"
    kinds = write_mixed_dataset(folder, 30, seed=0)
    assert kinds["broken"] >= 1 and kinds["image"] >= 1 and kinds["rotated"] >= 1
    return folder, kinds


def survey(folder, cache, caplog, threads=2):
    config = TrainConfig.model_validate({"concepts": [{"path": str(folder)}], "cache_dir": str(cache),
                                         "dataloader_threads": threads, "video_config": {"max_frames": 5, "target_fps": 8.0}})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="motiontune"):
        return survey_dataset(config, WanFamily(config, torch.device("cpu")), require_usable=False)


def probed(caplog) -> str:
    return " ".join(r.getMessage() for r in caplog.records if "probing" in r.getMessage())


def test_an_unchanged_file_is_not_probed_again(tmp_path, mixed, caplog):
    source, kinds = mixed
    folder = tmp_path / "clips"
    folder.mkdir()
    for path in source.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    # a variable frame rate: its frame times are kept as they are; a constant rate's as a step and a count
    write_timestamped_clip(folder / "vfr.mp4", [Fraction(ms, 1000) for ms in (0, 40, 70, 130, 160, 230, 260, 300)])
    first = survey(folder, tmp_path / "cache", caplog)
    stored = json.loads((tmp_path / "cache" / "probes.json").read_text())["files"]
    assert stored[str(folder / "vfr.mp4")][2]["frame_times"] == [0.0, 0.04, 0.07, 0.13, 0.16, 0.23, 0.26, 0.3]
    assert sum(len(fact[2]["frame_times"]) == 4 for fact in stored.values() if "frame_times" in fact[2]) >= 20
    problems = [e.problem for e in first.entries if e.problem]
    assert len(problems) == kinds["broken"] and all(str(folder) in p for p in problems)

    again = survey(folder, tmp_path / "cache", caplog)
    assert probed(caplog) == ""  # nothing probed: everything, problems too, came from probes.json
    assert [e.info for e in again.entries] == [e.info for e in first.entries]  # every field, frame times included
    assert [e.problem for e in again.entries] == [e.problem for e in first.entries]
    assert [e.clips for e in again.entries] == [e.clips for e in first.entries]

    changed = next(e.item.path for e in first.entries if e.usable and not e.info.is_image)
    changed.write_bytes((DATA / "shapes_200px_30fps.mp4").read_bytes())  # new bytes, new size
    third = survey(folder, tmp_path / "cache", caplog)
    assert "probing 1 new or changed files" in probed(caplog)
    assert next(e for e in third.entries if e.item.path == changed).info.duration == pytest.approx(10.0, abs=0.1)


def test_probes_are_kept_only_where_the_cache_is(tmp_path, mixed, caplog):
    folder, _ = mixed
    config = TrainConfig.model_validate({"concepts": [{"path": str(folder)}], "cache_dir": str(tmp_path / "cache"),
                                         "latent_caching": False, "dataloader_threads": 0})
    survey_dataset(config, WanFamily(config, torch.device("cpu")), require_usable=False)
    assert not (tmp_path / "cache").exists()


def test_cached_latents_are_read_when_a_step_asks(tmp_path, tiny_models):
    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "shapes.mp4").write_bytes((DATA / "shapes_200px_30fps.mp4").read_bytes())
    keys = base_config(tmp_path, tiny_models("wan-2.1"), folder, dataloader_threads=0,
                       video_config={"max_frames": 5, "target_fps": 8.0, "clips_per_file": 2})
    config = TrainConfig.model_validate(keys)
    family = WanFamily(config, torch.device("cpu"))
    surveyed = survey_dataset(config, family)

    def clips():
        return Encoding(family, config, Cache(tmp_path / "cache")).clips(surveyed)

    made, read = clips(), clips()  # the first encodes, the second finds every entry
    for encoded in (made, read):
        assert not any(isinstance(v, torch.Tensor) for clip in encoded for v in vars(clip).values())
    entry = read[0].stored.path
    replacement = torch.full_like(load_file(str(entry))["value"], 0.5)
    save_file({"value": replacement}, str(entry))
    assert torch.equal(read[0].latents, replacement) and read[0].shape == tuple(replacement.shape)
    os.unlink(entry)
    with pytest.raises(CacheError, match=str(entry)):
        read[0].latents

    Encoding(family, config, Cache(tmp_path / "cache")).texts({"a caption"})
    embeddings = Encoding(family, config, Cache(tmp_path / "cache")).texts({"a caption"})  # from the cache
    [text_entry] = (tmp_path / "cache" / "text").glob("*/*.safetensors")
    replacement = torch.full_like(load_file(str(text_entry))["value"], 0.25)
    save_file({"value": replacement}, str(text_entry))
    assert torch.equal(embeddings["a caption"], replacement)  # read when asked, not held


def test_inspect_prints_a_summary_and_the_table_on_request(tmp_path, mixed, capsys):
    folder, kinds = mixed
    cache = ["--set", f"cache_dir={tmp_path / 'cache'}"]
    assert main(["inspect", str(folder), *cache]) == 0
    summary = capsys.readouterr().out
    usable = kinds["video"] + kinds["image"]
    assert f"{usable} of 30 files usable: {kinds['video']} videos" in summary
    assert f"{kinds['rotated']} rotated), {kinds['image']} images" in summary
    assert "frame rates: " in summary and "bucket " in summary
    assert summary.count("clip_") == kinds["broken"]  # only the files with a problem are named
    assert main(["inspect", str(folder), "--files", *cache]) == 0
    table = capsys.readouterr().out
    assert all(f"clip_{i:05d}" in table for i in range(30)) and table.endswith(summary.split("files that cannot")[0])
    assert main(["inspect", str(folder), "--json", *cache]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["images"] == kinds["image"] and len(report["files"]) == 30
    # the rates the frames were written at (the x264 files' headers all say 25); millisecond timestamps on clips
    # this short cannot tell 24 from 23.976
    written = [min((12, 24, 25, 30), key=lambda r: abs(r - float(fps))) for fps in report["summary"]["fps_mix"]]
    assert all(abs(r - float(f)) < 0.005 * r for r, f in zip(written, report["summary"]["fps_mix"]))
    assert len(set(written)) >= 3


def test_inspect_imports_no_model_library(tmp_path, mixed):
    """A warm inspect of 10,000 files is under a second of work; importing torch, diffusers, transformers and peft
    would add over three. The family's facts the survey needs (VAE compression, frame rule) come without them."""
    folder, kinds = mixed
    script = ("import sys; from motiontune.cli import main; code = main(sys.argv[1:]); "
              "print('imported:', *sorted({'torch', 'diffusers', 'transformers', 'peft', 'torchao'} & set(sys.modules))); "
              "sys.exit(code)")
    hidream = write_config(tmp_path / "hidream.json", model_type="HI_DREAM_FULL", concepts=[{"path": str(folder)}])
    for target in (folder, hidream):  # a folder with the default (WAN) settings; a config naming another family
        done = subprocess.run([sys.executable, "-c", script, "inspect", str(target), "--set", f"cache_dir={tmp_path / 'cache'}"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"{kinds['video'] + kinds['image']} of 30 files usable" in done.stdout
        assert done.stdout.rstrip().endswith("imported:"), done.stdout[-300:]


def test_stale_temporaries_are_judged_by_the_machine_that_wrote_them(tmp_path):
    """A cache folder shared by several machines: another machine's process ids mean nothing here, so its
    temporaries are left alone until they are a day old; this machine's go as soon as their writer is gone."""
    from motiontune.util.processes import HOST

    folder = tmp_path / "cache" / "latents" / "ab"
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {"mine_dead": f"x.safetensors.{HOST}-{dead.pid}.tmp", "mine_alive": f"x.safetensors.{HOST}-{os.getpid()}.tmp",
             "other_fresh": f"y.safetensors.othernode-{dead.pid}.tmp", "other_old": f"z.safetensors.othernode-1.tmp"}
    for name in names.values():
        (folder / name).write_bytes(b"partial")
    day_ago = time.time() - 25 * 3600
    os.utime(folder / names["other_old"], (day_ago, day_ago))
    Cache(tmp_path / "cache")
    assert sorted(p.name for p in folder.iterdir()) == sorted([names["mine_alive"], names["other_fresh"]])
