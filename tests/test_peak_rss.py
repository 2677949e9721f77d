"""benchmarks/peers.py reads a trainer's own peak rather than wait4's, which is the largest of the process and its
children and starts from the launching process's own peak (util/peak_rss.py says why). That `train` records its
own peak apart from its encoding child's is checked in tests/test_cache.py (the child encoding test)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

TESTS = Path(__file__).parent
GiB = 2**30


def peers():
    spec = importlib.util.spec_from_file_location("peers", TESTS.parent / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("peers", module)  # its dataclasses look their module up
    spec.loader.exec_module(sys.modules["peers"])
    return sys.modules["peers"]


def test_the_benchmark_reads_the_trainers_own_peak_not_its_childs_nor_its_launchers(tmp_path):
    bench = peers()
    trainer = tmp_path / "trainer.py"
    trainer.write_text(  # holds 64 MB, then starts a child that holds 1 GiB
        "import subprocess, sys\n"
        "own = bytearray(64 << 20); own[::4096] = b'\\1' * ((64 << 20) // 4096)\n"
        "subprocess.run([sys.executable, '-c', \"b = bytearray(1 << 30); b[::4096] = b'\\\\1' * ((1 << 30) // 4096)\"],"
        " check=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = bench.Result("trainer")
    assert bench.run_phase(result, "train", [sys.executable, trainer], tmp_path, env, tmp_path / "log.txt",
                           probe=tmp_path / "probe.json")
    bench.read_probe(result, tmp_path / "probe.json", 3)
    probe = json.loads((tmp_path / "probe.json").read_text())
    print(f"own {result.train_peak_rss / 2**20:.0f} MB, children {probe['children_peak_rss'] / 2**20:.0f} MB")
    assert result.phases[0].own and result.phases[0].peak_rss == result.train_peak_rss
    assert 64 << 20 < result.train_peak_rss < GiB  # its 64 MB and torch (the probe's), not the child's gigabyte
    assert probe["children_peak_rss"] > GiB  # which wait4 would have reported as the trainer's

    # a phase without the probe: the largest process of it, from a launcher whose own small peak is the floor, not
    # this process's (which holds a gigabyte as it starts it)
    held = bytearray(GiB)
    held[::4096] = b"\1" * (GiB // 4096)
    assert bench.run_phase(result, "cache", [sys.executable, "-c", "pass"], tmp_path, env, tmp_path / "log.txt")
    del held
    Path("/proc/self/clear_refs").write_text("5")  # this process's peak back to its resident size, for later tests
    print(f"a bare python started from a process holding 1 GiB: {result.phases[1].peak_rss / 2**20:.0f} MB")
    assert not result.phases[1].own and result.phases[1].peak_rss < 256 << 20
