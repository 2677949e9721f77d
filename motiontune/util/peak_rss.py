"""This process's own resident-memory peak: what `train` reports at its end for itself and for the process that
encoded its clips (data/encoder_process.py), and what benchmarks/peers.py compares across trainers.

On Linux it is `VmHWM` of /proc/self/status, the high-water mark of this process's own memory map. The figure
wait4 / `RUSAGE_CHILDREN` give a parent is not that: it is the largest of the process and every descendant it
waited for (an encoding child, data-loader workers), and on exec the kernel carries the old memory map's peak into
the new process's `ru_maxrss`, so a program started by a large parent (through vfork, as Python's subprocess does)
starts from that parent's peak. `VmHWM` belongs to the new memory map alone. Elsewhere `ru_maxrss` of RUSAGE_SELF
(kilobytes on Linux, bytes on macOS) is the nearest figure."""

from __future__ import annotations

import sys


def own_peak_rss() -> int | None:
    """Bytes: the most this process has held resident since it started (None where the system does not say)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # no /proc (macOS; Windows)
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def mb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**20:.0f} MB"
