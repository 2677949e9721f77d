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
    if os.name == "nt":  # there os.kill(pid, 0) sends Ctrl-C (signal 0 is CTRL_C_EVENT) instead of asking
        return _windows_process_alive(pid)
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


def _windows_process_alive(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: it runs, as another user
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)
