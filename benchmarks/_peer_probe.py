"""Runs a trainer's script or module in this process and records, for benchmarks/peers.py, the end time of every
optimizer step and the process's resident memory around it. Works with any trainer that steps a torch.optim
optimizer: torch's global step hook fires after each step.

    python _peer_probe.py OUT.json script.py ARGS...      # or: python _peer_probe.py OUT.json -m module ARGS...

OUT.json: {"steps": [[time, rss_at_end, peak_rss_during_step], ...], "start": time}. RSS is sampled every 5 ms
from /proc/self/statm by a thread (torch releases the GIL in its kernels, so the sampler keeps running).
"""

import json
import os
import runpy
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
out_path, target, *rest = sys.argv[1:]
state = {"peak": 0, "steps": [], "start": time.time()}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def sample() -> None:
    while True:
        state["peak"] = max(state["peak"], rss())
        time.sleep(0.005)


def write() -> None:
    with open(out_path, "w") as f:
        json.dump({"start": state["start"], "steps": state["steps"]}, f)


def after_step(optimizer, args, kwargs) -> None:
    now = rss()
    state["steps"].append([time.time(), now, max(state["peak"], now)])
    state["peak"] = 0  # the next step's peak starts from here
    write()


from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

register_optimizer_step_post_hook(after_step)
threading.Thread(target=sample, daemon=True).start()
write()
if target == "-m":
    module, *rest = rest
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
else:
    sys.argv = [target, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    runpy.run_path(target, run_name="__main__")
write()
