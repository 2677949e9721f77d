"""Per-rank activation memory of one training forward with context parallel degree 1 against 2 (and 4 when asked).

Runs a WAN transformer (dim 192, 4 heads, 4 layers: tiny width, real architecture) on a long clip: 81 frames at
128 x 128 px, i.e. 21 latent frames of 16 x 16 latents, 1344 tokens after 2 x 2 patches. Each rank counts the bytes autograd keeps for the
backward (every saved tensor's storage, once) and its peak resident memory; the activation part per rank should
fall as 1 / degree, less what each rank keeps whole (the patch embedding before the split, the output gathered
after it).

    .venv/bin/python benchmarks/context_parallel_memory.py [2 4]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def rank_main() -> None:
    import torch
    import torch.distributed as dist
    from diffusers import WanTransformer3DModel

    from motiontune.testing.process_memory import process_memory
    from motiontune.train import distributed
    from motiontune.util.ranks import Ranks

    degree = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=48, in_channels=16,
                                  out_channels=16, text_dim=64, freq_dim=32, ffn_dim=768, num_layers=4, cross_attn_norm=True)
    if degree > 1:
        dist.init_process_group("gloo")
        ranks = Ranks(dist.get_rank(), degree, context=degree)
        ranks.context_mesh = distributed._context_mesh(torch.device("cpu"), degree, degree, "ulysses")
        distributed.enable_context_parallel(model, ranks, "ulysses")
    x = torch.randn(1, 16, 21, 16, 16)  # 81 frames at 128 px: 21 latent frames of 16 x 16, 21 x 64 tokens
    text = torch.randn(1, 32, 64)
    storages: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    before = process_memory()["VmRSS"]
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text, return_dict=False)[0]
    saved = sum(storages.values())
    out.square().mean().backward()
    peak = process_memory()["VmHWM"] - before
    print(json.dumps({"degree": degree, "rank": int(os.environ.get("RANK", "0")), "saved_activations": saved,
                      "peak_rss_increase": peak}), flush=True)
    if degree > 1:
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    degrees = [1] + [int(d) for d in sys.argv[1:] or ["2"]]
    results = {}
    for degree in degrees:
        launcher = [sys.executable] if degree == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                         f"--nproc-per-node={degree}"]
        done = subprocess.run([*launcher, __file__, "--rank"], capture_output=True, text=True, check=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        results[degree] = max(rows, key=lambda r: r["saved_activations"])  # the rank that keeps the most
    base = results[1]
    print("| degree | saved activations per rank | ratio to degree 1 | peak RSS increase per rank | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for degree, row in results.items():
        print(f"| {degree} | {row['saved_activations'] / 2**20:.1f} MiB | {row['saved_activations'] / base['saved_activations']:.3f} "
              f"| {row['peak_rss_increase'] / 2**20:.1f} MiB | {row['peak_rss_increase'] / base['peak_rss_increase']:.3f} |")


if __name__ == "__main__":
    rank_main() if "--rank" in sys.argv else main()
