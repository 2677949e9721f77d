"""How long `motiontune estimate` takes per shipped preset: its report (the breakdown, every moment, the cheapest
change for 8/16/24/48 GB cards), each preset in a fresh process, interleaved with an earlier checkout's when given.

    python benchmarks/estimate_speed.py                       # this tree
    git archive <commit> motiontune | tar -x -C /tmp/before   # an earlier motiontune, to compare with
    python benchmarks/estimate_speed.py --before /tmp/before [PRESET ...]

Prints, per preset and tree: wall seconds, CPU seconds of the process (less sensitive to a busy machine than wall
time) and the fake-tensor ops the simulations dispatched (what the time follows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def measure(preset: str) -> dict:
    """In this process: the report of one preset, timed and counted."""
    import importlib

    from motiontune.models import fake_memory

    ops = [0]
    dispatch = fake_memory.LiveBytes.__torch_dispatch__

    def counted(self, func, types, args=(), kwargs=None):
        ops[0] += 1
        return dispatch(self, func, types, args, kwargs)

    fake_memory.LiveBytes.__torch_dispatch__ = counted
    from motiontune.configure import load_config

    report = importlib.import_module("motiontune.estimate.report").report
    config = load_config(preset, [])
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        report(config, preset)
    except Exception as error:  # the presets whose estimate is not modelled say so
        return {"error": str(error)}
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "ops": ops[0]}


def run(tree: Path, preset: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run([sys.executable, __file__, "--one", preset], capture_output=True, text=True, env=env)
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if done.returncode == 0 and lines else {"error": done.stderr[-300:]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("presets", nargs="*")
    parser.add_argument("--before", type=Path, help="a folder holding an earlier motiontune package")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    sys.path.insert(0, str(HERE))
    from motiontune.config import list_presets

    trees = ([("before", args.before)] if args.before else []) + [("now", HERE)]
    for preset in args.presets or list_presets():
        for name, tree in trees:
            r = run(tree, preset)
            shown = r.get("error") or f"{r['wall']:6.1f} s wall, {r['cpu']:6.1f} s CPU, {r['ops']:7d} fake ops"
            print(f"{preset:32s} {name:6s} {shown}", flush=True)


if __name__ == "__main__":
    main()
