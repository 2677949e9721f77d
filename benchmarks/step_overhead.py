"""Time per optimizer step: `motiontune train` (latents from the disk cache) against a bare
forward+backward+AdamW loop.

Both train the same LoRA on the same transformer with the same batch (the clip latent and caption
embedding motiontune cached) and the same noise levels, in one process run. motiontune's time per step
comes from the wall-clock stamps of its own TensorBoard loss scalars, so loading and encoding do not
count; both report the median time between consecutive steps. The loop on the CPU runs faster or slower depending on the values it
multiplies, which is why the bare loop gets the same batch and noise levels rather than random tensors.

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
from motiontune.train.flow import sample_sigmas
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


def motiontune_step_time(model: Path, work: Path, frames: int, resolution: int, steps: int) -> float:
    def run(steps: int) -> float:
        config = TrainConfig.model_validate({
            "model_type": "WAN_2_1_T2V", "base_model_name": str(model),
            "concepts": [{"path": str(CLIPS)}], "resolution": str(resolution), "epochs": steps,
            "learning_rate": 1e-4, "train_dtype": "FLOAT_32", "lora_rank": 16, "lora_alpha": 16,
            "workspace_dir": str(work / f"ws{steps}"), "output_model_destination": str(work / f"lora{steps}.safetensors"),
            "cache_dir": str(work / "cache"),  # filled by the warm-up run: the timed runs read every latent from it
            "sample_after_unit": "NEVER", "video_config": {"max_frames": frames, "target_fps": 16.0},
        })
        # one clip per epoch: the shapes clip only
        config.concepts[0].path = str(_one_clip(work))
        with contextlib.redirect_stderr(io.StringIO()):
            train(config)
        return work / f"ws{steps}" / "tensorboard"

    run(2)  # warm-up: fills the cache, imports, allocator
    return step_time_from_logs(run(steps))


def median_step_time(stamps: list[float]) -> float:
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    return gaps[len(gaps) // 2]


def step_time_from_logs(folder: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    # the median gap between consecutive steps: robust to a step slowed by something else on the machine
    return median_step_time([e.wall_time for e in events.Scalars("loss")])


def _one_clip(work: Path) -> Path:
    folder = work / "clip"
    if not folder.exists():
        folder.mkdir()
        (folder / "shapes.mp4").write_bytes((CLIPS / "shapes.mp4").read_bytes())
        (folder / "shapes.txt").write_text((CLIPS / "shapes.txt").read_text())
    return folder


def cached_batch(work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The clip latent and caption embedding motiontune trained on, read back from its cache."""
    from safetensors.torch import load_file

    [latent] = [load_file(str(p))["value"] for p in (work / "cache" / "latents").glob("*/*.safetensors")]
    [text] = [load_file(str(p))["value"] for p in (work / "cache" / "text").glob("*/*.safetensors")]
    return latent[None], text[None]


def bare_loop_step_time(model: Path, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> float:
    """The floor: the same LoRA on the same transformer and the same batch, nothing else."""
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    from motiontune.models.wan import _DEFAULT_TARGETS

    transformer = WanTransformer3DModel.from_pretrained(model, subfolder="transformer")
    transformer.requires_grad_(False)
    targets = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and _DEFAULT_TARGETS.match(n)]
    transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=targets))
    parameters = [p for n, p in transformer.named_parameters() if "lora_" in n]
    transformer.train()  # as any training loop does (from_pretrained returns the model in eval mode)
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    x0, text = batch
    # the noise levels motiontune draws with its default settings and seed
    sigmas = sample_sigmas(steps + 1, "LOGIT_NORMAL", 1.0, generator=torch.Generator().manual_seed(43))
    generator = torch.Generator().manual_seed(42)

    def step(sigma):
        noise = torch.randn(x0.shape, generator=generator)
        noisy = (1 - sigma) * x0 + sigma * noise
        prediction = transformer(hidden_states=noisy, timestep=sigma[None] * 1000, encoder_hidden_states=text, return_dict=False)[0]
        torch.nn.functional.mse_loss(prediction, noise - x0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, sigmas)


def timed_steps(step, sigmas) -> float:
    """Median time of `step(sigma)` over the noise levels after the first (a warm-up)."""
    step(sigmas[0])
    stamps = [time.perf_counter()]
    for sigma in sigmas[1:]:
        step(sigma)
        stamps.append(time.perf_counter())
    return median_step_time(stamps)


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
            steps = 60 if name == "tiny" else 12
            ours = motiontune_step_time(model, work, frames, resolution, steps)
            bare = bare_loop_step_time(model, cached_batch(work), steps)
        print(f"{name:>16}: motiontune {ours * 1000:8.1f} ms/step, bare loop {bare * 1000:8.1f} ms/step, "
              f"ratio {ours / bare:.3f}  ({frames} frames x {resolution}^2, dim {heads * head_dim}, {layers} layers)")


if __name__ == "__main__":
    main()
