"""Peak memory of one LoRA training step with full 3D self-attention against frame-local attention
(`video_config.use_temporal_attention: false`), on a WAN-1.3B-width model (dim 1536, 12 heads, ffn 8960,
2 layers) at 33 frames x 256². Each setting runs in its own process; its peak RSS is reported.

    .venv/bin/python benchmarks/temporal_attention_memory.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def one_step(frame_local: bool) -> dict:
    import torch
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    from motiontune.config import TrainConfig
    from motiontune.models.base import Expert
    from motiontune.models.wan import _DEFAULT_TARGETS, WanFamily

    torch.manual_seed(0)
    model = WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=2, text_dim=4096)
    model.requires_grad_(False)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _DEFAULT_TARGETS.match(n)]
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=targets))
    model.train()
    family = WanFamily(TrainConfig.model_validate({"concepts": [{"path": "."}]}), torch.device("cpu"))
    if frame_local:
        family.set_frame_local_attention(Expert("transformer", "", model, (0.0, 1.0)), True)
    latents = torch.randn(1, 16, 9, 32, 32)  # 33 frames x 256² through WAN's VAE
    text = torch.randn(1, 512, 4096)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    prediction = model(hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=text, return_dict=False)[0]
    prediction.float().pow(2).mean().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"frame_local": frame_local, "peak_rss_mb": peak / 1024, "step_rss_mb": (peak - before) / 1024, "seconds": seconds}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(one_step(sys.argv[2] == "local")))
        return
    rows = []
    for setting in ("full", "local"):
        out = subprocess.run([sys.executable, __file__, "--child", setting], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("one LoRA step (forward + backward), WAN-1.3B width, 2 layers, 33 frames x 256² (9 x 32 x 32 latents, 2304 tokens)")
    for row in rows:
        name = "frame-local attention" if row["frame_local"] else "full 3D attention"
        print(f"  {name:22}: peak RSS {row['peak_rss_mb']:7.0f} MB (the step itself: +{row['step_rss_mb']:6.0f} MB), {row['seconds']:.2f} s")
    full, local = rows
    print(f"  the step's memory, frame-local / full: {local['step_rss_mb'] / full['step_rss_mb']:.3f}; "
          f"time: {local['seconds'] / full['seconds']:.3f}")


if __name__ == "__main__":
    main()
