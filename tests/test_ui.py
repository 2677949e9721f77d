"""`motiontune ui`: the web app end to end in headless Chromium (Debian's, driven by Playwright), files served
only from inside the workspace and output folders, the watch API on a run started elsewhere, and the bind rules.

Screenshots of each page are written to tests/artifacts/ui/ (git-ignored)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import DATA

ARTIFACTS = Path(__file__).parent / "artifacts" / "ui"
CHROMIUM = Path("/usr/bin/chromium")


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium, installed with apt-get when it is missing and we are root."""
    if CHROMIUM.exists():
        return CHROMIUM
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get): "
                    "apt-get install -y chromium, then run again")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "chromium"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"apt-get install chromium failed (offline?): {result.stderr[-500:]}")
    assert CHROMIUM.exists(), "apt-get installed chromium but /usr/bin/chromium is missing"
    return CHROMIUM


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LiveServer:
    """The UI app under uvicorn, in a thread of the test process."""

    def __init__(self, workspace=None, cwd: Path | None = None):
        import uvicorn

        from motiontune.ui import create_app

        self.app = create_app(workspace)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the UI server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        run = self.app.state.run
        if run.owned_running():  # never leave a trainer behind
            run.process.kill()
            run.process.wait()
        self.server.should_exit = True
        self.thread.join(10)

    def raw_get(self, target: str) -> tuple[int, bytes]:
        """A request line sent exactly as written (no client-side `..` clean-up)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        connection.putrequest("GET", target, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        body = response.read()
        connection.close()
        return response.status, body


def tiny_training_config(tmp_path: Path, model: Path) -> dict:
    """The demo's tiny WAN setup, smaller: 64x48, 9-frame clips, a 5-frame sample every 2 steps, many epochs
    (the test stops the run)."""
    from motiontune.demo import demo_config

    config = demo_config(tmp_path)
    config.update(
        base_model_name=str(model), epochs=40, resolution="64x48", dataloader_threads=0,
        sample_after=2, sample_after_unit="STEP", backup_after=0, backup_after_unit="NEVER",
        workspace_dir=str(tmp_path / "workspace"), cache_dir=str(tmp_path / "cache"),
        output_model_destination=str(tmp_path / "out" / "tiny-lora.safetensors"),
    )
    config["video_config"]["max_frames"] = 9
    config["samples"][0].update(frames=5, height=48, width=64, steps=2)
    return config


# ---------------------------------------------------------------------------------------------- end to end

def test_ui_end_to_end_in_chromium(chromium, tiny_models, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps(tiny_training_config(tmp_path, tiny_models("wan-2.1")), indent=2))
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    for name in ("shapes_200px_30fps.mp4", "big_buck_bunny_432_433.webm"):
        shutil.copy(DATA / name, dataset / name)
    (dataset / "shapes_200px_30fps.txt").write_text("moving shapes\n")
    (dataset / "broken.mp4").write_bytes(b"this is not a video" * 10)

    with LiveServer() as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), headless=True,
                                             args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        console_errors = []
        page.on("pageerror", lambda error: console_errors.append(str(error)))
        try:
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']")

            # Config: a preset loads into the generated form, with help text from the schema
            page.select_option("#preset-select", "#wan 2.2 LoRA")
            page.click("#load-preset")
            expect(page.locator("#field-model_type")).to_have_value('"WAN_2_2_T2V_A14B"')
            expect(page.locator("#field-lora_rank")).to_have_value("32")
            expect(page.locator("#config-status")).to_have_text("config valid")
            rank_help = page.locator('.field[data-path="lora_rank"] .help')
            expect(rank_help).to_contain_text("default 16")
            expect(rank_help).to_contain_text("≥ 1, ≤ 1024")
            expect(page.locator('.field[data-path="video_config.clips_per_file"] .help')).to_contain_text("clip windows taken from each video")
            page.screenshot(path=str(ARTIFACTS / "1-config-preset.png"), full_page=True)

            # an invalid value: the error appears next to the field (top level and nested)
            page.fill("#field-lora_rank", "0")
            expect(page.locator('[data-error-for="lora_rank"]')).to_contain_text("greater than or equal to 1")
            expect(page.locator('.field[data-path="lora_rank"]')).to_have_class("field set invalid")
            page.locator('details[data-path="video_config"] > summary').click()
            page.fill("#field-video_config-frame_dropout_probability", "0.9")
            expect(page.locator('[data-error-for="video_config.frame_dropout_probability"]')).to_contain_text("less than or equal to 0.3")
            expect(page.locator("#config-status")).to_have_text("2 problem(s) in the config")
            page.locator('.field[data-path="lora_rank"]').scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "2-config-invalid.png"), full_page=True)
            page.fill("#field-lora_rank", "8")
            expect(page.locator('[data-error-for="lora_rank"]')).to_have_text("")

            # save the edited config and load another file
            saved = tmp_path / "saved" / "edited.json"
            page.fill("#save-path", str(saved))
            page.click("#save-file")
            expect(page.locator("#config-message")).to_contain_text("saved")
            written = json.loads(saved.read_text())
            assert written["lora_rank"] == 8 and written["video_config"]["frame_dropout_probability"] == 0.9
            assert written["model_type"] == "WAN_2_2_T2V_A14B"

            page.fill("#load-path", str(config_file))
            page.click("#load-file")
            expect(page.locator("#field-resolution")).to_have_value("64x48")
            expect(page.locator("#config-status")).to_have_text("config valid")

            # Dataset: the inspect report as a table, thumbnails of the planned clips, the problems
            page.click("#tab-dataset")
            page.fill("#dataset-folder", str(dataset))
            page.click("#inspect")
            expect(page.locator("#inspect-status")).to_have_text("2 of 3 files usable", timeout=60_000)
            rows = page.locator("#inspect-table tbody tr")
            expect(rows).to_have_count(3)
            thumbs = page.locator("#inspect-table img")
            assert thumbs.count() == 6  # two usable files, one clip each, first/middle/last frame
            assert page.evaluate("() => [...document.querySelectorAll('#inspect-table img')].every(i => i.complete && i.naturalWidth > 0)")
            expect(page.locator("#inspect-problems")).to_contain_text("broken.mp4")
            expect(page.locator("#inspect-problems")).to_contain_text("no caption file (big_buck_bunny_432_433.txt)")
            expect(page.locator("#inspect-table tr.skipped td.problems")).not_to_be_empty()
            page.screenshot(path=str(ARTIFACTS / "3-dataset.png"), full_page=True)

            # Training: start, progress with ETA and memory, the loss chart grows, a sample plays
            page.click("#tab-training")
            page.click("#start-training")
            expect(page.locator("#train-message")).to_contain_text("started", timeout=10_000)
            page.wait_for_function("() => +document.querySelector('#loss-chart').dataset.points >= 1", timeout=150_000)
            first_points = int(page.locator("#loss-chart").get_attribute("data-points"))
            page.wait_for_function(f"() => +document.querySelector('#loss-chart').dataset.points > {first_points}", timeout=60_000)
            page.wait_for_function("() => { const v = document.querySelector('#samples video'); return v && v.readyState >= 2 && v.videoWidth === 64; }",
                                   timeout=60_000)
            expect(page.locator("#run-state")).to_have_text("training")
            expect(page.locator("#run-step")).to_contain_text("/ 120")
            expect(page.locator("#run-memory")).to_contain_text("RAM")
            expect(page.locator("#run-lr")).to_have_text("1.00e-3")
            expect(page.locator("#run-eta")).not_to_have_text("-", timeout=10_000)
            assert page.evaluate("() => document.querySelector('#samples video').duration") > 0
            page.screenshot(path=str(ARTIFACTS / "4-training.png"), full_page=True)

            # Stop: the graceful path (SIGINT): a backup and the LoRA, listed on the page
            page.click("#stop-training")
            expect(page.locator("#train-message")).to_contain_text("stop requested")
            expect(page.locator("#backups li[data-name^='step-']")).to_have_count(1, timeout=60_000)
            expect(page.locator("#run-state")).to_contain_text("stopped", timeout=30_000)
            expect(page.locator("#run-result")).to_contain_text("Stopped early")
            page.screenshot(path=str(ARTIFACTS / "5-training-stopped.png"), full_page=True)
        finally:
            page.screenshot(path=str(ARTIFACTS / "last.png"), full_page=True)
            browser.close()
        process = server.app.state.run.process
        assert process.wait(30) == 0
    assert not console_errors, console_errors
    workspace = tmp_path / "workspace"
    result = json.loads((workspace / "result.json").read_text())
    assert result["interrupted"] is True and result["backup"]
    assert Path(result["backup"]).is_dir() and (tmp_path / "out" / "tiny-lora.safetensors").is_file()
    progress = json.loads((workspace / "progress.json").read_text())
    assert progress["state"] == "stopped" and 0 < progress["step"] < progress["total_steps"]


# ---------------------------------------------------------------------------------------------- files

@pytest.fixture
def served_workspace(tmp_path):
    """A workspace with a sample, an output folder elsewhere, and secrets beside and outside both."""
    workspace = tmp_path / "run" / "workspace"
    (workspace / "samples").mkdir(parents=True)
    (workspace / "samples" / "step2-0.mp4").write_bytes(b"sample bytes")
    out = tmp_path / "models"
    out.mkdir()
    (out / "lora.safetensors").write_bytes(b"lora bytes")
    (workspace / "config.json").write_text(json.dumps({"output_model_destination": str(out / "lora.safetensors")}))
    (tmp_path / "run" / "secret.txt").write_text("SECRET beside the workspace")
    (tmp_path / "secret.txt").write_text("SECRET outside")
    (workspace / "samples" / "escape.mp4").symlink_to(tmp_path / "secret.txt")
    return tmp_path, workspace, out


def test_files_are_served_only_inside_the_workspace_and_output_folders(served_workspace):
    tmp_path, workspace, out = served_workspace
    with LiveServer(workspace) as server:
        allowed = {
            "/files/samples/step2-0.mp4": b"sample bytes",
            f"/api/file?path={out / 'lora.safetensors'}": b"lora bytes",
            "/api/file?path=samples/step2-0.mp4": b"sample bytes",
        }
        for target, body in allowed.items():
            assert server.raw_get(target) == (200, body), target
        refused = [
            "/files/../secret.txt",
            "/files/../../secret.txt",
            "/files/samples/../../secret.txt",
            "/files/%2e%2e/secret.txt",
            "/files/..%2fsecret.txt",
            "/files/%2e%2e%2f%2e%2e%2fsecret.txt",
            "/files/..%2f..%2f..%2f..%2f..%2f..%2f..%2fetc/passwd",
            f"/files/{tmp_path / 'secret.txt'}",  # an absolute path joined to the workspace replaces it
            f"/files/%2f{str(tmp_path / 'secret.txt').lstrip('/')}",
            "/files/samples/escape.mp4",  # a symlink out of the workspace
            "/api/file?path=/etc/passwd",
            f"/api/file?path={tmp_path / 'secret.txt'}",
            "/api/file?path=../secret.txt",
            "/api/file?path=..%2f..%2fsecret.txt",
            f"/api/file?path={out}/../secret.txt",
            "/static/../server.py",
            "/static/%2e%2e/server.py",
            "/static/..%2fserver.py",
            "/../../etc/passwd",
        ]
        for target in refused:
            status, body = server.raw_get(target)
            assert status in (403, 404), (target, status)
            assert b"SECRET" not in body and b"root:" not in body and b"import" not in body, target
        # the page's own assets are served
        assert server.raw_get("/static/app.js")[0] == 200 and server.raw_get("/")[0] == 200


def test_requests_from_other_sites_or_hosts_are_refused(served_workspace):
    from fastapi.testclient import TestClient

    from motiontune.ui import create_app

    _, workspace, _ = served_workspace
    client = TestClient(create_app(workspace), base_url="http://127.0.0.1:8765")
    assert client.get("/api/run").status_code == 200
    assert client.get("/api/run", headers={"host": "attacker.example:8765"}).status_code == 403  # DNS rebinding
    refused = client.post("/api/train/stop", json={}, headers={"origin": "http://attacker.example"})
    assert refused.status_code == 403
    # a plain HTML form can post text/plain cross-site without a preflight: only JSON is taken
    assert client.post("/api/train/start", content=b'{"config": {}}', headers={"content-type": "text/plain"}).status_code == 415


# ---------------------------------------------------------------------------------------------- watching a CLI run

def test_a_run_started_elsewhere_is_watched_from_its_workspace(tmp_path):
    from fastapi.testclient import TestClient
    from torch.utils.tensorboard import SummaryWriter

    from motiontune.train.progress import ProgressFile
    from motiontune.ui import create_app

    workspace = tmp_path / "cli-run"
    writer = SummaryWriter(str(workspace / "tensorboard"))
    for step in range(1, 6):
        writer.add_scalar("loss", 1.0 / step, step)
        writer.add_scalar("lr/high_noise", 1e-4, step)
    writer.close()
    progress = ProgressFile(workspace, total_steps=10, start_step=0)  # written as loop.py writes it, by this live process
    progress.update(1, 1, 1.0)
    time.sleep(0.05)
    progress.update(5, 1, 0.2)
    (workspace / "samples").mkdir()
    (workspace / "samples" / "step4-0.mp4").write_bytes(b"video")
    backup = workspace / "backup" / "step-0000004-epoch-0000-batch-00004"
    backup.mkdir(parents=True)
    (backup / "state.pt").write_bytes(b"")
    (backup / "backup.json").write_text(json.dumps({"step": 4, "written": "2026-01-01 00:00:00"}))
    (workspace / "backup" / ".partial-step-0000005").mkdir()  # an unfinished backup is not listed

    client = TestClient(create_app(), base_url="http://127.0.0.1:8765")
    assert client.get("/api/run").json() == {"workspace": None}
    assert client.get("/files/samples/step4-0.mp4").status_code == 404  # nothing watched, nothing served
    assert client.post("/api/watch", json={"workspace": str(workspace)}).status_code == 200
    run = client.get("/api/run").json()
    assert run["running"] is True and run["owned"] is False
    assert run["progress"]["step"] == 5 and run["progress"]["total_steps"] == 10
    assert run["progress"]["eta_seconds"] is not None and run["progress"]["eta_seconds"] >= 0
    assert run["progress"]["memory"]["rss_mb"] > 0
    assert [p[0] for p in run["scalars"]["loss"]] == [1, 2, 3, 4, 5]
    assert run["scalars"]["loss"][-1][1] == pytest.approx(0.2)
    assert run["scalars"]["lr/high_noise"][0][1] == pytest.approx(1e-4)
    assert [s["name"] for s in run["samples"]] == ["step4-0.mp4"]
    assert client.get(run["samples"][0]["url"]).content == b"video"
    assert [b["name"] for b in run["backups"]] == [backup.name]
    progress.finish("done")
    assert client.get("/api/run").json()["running"] is False
    assert client.post("/api/train/stop", json={}).status_code == 409  # nothing training there


def test_stop_sends_ctrl_c_to_a_run_started_from_the_command_line(tmp_path):
    """Stop on a watched CLI run: SIGINT to the trainer's pid from progress.json (a motiontune process only)."""
    import subprocess
    import sys

    from fastapi.testclient import TestClient

    from motiontune.ui import create_app

    workspace = tmp_path / "cli-run"
    workspace.mkdir()
    marker = tmp_path / "got-sigint"
    # stands in for `motiontune train` (the word is in its command line); exits 0 on SIGINT like the trainer
    script = (f"import time, pathlib  # motiontune\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
              f"    pathlib.Path({str(marker)!r}).write_text('stopped')\n")
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        time.sleep(0.5)  # its SIGINT handler (KeyboardInterrupt) is in place once the interpreter runs
        (workspace / "progress.json").write_text(json.dumps({"state": "training", "pid": process.pid, "step": 1, "total_steps": 9}))
        client = TestClient(create_app(workspace), base_url="http://127.0.0.1:8765")
        assert client.get("/api/run").json()["running"] is True
        assert client.post("/api/train/stop", json={}).json() == {"signalled": process.pid}
        assert process.wait(20) == 0 and marker.read_text() == "stopped"
        # a process that is not motiontune's is never signalled, whatever progress.json says
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        (workspace / "progress.json").write_text(json.dumps({"state": "training", "pid": other.pid}))
        assert client.post("/api/train/stop", json={}).status_code == 409
        assert other.poll() is None
        other.kill()
        other.wait()
    finally:
        if process.poll() is None:
            process.kill()


# ---------------------------------------------------------------------------------------------- validation and schema

def test_validation_errors_point_at_the_field():
    from motiontune.ui.server import validate

    base = {"concepts": [{"path": "clips"}]}
    _, errors = validate({**base, "lora_rank": 0, "clip_grad_norm": -1, "video_config": {"max_frames": "many"}, "bogus": 1})
    by_loc = {e["loc"]: e["msg"] for e in errors}
    assert set(by_loc) == {"lora_rank", "clip_grad_norm", "video_config.max_frames", "bogus"}
    assert "greater than or equal to 1" in by_loc["lora_rank"] and by_loc["bogus"] == "unknown key"
    _, errors = validate({"concepts": [{"name": "x"}]})
    assert errors == [{"loc": "concepts.0.path", "msg": "this key is required"}]
    _, errors = validate({**base, "train_dtype": "FLOAT_8", "vae": {"train": True}})
    assert {e["loc"] for e in errors} == {"train_dtype", "vae.train"}
    _, errors = validate({})
    assert errors[0]["loc"] == "" and "concepts" in errors[0]["msg"]
    assert validate(base) [1] == []


def test_the_schema_carries_defaults_ranges_and_help_from_the_code():
    from motiontune.ui.schema_help import ui_schema

    schema = ui_schema()
    rank = schema["properties"]["lora_rank"]
    assert (rank["default"], rank["minimum"], rank["maximum"]) == (16, 1, 1024)
    assert "module names" in schema["properties"]["layer_filter"]["description"]  # from the comment in schema.py
    video = schema["$defs"]["VideoConfig"]["properties"]
    assert "0 draws anew every epoch" in video["window_variants"]["description"]
    part = schema["$defs"]["ModelPartConfig"]["properties"]["train"]
    assert "vae" in part["x-not-supported"] and "transformer" not in part["x-not-supported"]


# ---------------------------------------------------------------------------------------------- binding

def test_binds_loopback_by_default_and_warns_for_another_address(monkeypatch, capsys):
    import uvicorn

    from motiontune.cli import main
    from motiontune.ui.server import check_bind, is_loopback

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    assert main(["ui", "--port", "9123"]) == 0
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 9123
    assert "WARNING" not in capsys.readouterr().err
    assert main(["ui", "--host", "0.0.0.0"]) == 0
    assert calls[-1]["host"] == "0.0.0.0"
    assert "WARNING" in capsys.readouterr().err
    assert main(["ui", "--host", "::1"]) == 0 and "WARNING" not in capsys.readouterr().err
    assert is_loopback("localhost") and is_loopback("127.0.0.2") and not is_loopback("192.168.1.5")
    with pytest.raises(ValueError, match="--host"):
        check_bind("0.0.0.0", explicit=False)  # another caller cannot bind a public address by accident
    assert check_bind("127.0.0.1", explicit=False) is True and check_bind("0.0.0.0", explicit=True) is False
