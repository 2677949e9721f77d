"""Nothing lost: exact resume after kill -9, Ctrl-C, non-finite steps, a full disk during a backup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import forked_command
from conftest import base_config, write_config
from motiontune.cli import main


def run_config(tmp_path: Path, name: str, model: Path, dataset: Path, **keys) -> Path:
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    keys = {"epochs": 8, "backup_after": 2, "backup_after_unit": "STEP", **keys}
    config = base_config(
        folder, model, dataset, cache_dir=str(tmp_path / "cache"), video_config={"max_frames": 5, "target_fps": 8.0}, **keys
    )
    return write_config(folder / "config.json", **config)


def command(config: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(config), *extra]


def losses(workspace: Path, tag: str = "loss") -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workspace / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def lora(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "lora.safetensors"))


def wait_for_backups(workspace: Path, count: int, process, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.exitcode is None:
        if len(list((workspace / "backup").glob("step-*"))) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {count} backups appeared (process exit: {process.exitcode})")


@pytest.fixture
def uninterrupted(tmp_path, tiny_models, dataset):
    config = run_config(tmp_path, "straight", tiny_models("wan-2.1"), dataset)
    assert main(command(config)) == 0
    return tmp_path / "straight"


def test_resume_after_kill_9_is_bitwise_identical(tmp_path, tiny_models, dataset, uninterrupted, capsys):
    config = run_config(tmp_path, "killed", tiny_models("wan-2.1"), dataset)
    workspace = tmp_path / "killed" / "workspace"
    process = forked_command.start(command(config), tmp_path / "killed.log")  # a process of its own, to SIGKILL
    wait_for_backups(workspace, 2, process)
    time.sleep(0.05)  # somewhere after the second backup, mid-step or mid-backup
    process.kill()
    process.join()
    assert not (tmp_path / "killed" / "lora.safetensors").exists()  # it really died before the end

    capsys.readouterr()
    assert main(command(config, "--resume")) == 0
    assert "continuing from" in capsys.readouterr().err
    expected, got = losses(uninterrupted / "workspace"), losses(workspace)
    assert len(expected) == 16 and got == expected  # every step's loss, the resumed ones included
    reference, final = lora(uninterrupted), lora(tmp_path / "killed")
    assert reference.keys() == final.keys() and all(torch.equal(reference[k], final[k]) for k in reference)


def test_ctrl_c_finishes_the_step_backs_up_saves_and_exits_0(tmp_path, tiny_models, dataset, uninterrupted):
    config = run_config(tmp_path, "interrupted", tiny_models("wan-2.1"), dataset)
    workspace = tmp_path / "interrupted" / "workspace"
    log = tmp_path / "interrupted.log"
    process = forked_command.start(command(config), log)
    wait_for_backups(workspace, 1, process)
    os.kill(process.pid, signal.SIGINT)
    process.join(timeout=120)
    output = log.read_text()
    assert process.exitcode == 0, output
    assert "SIGINT received" in output and "continue with --resume" in output
    result = json.loads((workspace / "result.json").read_text())
    assert result["interrupted"] and result["steps"] < 16 and Path(result["backup"]).is_dir()
    assert (tmp_path / "interrupted" / "lora.safetensors").is_file()

    assert main(command(config, "--resume")) == 0
    reference, final = lora(uninterrupted), lora(tmp_path / "interrupted")
    assert all(torch.equal(reference[k], final[k]) for k in reference)


def test_resume_refuses_a_changed_learning_rate_but_not_new_samples(tmp_path, tiny_models, dataset, capsys):
    config = run_config(tmp_path, "run", tiny_models("wan-2.1"), dataset, epochs=2)
    assert main(["train", "--config", str(config)]) == 0
    assert main(["train", "--config", str(config), "--resume", "--set", "learning_rate=0.5"]) == 2
    assert "learning_rate: 0.001 → 0.5" in capsys.readouterr().err
    samples = '[{"prompt": "a rabbit", "frames": 5, "height": 32, "width": 32, "steps": 2, "cfg_scale": 1.0}]'
    assert main(["train", "--config", str(config), "--resume", "--set", f"samples={samples}"]) == 0


def poison_predictions(monkeypatch, bad_calls):
    """Fault injection: the real prediction, made NaN on the given calls (counted from 1)."""
    from motiontune.models.wan import WanFamily

    original, calls = WanFamily.predict, {"n": 0}

    def predict(self, *args):
        calls["n"] += 1
        prediction = original(self, *args)
        return prediction * float("nan") if bad_calls(calls["n"]) else prediction

    monkeypatch.setattr(WanFamily, "predict", predict)


def test_a_nan_step_is_skipped_and_counted(tmp_path, tiny_models, dataset, monkeypatch, capsys):
    poison_predictions(monkeypatch, lambda n: n == 3)
    config = run_config(tmp_path, "nan", tiny_models("wan-2.1"), dataset, epochs=3)
    assert main(["train", "--config", str(config)]) == 0
    result = json.loads((tmp_path / "nan" / "workspace" / "result.json").read_text())
    assert result["skipped_steps"] == 1 and result["steps"] == 5  # 6 batches, one skipped
    assert "step skipped: the loss or a gradient is not finite" in capsys.readouterr().err
    assert all(torch.isfinite(t).all() for t in lora(tmp_path / "nan").values())


def test_nan_steps_in_a_row_stop_the_run_with_a_good_backup(tmp_path, tiny_models, dataset, monkeypatch, capsys):
    poison_predictions(monkeypatch, lambda n: n >= 4)
    config = run_config(tmp_path, "diverged", tiny_models("wan-2.1"), dataset, max_nonfinite_steps=3, backup_after_unit="NEVER")
    assert main(["train", "--config", str(config)]) == 5
    err = capsys.readouterr().err
    assert "3 steps in a row had a NaN" in err and "Lower learning_rate" in err
    [backup] = list((tmp_path / "diverged" / "workspace" / "backup").glob("step-*"))
    assert backup.name.startswith("step-0000003")  # the three good steps
    assert all(torch.isfinite(t).all() for t in load_file(str(backup / "adapters-transformer.safetensors")).values())


def test_a_full_disk_during_a_backup_keeps_the_previous_one(tmp_path, tiny_models, dataset, capsys):
    backups = tmp_path / "full" / "workspace" / "backup"
    backups.mkdir(parents=True)
    # a filesystem with room for one backup (about 300 KB here) but not two
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=450k", "tmpfs", str(backups)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        config = run_config(tmp_path, "full", tiny_models("wan-2.1"), dataset, epochs=3)
        assert main(["train", "--config", str(config)]) == 0  # the run itself goes on
        err = capsys.readouterr().err
        assert "backup failed (No space left on device" in err and "the previous backup is kept" in err
        [kept] = sorted(backups.glob("step-*"))
        assert kept.name.startswith("step-0000002") and not list(backups.glob(".partial-*"))
        assert main(["train", "--config", str(config), "--resume", str(kept), "--set", "backup_after_unit=NEVER"]) == 0
        assert "continuing from" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(backups)], check=False)


def killed_while_writing(destination: Path, prefix: str) -> Path:
    """Start writing `destination` the way backups and saves do, in a process killed (SIGKILL) halfway: what it
    leaves beside `destination`."""
    script = (f"import os, signal; from pathlib import Path; from motiontune.util.files import replacing\n"
              f"with replacing(Path({str(destination)!r}), prefix={prefix!r}) as written:\n"
              f"    written.mkdir(); (written / 'half.bin').write_bytes(bytes(1 << 20)); os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL
    [left] = destination.parent.glob(prefix + "*")
    return left


def test_what_a_killed_backup_or_save_left_is_removed_by_the_next_one(tmp_path, tiny_models, dataset):
    from motiontune.util.processes import HOST

    config = run_config(tmp_path, "left", tiny_models("wan-2.1"), dataset, epochs=2)
    backups, output = tmp_path / "left" / "workspace" / "backup", tmp_path / "left" / "lora.safetensors"
    dead_backup = killed_while_writing(backups / "step-0000004-epoch-0001-batch-00000", ".partial-")
    dead_save = killed_while_writing(output, ".saving-")
    elsewhere = backups / ".partial-another_machine-1-abcd1234"  # a shared folder: its process cannot be seen here
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a writer that still runs
    running = backups / f".partial-{HOST}-{writer.pid}-abcd1234"
    # a run before this one with this one's pid (a restarted container's pid 1): not this run's, which writes one
    # file at a time (this test trains in its own process)
    same_pid = backups / f".partial-{HOST}-{os.getpid()}-abcd1234"
    for folder in (elsewhere, running, same_pid):
        folder.mkdir()
    try:
        assert main(["train", "--config", str(config)]) == 0
        assert elsewhere.is_dir() and running.is_dir()
    finally:
        writer.kill()
    assert not dead_backup.exists() and not dead_save.exists()  # 1 MB each, gone with the first backup and the save
    assert not same_pid.exists()
    assert list(backups.glob("step-*")) and output.is_file()


def test_a_failed_final_save_says_so_and_keeps_the_old_file(tmp_path, tiny_models, dataset, capsys):
    config_path = run_config(tmp_path, "ro", tiny_models("wan-2.1"), dataset, epochs=1, backup_after_unit="NEVER")
    assert main(["train", "--config", str(config_path)]) == 0
    before = (tmp_path / "ro" / "lora.safetensors").read_bytes()
    config = json.loads(config_path.read_text())
    config["output_model_destination"] = str(tmp_path / "ro" / "lora.safetensors" / "inside-a-file.safetensors")
    write_config(config_path, **config)
    assert main(["train", "--config", str(config_path)]) == 6
    assert "could not save the LoRA to" in capsys.readouterr().err
    assert (tmp_path / "ro" / "lora.safetensors").read_bytes() == before


def test_rolling_backups_keep_the_newest(tmp_path, tiny_models, dataset):
    config = run_config(tmp_path, "rolling", tiny_models("wan-2.1"), dataset, epochs=4, backup_after=1,
                        rolling_backup=True, rolling_backup_count=2)
    assert main(["train", "--config", str(config)]) == 0
    kept = sorted(p.name for p in (tmp_path / "rolling" / "workspace" / "backup").glob("step-*"))
    assert [name[:12] for name in kept] == ["step-0000007", "step-0000008"]
