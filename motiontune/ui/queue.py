"""Jobs waiting to train: each one a config (checked when it is added) and the workspace its run goes in. A thread
starts the next job whenever nothing this UI started is training, so the jobs run one after another while no page
is open. The queue is kept in the UI's home folder (queue.json), so a restarted UI goes on with it.

A job is `queued`, then `started` (its run's own state tells how the run went: a failed run does not stop the
next job), or `cancelled` before it started."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

from fastapi import HTTPException

from ..util.files import write_then_rename
from .runs import Runs

FILE_NAME = "queue.json"


class JobQueue:
    def __init__(self, runs: Runs, home: Path, poll_seconds: float = 1.0):
        self.runs, self.file, self.poll_seconds = runs, Path(home) / FILE_NAME, poll_seconds
        self.lock = threading.Lock()
        self.jobs: list[dict] = self._read()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="motiontune-queue", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ asked by the page

    def add(self, config: dict, workspace_dir: str, name: str) -> dict:
        job = {"id": uuid.uuid4().hex[:8], "name": name or "job", "config": config, "workspace_dir": workspace_dir,
               "state": "queued", "added": time.time(), "started": None, "run": None, "error": None}
        with self.lock:
            self.jobs.append(job)
            self._write()
        self.tick()  # nothing training: it starts now
        return self._shown(job)

    def cancel(self, job_id: str) -> dict:
        with self.lock:
            job = self._job(job_id)
            if job["state"] != "queued":
                raise HTTPException(409, f"job {job['name']} has {job['state']}: only a queued job can be cancelled")
            job["state"] = "cancelled"
            self._write()
            return self._shown(job)

    def move(self, job_id: str, offset: int) -> dict:
        """Up (-1) or down (+1) among the jobs still queued."""
        with self.lock:
            job = self._job(job_id)
            waiting = [j for j in self.jobs if j["state"] == "queued"]
            if job not in waiting:
                raise HTTPException(409, f"job {job['name']} is not waiting")
            place = min(max(waiting.index(job) + offset, 0), len(waiting) - 1)
            other = waiting[place]
            first, second = self.jobs.index(job), self.jobs.index(other)
            self.jobs[first], self.jobs[second] = other, job
            self._write()
            return self._shown(job)

    def listing(self) -> list[dict]:
        with self.lock:
            return [self._shown(job) for job in self.jobs]

    # ------------------------------------------------------------------------------------------ the thread

    def tick(self) -> None:
        """Start the first queued job if nothing this UI started is training."""
        with self.lock:
            if self._closing.is_set() or self.runs.closing or any(p.poll() is None for p in self.runs.processes.values()):
                return
            job = next((j for j in self.jobs if j["state"] == "queued"), None)
            if job is None:
                return
            job["state"], job["started"] = "started", time.time()
            try:
                job["run"] = self.runs.start(job["config"], job["workspace_dir"])["path"]
            except HTTPException as error:
                if error.status_code == 409:  # a run started by hand meanwhile: the job waits its turn again
                    job["state"], job["started"] = "queued", None
                    return
                job["error"] = str(error.detail)  # e.g. its workspace is too wide: said on the job, the next goes on
            except OSError as error:
                job["error"] = str(error)
            self._write()

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._closing.wait(self.poll_seconds):
            try:
                self.tick()
            except Exception as error:  # the queue keeps going whatever one tick met
                print(f"motiontune ui: queue: {type(error).__name__}: {error}")

    # ------------------------------------------------------------------------------------------ helpers

    def _job(self, job_id: str) -> dict:
        for job in self.jobs:
            if job["id"] == job_id:
                return job
        raise HTTPException(404, f"no job {job_id} in the queue")

    def _shown(self, job: dict) -> dict:
        """The job as the page lists it: its run's state once it started."""
        shown = {key: value for key, value in job.items() if key != "config"}
        if job["run"]:
            shown["run_state"] = self.runs.summary(Path(job["run"]))["state"]
        elif job["error"]:
            shown["run_state"] = "could not start"
        return shown

    def _read(self) -> list[dict]:
        try:
            jobs = json.loads(self.file.read_text())["jobs"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        return [job for job in jobs if isinstance(job, dict) and "id" in job]

    def _write(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        write_then_rename(self.file, lambda partial: partial.write_text(json.dumps({"jobs": self.jobs}, indent=1)))
