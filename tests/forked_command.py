"""`motiontune ...` in a process of its own, started from a fork server that has already imported the trainer.

A killed-and-resumed run needs a real process to SIGKILL. Started with `python -m motiontune`, each one pays an
interpreter start and the import of torch, diffusers and every family (most of a tiny preset run's time); forked
from a server that imported them once per test worker, it starts in a fraction of a second and runs the same
`motiontune.cli.main`. The server holds imports only (no model, no thread pool ran), so forking it is safe.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

import diffusers  # noqa: F401  (what every run imports, loaded once by the server)

import motiontune.cli  # noqa: F401
import motiontune.train.loop  # noqa: F401
from motiontune.models.registry import families

families()  # every family module

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload([__name__])


def _run(argv: list[str], log_path: str) -> None:
    with open(log_path, "w") as log:  # the command's output, as a shell would redirect it
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    from motiontune.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start(argv: list[str], log_path) -> multiprocessing.Process:
    """`motiontune <argv>` with its output in `log_path`; `.kill()` sends SIGKILL, `.exitcode` is its exit status."""
    process = _CONTEXT.Process(target=_run, args=(list(argv), str(log_path)), daemon=False)
    process.start()
    return process
