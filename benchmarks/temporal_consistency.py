"""Does `temporal_consistency_weight` change the motion of samples? Train the tiny WAN model on one real
clip with weight 0 and with weight 1 (same seed and steps), sample both with the stock WanPipeline, and
compare a temporal metric of the samples with the clip's: the mean absolute frame-to-frame difference of
the latents, and the MSE between the samples' frame differences and the clip's.

    .venv/bin/python benchmarks/temporal_consistency.py
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import av
import numpy as np
import torch

from motiontune.config import TrainConfig
from motiontune.data.video import write_video
from motiontune.testing.tiny_models import make_tiny_model
from motiontune.train.loop import train

SHAPES = Path(__file__).resolve().parents[1] / "tests" / "data" / "shapes_200px_30fps.mp4"
STEPS, SEEDS, SIZE = 1000, 8, 32


def clip_frames(folder: Path) -> Path:
    """9 frames of the shapes clip from 3 s in (it moves there), 16 fps, 32x32."""
    with av.open(str(SHAPES)) as container:
        frames = [f.to_ndarray(format="rgb24", width=SIZE, height=SIZE) for _, f in zip(range(108), container.decode(video=0))]
    folder.mkdir()
    write_video(folder / "shapes.mp4", np.stack(frames[90::2]), 16)
    (folder / "shapes.txt").write_text("moving shapes\n")
    return folder / "shapes.mp4"


def frame_differences(latents: torch.Tensor) -> torch.Tensor:
    return latents.diff(dim=2)


def main() -> None:
    from diffusers import WanPipeline

    logging.getLogger("motiontune").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model = make_tiny_model("wan-2.1", work / "model")
        clip = clip_frames(work / "data")
        pipe = WanPipeline.from_pretrained(model)
        pipe.set_progress_bar_config(disable=True)
        with av.open(str(clip)) as container:
            pixels = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        with torch.no_grad():
            x = torch.from_numpy(pixels).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
            latents = pipe.vae.encode(x).latent_dist.mean
        mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
        target = (latents - mean) / std
        target_motion = frame_differences(target)
        print(f"clip: mean |frame-to-frame latent difference| {target_motion.abs().mean():.4f}")
        for weight in (0.0, 1.0):
            config = TrainConfig.model_validate({
                "model_type": "WAN_2_1_T2V", "base_model_name": str(model), "concepts": [{"path": str(clip.parent)}],
                "resolution": str(SIZE), "epochs": STEPS, "learning_rate": 3e-3, "train_dtype": "FLOAT_32", "lora_rank": 16,
                "lora_alpha": 8, "timestep_shift": 3.0, "sample_after_unit": "NEVER", "backup_after_unit": "NEVER",
                "workspace_dir": str(work / f"ws{weight}"), "cache_dir": str(work / "cache"),
                "output_model_destination": str(work / f"lora{weight}.safetensors"),
                "video_config": {"max_frames": 9, "target_fps": 16.0, "temporal_consistency_weight": weight},
            })
            with contextlib.redirect_stderr(io.StringIO()):
                train(config)
            pipe.load_lora_weights(str(work / f"lora{weight}.safetensors"), adapter_name=f"w{int(weight)}")
            pipe.set_adapters([f"w{int(weight)}"])
            samples = torch.cat([
                pipe("moving shapes", height=SIZE, width=SIZE, num_frames=9, num_inference_steps=20, guidance_scale=1.0,
                     output_type="latent", generator=torch.Generator().manual_seed(seed)).frames
                for seed in range(SEEDS)
            ])
            motion = frame_differences(samples)
            print(f"weight {weight:g}: samples' mean |frame difference| {motion.abs().mean():.4f}, "
                  f"MSE of frame differences against the clip's {((motion - target_motion) ** 2).mean():.4f}, "
                  f"MSE to the clip {((samples - target) ** 2).mean():.4f}")


if __name__ == "__main__":
    main()
