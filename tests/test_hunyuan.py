"""HunyuanVideo against the stock `HunyuanVideoPipeline`: the packed prompt is what the pipeline passes (template,
crop, third-last Llama layer, mask, CLIP pooled), the guidance embedding gets the value × 1000 in training as at
inference, and a LoRA trained with `motiontune train` on a real clip moves the stock pipeline's samples towards
that clip.
"""

from __future__ import annotations


import av
import numpy as np
import pytest
import torch

from conftest import base_config, write_config
from motiontune.cli import main
from stock_checks import stock_samples
from test_lora_end_to_end import PROMPT, SEEDS, _channel_stats_distance, _make_clip


@pytest.fixture(scope="module")
def hunyuan(tiny_models):
    from motiontune.config import TrainConfig
    from motiontune.models.hunyuan import HunyuanVideoFamily

    model = tiny_models("hunyuan-video")
    config = TrainConfig.model_validate({"model_type": "HUNYUAN_VIDEO", "base_model_name": str(model), "train_dtype": "FLOAT_32",
                                         "concepts": [{"path": "."}], "guidance_scale": 3.5})
    family = HunyuanVideoFamily(config, torch.device("cpu"))
    family.load_transformers()
    family.load_text_encoder()
    return model, family


def test_packed_prompt_is_what_the_pipeline_passes(hunyuan):
    from diffusers import HunyuanVideoPipeline

    model, family = hunyuan
    pipe = HunyuanVideoPipeline.from_pretrained(model)
    embeds, pooled, mask = pipe.encode_prompt(prompt=[PROMPT, "a rabbit"], prompt_2=None, device=torch.device("cpu"))
    ours_embeds, ours_mask, ours_pooled = family._unpack(family.encode_prompts([PROMPT, "a rabbit"]))
    assert torch.equal(ours_mask, mask.long())
    assert torch.allclose(ours_embeds, embeds, atol=1e-6) and torch.allclose(ours_pooled, pooled, atol=1e-6)


def test_guidance_is_the_value_times_1000_in_training_as_at_inference(hunyuan):
    from diffusers import HunyuanVideoPipeline

    model, family = hunyuan
    seen = []
    hook = family.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["guidance"].tolist()), with_kwargs=True)
    try:
        text = family.encode_prompts([PROMPT])
        with torch.no_grad():
            family.predict(torch.randn(1, 16, 2, 4, 4), torch.tensor([0.5]), text, family.trained_experts()[0])
        pipe = HunyuanVideoPipeline.from_pretrained(model, transformer=family.transformer)
        pipe.set_progress_bar_config(disable=True)
        pipe(PROMPT, height=32, width=32, num_frames=5, num_inference_steps=1, guidance_scale=3.5, output_type="latent")
    finally:
        hook.remove()
    assert seen[0] == [3500.0] and seen[1] == [3500.0]


def test_stock_pipeline_samples_move_towards_the_trained_clip(tiny_models, tmp_path):
    from diffusers import HunyuanVideoPipeline

    model = tiny_models("hunyuan-video")
    clip = _make_clip(tmp_path / "data", 32)
    # DIFFUSERS_LORA: diffusers' reader of the default (original-layout) file assumes the real model's width, 3072,
    # and the tiny model is 32 wide (the two formats give the same weights: test_lora_formats.py)
    config = base_config(tmp_path, model, clip.parent, model_type="HUNYUAN_VIDEO", resolution="32", epochs=1500,
                         learning_rate=3e-3, lora_rank=16, lora_alpha=8, timestep_shift=7.0, output_model_format="DIFFUSERS_LORA",
                         video_config={"max_frames": 9, "target_fps": 16.0})
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0

    pipe = HunyuanVideoPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    target = _clip_latents(pipe, clip)

    without = _samples(pipe)
    pipe.load_lora_weights(config["output_model_destination"])
    with_lora = _samples(pipe)
    mse_ratio = ((with_lora - target) ** 2).mean().item() / ((without - target) ** 2).mean().item()
    stats_ratio = _channel_stats_distance(with_lora, target) / _channel_stats_distance(without, target)
    print(f"hunyuan-video: MSE ratio with/without LoRA {mse_ratio:.3f}; channel statistics ratio {stats_ratio:.3f}")
    assert mse_ratio < 0.75, "samples did not move towards the clip: timestep, guidance or latent convention broken"
    assert stats_ratio < 0.85


def test_fine_tune_in_the_stock_pipeline(tiny_models, tmp_path):
    """FINE_TUNE on HunyuanVideo: the saved transformer folder, swapped into the stock pipeline, generates
    latents far closer to the clip than the base model. (The original single-file layout: test_lora_formats.py.)"""
    from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    model = tiny_models("hunyuan-video")
    clip = _make_clip(tmp_path / "data", 32)
    config = base_config(tmp_path, model, clip.parent, model_type="HUNYUAN_VIDEO", resolution="32", epochs=200,
                         training_method="FINE_TUNE", output_model_format="DIFFUSERS", output_model_destination=str(tmp_path / "tuned"),
                         learning_rate=1e-3, timestep_shift=7.0, video_config={"max_frames": 9, "target_fps": 16.0})
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0

    pipe = HunyuanVideoPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    target = _clip_latents(pipe, clip)
    base = ((_samples(pipe) - target) ** 2).mean().item()
    pipe.transformer = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "tuned")
    ratio = ((_samples(pipe) - target) ** 2).mean().item() / base
    print(f"hunyuan-video fine-tune: MSE ratio to the clip, fine-tuned / base {ratio:.3f}")
    assert ratio < 0.4  # far closer than the LoRA gets (0.71)


def _clip_latents(pipe, clip):
    with av.open(str(clip)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor  # as the pipeline undoes it


def _samples(pipe, prompt=PROMPT):
    return stock_samples(pipe, SEEDS, prompt=prompt, height=32, width=32, num_frames=9, num_inference_steps=20, guidance_scale=1.0)


def test_embedding_trains_through_both_text_encoders(tiny_models, tmp_path):
    """EMBEDDING on HunyuanVideo: the placeholder's vectors train in the Llama and the CLIP encoder (saved keyed
    llama, clip_l); added to the stock pipeline's tokenizers and embedding tables, the placeholder prompt moves
    samples towards the clip, and a prompt without it is unchanged bit for bit."""
    import json

    from diffusers import HunyuanVideoPipeline
    from safetensors import safe_open

    model = _text_sensitive_model(tiny_models("hunyuan-video"), tmp_path / "model")
    clip = _make_clip(tmp_path / "data", 32)
    (clip.parent / f"{clip.stem}.txt").write_text("<shapes>\n")
    destination = tmp_path / "shapes.safetensors"
    config = base_config(tmp_path, model, clip.parent, model_type="HUNYUAN_VIDEO", resolution="32", epochs=300,
                         training_method="EMBEDDING", output_model_format="SAFETENSORS", output_model_destination=str(destination),
                         embedding_learning_rate=0.2, timestep_shift=7.0, video_config={"max_frames": 9, "target_fps": 16.0},
                         embedding={"placeholder": "<shapes>", "token_count": 8, "initial_embedding_text": "shapes"})
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0

    pipe = HunyuanVideoPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    target = _clip_latents(pipe, clip)
    before, plain_before = _samples(pipe, "<shapes>"), _samples(pipe)
    with safe_open(str(destination), "pt") as f:
        assert sorted(f.keys()) == ["clip_l", "llama"]
        tokens = json.loads(f.metadata()["tokens"])
        for key, (tokenizer, encoder) in {"llama": (pipe.tokenizer, pipe.text_encoder), "clip_l": (pipe.tokenizer_2, pipe.text_encoder_2)}.items():
            tokenizer.add_tokens(tokens)
            ids = tokenizer.convert_tokens_to_ids(tokens)
            if max(ids) >= encoder.get_input_embeddings().num_embeddings:
                encoder.resize_token_embeddings(max(ids) + 1)
            with torch.no_grad():
                encoder.get_input_embeddings().weight[ids] = f.get_tensor(key)
    after = _samples(pipe, "".join(tokens))
    ratio = ((after - target) ** 2).mean().item() / ((before - target) ** 2).mean().item()
    print(f"hunyuan-video embedding: MSE ratio to the clip with / without the trained vectors {ratio:.3f}")
    assert ratio < 0.95  # measured 0.908 (0.98 on the tiny model as built, which hardly hears its prompt)
    assert torch.equal(_samples(pipe), plain_before)


def _text_sensitive_model(model, folder):
    """The tiny HunyuanVideo made to listen to its prompt: as built, two prompts' samples differ by 0.1% of their
    variance; with the pooled-text projection (CLIP's path into every block's modulation) 10x stronger, by
    about 40%."""
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline.from_pretrained(model)
    with torch.no_grad():
        pipe.transformer.time_text_embed.text_embedder.linear_2.weight.mul_(10.0)
    pipe.save_pretrained(folder)
    return folder
