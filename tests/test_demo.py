"""`make demo`'s job: the tiny built-in model trained on the bundled clips, ending with the paths it wrote."""

from __future__ import annotations


from motiontune.cli import main


def test_demo_trains_and_reports_the_lora_the_sample_and_the_logs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--set", "epochs=2", "--set", "resolution=64x48", "--set", "video_config.max_frames=9"]) == 0
    report = capsys.readouterr().out
    lora, sample = out / "demo-lora.safetensors", out / "workspace" / "samples" / "final-0.mp4"
    assert lora.is_file() and sample.is_file() and any((out / "workspace" / "tensorboard").iterdir())
    for path in (lora, sample, out / "workspace" / "tensorboard"):
        assert str(path) in report
    assert "Done." in report
