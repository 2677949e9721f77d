"""Image-to-video training matches the stock `WanImageToVideoPipeline`: the cached condition channels are
the pipeline's own, and a LoRA trained with motiontune moves the stock pipeline's samples (given the clip's
first frame) towards the clip. WAN 2.2 I2V A14B (36 input channels, two experts) and TI2V-5B's
image-to-video mode (clean first latent frame at timestep 0), WAN 2.1 I2V (36 channels and the CLIP image
encoder's embedding of the first frame).

Measured on the CPU build here (8 seeds), MSE / channel-statistics ratios with/without the LoRA, printed by the
test: WAN 2.1 I2V 0.553 / 0.397, A14B 0.531 / 0.520, TI2V-5B 0.613 / 0.511 (400 steps at 6e-3, A14B 800; with
1000 steps at 3e-3, A14B 2000: 0.494 / 0.379, 0.475 / 0.421, 0.610 / 0.531).
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import base_config, write_config
from motiontune.cli import main
from stock_checks import stock_samples
from test_lora_end_to_end import PROMPT, SEEDS, _channel_stats_distance, _make_clip, _stock_target_latents, _train

# The first frame given makes the clip easier to learn than from text alone: 400 steps at twice text-to-video's
# learning rate (800 for A14B's two experts) keep a wide margin (figures in the module docstring)
FAST = {"epochs": 400, "learning_rate": 6e-3}
FAMILIES = {
    # keys, clip size
    "wan-2.1-i2v": ({"model_type": "WAN_2_1_I2V", "timestep_shift": 3.0, **FAST}, 32),
    "wan-2.2-i2v-a14b": ({"model_type": "WAN_2_2_I2V_A14B", "experts": "both", "timestep_shift": 5.0, **FAST, "epochs": 800}, 32),
    "wan-2.2-ti2v-5b": ({"model_type": "WAN_2_2_TI2V_5B", "image_conditioning_probability": 1.0, "timestep_shift": 5.0, **FAST}, 64),
}


def _first_frame(clip: Path) -> np.ndarray:
    with av.open(str(clip)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


def test_cached_condition_is_the_pipelines_own(tiny_models, tmp_path):
    """The mask + first-frame latents motiontune caches equal what WanImageToVideoPipeline.prepare_latents builds."""
    from diffusers import WanImageToVideoPipeline

    from motiontune.config import TrainConfig
    from motiontune.models.wan import WanFamily

    model = tiny_models("wan-2.2-i2v-a14b")
    clip = _make_clip(tmp_path / "data", 32)
    with av.open(str(clip)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    config = TrainConfig.model_validate({"model_type": "WAN_2_2_I2V_A14B", "base_model_name": str(model), "experts": "both",
                                         "concepts": [{"path": str(clip.parent)}], "train_dtype": "FLOAT_32"})
    family = WanFamily(config, torch.device("cpu"))
    family.load_vae()
    stored = family.encode_video(frames)
    assert stored.shape[0] == 36  # 16 latents + 4 mask + 16 condition

    pipe = WanImageToVideoPipeline.from_pretrained(model)
    image = pipe.video_processor.preprocess(Image.fromarray(frames[0]), height=32, width=32).float()
    with torch.no_grad():
        _, condition = pipe.prepare_latents(image, 1, 16, 32, 32, len(frames), torch.float32, torch.device("cpu"),
                                            torch.Generator().manual_seed(0))
    assert torch.allclose(stored[16:], condition[0], atol=1e-5), (stored[16:] - condition[0]).abs().max()
    # and the first 16 channels are the clip's latents as the stock pipeline normalises them
    assert torch.allclose(stored[:16], _stock_target_latents(pipe, clip)[0], atol=1e-5)


def test_cached_image_embedding_is_the_pipelines_own(tiny_models, tmp_path):
    """WAN 2.1 I2V: the CLIP embedding cached with a clip equals WanImageToVideoPipeline.encode_image of its first frame,
    and a second run reads it from the cache."""
    from diffusers import WanImageToVideoPipeline

    from motiontune.config import TrainConfig
    from motiontune.data.cache import Cache
    from motiontune.data.latents import Encoding
    from motiontune.data.survey import survey_dataset
    from motiontune.models.wan import WanFamily

    model = tiny_models("wan-2.1-i2v")
    clip = _make_clip(tmp_path / "data", 32)
    config = TrainConfig.model_validate({"model_type": "WAN_2_1_I2V", "base_model_name": str(model), "resolution": "32",
                                         "concepts": [{"path": str(clip.parent)}], "train_dtype": "FLOAT_32",
                                         "video_config": {"max_frames": 9, "target_fps": 16.0}})
    encoded = {}
    for run in ("first", "second"):
        family = WanFamily(config, torch.device("cpu"))
        encoding = Encoding(family, config, Cache(tmp_path / "cache"))
        [encoded[run]] = encoding.clips(survey_dataset(config, family))
        assert encoding.calls["video"] == (1 if run == "first" else 0)
    pipe = WanImageToVideoPipeline.from_pretrained(model)
    expected = pipe.encode_image(Image.fromarray(_first_frame(clip)), torch.device("cpu"))[0]
    for run in encoded.values():
        assert run.image_embeds.shape == expected.shape
        assert torch.allclose(run.image_embeds, expected, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_i2v_pipeline_samples_move_towards_the_trained_clip(family, tiny_models, tmp_path):
    from diffusers import WanImageToVideoPipeline

    model, clip, lora, _ = _train(tiny_models, tmp_path, family, FAMILIES)
    size = FAMILIES[family][1]
    pipe = WanImageToVideoPipeline.from_pretrained(model)  # TI2V-5B: its folder says expand_timesteps
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(_first_frame(clip))
    target = _stock_target_latents(pipe, clip)

    def samples():
        return stock_samples(pipe, SEEDS, image=image, prompt=PROMPT, height=size, width=size, num_frames=9,
                             num_inference_steps=20, guidance_scale=1.0)

    without = samples()
    if family == "wan-2.2-i2v-a14b":  # one file per expert
        pipe.load_lora_weights(str(lora.with_name("lora_high_noise.safetensors")))
        pipe.load_lora_weights(str(lora.with_name("lora_low_noise.safetensors")), load_into_transformer_2=True)
    else:
        pipe.load_lora_weights(str(lora))
    with_lora = samples()
    # the frames the model generates (TI2V-5B copies the given first latent frame in)
    generated = slice(1, None) if family == "wan-2.2-ti2v-5b" else slice(None)
    with_lora, without, target = with_lora[:, :, generated], without[:, :, generated], target[:, :, generated]
    mse_ratio = ((with_lora - target) ** 2).mean().item() / ((without - target) ** 2).mean().item()
    stats_ratio = _channel_stats_distance(with_lora, target) / _channel_stats_distance(without, target)
    print(f"{family} image-to-video: MSE ratio with/without LoRA {mse_ratio:.3f}; channel statistics ratio {stats_ratio:.3f}")
    assert mse_ratio < 0.75, "samples did not move towards the clip: the condition or timestep convention is broken"
    assert stats_ratio < 0.85


def test_ti2v_conditioned_first_frame_is_left_out_of_the_loss(tiny_models):
    """TI2V-5B image-to-video: the first latent frame is the clean one, its tokens at timestep 0, and it is
    not in the loss; unconditioned samples in the same batch are untouched."""
    from motiontune.config import TrainConfig
    from motiontune.models.wan import WanFamily

    model = tiny_models("wan-2.2-ti2v-5b")
    config = TrainConfig.model_validate({"model_type": "WAN_2_2_TI2V_5B", "base_model_name": str(model), "train_dtype": "FLOAT_32",
                                         "concepts": [{"path": "."}], "image_conditioning_probability": 0.5})
    family = WanFamily(config, torch.device("cpu"))
    family.load_transformers()
    expert = family.trained_experts()[0]
    stored = torch.randn(8, 48, 3, 2, 2)
    x0, conditioning = family.split_conditioning(stored, torch.Generator().manual_seed(0))
    rows = conditioning.rows
    assert 0 < rows.sum() < 8  # about half conditioned
    assert torch.equal(conditioning.loss_frames[rows, 0], torch.zeros(int(rows.sum())))
    assert torch.equal(conditioning.loss_frames[~rows], torch.ones(int((~rows).sum()), 3))

    # the transformer sees the clean first frame at timestep 0 for conditioned rows: its prediction there
    # equals the prediction for an input whose first frame is clean
    noisy = torch.randn_like(x0)
    sigma = torch.full((8,), 0.7)
    text = torch.zeros(8, 512, 32)
    seen = {}
    hook = expert.module.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    with torch.no_grad():
        family.predict(noisy, sigma, text, expert, conditioning)
    hook.remove()
    hidden, timestep = seen["hidden_states"], seen["timestep"]
    assert torch.equal(hidden[rows][:, :, 0], x0[rows][:, :, 0])
    assert torch.equal(hidden[~rows], noisy[~rows])
    tokens_per_frame = timestep.shape[1] // 3
    assert torch.all(timestep[rows][:, :tokens_per_frame] == 0) and torch.all(timestep[rows][:, tokens_per_frame:] == 700)
    assert torch.all(timestep[~rows] == 700)


@pytest.mark.parametrize("family", ["wan-2.1-i2v", "hi-dream"])
def test_samples_during_training(family, tiny_models, tmp_path, dataset):
    """Samples render with the stock pipelines while training: image-to-video from the sample's `image`
    (with classifier-free guidance, so the negative prompt path runs too), and HiDream as one-frame videos."""
    from test_training import frame_count

    clip = _make_clip(tmp_path / "data", 64)
    image = tmp_path / "first.png"
    Image.fromarray(_first_frame(clip)).save(image)
    if family == "hi-dream":
        keys = {"model_type": "HI_DREAM_DEV", "resolution": "64", "video_config": {"max_frames": 1, "target_fps": 8.0}}
        sample = {"prompt": PROMPT, "frames": 1, "height": 64, "width": 64, "steps": 2, "cfg_scale": 2.0}
    else:
        keys = {"model_type": "WAN_2_1_I2V"}
        sample = {"prompt": PROMPT, "frames": 5, "height": 32, "width": 32, "steps": 2, "cfg_scale": 2.0, "image": str(image)}
    config = base_config(tmp_path, tiny_models(family), dataset, epochs=2, samples=[sample], sample_after_unit="EPOCH",
                         sample_after=2, **keys)
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0
    assert frame_count(tmp_path / "workspace" / "samples" / "epoch2-0.mp4") == (sample["frames"], sample["height"], sample["width"])


def test_image_to_video_samples_need_an_image(tiny_models, tmp_path, dataset, capsys):
    config = base_config(tmp_path, tiny_models("wan-2.2-i2v-a14b"), dataset, model_type="WAN_2_2_I2V_A14B", experts="both",
                         samples=[{"prompt": PROMPT}])
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 2
    assert "samples[0].image: WAN_2_2_I2V_A14B makes videos from a first frame" in capsys.readouterr().err
