"""Kandinsky 5 against the stock `Kandinsky5T2VPipeline` / `Kandinsky5I2VPipeline`: the packed prompt is what the
pipeline's `encode_prompt` gives, training's prediction is the pipeline's transformer call (channels-last latents,
condition channels, rope positions and scale), image-to-video's given first frame is the pipeline's own encoding of
the image, and a LoRA trained with `motiontune train` on a real clip moves the stock pipeline's samples towards that
clip (text-to-video and image-to-video), loaded with the pipeline's own `load_lora_weights`, while a run with the
flow target's sign flipped does not. The default LoRA file names the transformer's own modules (ComfyUI's Kandinsky5
model keeps diffusers' names), holds the same update as the diffusers file and loads in the stock pipeline too.

Measured figures are printed by each test (see the closing note of the change that added them).
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import DATA, base_config, write_config
from motiontune.cli import main
from motiontune.methods import lora
from test_lora_end_to_end import PROMPT, _channel_stats_distance, _make_clip
from test_lora_formats import also_saved_as

SIZE = 32  # 8x VAE and 2x2 patches: a 2 x 2 token grid
SEEDS = range(2)
TRAINING = {"resolution": str(SIZE), "epochs": 100, "learning_rate": 1e-2, "lora_rank": 16, "lora_alpha": 8,
            "timestep_shift": 10.0, "video_config": {"max_frames": 9, "target_fps": 16.0}}


def _make_i2v_clip(folder: Path) -> Path:
    """17 frames of the real shapes clip (as `_make_clip` makes 9): the I2V pipeline renormalises its first 4 latent
    frames against the next ones ("mesh artifacts"), so a sample needs at least 5 latent frames."""
    folder.mkdir()
    with av.open(str(DATA / "shapes_200px_30fps.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24", width=SIZE, height=SIZE) for _, f in zip(range(124), container.decode(video=0))]
    clip = folder / "shapes.mp4"
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("libx264", rate=16)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv444p"
        stream.options = {"qp": "0"}  # lossless: the decoded pixels are the source pixels
        for array in frames[90::2]:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        out.mux(stream.encode())
    (folder / "shapes.txt").write_text(PROMPT + "\n")
    return clip


def _frames(clip: Path) -> np.ndarray:
    with av.open(str(clip)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _family(model: Path, model_type: str):
    from motiontune.config import TrainConfig
    from motiontune.models.kandinsky5 import Kandinsky5Family

    config = TrainConfig.model_validate({"model_type": model_type, "base_model_name": str(model), "train_dtype": "FLOAT_32",
                                         "concepts": [{"path": "."}]})
    return Kandinsky5Family(config, torch.device("cpu"))


def _train(tiny, tmp: Path, model_type: str, frames: int = 9, **keys):
    """A LoRA run on the clip: the default (COMFY_LORA) file, and the same adapters as DIFFUSERS_LORA beside it."""
    clip = _make_clip(tmp / "data", SIZE) if frames == 9 else _make_i2v_clip(tmp / "data")
    keys.setdefault("video_config", {**TRAINING["video_config"], "max_frames": frames})
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


def _samples(pipe, frames: int = 9, **inputs) -> torch.Tensor:
    """Latents of the stock pipeline, (B, C, F, H, W) (it returns them channels-last)."""
    return torch.cat([pipe(prompt=PROMPT, height=SIZE, width=SIZE, num_frames=frames, num_inference_steps=8, guidance_scale=1.0,
                           output_type="latent", generator=torch.Generator().manual_seed(seed), **inputs).frames
                      for seed in SEEDS]).permute(0, 4, 1, 2, 3)


_BASE_SAMPLES = {}  # model folder → the base model's samples (the negative control reuses them)


def _ratios(pipe, clip: Path, lora_file: Path, skip_first: bool = False, **inputs) -> tuple[float, float]:
    """(MSE, channel statistics) distance to the clip with / without the LoRA, in the stock pipeline (image-to-video:
    over the generated frames, the given first one left out)."""
    pipe.set_progress_bar_config(disable=True)
    target = _target(pipe, clip)
    key = str(pipe.transformer.config._name_or_path)
    without = _BASE_SAMPLES[key] = _BASE_SAMPLES[key] if key in _BASE_SAMPLES else _samples(pipe, **inputs)
    pipe.load_lora_weights(str(lora_file))
    with_lora = _samples(pipe, **inputs)
    pipe.unload_lora_weights()
    if skip_first:
        target, without, with_lora = target[:, :, 1:], without[:, :, 1:], with_lora[:, :, 1:]
    mse = ((with_lora - target) ** 2).mean().item() / ((without - target) ** 2).mean().item()
    stats = _channel_stats_distance(with_lora, target) / _channel_stats_distance(without, target)
    return mse, stats


@pytest.fixture(scope="module")
def t2v(tiny_models, tmp_path_factory):
    model = tiny_models("kandinsky-5")
    return (model, *_train(model, tmp_path_factory.mktemp("k5-t2v"), "KANDINSKY_5_T2V"))


def test_packed_prompt_is_what_the_pipeline_passes(tiny_models):
    """Each prompt's Qwen hidden states (cropped after the template, unpadded) and CLIP pooled vector equal the
    pipeline's `encode_prompt` of that prompt."""
    from diffusers import Kandinsky5T2VPipeline

    model = tiny_models("kandinsky-5")
    family = _family(model, "KANDINSKY_5_T2V")
    family.load_text_encoder()
    prompts = [PROMPT, "a dog runs in the city street at night"]
    embeds, lengths, pooled = family._unpack(family.encode_prompts(prompts))
    pipe = Kandinsky5T2VPipeline.from_pretrained(model)
    for i, prompt in enumerate(prompts):
        want, want_pooled, cu_seqlens = pipe.encode_prompt(prompt, device=torch.device("cpu"), dtype=torch.float32)
        assert lengths[i] == want.shape[1] == cu_seqlens[-1]
        assert torch.allclose(embeds[i, :lengths[i]], want[0], atol=1e-6) and not embeds[i, lengths[i]:].any()
        assert torch.allclose(pooled[i], want_pooled[0], atol=1e-6)
    assert lengths[0] != lengths[1]


def test_prediction_is_the_pipelines_transformer_call(tiny_models):
    """A batch of two prompts of different lengths: each row's prediction equals the transformer called as
    Kandinsky5T2VPipeline calls it for that prompt alone (channels-last latents + zero condition channels and mask,
    t = 1000σ, its rope positions and scale)."""
    from diffusers import Kandinsky5T2VPipeline

    model = tiny_models("kandinsky-5")
    family = _family(model, "KANDINSKY_5_T2V")
    family.load_transformers()
    family.load_text_encoder()
    prompts = [PROMPT, "a dog runs in the city street at night"]
    text = family.encode_prompts(prompts)
    noisy = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    pipe = Kandinsky5T2VPipeline.from_pretrained(model)
    with torch.no_grad():
        ours = family.predict(noisy, torch.tensor([0.5, 0.3]), text, family.trained_experts()[0])
        for i, (prompt, t) in enumerate(zip(prompts, (500.0, 300.0))):
            embeds, pooled, _ = pipe.encode_prompt(prompt, device=torch.device("cpu"), dtype=torch.float32)
            hidden = torch.cat([noisy[i : i + 1].permute(0, 2, 3, 4, 1), torch.zeros(1, 3, 4, 4, 17)], dim=-1)
            stock = pipe.transformer(hidden_states=hidden, encoder_hidden_states=embeds, pooled_projections=pooled,
                                     timestep=torch.tensor([t]), text_rope_pos=torch.arange(embeds.shape[1]),
                                     visual_rope_pos=[torch.arange(3), torch.arange(2), torch.arange(2)],
                                     scale_factor=pipe._get_scale_factor(SIZE, SIZE), sparse_params=None, return_dict=False)
            assert torch.allclose(ours[i], stock[0].permute(3, 0, 1, 2), atol=1e-5), (ours[i] - stock[0].permute(3, 0, 1, 2)).abs().max()


def test_given_first_frame_is_the_pipelines_own(tiny_models, tmp_path):
    """Image-to-video: the first frame's latents cached with a clip equal the image latents Kandinsky5I2VPipeline
    puts in the first latent frame (its posterior's mean; the pipeline draws a sample of it), and differ from the clip's
    own first latent frame (the VAE's group norms see the whole clip), which is why they are cached apart."""
    from diffusers import Kandinsky5I2VPipeline

    model = tiny_models("kandinsky-5-i2v")
    frames = _frames(_make_clip(tmp_path / "data", SIZE))
    family = _family(model, "KANDINSKY_5_I2V")
    family.load_vae()
    stored = family.encode_video(frames)
    assert stored.shape == (32, 3, 4, 4) and not stored[16:, 1:].any()
    pipe = Kandinsky5I2VPipeline.from_pretrained(model)
    image = pipe.video_processor.preprocess(Image.fromarray(frames[0]), height=SIZE, width=SIZE).unsqueeze(2)
    with torch.no_grad():
        expected = pipe.vae.encode(image).latent_dist.mean[0, :, 0] * pipe.vae.config.scaling_factor
    gap = (stored[:16, 0] - expected).abs().max().item()
    print(f"kandinsky-5-i2v: clip's own first latent frame vs the image's encoding: max difference {gap:.3f}")
    assert torch.allclose(stored[16:, 0], expected, atol=1e-5) and gap > 1e-3


def test_stock_pipeline_samples_move_towards_the_trained_clip(t2v):
    from diffusers import Kandinsky5T2VPipeline

    model, clip, _, diffusers_lora = t2v
    mse, stats = _ratios(Kandinsky5T2VPipeline.from_pretrained(model), clip, diffusers_lora)
    print(f"kandinsky-5: MSE ratio with/without LoRA {mse:.3f}; channel statistics ratio {stats:.3f}")
    assert mse < 0.75, "samples did not move towards the clip: timestep, layout or latent convention broken"
    assert stats < 0.85


def test_flipped_target_fails_the_check(tiny_models, tmp_path):
    """Negative control: the same run with the flow target's sign flipped does not pass the check above."""
    from diffusers import Kandinsky5T2VPipeline

    from motiontune.train import step

    model = tiny_models("kandinsky-5")
    flow_target = step.flow_target
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step, "flow_target", lambda x0, noise: -flow_target(x0, noise))
        clip, _, diffusers_lora = _train(model, tmp_path, "KANDINSKY_5_T2V")
    mse, stats = _ratios(Kandinsky5T2VPipeline.from_pretrained(model), clip, diffusers_lora)
    print(f"kandinsky-5, target sign flipped: MSE ratio {mse:.3f}; channel statistics ratio {stats:.3f}")
    assert mse > 0.75


def test_stock_i2v_pipeline_samples_move_towards_the_trained_clip(tiny_models, tmp_path):
    from diffusers import Kandinsky5I2VPipeline

    model = tiny_models("kandinsky-5-i2v")
    clip, _, diffusers_lora = _train(model, tmp_path, "KANDINSKY_5_I2V", frames=17)
    pipe = Kandinsky5I2VPipeline.from_pretrained(model)
    mse, stats = _ratios(pipe, clip, diffusers_lora, skip_first=True, frames=17, image=Image.fromarray(_frames(clip)[0]))
    print(f"kandinsky-5-i2v: MSE ratio with/without LoRA {mse:.3f}; channel statistics ratio {stats:.3f}")
    assert mse < 0.75, "samples did not move towards the clip: the first-frame or timestep convention is broken"
    assert stats < 0.85


def test_default_lora_loads_in_the_stock_pipeline_with_the_diffusers_update(t2v):
    """The default (COMFY_LORA) file: every key is `transformer.<module>` + lora_A / lora_B of a Linear weight of the
    transformer (Kandinsky's original checkpoints and ComfyUI's model use diffusers' names; ComfyUI's LoRA key map for
    Kandinsky 5 takes `transformer.<name>`), alpha / rank folded into lora_B (no `.alpha`: ComfyUI's scale is then 1);
    applied as ComfyUI applies a LoRA (W += B·A), it changes the transformer exactly as the same run's DIFFUSERS_LORA
    file does in diffusers, and the stock pipeline's `load_lora_weights` reads it to the same weights."""
    from diffusers import Kandinsky5T2VPipeline

    model, _, comfy_file, diffusers_lora = t2v
    family = _family(model, "KANDINSKY_5_T2V")
    pipe = Kandinsky5T2VPipeline.from_pretrained(model)
    original = family.single_file_state_dict(pipe.transformer, torch.float32)
    assert set(original) == set(pipe.transformer.state_dict())
    comfy = load_file(str(comfy_file))
    assert not [k for k in comfy if k.endswith(".alpha") or not k.startswith("transformer.")]
    assert "transformer.text_transformer_blocks.0.feed_forward.in_layer.lora_A.weight" in comfy
    applied = dict(original)
    for key in [k for k in comfy if k.endswith(".lora_A.weight")]:
        module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        down, up = comfy[key], comfy[key.replace("lora_A", "lora_B")]
        assert down.shape[0] == TRAINING["lora_rank"] and (up.shape[0], down.shape[1]) == original[f"{module}.weight"].shape
        applied[f"{module}.weight"] = original[f"{module}.weight"] + up @ down
    fused = {}
    for lora_file in (diffusers_lora, comfy_file):
        pipe = Kandinsky5T2VPipeline.from_pretrained(model)
        pipe.load_lora_weights(str(lora_file))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        fused[lora_file] = pipe.transformer.state_dict()
    changed = 0
    for key, reference in fused[diffusers_lora].items():
        assert torch.allclose(reference, applied[key], atol=1e-6), key
        assert torch.allclose(fused[comfy_file][key], reference, atol=1e-6), key
        changed += not torch.equal(reference, original[key])
    trained = [k for k, v in load_file(str(diffusers_lora)).items() if k.endswith(".lora_B.weight") and v.any()]
    assert changed == len(trained) > 0


def test_memory_options_give_the_same_gradients(tiny_models):
    """The LoRA gradients of one prediction through plain checkpointing, CPU_OFFLOADED checkpointing and fully
    offloaded blocks are equal (train/memory.py works on the text and visual blocks `fsdp_units` lists). The text
    states and the time embedding feed every visual block: CPU_OFFLOADED's own backward adds up their gradients in
    another order, so what lies before them (text blocks, embeddings) differs in float rounding only (about 1e-7 of
    the largest gradient); the visual blocks' gradients are identical."""
    from peft import LoraConfig

    from motiontune.train import memory

    family = _family(tiny_models("kandinsky-5"), "KANDINSKY_5_T2V")
    family.load_text_encoder()
    text = family.encode_prompts([PROMPT])
    gradients, hosts = {}, None
    for mode in ("ON", "CPU_OFFLOADED", "offloaded"):
        family.load_transformers()
        model = family.transformer
        torch.manual_seed(0)
        model.add_adapter(LoraConfig(r=2, target_modules=["to_query", "to_value", "in_layer"], init_lora_weights="gaussian"))
        host = memory.HostCheckpoint(torch.device("cpu")) if mode == "CPU_OFFLOADED" else None
        model.enable_gradient_checkpointing(**({"gradient_checkpointing_func": host} if host else {}))
        hosts = hosts if host is None else host
        if mode == "offloaded":
            offloader = memory.BlockOffloader(family.fsdp_units(model), 1.0, 1, torch.device("cpu"))
        model.train()
        noisy = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
        family.predict(noisy, torch.tensor([0.6]), text, family.trained_experts()[0]).square().mean().backward()
        gradients[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert hosts.peak_host_bytes > 0 and offloader.max_resident <= 1
    largest = max(g.abs().max() for g in gradients["ON"].values())
    assert largest > 0
    for mode in ("CPU_OFFLOADED", "offloaded"):
        for name, reference in gradients["ON"].items():
            if name.startswith("visual_transformer_blocks.") or mode == "offloaded":
                assert torch.equal(gradients[mode][name], reference), (mode, name)
            else:
                assert torch.allclose(gradients[mode][name], reference, rtol=0, atol=1e-6 * largest), (mode, name)


def test_config_refuses_what_the_model_has_not(tiny_models, tmp_path):
    from motiontune.config import ConfigError
    from motiontune.configure import load_config

    path = write_config(tmp_path / "c.json", **base_config(tmp_path, tiny_models("kandinsky-5"), tmp_path,
                                                          model_type="KANDINSKY_5_T2V", guidance_scale=3.5,
                                                          video_config={"use_temporal_attention": False}))
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert "guidance_scale = 3.5" in str(error.value) and "use_temporal_attention = false" in str(error.value)


def test_fine_tune_and_embedding_runs_save_what_the_stock_parts_load(tiny_models, tmp_path):
    """FINE_TUNE: the saved transformer folder loads as the stock Kandinsky5Transformer3DModel with changed block
    weights. EMBEDDING: the placeholder's vectors train in both text encoders and are saved keyed `qwen25_7b` and
    `clip_l` (ComfyUI's names for them)."""
    from diffusers import Kandinsky5Transformer3DModel
    from safetensors import safe_open

    model = tiny_models("kandinsky-5")
    clip = _make_clip(tmp_path / "data", SIZE)
    tuned = tmp_path / "tuned"
    config = base_config(tmp_path / "ft", model, clip.parent, **{**TRAINING, "epochs": 3, "model_type": "KANDINSKY_5_T2V",
                         "training_method": "FINE_TUNE", "output_model_format": "DIFFUSERS", "output_model_destination": str(tuned)})
    assert main(["train", "--config", str(write_config(tmp_path / "ft.json", **config))]) == 0
    key = "visual_transformer_blocks.0.self_attention.to_query.weight"
    base = Kandinsky5Transformer3DModel.from_pretrained(model, subfolder="transformer").state_dict()
    assert not torch.equal(base[key], Kandinsky5Transformer3DModel.from_pretrained(tuned).state_dict()[key])

    (clip.parent / "shapes.txt").write_text("<shapes> moving\n")
    destination = tmp_path / "shapes.safetensors"
    config = base_config(tmp_path / "emb", model, clip.parent, **{**TRAINING, "epochs": 3, "model_type": "KANDINSKY_5_T2V",
                         "training_method": "EMBEDDING", "output_model_format": "SAFETENSORS", "output_model_destination": str(destination),
                         "embedding_learning_rate": 0.1, "embedding": {"placeholder": "<shapes>", "token_count": 2,
                                                                       "initial_embedding_text": "shapes"}})
    assert main(["train", "--config", str(write_config(tmp_path / "emb.json", **config))]) == 0
    family = _family(model, "KANDINSKY_5_T2V")
    family.load_text_encoder()
    with safe_open(str(destination), "pt") as f:
        assert sorted(f.keys()) == ["clip_l", "qwen25_7b"]
        for name in f.keys():
            tokenizer, encoder = family.encoders[name]
            initial = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("shapes")]
            vectors = f.get_tensor(name)
            assert vectors.shape == (2, 32) and not torch.allclose(vectors, initial.expand(2, -1))


def test_estimate_of_the_released_models_reads_no_weights():
    """`motiontune estimate`'s step on the preset: the Lite 5 s release's embedded config (its Hub id is not on this
    machine, nothing is downloaded), and the Pro 19B release by name. Their frozen weights: 1.9B / 19B parameters in
    bf16, the modulation tables in float32 as diffusers keeps them (`_keep_in_fp32_modules`): 4.6 GB / 43.4 GB."""
    from motiontune.configure import load_config
    from motiontune.estimate.step import estimate

    for base, blocks, low, high in (("kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers", 34, 4.3e9, 4.9e9),
                                    ("kandinskylab/Kandinsky-5.0-T2V-Pro-sft-5s-Diffusers", 64, 42e9, 45e9)):
        result = estimate(load_config("#kandinsky 5 LoRA", ["samples=[]", f"base_model_name={base}"]))
        lines = {line.name: line for line in result.lines}
        print(f"{base}: frozen weights {lines['frozen weights'].device / 1e9:.1f} GB in {result.blocks} blocks")
        assert base in result.source and result.blocks == blocks
        assert low < lines["frozen weights"].device < high


def test_comfyui_applies_every_key_of_the_default_lora_as_diffusers_does(t2v, tmp_path):
    """ComfyUI v0.30.0's own loaders (tests/comfyui, its own venv): the transformer saved under its own names (what
    COMFY_TRANSFORMER writes) loads as ComfyUI's Kandinsky5 model with no missing or unexpected weight; every tensor of
    the default LoRA file is applied (no "lora key not loaded"); the weights change by what the stock diffusers pipeline
    fuses from the same run's DIFFUSERS_LORA file, within 1e-5 relative."""
    harness = pytest.importorskip("comfyui.harness", reason="the ComfyUI harness (tests/comfyui) is not in this tree")
    from diffusers import Kandinsky5T2VPipeline
    from safetensors.torch import save_file

    model, _, comfy_file, diffusers_lora = t2v
    family = _family(model, "KANDINSKY_5_T2V")
    pipe = Kandinsky5T2VPipeline.from_pretrained(model)
    base = {k: v.clone() for k, v in family.single_file_state_dict(pipe.transformer, torch.float32).items()}  # fusing changes them in place
    save_file(base, str(tmp_path / "base.safetensors"))
    pipe.load_lora_weights(str(diffusers_lora))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = family.single_file_state_dict(pipe.transformer, torch.float32)
    theirs = {k: fused[k] - base[k] for k in base if not torch.equal(fused[k], base[k])}
    alone, patched = harness.run_comfy([harness.ComfyJob("KANDINSKY_5_T2V", tmp_path / "base.safetensors", None, model),
                                        harness.ComfyJob("KANDINSKY_5_T2V", tmp_path / "base.safetensors", comfy_file, model)])
    ours = patched.deltas(base)
    gap = max(((ours[k] - theirs[k]).norm() / theirs[k].norm()).item() for k in theirs)
    print(f"KANDINSKY_5_T2V: ComfyUI {patched.model_class} ({patched.image_model}); base: {len(alone.unet_missing)} missing, "
          f"{len(alone.unet_unexpected)} unexpected; LoRA: {patched.lora_keys} tensors, {len(patched.not_loaded)} not loaded, "
          f"{len(theirs)} weights changed; deltas vs diffusers' {gap:.2e} relative")
    assert alone.model_class == "Kandinsky5" and alone.unet_missing == [] and alone.unet_unexpected == []
    assert patched.not_loaded == [] and patched.lora_keys == len(load_file(str(comfy_file))) > 0
    assert sorted(ours) == sorted(theirs) and gap <= 1e-5
