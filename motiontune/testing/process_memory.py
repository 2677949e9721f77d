"""This process's memory as Linux reports it: what the memory tests and benchmarks/memory.py measure on the CPU."""

from __future__ import annotations


def process_memory() -> dict[str, int]:
    """Bytes: `VmRSS` (resident now) and `VmHWM` (the resident peak since start or the last reset)."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(value.split()[0]) * 1024
    return values
