"""`workspace_dir/progress.json`: where a run stands (step of total, epoch, ETA, memory, the process id),
rewritten atomically after every step so a watcher (`motiontune ui`) can follow any run, including one
started from the command line. TensorBoard keeps the loss and learning-rate history; this file is only the
present moment.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from ..util.files import write_then_rename

FILE_NAME = "progress.json"


def memory_use() -> dict:
    """This process's resident memory and peak (MB), and the CUDA allocator's when a GPU is in use."""
    memory = {}
    try:  # Linux: the current resident set
        with open("/proc/self/statm") as handle:
            memory["rss_mb"] = round(int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    memory["peak_rss_mb"] = round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        memory["cuda_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        memory["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return memory


class ProgressFile:
    def __init__(self, workspace: Path, total_steps: int, start_step: int, enabled: bool = True, resumed: bool = False):
        self.path = Path(workspace) / FILE_NAME
        self.enabled = enabled
        # a resumed run's elapsed time goes on from where its last session left it, as its step count does
        self.elapsed_before = _elapsed_so_far(self.path) if resumed else 0.0
        self.total = total_steps
        self.start_step = start_step
        self.started = time.time()
        self.first_step_time: float | None = None  # the first step pays for warm-up; the rate is timed after it
        self.first_step = start_step
        self.last: dict = {}
        self.write("training", start_step, None, None)

    def update(self, step: int, epoch: int, loss: float) -> None:
        if self.first_step_time is None:
            self.first_step_time, self.first_step = time.time(), step
        self.write("training", step, epoch, loss)

    def finish(self, state: str) -> None:
        self.write(state, self.last.get("step", self.start_step), self.last.get("epoch"), self.last.get("loss"))

    def write(self, state: str, step: int, epoch: int | None, loss: float | None) -> None:
        if not self.enabled:
            return
        now = time.time()
        seconds_per_step = None
        if self.first_step_time is not None and step > self.first_step:
            seconds_per_step = (now - self.first_step_time) / (step - self.first_step)
        remaining = max(self.total - step, 0)
        self.last = {
            "state": state,  # training, done, stopped
            "pid": os.getpid(),
            "step": step,
            "total_steps": self.total,
            "epoch": epoch,
            "loss": loss,
            "started": self.started,
            "updated": now,
            "elapsed_seconds": round(self.elapsed_before + now - self.started, 1),
            "seconds_per_step": None if seconds_per_step is None else round(seconds_per_step, 3),
            "eta_seconds": None if seconds_per_step is None else round(remaining * seconds_per_step, 1),
            "memory": memory_use(),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_then_rename(self.path, lambda partial: partial.write_text(json.dumps(self.last, indent=1)))
        except OSError:  # a watcher's convenience: never a reason to stop training
            pass


def _elapsed_so_far(path: Path) -> float:
    """The elapsed time an earlier session of the run wrote (0 when there is none to read)."""
    try:
        return float(json.loads(path.read_text())["elapsed_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0
