"""Runs as the UI keeps them: each Start makes a run folder `workspace_dir/runs/<id>/` holding everything of that
run (the config it was started with, its log, TensorBoard files, samples, backups, saves and the trained model),
so a second run never mixes with the first, and any run can be resumed, stopped, asked for a sample, a backup
or a save (train/requests.py), and compared with another. A run started from the command line in a workspace is
watched as it is (the workspace is then the run's folder)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

from fastapi import HTTPException

from ..train import requests as train_requests
from ..train.progress import FILE_NAME as PROGRESS_FILE
from ..util.processes import process_alive

RUNS = "runs"  # inside a workspace_dir: one folder per run the UI started
RUN_CONFIG = "run-config.json"  # the config a UI run trains with, as started (paths pointing into the run)
RUN_LOG = "train.log"  # its output
OUTPUT = "output"  # the trained model, inside the run
LEGACY_CONFIG, LEGACY_LOG = "ui-config.json", "ui-train.log"  # what earlier versions wrote in the workspace
SAMPLE_NAME = re.compile(r"^(?:(?P<unit>step|epoch)(?P<count>\d+)|final)(?P<now>-now)?-(?P<index>\d+)\.mp4$")

log = logging.getLogger("motiontune")


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_motiontune(pid: int) -> bool:
    try:
        return b"motiontune" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def resident_mb(pid: int | None) -> float | None:
    """A process's resident memory now (Linux), read between the trainer's own reports."""
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def too_wide(folder: Path) -> bool:
    return folder == Path(folder.anchor) or folder == Path.home().resolve()


def run_config(folder: Path) -> dict:
    config = read_json(folder / RUN_CONFIG) or read_json(folder / "config.json") or read_json(folder / LEGACY_CONFIG)
    return config if isinstance(config, dict) else {}


def backups(folder: Path) -> list[dict]:
    found = []
    if (folder / "backup").is_dir():
        for backup in sorted((folder / "backup").iterdir()):
            if backup.is_dir() and backup.name.startswith("step-") and (backup / "state.pt").is_file():
                found.append({"name": backup.name, "path": str(backup), "info": read_json(backup / "backup.json")})
    return found


def samples(folder: Path, config: dict, result: dict | None) -> list[dict]:
    """The run's sample videos, oldest first, each with the step (or epoch) it shows, its prompt and the prompt's
    place in the config's `samples` (the page lines a prompt's samples up across steps and across runs)."""
    directory = folder / "samples"
    if not directory.is_dir():
        return []
    prompts = [s.get("prompt", "") if isinstance(s, dict) else "" for s in config.get("samples") or []]
    found = []
    for path in sorted(directory.glob("*.mp4"), key=lambda p: p.stat().st_mtime):
        match = SAMPLE_NAME.match(path.name)
        entry = {"name": path.name, "path": str(path), "url": f"/api/file?path={quote(str(path))}",
                 "modified": path.stat().st_mtime, "step": None, "epoch": None, "prompt": "", "asked": False,
                 "index": None}
        if match:
            index = entry["index"] = int(match["index"])
            entry["prompt"] = prompts[index] if index < len(prompts) else ""
            entry["asked"] = bool(match["now"])
            if match["unit"] == "step":
                entry["step"] = int(match["count"])
            elif match["unit"] == "epoch":
                entry["epoch"] = int(match["count"])
            elif result:
                entry["step"] = result.get("steps")
        found.append(entry)
    return found


def log_tail(folder: Path) -> str:
    for name in (RUN_LOG, LEGACY_LOG):
        if (folder / name).is_file():
            with open(folder / name, "rb") as handle:
                handle.seek(max(0, handle.seek(0, 2) - 6000))
                text = handle.read().decode(errors="replace").replace("\r", "\n")
            return "\n".join(line for line in text.splitlines() if line.strip())[-4000:]
    return ""


class Runs:
    """The runs this UI started (their processes) and the folders it serves files from."""

    def __init__(self, home: Path):
        self.lock = threading.Lock()
        self.home = home  # where the working config is kept between page loads
        self.processes: dict[Path, subprocess.Popen] = {}
        self.current: Path | None = None  # the run shown on the Training page (/api/run without a path)
        self.stopped: set[Path] = set()  # runs this UI was asked to stop
        self.served: set[Path] = set()  # workspaces and output folders files may be served from
        self._scalars: dict[str, object] = {}
        self.closing = False  # set by kill_all: nothing new starts (the job queue asks)

    # ------------------------------------------------------------------------------------------ folders

    def serve(self, folder: Path) -> Path:
        folder = Path(folder).expanduser().resolve()
        if too_wide(folder):
            raise HTTPException(400, f"{folder} is too wide to serve files from; pick the run's workspace_dir")
        self.served.add(folder)
        destination = run_config(folder).get("output_model_destination")
        if isinstance(destination, str) and destination:
            output = Path(destination).expanduser().resolve().parent
            if not too_wide(output):
                self.served.add(output)
        return folder

    def watch(self, folder: Path) -> Path:
        """Show a workspace: its newest UI run, or the workspace itself when a run was started there directly."""
        folder = self.serve(folder)
        listed = self.list(folder)
        self.current = Path(listed[0]["path"]) if listed and not (folder / PROGRESS_FILE).is_file() else folder
        self.serve(self.current)
        return self.current

    def list(self, workspace: Path) -> list[dict]:
        """The runs of a workspace, newest first (a run started there from the command line too)."""
        workspace = Path(workspace).expanduser().resolve()
        folders = [f for f in (workspace / RUNS).iterdir() if f.is_dir()] if (workspace / RUNS).is_dir() else []
        if (workspace / PROGRESS_FILE).is_file():
            folders.append(workspace)
        entries = [self.summary(folder) for folder in folders]
        return sorted(entries, key=lambda e: e["started"] or 0, reverse=True)

    # ------------------------------------------------------------------------------------------ one run

    def running(self, folder: Path) -> tuple[bool, int | None]:
        process = self.processes.get(folder)
        if process is not None and process.poll() is None:
            return True, process.pid
        progress = read_json(folder / PROGRESS_FILE)
        if progress and progress.get("state") == "training" and process_alive(progress.get("pid")):
            return True, progress.get("pid")
        return False, None

    def summary(self, folder: Path) -> dict:
        progress = read_json(folder / PROGRESS_FILE) or {}
        result = read_json(folder / "result.json")
        config = run_config(folder)
        running, pid = self.running(folder)
        process = self.processes.get(folder)
        exit_code = process.poll() if process is not None else None
        if running:
            state = "training" if progress.get("state") == "training" else "starting"
        elif progress.get("state") in ("done", "stopped"):
            state = progress["state"]
        elif folder in self.stopped and progress.get("state") != "training":
            state = "stopped"  # before its first step: nothing was trained, so nothing was backed up
        elif exit_code not in (None, 0):
            state = "failed"
        elif progress.get("state") == "training":
            state = "ended without finishing"
        elif result:
            state = "done"
        else:
            state = "not started"
        saved = backups(folder)
        return {
            "id": folder.name if folder.parent.name == RUNS else ".",
            "path": str(folder),
            "state": state,
            "running": running,
            "pid": pid,
            "exit_code": exit_code,
            "step": progress.get("step"),
            "total_steps": progress.get("total_steps"),
            "epoch": progress.get("epoch"),
            "epochs": config.get("epochs", 10),
            # when the UI made the run (a resumed run's progress.json starts again), else when its trainer started
            "started": (folder / RUN_CONFIG).stat().st_mtime if (folder / RUN_CONFIG).is_file() else progress.get("started"),
            "model_type": config.get("model_type"),
            "resumable": not running and state != "done" and bool(saved),
            "backups": len(saved),
        }

    def status(self, folder: Path | None = None) -> dict:
        """Everything the Training page shows of a run."""
        if folder is not None and not any(folder.resolve().is_relative_to(root) for root in self.served):
            # a GET changes nothing: a folder is served once it was started, listed or watched (POST, same origin)
            raise HTTPException(403, f"{folder} is not a run of a listed or watched workspace")
        folder = folder or self.current
        if folder is None:
            return {"workspace": None}
        folder = self.serve(folder)
        config = run_config(folder)
        result = read_json(folder / "result.json")
        progress = read_json(folder / PROGRESS_FILE)
        summary = self.summary(folder)
        outputs = []
        if result and not summary["running"]:
            outputs = [p for p in result.get("loras") or [result.get("lora")] if p]
        return {
            **summary,
            "workspace": str(folder),
            "owned": folder in self.processes,
            "progress": progress,
            "live_rss_mb": resident_mb(summary["pid"]) if summary["running"] else None,
            "scalars": self.scalars(folder),
            "samples": samples(folder, config, result),
            "backups": backups(folder),
            # a save being written is a hidden temporary until its rename: not listed (nor downloaded half-written)
            "saves": sorted(str(p) for p in (folder / "save").iterdir() if not p.name.startswith("."))
                     if (folder / "save").is_dir() else [],
            "outputs": outputs,
            "result": result,
            "requests": train_requests.answers(folder),
            "log": log_tail(folder),
            "log_file": next((str(folder / n) for n in (RUN_LOG, LEGACY_LOG) if (folder / n).is_file()), None),
            "tensorboard_dir": str(folder / "tensorboard") if (folder / "tensorboard").is_dir() else None,
        }

    def scalars(self, folder: Path) -> dict[str, list]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        directory = folder / "tensorboard"
        if not directory.is_dir():
            return {}
        key = str(directory)
        if key not in self._scalars:
            if len(self._scalars) >= 8:
                self._scalars.pop(next(iter(self._scalars)))
            self._scalars[key] = EventAccumulator(key, size_guidance={"scalars": 0})
        accumulator = self._scalars[key]
        try:
            accumulator.Reload()
        except Exception as error:  # a file mid-write: the next poll reads it
            log.debug("tensorboard reload: %s", error)
        tags = accumulator.Tags().get("scalars", [])
        series = {}
        for tag in tags:
            by_step = {}  # a resumed run logs again from its backup's step: the newest value of a step wins
            for event in accumulator.Scalars(tag):
                by_step[event.step] = event.value
            series[tag] = sorted([step, value] for step, value in by_step.items())
        return series

    # ------------------------------------------------------------------------------------------ actions

    def _check_free(self) -> None:
        for folder, process in self.processes.items():
            if process.poll() is None:
                raise HTTPException(409, f"run {folder.name} is still training; stop it first (one run at a time)")

    def _spawn(self, folder: Path, resume: bool) -> subprocess.Popen:
        command = [sys.executable, "-m", "motiontune", "train", "--config", str(folder / RUN_CONFIG)]
        if resume:
            command.append("--resume")
        with open(folder / RUN_LOG, "ab") as output:
            process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # Ctrl-C on the UI server leaves the run going; it can be watched again
            )
        self.processes[folder] = process
        self.stopped.discard(folder)
        self.current = folder
        self.serve(folder)
        return process

    def start(self, data: dict, workspace_dir: str) -> dict:
        """A new run folder with the config as started (its workspace and output inside the folder), trained by
        `motiontune train` in its own process."""
        with self.lock:
            self._check_free()
            workspace = Path(workspace_dir).expanduser().resolve()
            if too_wide(workspace):
                raise HTTPException(400, f"workspace_dir {workspace} is too wide; give the runs a folder of their own")
            stamp = time.strftime("%Y%m%d-%H%M%S")
            folder, number = workspace / RUNS / stamp, 1
            while folder.exists():
                number += 1
                folder = workspace / RUNS / f"{stamp}-{number}"
            folder.mkdir(parents=True)
            snapshot = dict(data)
            snapshot["workspace_dir"] = str(folder)
            name = Path(str(data.get("output_model_destination") or "models/lora.safetensors")).name
            snapshot["output_model_destination"] = str(folder / OUTPUT / name)
            snapshot.pop("continue_last_backup", None)  # a run resumes from its own Resume button
            (folder / RUN_CONFIG).write_text(json.dumps(snapshot, indent=2) + "\n")
            self.serve(workspace)
            process = self._spawn(folder, resume=False)
            return {"pid": process.pid, "run": folder.name, "path": str(folder), "config": str(folder / RUN_CONFIG)}

    def resume(self, folder: Path) -> dict:
        """The run continues from its newest backup, exactly (same data order and noise): its step count and
        chart go on where they were."""
        with self.lock:
            folder = self.serve(folder)
            self._check_free()
            if self.running(folder)[0]:
                raise HTTPException(409, "this run is training")
            if not backups(folder):
                raise HTTPException(409, "this run has no backup to continue from")
            if not (folder / RUN_CONFIG).is_file():
                raise HTTPException(409, f"{folder} was not started here: resume it with motiontune train --resume")
            process = self._spawn(folder, resume=True)
            return {"pid": process.pid, "run": folder.name, "path": str(folder)}

    def stop(self, folder: Path | None) -> dict:
        """SIGINT, as Ctrl-C: the trainer finishes its step, writes a backup and the model, and exits."""
        with self.lock:
            folder = Path(folder).expanduser().resolve() if folder else self.current
            if folder is None:
                raise HTTPException(409, "no run is watched")
            process = self.processes.get(folder)
            if process is not None and process.poll() is None:
                self.stopped.add(folder)
                process.send_signal(signal.SIGINT)
                return {"signalled": process.pid}
            progress = read_json(folder / PROGRESS_FILE)
            pid = progress.get("pid") if progress and progress.get("state") == "training" else None
            if pid and process_alive(pid) and is_motiontune(pid):  # a run started from the command line
                os.kill(pid, signal.SIGINT)
                return {"signalled": pid}
            raise HTTPException(409, "no run is training in the watched workspace")

    def ask(self, folder: Path, action: str) -> dict:
        folder = self.serve(folder)
        if not self.running(folder)[0]:
            raise HTTPException(409, f"{action} now: the run is not training")
        if action not in train_requests.ACTIONS:
            raise HTTPException(400, f"unknown action {action!r}")
        train_requests.ask(folder, action)
        return {"asked": action, "path": str(folder)}

    def kill_all(self) -> None:
        self.closing = True
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
