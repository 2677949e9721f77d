"""Per-rank activation memory of one training forward with context parallel degree 1 against 2 (and 4 when asked).

Runs a WAN transformer (dim 192, 4 heads, 4 layers: tiny width, real architecture) on a long clip: 81 frames at
128 x 128 px, i.e. 21 latent frames of 16 x 16 latents, 1344 tokens after 2 x 2 patches. Each rank counts the bytes autograd keeps for the
backward (every saved tensor's storage, once) and its peak resident memory; the activation part per rank should
fall as 1 / degree, less what each rank keeps whole (the patch embedding before the split, the output gathered
after it).

    .venv/bin/python benchmarks/context_parallel_memory.py [2 4] [--ltx]

`--ltx`: an LTX-2 transformer instead (video dim 128, audio dim 64, 4 heads each, 4 layers, `rope_type: split`) on
81 frames at 512 x 512 px with their sound: 11 latent frames of 16 x 16, 2816 video tokens, and 84 audio tokens, which
stay whole on every rank (docs/distributed.md).
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
    ltx = "--ltx" in sys.argv
    torch.manual_seed(0)
    if ltx:
        from diffusers import LTX2VideoTransformer3DModel

        from motiontune.models.ltx2 import LTX2Family

        model = LTX2VideoTransformer3DModel(in_channels=128, out_channels=128, num_attention_heads=4, attention_head_dim=32,
                                            cross_attention_dim=128, audio_in_channels=128, audio_out_channels=128,
                                            audio_num_attention_heads=4, audio_attention_head_dim=16,
                                            audio_cross_attention_dim=64, num_layers=4, caption_channels=64, rope_type="split")
        family = LTX2Family.__new__(LTX2Family)  # its context-parallel plan and hooks need no config
    else:
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=48, in_channels=16,
                                      out_channels=16, text_dim=64, freq_dim=32, ffn_dim=768, num_layers=4, cross_attn_norm=True)
    if degree > 1:
        dist.init_process_group("gloo")
        ranks = Ranks(dist.get_rank(), degree, context=degree)
        ranks.context_mesh = distributed._context_mesh(torch.device("cpu"), degree, degree, "ulysses")
        distributed.enable_context_parallel(model, ranks, "ulysses", family.context_parallel_plan(model) if ltx else None)
        if ltx:
            family.prepare_context_parallel(model, degree)
    if ltx:  # 81 frames at 512 px and 24 fps: 11 latent frames of 16 x 16 (2816 tokens), 84 audio tokens
        x, sound, text = torch.randn(1, 2816, 128), torch.randn(1, 84, 128), torch.randn(1, 64, 64)
        t = torch.tensor([500.0])
        inputs = dict(hidden_states=x, audio_hidden_states=sound, encoder_hidden_states=text, audio_encoder_hidden_states=text,
                      timestep=t, audio_timestep=t, sigma=t, audio_sigma=t, encoder_attention_mask=torch.ones(1, 64),
                      audio_encoder_attention_mask=torch.ones(1, 64), num_frames=11, height=16, width=16, fps=24.0,
                      audio_num_frames=84, return_dict=False)
    else:
        x = torch.randn(1, 16, 21, 16, 16)  # 81 frames at 128 px: 21 latent frames of 16 x 16, 21 x 64 tokens
        text = torch.randn(1, 32, 64)
        inputs = dict(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text, return_dict=False)
    storages: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    before = process_memory()["VmRSS"]
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        outputs = model(**inputs)
    saved = sum(storages.values())
    sum(out.square().mean() for out in outputs).backward()
    peak = process_memory()["VmHWM"] - before
    print(json.dumps({"degree": degree, "rank": int(os.environ.get("RANK", "0")), "saved_activations": saved,
                      "peak_rss_increase": peak}), flush=True)
    if degree > 1:
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    degrees = [1] + [int(d) for d in [a for a in sys.argv[1:] if a.isdigit()] or ["2"]]
    extra = ["--ltx"] if "--ltx" in sys.argv else []
    results = {}
    for degree in degrees:
        launcher = [sys.executable] if degree == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                         f"--nproc-per-node={degree}"]
        done = subprocess.run([*launcher, __file__, "--rank", *extra], capture_output=True, text=True, check=True,
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
