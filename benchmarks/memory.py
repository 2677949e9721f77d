"""Peak memory and step time of real LoRA training steps under each memory option, next to `motiontune estimate`.

A WAN model at 1.3B width (dim 1536, 12 heads, ffn 8960) with 4 blocks, a tiny VAE and text encoder (latents and
captions come from the cache), one clip of 33 frames at 256² (9 × 32 × 32 latents, 2304 tokens), LoRA rank 16,
bf16. Each setting trains one step with `motiontune.train.loop.train` in its own process:

- peak: the process's VmHWM, its high-water mark reset (`/proc/self/clear_refs`) when the transformer's first
  forward starts, minus its VmRSS before `train()` (the libraries); MALLOC_MMAP_THRESHOLD_=65536 makes freed
  tensors go back to the OS, so RSS follows live memory;
- step time: from the forward's start to the end of the optimizer step;
- weight bytes: the transformer's frozen parameters and buffers (quantized tensors by what they store).

On the CPU the training device and host memory are one, so the estimate printed beside each peak is its device
and host parts together (`estimate(config, device="cpu").total`).

    .venv/bin/python benchmarks/memory.py        # about 8 minutes on 2 cores

HunyuanVideo and HiDream are measured the same way at their real width with two blocks (one of each kind):

    .venv/bin/python benchmarks/memory.py hunyuan-video OFF ON FLOAT_8
    .venv/bin/python benchmarks/memory.py hi-dream OFF ON FLOAT_8

HunyuanVideo trains two steps (the second beside the optimizer state the first made, as every later step runs);
HiDream ten, because on the CPU its MoE routing brings matmuls of new shapes every step, each a kernel oneDNN
compiles and caches, until the cache's 1024 kernels are full (at the eighth step here): a long run's memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIP = ROOT / "tests" / "data" / "shapes_200px_30fps.mp4"
# family → (model_type, transformer class, its real width with two blocks (text widths: the tiny encoders'),
#           resolution, frames, steps)
FAMILIES = {
    "wan-2.1": ("WAN_2_1_T2V", "WanTransformer3DModel", None, "256", 33, 1),
    "hunyuan-video": ("HUNYUAN_VIDEO", "HunyuanVideoTransformer3DModel", dict(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=32, rope_axes_dim=(16, 56, 56)), "256", 17, 2),
    "hi-dream": ("HI_DREAM_FULL", "HiDreamImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=20, caption_channels=[32, 32], text_emb_dim=64, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(64, 64), llama_layers=[0, 1]), "512", 1, 10),
}
SETTINGS = {  # name → config overrides
    "OFF": ["gradient_checkpointing=OFF"],
    "ON": ["gradient_checkpointing=ON"],
    "CPU_OFFLOADED": ["gradient_checkpointing=CPU_OFFLOADED"],
    "FLOAT_8": ["gradient_checkpointing=OFF", "transformer.weight_dtype=FLOAT_8"],
    "NFLOAT_4": ["gradient_checkpointing=OFF", "transformer.weight_dtype=NFLOAT_4"],
}


def child(config_path: str, setting: str) -> dict:
    """One setting's run, in this (fresh) process."""
    import torch

    from motiontune.configure import load_config
    from motiontune.estimate.configs import family
    from motiontune.estimate import estimate
    from motiontune.train import loop
    from motiontune.train.memory import tensor_bytes
    from motiontune.testing.process_memory import process_memory

    config = load_config(config_path, SETTINGS[setting])
    predicted = estimate(config, device="cpu")
    transformer_class = family(config).transformer_class_name
    torch.set_num_threads(os.cpu_count() or 1)
    starts, stepped, seen = [], [], {}

    def before_forward(module, args):
        if type(module).__name__ != transformer_class:
            return
        if not starts:  # the model is loaded and prepared: from here on is the training steps' memory
            frozen = [t for t in (*module.parameters(), *module.buffers()) if not t.requires_grad]
            seen["weights"] = sum(tensor_bytes(t) for t in frozen)
            seen["block_weights"] = sum(tensor_bytes(t) for b in family(config).fsdp_units(module)
                                        for t in (*b.parameters(), *b.buffers()) if not t.requires_grad)
            seen["rss_loaded"] = process_memory()["VmRSS"]
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
        starts.append(time.perf_counter())

    hook = torch.nn.modules.module.register_module_forward_pre_hook(before_forward)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    step_hook = register_optimizer_step_post_hook(lambda *_: stepped.append(time.perf_counter()))
    baseline = process_memory()["VmRSS"]
    try:
        loop.train(config)
    finally:
        hook.remove()
        step_hook.remove()
    peak = process_memory()["VmHWM"]
    return {
        "setting": setting,
        "peak": peak - baseline,
        "estimate": predicted.total,
        "estimate_lines": [(line.name, line.device + line.host) for line in predicted.lines],
        "step_seconds": stepped[0] - starts[0],
        "weights": seen["weights"],
        "block_weights": seen["block_weights"],
        "loaded": seen["rss_loaded"] - baseline,
    }


def build(workspace: Path, name: str) -> Path:
    """The model folder (a tiny pipeline, its transformer replaced by a real-width one), one clip, a config, and the
    cache filled (so the measured runs load no encoder)."""
    import diffusers
    import torch

    from motiontune.testing.tiny_models import make_tiny_model

    model_type, cls, width, resolution, frames, steps = FAMILIES[name]
    model = make_tiny_model(name, workspace / "model")
    torch.manual_seed(0)
    if width is None:  # WAN at 1.3B width, 4 blocks
        text_dim = json.loads((model / "transformer" / "config.json").read_text())["text_dim"]
        width = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=4, in_channels=16,
                     out_channels=16, text_dim=text_dim)
    transformer = getattr(diffusers, cls)(**width)
    # Saved in float16, a dtype no parameter is trained or kept in: loading converts every tensor, so no weight
    # stays a view of the memory-mapped file. (With a bf16 or float32 file some tensors load as views of it, which
    # keeps the whole mapping, and every page of it loading touched, resident: RSS would count the file beside
    # the weights, and weights that quantization replaced would still count.)
    transformer.to(torch.float16).save_pretrained(model / "transformer")
    clips = workspace / "clips"
    clips.mkdir()
    (clips / CLIP.name).write_bytes(CLIP.read_bytes())
    (clips / CLIP.with_suffix(".txt").name).write_text("moving shapes\n")
    config = {
        "model_type": model_type, "base_model_name": str(model), "concepts": [{"path": str(clips)}],
        "resolution": resolution, "epochs": steps, "learning_rate": 1e-4, "train_dtype": "BFLOAT_16", "lora_rank": 16,
        "lora_alpha": 16, "workspace_dir": str(workspace / "run"), "cache_dir": str(workspace / "cache"),
        "output_model_destination": str(workspace / "lora.safetensors"), "sample_after_unit": "NEVER",
        "backup_after_unit": "NEVER", "dataloader_threads": 0,
        "video_config": {"max_frames": frames, "target_fps": 16.0, "max_duration": 5.0},
    }
    path = workspace / "config.json"
    path.write_text(json.dumps(config, indent=2))
    subprocess.run([sys.executable, "-m", "motiontune", "cache", "--config", str(path)], check=True, capture_output=True)
    return path


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])))
        return
    name = sys.argv[1] if len(sys.argv) > 1 else "wan-2.1"
    settings = sys.argv[2:] or list(SETTINGS)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="motiontune-memory-") as scratch:
        config = build(Path(scratch), name)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        rows = []
        for setting in settings:
            out = subprocess.run([sys.executable, __file__, "--child", str(config), setting], capture_output=True, text=True,
                                 env=env)
            if out.returncode:
                print(f"{setting}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            row = rows[-1]
            print(f"  {setting}: peak {row['peak'] / 2**20:.0f} MB, estimate {row['estimate'] / 2**20:.0f} MB, "
                  f"{row['step_seconds']:.1f} s", file=sys.stderr)
    report(rows, time.perf_counter() - started, name)


def report(rows: list[dict], seconds: float, name: str = "wan-2.1") -> None:
    mb = 2**20
    by = {r["setting"]: r for r in rows}
    off = by.get("OFF")
    _, cls, width, resolution, frames, steps = FAMILIES[name]
    if width is None:
        print("LoRA rank 16 steps of a WAN-1.3B-width transformer (dim 1536, 12 heads, ffn 8960, 4 blocks), bf16, "
              "1 × 33 frames × 256² (2304 tokens), on the CPU")
    else:
        print(f"LoRA rank 16, {steps} steps of a real-width {cls} ({width['num_attention_heads']} heads × 128, one block "
              f"of each kind), bf16, 1 × {frames} frame(s) × {resolution}², on the CPU")
    print("peak: the process's high-water mark during the training step above its memory before train(); estimate: "
          "`motiontune estimate`'s device + host parts (one memory on the CPU)\n")
    print("| setting | measured peak | estimate | estimate / measured | step time | step time / OFF | frozen weights |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio_time = r["step_seconds"] / off["step_seconds"] if off else float("nan")
        print(f"| {r['setting']} | {r['peak'] / mb:.0f} MB | {r['estimate'] / mb:.0f} MB | {r['estimate'] / r['peak']:.3f} | "
              f"{r['step_seconds']:.1f} s | {ratio_time:.2f} | {r['weights'] / mb:.0f} MB |")
    bf16 = off
    if bf16:
        print()
        for kind, target in (("FLOAT_8", 0.55), ("NFLOAT_4", 0.30)):
            if kind in by:
                r = by[kind]
                whole = r["weights"] / bf16["weights"]
                blocks = r["block_weights"] / bf16["block_weights"]
                print(f"{kind} weight bytes / bf16: blocks {blocks:.3f} (target ≤ {target}: {'met' if blocks <= target else 'NOT met'}), "
                      f"whole transformer {whole:.3f} (its embedders and output head stay bf16/float32)")
        print("\nestimate, by part (MB):")
        for r in rows:
            print(f"  {r['setting']}: " + ", ".join(f"{name} {value / mb:.0f}" for name, value in r["estimate_lines"]))
        worst = max(abs(r["estimate"] / r["peak"] - 1) for r in rows)
        print(f"\nlargest estimate error: {worst:.1%} (target: within 15%)")
    print(f"whole run: {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
