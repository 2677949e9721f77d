"""Bad input never kills a run: each bad file is reported once with its reason, skipped, and the rest trains;
`motiontune inspect` shows it all before any model loads."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import DATA, base_config, write_config
from motiontune.cli import main
from motiontune.data.workers import WorkerCrash, map_isolated

SHARED = Path(__file__).resolve().parents[2] / "shared" / "videos"


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """The real clips (all of ../shared/videos when it is beside the checkout) plus three bad files."""
    folder = tmp_path / "messy"
    folder.mkdir()
    source = SHARED if SHARED.is_dir() else DATA
    for path in source.iterdir():
        if path.suffix != ".md":
            shutil.copy(path, folder / path.name)
    (folder / "zero.mp4").write_bytes(b"")
    whole = (DATA / "shapes_200px_30fps.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(whole[: len(whole) // 4])
    (folder / "notes.mp4").write_text("shopping list: milk, eggs\n" * 40)
    damaged = bytearray((DATA / "shapes_200px_30fps.mp4").read_bytes())
    damaged[len(damaged) // 2 : len(damaged) // 2 + 2000] = bytes(range(250)) * 8  # garbage mid-stream
    (folder / "damaged_middle.mp4").write_bytes(bytes(damaged))
    (folder / "shapes_200px_30fps.txt").write_bytes("\ufeffmoving shapes\n".encode("utf-8"))  # with a BOM
    (folder / "transparent.txt").write_bytes(b"caf\xe9 latte")  # Latin-1, not UTF-8
    return folder


def test_inspect_reports_every_bad_file_with_its_reason(messy_folder, tmp_path, capsys):
    cache = f"cache_dir={tmp_path / 'cache'}"
    assert main(["inspect", str(messy_folder), "--json", "--set", "video_config.target_fps=8", "--set", cache]) == 0
    report = json.loads(capsys.readouterr().out)
    files = {Path(f["path"]).name: f for f in report["files"]}
    assert files["zero.mp4"]["problems"][0] == "empty file (0 bytes)"
    assert files["notes.mp4"]["problems"][0].startswith("not a readable video")
    assert files["truncated.mp4"]["problems"][0].startswith("not a readable video")
    good = [name for name, f in files.items() if f["usable"]]
    assert sorted(good) == sorted(p.name for p in messy_folder.iterdir() if p.suffix in {".mp4", ".webm", ".gif"}
                                  and p.name not in {"zero.mp4", "notes.mp4", "truncated.mp4"})
    assert files["damaged_middle.mp4"]["usable"]  # the decoder conceals the damage; the file still plays
    shapes = files["shapes_200px_30fps.mp4"]
    assert shapes["caption"] == "moving shapes"  # the byte-order mark is not part of the caption
    assert shapes["clips"][0][:3] == [0.0, 0.125, 0.25] and shapes["metadata"]["fps"] == pytest.approx(30.0)
    assert "not UTF-8" in files["transparent.webm"]["problems"][0] and files["transparent.webm"]["usable"]
    summary = report["summary"]
    assert summary["skipped_by_reason"] == {"empty file": 1, "not a readable video": 2}
    assert summary["usable_files"] == len(good)
    assert summary["total_frames"] == sum(len(c) for f in files.values() for c in f["clips"])


def test_inspect_table_summarises(messy_folder, tmp_path, capsys):
    assert main(["inspect", str(messy_folder), "--files", "--set", f"cache_dir={tmp_path / 'cache'}"]) == 0
    out = capsys.readouterr().out
    assert "zero.mp4" in out and "empty file (0 bytes)" in out
    assert "skipped (not a readable video): 2" in out and "files usable" in out


def test_train_on_the_messy_folder_trains_on_the_good_files(messy_folder, tiny_models, tmp_path, capsys):
    config = base_config(tmp_path, tiny_models("wan-2.1"), messy_folder, epochs=1, video_config={"max_frames": 5, "target_fps": 8.0})
    assert main(["train", "--config", str(write_config(tmp_path / "c.json", **config))]) == 0
    err = capsys.readouterr().err
    for name in ("zero.mp4", "notes.mp4", "truncated.mp4"):
        assert err.count(f"skipped {messy_folder / name}") == 1  # reported once, with its path
    result = json.loads((tmp_path / "workspace" / "result.json").read_text())
    assert Path(result["lora"]).is_file() and result["steps"] >= 4


def test_a_dataset_with_nothing_usable_stops_before_any_model_loads(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "zero.mp4").write_bytes(b"")
    config = {"base_model_name": "/nonexistent/model", "concepts": [{"path": str(folder)}]}
    assert main(["train", "--config", str(write_config(tmp_path / "c.json", **config))]) == 4
    err = capsys.readouterr().err
    assert "none of the 1 dataset files can be used" in err and "loading" not in err


def crash_on_three(job: int) -> int:
    if job == 3:
        os._exit(1)  # what a segfaulting decoder looks like from outside
    return job * 10


def test_a_crashing_decoder_costs_one_file_not_the_run():
    results = dict(map_isolated(crash_on_three, range(6), workers=2))
    assert isinstance(results.pop(3), WorkerCrash)
    assert results == {0: 0, 1: 10, 2: 20, 4: 40, 5: 50}


def pid_unless_three(job: int) -> int:
    if job == 3:
        os._exit(1)
    return os.getpid()


def test_a_crash_among_many_files_isolates_a_few_jobs_not_all_the_rest():
    """After a crash only the jobs the broken pool may have held run one per process; the rest share a new
    pool (before, each of the remaining files got a process of its own: thousands for a large dataset)."""
    results = dict(map_isolated(pid_unless_three, range(40), workers=2))
    assert isinstance(results.pop(3), WorkerCrash)
    assert len(results) == 39
    # two pools of 2 workers, and at most the 4 jobs in flight (2 x workers) run alone
    assert len(set(results.values())) <= 2 + 2 + 4


def mark_started(job: tuple[Path, int]) -> int:
    folder, index = job
    (folder / str(index)).touch()
    return index


def test_workers_run_only_a_few_jobs_ahead_of_the_consumer(tmp_path):
    """Results wait in memory until the consumer takes them: with 2 workers, no more than 4 jobs are in flight,
    so a slow consumer (the VAE) never has thousands of decoded clips piling up."""
    results = map_isolated(mark_started, [(tmp_path, i) for i in range(40)], workers=2)
    assert next(results)[1] == 0
    deadline = time.monotonic() + 60
    while len(list(tmp_path.iterdir())) < 4 and time.monotonic() < deadline:  # jobs 1-3 are in flight and run
        time.sleep(0.05)
    time.sleep(1)  # room for the workers to run further ahead, if they could
    assert len(list(tmp_path.iterdir())) == 4  # job 0 and the 3 still in flight; nothing more
    assert [index for _, index in results] == list(range(1, 40))
