"""Whether a process still runs (stale temporaries of the cache, runs the UI watches)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

# This machine's name as temporary files carry it (no dots or dashes, so such a name splits back into its parts).
HOST = socket.gethostname().replace(".", "_").replace("-", "_")


def process_alive(pid) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped, does not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:  # no /proc (macOS, Windows): kill's answer stands
        return True
