"""The conventions, end to end: train a LoRA with `motiontune train` on a real clip, then sample with the
stock diffusers WanPipeline (no motiontune code) and check the samples moved towards that clip.

Measured on the CPU build here (8 seeds), MSE ratio with/without LoRA and per-channel statistics ratio:
WAN 2.1 0.60 / 0.45 (1000 steps), WAN 2.2 A14B with both experts 0.69 / 0.43 (2000 steps, split between the
experts by noise level), TI2V-5B 0.67 / 0.55. On WAN 2.1, with the flow target's sign flipped the MSE ratio
is 1.12, and with the latent normalisation left out the statistics ratio is 1.19: each fails an assertion.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import DATA, base_config, write_config
from motiontune.cli import main
from stock_checks import stock_samples

PROMPT = "moving shapes"
SEEDS = range(8)

# Per family: the config keys that differ, and the clip size (TI2V-5B's VAE compresses 16x, so it needs more
# pixels for the same latent grid). Timestep shifts match the tiny models' schedulers.
FAMILIES = {
    "wan-2.1": ({"model_type": "WAN_2_1_T2V", "timestep_shift": 3.0}, 32),
    # two experts share the steps, so each gets about half: twice the steps
    "wan-2.2-a14b": ({"model_type": "WAN_2_2_T2V_A14B", "experts": "both", "timestep_shift": 5.0, "epochs": 2000}, 32),
    "wan-2.2-ti2v-5b": ({"model_type": "WAN_2_2_TI2V_5B", "timestep_shift": 5.0}, 64),
}


def _make_clip(folder: Path, size: int, source: str = "shapes_200px_30fps.mp4", first: int = 90, name: str = "shapes") -> Path:
    """9 frames of a real clip (every other one from frame `first`; the shapes clip's first second is black) at
    size x size, written losslessly at 16 fps, so the test and the trainer read identical pixels."""
    folder.mkdir()
    with av.open(str(DATA / source)) as container:
        frames = [f.to_ndarray(format="rgb24", width=size, height=size) for _, f in zip(range(first + 18), container.decode(video=0))]
    frames = frames[first:]
    clip = folder / f"{name}.mp4"
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("libx264", rate=16)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv444p"
        stream.options = {"qp": "0"}  # lossless: the decoded pixels are the source pixels
        for array in frames[::2]:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        out.mux(stream.encode())
    clip.with_suffix(".txt").write_text(PROMPT + "\n")
    return clip


def _stock_target_latents(pipe, clip: Path) -> torch.Tensor:
    """The clip's latents as the stock pipeline's denoiser sees them: VAE mean, normalised with the VAE config."""
    with av.open(str(clip)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)  # as WanPipeline un-normalises
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    return (latents - mean) / std


def _sample_latents(pipe, size: int, steps: int = 20) -> torch.Tensor:
    return stock_samples(pipe, SEEDS, prompt=PROMPT, height=size, width=size, num_frames=9, num_inference_steps=steps,
                         guidance_scale=1.0)


def _channel_stats_distance(samples: torch.Tensor, target: torch.Tensor) -> float:
    dims = (2, 3, 4)
    mean_gap = (samples.mean(dims) - target.mean(dims)) ** 2
    std_gap = (samples.std(dims) - target.std(dims)) ** 2
    return (mean_gap + std_gap).mean().item()


def _train(tiny_models, tmp: Path, family: str, families: dict = FAMILIES, clip: tuple = (), **more):
    """Train `family` (keys and clip size from `families`, then `more`) with `motiontune train` on the clip
    `_make_clip` makes (of `clip`: its source file, first frame and name; the shapes clip by default)."""
    keys, size = families[family]
    model = tiny_models(family)
    clip = _make_clip(tmp / "data", size, *clip)
    config = base_config(
        tmp, model, clip.parent, resolution=str(size),
        **{"epochs": 1000, "learning_rate": 3e-3, "lora_rank": 16, "lora_alpha": 8,  # alpha != rank: files keep alpha
           "video_config": {"max_frames": 9, "target_fps": 16.0}, **keys, **more},
    )
    assert main(["train", "--config", str(write_config(tmp / "config.json", **config))]) == 0
    return model, clip, Path(config["output_model_destination"]), tmp


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    return _train(tiny_models, tmp_path_factory.mktemp("e2e"), "wan-2.1")


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_pipeline_samples_move_towards_the_trained_clip(family, trained, tiny_models, tmp_path):
    from diffusers import WanPipeline

    model, clip, lora, _ = trained if family == "wan-2.1" else _train(tiny_models, tmp_path, family)
    size = FAMILIES[family][1]
    pipe = WanPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    target = _stock_target_latents(pipe, clip)
    without = _sample_latents(pipe, size)
    if family == "wan-2.2-a14b":  # one file per expert; the low-noise one goes into transformer_2
        pipe.load_lora_weights(str(lora.with_name("lora_high_noise.safetensors")))
        pipe.load_lora_weights(str(lora.with_name("lora_low_noise.safetensors")), load_into_transformer_2=True)
    else:
        pipe.load_lora_weights(str(lora))
    with_lora = _sample_latents(pipe, size)

    mse_ratio = ((with_lora - target) ** 2).mean().item() / ((without - target) ** 2).mean().item()
    stats_ratio = _channel_stats_distance(with_lora, target) / _channel_stats_distance(without, target)
    print(f"{family}: MSE ratio with/without LoRA: {mse_ratio:.3f}; channel statistics ratio: {stats_ratio:.3f}")
    assert mse_ratio < 0.75, "samples did not move towards the clip: sign, timestep or loading convention broken"
    assert stats_ratio < 0.85, "sample statistics do not match the clip's: latent normalisation broken"


def test_default_lora_file_keeps_alpha_and_names(trained):
    """The default format, COMFY_LORA: original WAN names, and alpha beside each module."""
    _, _, lora, _ = trained
    weights = load_file(str(lora))
    assert all(k.startswith("diffusion_model.blocks.") for k in weights)
    assert weights["diffusion_model.blocks.0.self_attn.q.lora_A.weight"].shape[0] == 16
    assert "diffusion_model.blocks.1.ffn.2.lora_B.weight" in weights
    assert weights["diffusion_model.blocks.0.self_attn.q.alpha"].item() == 8


def test_comfy_lora_matches_diffusers_lora(trained, tmp_path):
    """The COMFY_LORA file of a run holds the same update as its DIFFUSERS_LORA file: loaded through
    diffusers' converter for original-Wan (ComfyUI) keys, the transformer gives the same output."""
    from diffusers import WanPipeline

    model, clip, _, _ = trained
    outputs = {}
    for fmt in ("DIFFUSERS_LORA", "COMFY_LORA"):
        config = base_config(
            tmp_path / fmt, model, clip.parent, epochs=20, lora_rank=8, lora_alpha=2,
            output_model_format=fmt, output_model_destination=str(tmp_path / f"{fmt}.safetensors"),
            workspace_dir=str(tmp_path / fmt / "ws"), video_config={"max_frames": 9, "target_fps": 16.0},
        )
        (tmp_path / fmt).mkdir()
        assert main(["train", "--config", str(write_config(tmp_path / fmt / "c.json", **config))]) == 0
        pipe = WanPipeline.from_pretrained(model)
        pipe.load_lora_weights(str(tmp_path / f"{fmt}.safetensors"))
        if fmt == "DIFFUSERS_LORA":  # diffusers names, and alpha in the adapter metadata
            with safe_open(str(tmp_path / f"{fmt}.safetensors"), "pt") as f:
                assert all(k.startswith("transformer.blocks.") for k in f.keys())
                metadata = json.loads(f.metadata()["lora_adapter_metadata"])
            assert metadata["transformer.r"] == 8 and metadata["transformer.lora_alpha"] == 2
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 16, 3, 4, 4, generator=generator)
        text = torch.randn(1, 512, 32, generator=generator)
        with torch.no_grad():
            outputs[fmt] = pipe.transformer(latents, torch.tensor([500.0]), text, return_dict=False)[0]

    comfy = load_file(str(tmp_path / "COMFY_LORA.safetensors"))
    # ComfyUI maps a LoRA key "<x>.lora_A.weight" / "<x>.lora_B.weight" / "<x>.alpha" onto the model weight
    # "<x>.weight" of its WAN model, whose state dict is "diffusion_model." + the original WAN names.
    from diffusers import WanTransformer3DModel

    from motiontune.models.wan import original_name

    stock = WanTransformer3DModel.from_pretrained(model, subfolder="transformer")
    comfy_model = {"diffusion_model." + original_name(k) for k in stock.state_dict()}
    for key in comfy:
        module = next(key[: -len(s)] for s in (".lora_A.weight", ".lora_B.weight", ".alpha") if key.endswith(s))
        assert module + ".weight" in comfy_model, key
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in comfy
    assert "diffusion_model.blocks.0.cross_attn.o.lora_B.weight" in comfy
    assert "diffusion_model.blocks.1.ffn.0.lora_A.weight" in comfy
    assert comfy["diffusion_model.blocks.0.self_attn.q.alpha"].item() == 2.0
    assert torch.allclose(outputs["DIFFUSERS_LORA"], outputs["COMFY_LORA"], atol=1e-5)


def test_comfy_names_are_the_original_wan_names(tiny_models):
    """Every ComfyUI key names an original-Wan module: diffusers' own original→diffusers converter
    (used for single-file WAN checkpoints) maps each one back to the module the LoRA was trained on."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from motiontune.config import TrainConfig
    from motiontune.models.wan import WanFamily

    config = TrainConfig.model_validate({"concepts": [{"path": "."}]})
    family = WanFamily(config, torch.device("cpu"))
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(tiny_models("wan-2.1"), subfolder="transformer")
    modules = family.lora_target_modules(transformer, "blocks,condition_embedder,proj_out")
    original = {family.comfy_lora_key(m).removeprefix("diffusion_model.") + ".weight": torch.zeros(1) for m in modules}
    converted = convert_wan_transformer_to_diffusers(dict(original))
    assert sorted(converted) == sorted(m + ".weight" for m in modules)
