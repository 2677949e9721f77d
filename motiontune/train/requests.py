"""Requests to a running trainer from outside it (`motiontune ui`'s Sample now / Backup now / Save now): each is a
small file in `workspace_dir/requests/`, written by `ask` and taken by the training loop between steps, so a
request never interrupts a step and needs no connection to the process. Taken requests are deleted and answered
in `requests/taken.jsonl` (what was done, at which step)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ..util.files import write_then_rename

ACTIONS = ("sample", "backup", "save")
FOLDER = "requests"
ANSWERS = "taken.jsonl"

log = logging.getLogger("motiontune")


def ask(workspace: Path, action: str) -> Path:
    """Leave a request for the run training in `workspace`; it is taken after the step in progress."""
    if action not in ACTIONS:
        raise ValueError(f"unknown request {action!r}: one of {', '.join(ACTIONS)}")
    folder = Path(workspace) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.time_ns()}-{os.getpid()}-{action}.json"
    write_then_rename(path, lambda partial: partial.write_text(json.dumps({"action": action, "asked": time.time()})))
    return path


def answers(workspace: Path) -> list[dict]:
    """What the run did with the requests it took, oldest first."""
    try:
        lines = (Path(workspace) / FOLDER / ANSWERS).read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


class Requests:
    """The trainer's side: `take()` between steps returns the actions asked for since the last call."""

    def __init__(self, workspace: Path, enabled: bool):
        self.folder = Path(workspace) / FOLDER
        self.enabled = enabled
        if enabled and self.folder.is_dir():  # requests left from before this run started are not for it
            for stale in self.folder.glob("*.json"):
                stale.unlink(missing_ok=True)

    def waiting(self) -> bool:
        """Whether a request is waiting to be taken."""
        return self.enabled and self.folder.is_dir() and any(self.folder.glob("*.json"))

    def take(self) -> list[str]:
        if not self.enabled or not self.folder.is_dir():
            return []
        actions = []
        for path in sorted(self.folder.glob("*.json")):  # the time in the name orders them
            try:
                action = json.loads(path.read_text()).get("action")
            except (OSError, ValueError):
                action = None
            path.unlink(missing_ok=True)
            if action in ACTIONS:
                actions.append(action)
            else:
                log.warning("ignored a request file that is not one: %s", path.name)
        return actions

    def answer(self, action: str, step: int, result: str) -> None:
        if not self.enabled:  # another rank: rank 0 answers
            return
        try:
            with open(self.folder / ANSWERS, "a") as handle:
                handle.write(json.dumps({"action": action, "step": step, "result": result, "done": time.time()}) + "\n")
        except OSError:  # an answer is a convenience for the UI, never a reason to stop training
            pass
