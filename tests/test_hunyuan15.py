"""HunyuanVideo 1.5 against the stock `HunyuanVideo15Pipeline` / `HunyuanVideo15ImageToVideoPipeline`: the packed
prompt is what the pipeline passes (chat template, crop, third-last Qwen layer, masks, ByT5 glyph text), training's
shortened text gives the pipeline's full-length prediction, the cached image-to-video condition is the pipeline's
own, and a LoRA trained with `motiontune train` on a real clip moves the stock pipeline's samples towards that clip
(text-to-video and image-to-video), while a run with the flow target's sign flipped does not. The default LoRA file
names original-layout (ComfyUI) modules and holds the same update as the diffusers file.

Measured here (2 seeds, 100 steps), MSE / per-channel statistics ratios with / without the LoRA: text-to-video
0.25 / 0.10, image-to-video 0.25 / 0.12; with the target's sign flipped 1.64 / 2.66.

diffusers 0.42.1 has no LoRA loader mixin for HunyuanVideo 1.5, so the stock way to load a LoRA there is the
transformer's own `load_lora_adapter(path, prefix="transformer")`.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import base_config, write_config
from motiontune.cli import main
from motiontune.methods import lora
from test_lora_end_to_end import PROMPT, _channel_stats_distance, _make_clip
from test_lora_formats import also_saved_as

SIZE = 64  # 16x VAE: a 4 x 4 latent grid
SEEDS = range(2)
TRAINING = {"resolution": str(SIZE), "epochs": 100, "learning_rate": 1e-2, "lora_rank": 16, "lora_alpha": 8,
            "timestep_shift": 5.0, "video_config": {"max_frames": 9, "target_fps": 16.0}}


def _frames(clip: Path) -> np.ndarray:
    with av.open(str(clip)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _family(model: Path, model_type: str):
    from motiontune.config import TrainConfig
    from motiontune.models.hunyuan15 import HunyuanVideo15Family

    config = TrainConfig.model_validate({"model_type": model_type, "base_model_name": str(model), "train_dtype": "FLOAT_32",
                                         "concepts": [{"path": "."}]})
    return HunyuanVideo15Family(config, torch.device("cpu"))


def _train(tiny, tmp: Path, model_type: str, **keys):
    """A LoRA run on the clip: the default (COMFY_LORA) file, and the same adapters as DIFFUSERS_LORA beside it."""
    clip = _make_clip(tmp / "data", SIZE)
    config = base_config(tmp, tiny, clip.parent, model_type=model_type, **{**TRAINING, **keys})
    with also_saved_as(lora, "DIFFUSERS_LORA", lambda path: path.with_name(f"{path.stem}-diffusers{path.suffix}")):
        assert main(["train", "--config", str(write_config(tmp / "config.json", **config))]) == 0
    destination = Path(config["output_model_destination"])
    return clip, destination, destination.with_name(f"{destination.stem}-diffusers{destination.suffix}")


def _target(pipe, clip: Path) -> torch.Tensor:
    """The clip's latents as the stock pipeline's denoiser sees them (it divides by scaling_factor to decode)."""
    pixels = torch.from_numpy(_frames(clip)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor


def _samples(pipe, **inputs) -> torch.Tensor:
    return torch.cat([pipe(prompt=PROMPT, num_frames=9, num_inference_steps=8, output_type="latent",
                           generator=torch.Generator().manual_seed(seed), **inputs).frames for seed in SEEDS])


_BASE_SAMPLES = {}  # model folder → the base model's samples (the negative control reuses them)


def _ratios(pipe, clip: Path, lora_file: Path, **inputs) -> tuple[float, float]:
    """(MSE, channel statistics) distance to the clip with / without the LoRA, in the stock pipeline."""
    from diffusers import ClassifierFreeGuidance

    pipe.guider = ClassifierFreeGuidance(guidance_scale=1.0)
    pipe.set_progress_bar_config(disable=True)
    target = _target(pipe, clip)
    key = str(pipe.transformer.config._name_or_path)
    without = _BASE_SAMPLES[key] = _BASE_SAMPLES[key] if key in _BASE_SAMPLES else _samples(pipe, **inputs)
    pipe.transformer.load_lora_adapter(str(lora_file), prefix="transformer")
    with_lora = _samples(pipe, **inputs)
    pipe.transformer.unload_lora()
    mse = ((with_lora - target) ** 2).mean().item() / ((without - target) ** 2).mean().item()
    stats = _channel_stats_distance(with_lora, target) / _channel_stats_distance(without, target)
    return mse, stats


@pytest.fixture(scope="module")
def t2v(tiny_models, tmp_path_factory):
    model = tiny_models("hunyuan-video-1.5")
    return (model, *_train(model, tmp_path_factory.mktemp("hv15-t2v"), "HUNYUAN_VIDEO_1_5"))


def test_packed_prompt_is_what_the_pipeline_passes(tiny_models):
    from diffusers import HunyuanVideo15Pipeline

    model = tiny_models("hunyuan-video-1.5")
    family = _family(model, "HUNYUAN_VIDEO_1_5")
    family.load_text_encoder()
    prompts = [PROMPT, 'a sign that says "moving shapes"']  # the second has glyph text for ByT5
    pipe = HunyuanVideo15Pipeline.from_pretrained(model)
    expected = pipe.encode_prompt(prompt=prompts, device=torch.device("cpu"), dtype=torch.float32, batch_size=2)
    ours = family._unpack(family.encode_prompts(prompts))
    assert ours[1].sum(1).tolist() == expected[1].sum(1).tolist() and ours[3][0].sum() == 0 < ours[3][1].sum()
    for got, want in zip(ours, expected):
        assert torch.allclose(got.float(), want.float(), atol=1e-6)


def test_prediction_equals_the_pipelines_full_length_call(tiny_models):
    """Training passes the text up to the longest prompt only (and one zero image token for text-to-video); the
    prediction equals the transformer called as HunyuanVideo15Pipeline calls it: 1000 + 256 text tokens, 729 zero
    image tokens, zero condition channels."""
    from motiontune.models.hunyuan15 import T2V_IMAGE_TOKENS

    family = _family(tiny_models("hunyuan-video-1.5"), "HUNYUAN_VIDEO_1_5")
    family.load_transformers()
    family.load_text_encoder()
    text = family.encode_prompts([PROMPT, 'a sign that says "hello" in a city street'])
    noisy = torch.randn(2, 8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    embeds, mask, glyph, glyph_mask = family._unpack(text)
    with torch.no_grad():
        ours = family.predict(noisy, torch.tensor([0.5, 0.3]), text, family.trained_experts()[0])
        stock = family.transformer(
            hidden_states=torch.cat([noisy, torch.zeros(2, 9, 3, 4, 4)], dim=1), timestep=torch.tensor([500.0, 300.0]),
            encoder_hidden_states=embeds, encoder_attention_mask=mask.float(), encoder_hidden_states_2=glyph,
            encoder_attention_mask_2=glyph_mask.float(), image_embeds=torch.zeros(2, T2V_IMAGE_TOKENS, 32), return_dict=False)[0]
    assert torch.allclose(ours, stock, atol=1e-5), (ours - stock).abs().max()


def test_cached_condition_is_the_pipelines_own(tiny_models, tmp_path):
    """Image-to-video: the condition latents + mask cached with a clip, and its first frame's SigLIP embedding, equal
    what HunyuanVideo15ImageToVideoPipeline builds from that frame."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline

    model = tiny_models("hunyuan-video-1.5-i2v")
    frames = _frames(_make_clip(tmp_path / "data", SIZE))
    family = _family(model, "HUNYUAN_VIDEO_1_5_I2V")
    family.load_vae()
    stored, embeds = family.encode_video(frames), family.encode_first_frame(frames[0])
    assert stored.shape == (17, 3, 4, 4)  # 8 latents + 8 condition + 1 mask

    pipe = HunyuanVideo15ImageToVideoPipeline.from_pretrained(model)
    image = Image.fromarray(frames[0])
    with torch.no_grad():
        condition, mask = pipe.prepare_cond_latents_and_mask(torch.zeros(1, 8, 3, 4, 4), image, 1, SIZE, SIZE,
                                                             torch.float32, torch.device("cpu"))
        expected_embeds = pipe.encode_image(image, 1, torch.device("cpu"), torch.float32)[0]
    assert torch.allclose(stored[8:16], condition[0], atol=1e-5) and torch.equal(stored[16:], mask[0])
    assert torch.allclose(embeds, expected_embeds, atol=1e-5)


def test_stock_pipeline_samples_move_towards_the_trained_clip(t2v):
    from diffusers import HunyuanVideo15Pipeline

    model, clip, _, diffusers_lora = t2v
    pipe = HunyuanVideo15Pipeline.from_pretrained(model)
    mse, stats = _ratios(pipe, clip, diffusers_lora, height=SIZE, width=SIZE)
    print(f"hunyuan-video-1.5: MSE ratio with/without LoRA {mse:.3f}; channel statistics ratio {stats:.3f}")
    assert mse < 0.75, "samples did not move towards the clip: timestep, condition or latent convention broken"
    assert stats < 0.85


def test_flipped_target_fails_the_check(tiny_models, tmp_path):
    """Negative control: the same run with the flow target's sign flipped does not pass the check above."""
    from diffusers import HunyuanVideo15Pipeline

    from motiontune.train import step

    model = tiny_models("hunyuan-video-1.5")
    flow_target = step.flow_target
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step, "flow_target", lambda x0, noise: -flow_target(x0, noise))
        clip, _, diffusers_lora = _train(model, tmp_path, "HUNYUAN_VIDEO_1_5")
    mse, stats = _ratios(HunyuanVideo15Pipeline.from_pretrained(model), clip, diffusers_lora, height=SIZE, width=SIZE)
    print(f"hunyuan-video-1.5, target sign flipped: MSE ratio {mse:.3f}; channel statistics ratio {stats:.3f}")
    assert mse > 0.75


def test_stock_i2v_pipeline_samples_move_towards_the_trained_clip(tiny_models, tmp_path):
    from diffusers import HunyuanVideo15ImageToVideoPipeline

    model = tiny_models("hunyuan-video-1.5-i2v")
    clip, _, diffusers_lora = _train(model, tmp_path, "HUNYUAN_VIDEO_1_5_I2V")
    pipe = HunyuanVideo15ImageToVideoPipeline.from_pretrained(model)
    image = Image.fromarray(_frames(clip)[0])  # the pipeline sizes the video from it: 64 x 64 (target_size 64)
    mse, stats = _ratios(pipe, clip, diffusers_lora, image=image)
    print(f"hunyuan-video-1.5-i2v: MSE ratio with/without LoRA {mse:.3f}; channel statistics ratio {stats:.3f}")
    assert mse < 0.75, "samples did not move towards the clip: the condition or timestep convention is broken"
    assert stats < 0.85


def test_default_lora_names_original_layout_weights_with_the_diffusers_update(t2v):
    """The default (COMFY_LORA) file: every key is `diffusion_model.<original module>` + lora_A / lora_B / alpha of a
    weight in the original-layout state dict ComfyUI reads (its HunyuanVideo model's names: q, k, v fused as
    `img_attn_qkv` / `txt_attn_qkv`), with matching shapes; applied as ComfyUI applies a LoRA (W += B·A · alpha /
    rank of the entry), then split back into diffusers' modules, it changes the transformer exactly as the same run's
    DIFFUSERS_LORA file does in diffusers."""
    from diffusers import HunyuanVideo15Transformer3DModel

    model, _, comfy_file, diffusers_lora = t2v
    family = _family(model, "HUNYUAN_VIDEO_1_5")
    stock = HunyuanVideo15Transformer3DModel.from_pretrained(model, subfolder="transformer")
    original = family.single_file_state_dict(stock, torch.float32)
    # every weight named once: q, k, v fused (weights and biases) in each double block and each refiner block
    config = stock.config
    assert len(original) == len(stock.state_dict()) - 8 * config.num_layers - 4 * config.num_refiner_layers
    assert {"double_blocks.1.txt_attn_qkv.weight", "double_blocks.0.img_attn_q_norm.weight", "double_blocks.0.img_mod.linear.weight",
            "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight", "vision_in.proj.4.weight", "byt5_in.fc3.weight",
            "final_layer.adaLN_modulation.1.weight", "cond_type_embedding.weight", "img_in.proj.weight"} <= set(original)
    comfy = load_file(str(comfy_file))
    rank, alpha = TRAINING["lora_rank"], TRAINING["lora_alpha"]
    assert comfy["diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight"].shape[0] == 3 * rank
    assert comfy["diffusion_model.double_blocks.0.img_attn_qkv.alpha"].item() == 3 * alpha  # alpha / rank kept
    assert comfy["diffusion_model.double_blocks.1.txt_mlp.fc2.alpha"].item() == alpha
    applied = dict(original)
    for key in [k for k in comfy if k.endswith(".lora_A.weight")]:
        module = key.removeprefix("diffusion_model.").removesuffix(".lora_A.weight")
        down, up = comfy[key], comfy[key.replace("lora_A", "lora_B")]
        scale = comfy[key.replace("lora_A.weight", "alpha")].item() / down.shape[0]
        weight = original[f"{module}.weight"]
        assert (up.shape[0], down.shape[1]) == weight.shape, key
        applied[f"{module}.weight"] = weight + scale * up @ down
    diffusers_file = load_file(str(diffusers_lora))
    stock.load_lora_adapter(str(diffusers_lora), prefix="transformer")
    stock.fuse_lora()
    stock.unload_lora()
    changed = 0
    for key, reference in stock.state_dict().items():
        if key.startswith("transformer_blocks.") and key.endswith(".weight"):
            name = key.removesuffix(".weight")
            fused, parts = family.original_module(name)
            rows = applied[f"{fused}.weight"].chunk(len(parts))[parts.index(name)]  # this part's rows
            assert torch.allclose(reference, rows, atol=1e-6), key
            changed += not torch.equal(rows, original[f"{fused}.weight"].chunk(len(parts))[parts.index(name)])
    # (the last block's text-side modules get no gradient: its text stream is not used after it)
    trained = [k for k, v in diffusers_file.items() if k.endswith(".lora_B.weight") and v.any()]
    assert changed == len(trained) > 0


def test_memory_options_give_the_same_gradients(tiny_models):
    """The LoRA gradients of one prediction through plain checkpointing, CPU_OFFLOADED checkpointing and fully
    offloaded blocks are equal (train/memory.py works on the blocks `fsdp_units` lists)."""
    from peft import LoraConfig

    from motiontune.train import memory

    family = _family(tiny_models("hunyuan-video-1.5"), "HUNYUAN_VIDEO_1_5")
    family.load_text_encoder()
    text = family.encode_prompts([PROMPT])
    gradients, hosts = {}, None
    for mode in ("ON", "CPU_OFFLOADED", "offloaded"):
        family.load_transformers()
        model = family.transformer
        torch.manual_seed(0)
        model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "add_v_proj"], init_lora_weights="gaussian"))
        host = memory.HostCheckpoint(torch.device("cpu")) if mode == "CPU_OFFLOADED" else None
        model.enable_gradient_checkpointing(**({"gradient_checkpointing_func": host} if host else {}))
        hosts = hosts if host is None else host
        if mode == "offloaded":
            offloader = memory.BlockOffloader(family.fsdp_units(model), 1.0, 1, torch.device("cpu"))
        model.train()
        noisy = torch.randn(1, 8, 3, 4, 4, generator=torch.Generator().manual_seed(1))
        family.predict(noisy, torch.tensor([0.6]), text, family.trained_experts()[0]).square().mean().backward()
        gradients[mode] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    assert gradients["ON"].norm() > 0 and hosts.peak_host_bytes > 0
    assert torch.equal(gradients["CPU_OFFLOADED"], gradients["ON"]) and torch.equal(gradients["offloaded"], gradients["ON"])
    assert offloader.max_resident <= 1


@pytest.mark.parametrize("keys", [
    {"train_dtype": "BFLOAT_16", "gradient_checkpointing": "CPU_OFFLOADED", "layer_offload_fraction": 0.5,
     "transformer": {"train": True, "weight_dtype": "FLOAT_8"}},
    {"model_type": "HUNYUAN_VIDEO_1_5_I2V", "transformer": {"train": True, "weight_dtype": "NFLOAT_4"},
     "text_encoder": {"train": False, "weight_dtype": "FLOAT_8"}},
], ids=["bf16-offloaded-float8", "i2v-nf4-float8-text-encoder"])
def test_memory_options_train(keys, tiny_models, tmp_path):
    """bf16 training, CPU_OFFLOADED checkpointing, layer offloading, FLOAT_8 / NFLOAT_4 frozen weights and a FLOAT_8
    Qwen: a run finishes and saves a finite LoRA."""
    model_type = keys.get("model_type", "HUNYUAN_VIDEO_1_5")
    model = tiny_models("hunyuan-video-1.5-i2v" if model_type.endswith("I2V") else "hunyuan-video-1.5")
    clip = _make_clip(tmp_path / "data", SIZE)
    config = base_config(tmp_path, model, clip.parent, **{**TRAINING, "epochs": 3, "model_type": model_type, **keys})
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0
    weights = load_file(config["output_model_destination"])
    assert weights and all(torch.isfinite(v).all() for v in weights.values())


def test_config_refuses_what_the_model_has_not(tiny_models, tmp_path):
    from motiontune.config import ConfigError
    from motiontune.configure import load_config

    path = write_config(tmp_path / "c.json", **base_config(tmp_path, tiny_models("hunyuan-video-1.5"), tmp_path,
                                                          model_type="HUNYUAN_VIDEO_1_5", guidance_scale=3.5,
                                                          video_config={"use_temporal_attention": False}))
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert "guidance_scale = 3.5" in str(error.value) and "use_temporal_attention = false" in str(error.value)


def test_estimate_of_the_released_model_reads_no_weights():
    """`motiontune estimate`'s step on the preset: the 480p release's embedded config (its Hub id is not on this
    machine, nothing is downloaded): 8.3B parameters, 15.5 GB of bf16 weights in 54 blocks; activations simulated
    through the stock transformer on fake tensors. (`motiontune estimate` on both presets: docs/memory.md.)"""
    from motiontune.configure import load_config
    from motiontune.estimate.step import estimate

    result = estimate(load_config("#hunyuan video 1.5 LoRA", ["samples=[]"]))
    assert "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v" in result.source
    lines = {line.name: line for line in result.lines}
    assert lines["frozen weights"].note.startswith("54 blocks × 0.281 GB")
    assert 16.5e9 < lines["frozen weights"].device < 16.8e9 and result.blocks == 54
    assert 2e9 < lines["activations (checkpointing ON)"].device < 20e9


def test_fine_tune_and_embedding_runs_save_what_the_stock_parts_load(tiny_models, tmp_path):
    """FINE_TUNE: the saved transformer folder loads as the stock HunyuanVideo15Transformer3DModel with changed
    block weights. EMBEDDING: the placeholder's vectors train in the Qwen2.5-VL encoder and are saved keyed
    `qwen25_7b` (ComfyUI's name for it); the ByT5 glyph encoder, which reads quoted text only, stays as it is."""
    from diffusers import HunyuanVideo15Transformer3DModel
    from safetensors import safe_open

    model = tiny_models("hunyuan-video-1.5")
    clip = _make_clip(tmp_path / "data", SIZE)
    tuned = tmp_path / "tuned"
    config = base_config(tmp_path / "ft", model, clip.parent, **{**TRAINING, "epochs": 3, "model_type": "HUNYUAN_VIDEO_1_5",
                         "training_method": "FINE_TUNE", "output_model_format": "DIFFUSERS", "output_model_destination": str(tuned)})
    assert main(["train", "--config", str(write_config(tmp_path / "ft.json", **config))]) == 0
    base = HunyuanVideo15Transformer3DModel.from_pretrained(model, subfolder="transformer").state_dict()
    after = HunyuanVideo15Transformer3DModel.from_pretrained(tuned).state_dict()
    assert not torch.equal(base["transformer_blocks.0.attn.to_q.weight"], after["transformer_blocks.0.attn.to_q.weight"])

    (clip.parent / "shapes.txt").write_text("<shapes> moving\n")
    destination = tmp_path / "shapes.safetensors"
    config = base_config(tmp_path / "emb", model, clip.parent, **{**TRAINING, "epochs": 3, "model_type": "HUNYUAN_VIDEO_1_5",
                         "training_method": "EMBEDDING", "output_model_format": "SAFETENSORS", "output_model_destination": str(destination),
                         "embedding_learning_rate": 0.1, "embedding": {"placeholder": "<shapes>", "token_count": 2,
                                                                       "initial_embedding_text": "shapes"}})
    assert main(["train", "--config", str(write_config(tmp_path / "emb.json", **config))]) == 0
    family = _family(model, "HUNYUAN_VIDEO_1_5")
    family.load_text_encoder()
    table = family.encoders["qwen25_7b"][1].get_input_embeddings().weight
    initial = table[family.encoders["qwen25_7b"][0].convert_tokens_to_ids("shapes")]
    with safe_open(str(destination), "pt") as f:
        assert list(f.keys()) == ["qwen25_7b"]
        vectors = f.get_tensor("qwen25_7b")
    assert vectors.shape == (2, 32) and not torch.allclose(vectors, initial.expand(2, -1))
