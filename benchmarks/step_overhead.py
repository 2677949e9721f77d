"""Time per optimizer step: `motiontune train` (cached latents) against a bare forward+backward+AdamW loop.

Both train the same LoRA on the same transformer with a batch of the same shape, in one process run.
motiontune's time per step is the difference between two runs of different length divided by the
difference in steps, so loading and encoding (done once per run) do not count.

    .venv/bin/python benchmarks/step_overhead.py            # tiny model and WAN-1.3B width, 2 layers
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import tempfile
import time
from pathlib import Path

import torch

from motiontune.config import TrainConfig
from motiontune.demo import CLIPS
from motiontune.train.loop import train

SIZES = {
    # name: (heads, head_dim, ffn, layers, text_dim, frames, resolution)
    "tiny": (4, 24, 384, 2, 32, 17, 64),
    "wan-1.3B-width": (12, 128, 8960, 2, 4096, 17, 256),
}


def build_model(folder: Path, heads, head_dim, ffn, layers, text_dim) -> Path:
    """A WAN 2.1 diffusers folder with a transformer of the given width and a small text encoder."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from motiontune.testing.tiny_models import build_tokenizer

    torch.manual_seed(0)
    build_tokenizer(folder / "tokenizer")
    transformer = WanTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, ffn_dim=ffn, num_layers=layers,
        text_dim=text_dim, freq_dim=256, in_channels=16, out_channels=16,
    )
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=256, d_model=text_dim, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
    ))
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"), text_encoder=text_encoder, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer,
    ).save_pretrained(folder)
    return folder


def motiontune_step_time(model: Path, work: Path, frames: int, resolution: int, short: int, long: int) -> float:
    def run(steps: int) -> float:
        config = TrainConfig.model_validate({
            "model_type": "WAN_2_1_T2V", "base_model_name": str(model),
            "concepts": [{"path": str(CLIPS)}], "resolution": str(resolution), "epochs": steps,
            "learning_rate": 1e-4, "train_dtype": "FLOAT_32", "lora_rank": 16, "lora_alpha": 16,
            "workspace_dir": str(work / f"ws{steps}"), "output_model_destination": str(work / f"lora{steps}.safetensors"),
            "sample_after_unit": "NEVER", "video_config": {"max_frames": frames, "target_fps": 16.0},
        })
        # one clip per epoch: the shapes clip only
        config.concepts[0].path = str(_one_clip(work))
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            train(config)
        return time.perf_counter() - start

    run(1)  # warm-up: imports, allocator, kernels
    return (run(long) - run(short)) / (long - short)


def _one_clip(work: Path) -> Path:
    folder = work / "clip"
    if not folder.exists():
        folder.mkdir()
        (folder / "shapes.mp4").write_bytes((CLIPS / "shapes.mp4").read_bytes())
        (folder / "shapes.txt").write_text((CLIPS / "shapes.txt").read_text())
    return folder


def bare_loop_step_time(model: Path, frames: int, resolution: int, text_dim: int, steps: int) -> float:
    """The floor: the same LoRA on the same transformer, a fixed batch, nothing else."""
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    from motiontune.models.wan import _DEFAULT_TARGETS

    transformer = WanTransformer3DModel.from_pretrained(model, subfolder="transformer")
    transformer.requires_grad_(False)
    targets = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and _DEFAULT_TARGETS.match(n)]
    transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=targets))
    parameters = [p for n, p in transformer.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    latent = resolution // 8
    x = torch.randn(1, 16, (frames - 1) // 4 + 1, latent, latent)
    target = torch.randn_like(x)
    text = torch.randn(1, 512, text_dim)
    t = torch.tensor([500.0])

    def step():
        prediction = transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        torch.nn.functional.mse_loss(prediction, target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    args = parser.parse_args()
    logging.getLogger("motiontune").setLevel(logging.WARNING)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    for name in args.sizes:
        heads, head_dim, ffn, layers, text_dim, frames, resolution = SIZES[name]
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(scratch)
            model = build_model(work / "model", heads, head_dim, ffn, layers, text_dim)
            short, long = (5, 45) if name == "tiny" else (2, 8)
            ours = motiontune_step_time(model, work, frames, resolution, short, long)
            bare = bare_loop_step_time(model, frames, resolution, text_dim, steps=40 if name == "tiny" else 6)
        print(f"{name:>16}: motiontune {ours * 1000:8.1f} ms/step, bare loop {bare * 1000:8.1f} ms/step, "
              f"ratio {ours / bare:.3f}  ({frames} frames x {resolution}^2, dim {heads * head_dim}, {layers} layers)")


if __name__ == "__main__":
    main()
