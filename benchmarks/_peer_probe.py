"""Runs a trainer's script or module in this process and records, for benchmarks/peers.py, the end time of every
optimizer step and the process's resident memory around it. Works with any trainer that steps a torch.optim
optimizer: torch's global step hook fires after each step.

    python _peer_probe.py OUT.json script.py ARGS...      # or: python _peer_probe.py OUT.json -m module ARGS...

OUT.json: {"steps": [[time, rss_at_end, peak_rss_during_step], ...], "start": time, "loaded": rss, "peak_rss": bytes,
"children_peak_rss": bytes}. RSS is sampled every 5 ms from /proc/self/statm by a thread (torch releases the GIL in
its kernels, so the sampler keeps running).

"peak_rss" is this process's own high-water mark (VmHWM of /proc/self/status), written after every step and at
exit: the trainer's process alone. The wait4 rusage a parent gets is not that: it is the largest of the process and
every descendant it waited for (an encoding child, data-loader workers), and it starts from the launching parent's
own peak (the kernel carries the old memory map's peak into ru_maxrss at exec, and Python's subprocess starts
programs through vfork, sharing the parent's map until then). "children_peak_rss" is RUSAGE_CHILDREN's ru_maxrss:
the largest child this process waited for, with that same carried-over floor (this process's peak when it started
the child), so an upper bound of any child's own peak.
"loaded" is the RSS at the first forward that can train (grad enabled, a module with trainable parameters) after
an optimizer is made: the model, the adapter and the optimizer loaded, no step run yet. A freed allocation stays in
the process (the allocator keeps it), so a step's need shows against this, not against the previous step's end.
"""

import atexit
import json
import os
import resource
import runpy
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
out_path, target, *rest = sys.argv[1:]
state = {"peak": 0, "steps": [], "start": time.time(), "loaded": None}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def sample() -> None:
    while True:
        state["peak"] = max(state["peak"], rss())
        time.sleep(0.005)


def own_peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def write() -> None:
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    with open(out_path, "w") as f:
        json.dump({"start": state["start"], "steps": state["steps"], "loaded": state["loaded"], "peak_rss": own_peak(),
                   "children_peak_rss": children or None}, f)


def after_step(optimizer, args, kwargs) -> None:
    now = rss()
    state["steps"].append([time.time(), now, max(state["peak"], now)])
    state["peak"] = 0  # the next step's peak starts from here
    write()


import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402


def first_training_forward(module, args) -> None:
    if state["loaded"] is None and torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
        state["loaded"] = rss()
        state["peak"] = state["loaded"]  # the first step's peak counts from here
        hook.remove()


def optimizer_made(init):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        global hook
        if state["loaded"] is None and hook is None:
            hook = torch.nn.modules.module.register_module_forward_pre_hook(first_training_forward)
    return wrapped


hook = None
torch.optim.Optimizer.__init__ = optimizer_made(torch.optim.Optimizer.__init__)
register_optimizer_step_post_hook(after_step)
threading.Thread(target=sample, daemon=True).start()
write()
atexit.register(write)  # also when the trainer ends with sys.exit
if target == "-m":
    module, *rest = rest
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
else:
    sys.argv = [target, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    runpy.run_path(target, run_name="__main__")
