"""Time per optimizer step for each model family's tiny model and for WAN-2.2-5B width, each against a bare
forward+backward+AdamW loop on the same transformer and batch, in one run.

motiontune's figure is the median gap between its own TensorBoard loss stamps (latents from the disk cache,
so loading and encoding do not count). The bare loop trains the same LoRA on the first transformer with the
cached batch through the family's own forward (`predict`: its timestep, conditioning and sign conventions),
MSE, backward and AdamW — none of the training loop around it.

    .venv/bin/python benchmarks/family_steps.py                 # every tiny family, then WAN-2.2-5B width
    .venv/bin/python benchmarks/family_steps.py --only tiny     # the tiny families only
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import tempfile
from pathlib import Path

import torch

from step_overhead import _one_clip, step_time_from_logs, timed_steps

from motiontune.config import TrainConfig
from motiontune.testing.tiny_models import FAMILIES, build_tokenizer, make_tiny_model
from motiontune.train.flow import sample_sigmas
from motiontune.train.loop import train

# tiny family → the config keys that select it (A14B models train both experts, as users run them)
FAMILY_KEYS = {
    "wan-2.1": {"model_type": "WAN_2_1_T2V"},
    "wan-2.2-a14b": {"model_type": "WAN_2_2_T2V_A14B", "experts": "both"},
    "wan-2.2-ti2v-5b": {"model_type": "WAN_2_2_TI2V_5B"},
    "wan-2.2-i2v-a14b": {"model_type": "WAN_2_2_I2V_A14B", "experts": "both"},
    "wan-2.1-i2v": {"model_type": "WAN_2_1_I2V"},
    "hi-dream": {"model_type": "HI_DREAM_DEV"},
    "hunyuan-video": {"model_type": "HUNYUAN_VIDEO"},
}
# WAN 2.2 TI2V-5B's transformer width (dim 3072 = 24 heads × 128, ffn 14336, 48 latent channels), 2 layers
WIDE_5B = {"heads": 24, "head_dim": 128, "ffn": 14336, "layers": 2, "text_dim": 4096}


def build_5b_width(folder: Path) -> Path:
    """A TI2V-5B-layout diffusers folder (48-channel VAE, per-token timesteps) with a full-width transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from motiontune.models.wan import calibrate_latent_stats, tiny_vae
    from motiontune.testing.tiny_models import demo_clip_pixels

    torch.manual_seed(0)
    vae = tiny_vae(wide=True)
    calibrate_latent_stats(vae, demo_clip_pixels())  # 48 channels of statistics (the config's defaults are WAN 2.1's 16)
    build_tokenizer(folder / "tokenizer")
    transformer = WanTransformer3DModel(
        num_attention_heads=WIDE_5B["heads"], attention_head_dim=WIDE_5B["head_dim"], ffn_dim=WIDE_5B["ffn"],
        num_layers=WIDE_5B["layers"], text_dim=WIDE_5B["text_dim"], freq_dim=256, in_channels=48, out_channels=48,
    )
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=256, d_model=WIDE_5B["text_dim"], d_kv=16, d_ff=64, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
    ))
    WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"), text_encoder=text_encoder, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=transformer, expand_timesteps=True,
    ).save_pretrained(folder)
    return folder


def motiontune_step_time(model: Path, keys: dict, work: Path, frames: int, resolution: int, steps: int) -> float:
    def run(steps: int) -> Path:
        config = TrainConfig.model_validate({
            **keys, "base_model_name": str(model), "concepts": [{"path": str(_one_clip(work))}],
            "resolution": str(resolution), "epochs": steps, "learning_rate": 1e-4, "train_dtype": "FLOAT_32",
            "lora_rank": 16, "lora_alpha": 16, "workspace_dir": str(work / f"ws{steps}"),
            "output_model_destination": str(work / f"lora{steps}.safetensors"), "cache_dir": str(work / "cache"),
            "sample_after_unit": "NEVER", "video_config": {"max_frames": frames, "target_fps": 16.0},
        })
        with contextlib.redirect_stderr(io.StringIO()):
            train(config)
        return work / f"ws{steps}" / "tensorboard"

    run(2)  # warm-up: fills the cache
    return step_time_from_logs(run(steps))


def bare_loop_step_time(model: Path, keys: dict, work: Path, steps: int) -> float:
    """The same LoRA on the first transformer with the cached batch: the family's forward (its conventions,
    nothing else), MSE, backward, AdamW."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    from motiontune.models import family_for

    config = TrainConfig.model_validate({**keys, "base_model_name": str(model), "concepts": [{"path": "."}], "train_dtype": "FLOAT_32"})
    family = family_for(config, torch.device("cpu"))
    family.load_transformers()
    expert = family.trained_experts()[0]
    transformer = expert.module
    transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=family.lora_target_modules(transformer, "")))
    parameters = [p for n, p in transformer.named_parameters() if "lora_" in n]
    transformer.train()
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    [entry] = [load_file(str(p)) for p in (work / "cache" / "latents").glob("*/*.safetensors")]
    [text] = [load_file(str(p))["value"][None] for p in (work / "cache" / "text").glob("*/*.safetensors")]
    image = entry["image"][None] if "image" in entry else None
    x0, conditioning = family.split_conditioning(entry["value"][None], torch.Generator().manual_seed(0), image)
    sigmas = sample_sigmas(steps + 1, "LOGIT_NORMAL", 1.0, generator=torch.Generator().manual_seed(43))
    generator = torch.Generator().manual_seed(42)

    def step(sigma):
        noise = torch.randn(x0.shape, generator=generator)
        noisy = (1 - sigma) * x0 + sigma * noise
        prediction = family.predict(noisy, sigma[None], text, expert, conditioning)
        torch.nn.functional.mse_loss(prediction, noise - x0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, sigmas)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["tiny", "wide"])
    parser.add_argument("--family", help="one tiny family (e.g. hunyuan-video) instead of all")
    args = parser.parse_args()
    logging.getLogger("motiontune").setLevel(logging.WARNING)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    runs = []
    if args.only != "wide":
        sizes = {"wan-2.2-ti2v-5b": 64, "hi-dream": 64}  # 16x-compressing VAE; an image model (one frame) at 64²
        runs += [(family, FAMILY_KEYS[family], 17, sizes.get(family, 32), 40) for family in FAMILIES
                 if family in FAMILY_KEYS and args.family in (None, family)]
    if args.only != "tiny" and not args.family:
        runs.append(("wan-2.2-5B-width", FAMILY_KEYS["wan-2.2-ti2v-5b"], 17, 256, 10))
    for name, keys, frames, resolution, steps in runs:
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(scratch)
            model = build_5b_width(work / "model") if name.endswith("width") else make_tiny_model(name, work / "model")
            ours = motiontune_step_time(model, keys, work, frames, resolution, steps)
            bare = bare_loop_step_time(model, keys, work, steps)
        print(f"{name:>18}: motiontune {ours * 1000:8.1f} ms/step, bare loop {bare * 1000:8.1f} ms/step, "
              f"ratio {ours / bare:.3f}  ({frames} frames x {resolution}^2)")


if __name__ == "__main__":
    main()
