"""One cache folder filled by two torchrun "nodes" (separate node ranks, one process each, on this machine): every
entry is written by exactly one rank, a node killed mid-fill leaves no partial entry, and a rerun completes."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import base_config, write_config

CLIPS = 30 + 30  # 30 windows from each of the two files
DUPLICATE = "already written by another process"


def free_port() -> int:
    """A free port below the kernel's ephemeral range: no connection another process opens can take it between
    this check and torchrun binding it seconds later (a port from bind(0) could be)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random(os.getpid()).sample(range(max(1024, low - 8000), low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {max(1024, low - 8000)} and {low}")


def start_nodes(config: Path) -> list[subprocess.Popen]:
    port = free_port()
    nodes = []
    for node in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
                   "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "motiontune", "train", "--config", str(config)]
        nodes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    return nodes


def descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # the thread or process just ended
            children += [int(c) for c in (task / "children").read_text().split()]
    return [c for child in children for c in (child, *descendants(child))]


def kill(node: subprocess.Popen) -> str:
    """SIGKILL the node: its workers first (torchrun starts each in a session of its own, so they would outlive
    their launcher), then the launcher. What the node wrote to stderr."""
    for pid in [*descendants(node.pid), node.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return node.communicate()[1]


def entries(cache: Path) -> list[Path]:
    return sorted((cache / "latents").glob("*/*.safetensors"))


def test_two_nodes_fill_one_cache_each_entry_once_and_survive_a_kill(tmp_path, tiny_models, dataset):
    cache = tmp_path / "cache"
    video = {"max_frames": 9, "target_fps": 8.0, "clips_per_file": 30}
    keys = base_config(tmp_path, tiny_models("wan-2.1"), dataset, resolution="128", epochs=1, dataloader_threads=0,
                       video_config=video, transformer={"max_steps": 1})
    config = write_config(tmp_path / "config.json", **keys)

    nodes = start_nodes(config)
    deadline = time.time() + 300
    while time.time() < deadline and len(entries(cache)) < 6 and all(n.poll() is None for n in nodes):
        time.sleep(0.05)
    written = entries(cache)
    states = [n.poll() for n in nodes]
    errors = kill(nodes[1])  # node 1 dies mid-fill; node 0 would wait for it at the next barrier
    errors += kill(nodes[0])
    assert 6 <= len(written) < CLIPS and states == [None, None], f"the kill did not land mid-fill: {states}\n{errors[-3000:]}"
    for entry in written:  # whatever is in place is whole: partial writes never have an entry's name
        assert torch.isfinite(load_file(str(entry))["value"]).all()
    assert DUPLICATE not in errors

    nodes = start_nodes(config)
    outputs = [node.communicate(timeout=900) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-4000:]
        assert DUPLICATE not in err  # no entry was encoded by both nodes
    finished = entries(cache)
    assert len(finished) == CLIPS and not list(cache.rglob("*.tmp"))
    assert set(written) <= set(finished)
    assert all(torch.isfinite(load_file(str(e))["value"]).all() for e in finished)
    encoded_by_node_0 = json.loads((tmp_path / "workspace" / "result.json").read_text())["encoder_calls"]["video"]
    assert 0 < encoded_by_node_0 < CLIPS - len(written)  # node 1 encoded the rest of what was missing
