"""MiniMax H3 against diffusers' own modular pipeline: a LoRA trained with `motiontune train` on a real clip with a
known tone moves the stock pipeline's video AND audio latents towards that clip's (each measured on its own), the
cached prompt is what the pipeline's text block computes, samples are mp4 files with their sound track, and the LoRA
file has the original (ComfyUI) names diffusers' converter reads.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from conftest import DATA, base_config, write_config
from motiontune.cli import main

PROMPT = "moving shapes"
SEEDS = range(3)
FPS, FRAMES, SIZE = 24, 124, 32  # the pipeline's shortest video: 5 s at 24 fps, rounded up to 17n+5
RATE = 32000


def _shapes(count: int) -> np.ndarray:
    """`count` frames of the real shapes clip from 3 s in (its first second is black), SIZE x SIZE."""
    with av.open(str(DATA / "shapes_200px_30fps.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24", width=SIZE, height=SIZE) for _, f in zip(range(90 + count), container.decode(video=0))]
    return np.stack(frames[90:])


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """One LoRA run on a real clip with a 440 Hz stereo tone (FLAC, lossless), 124 frames at 24 fps."""
    return _train(tiny_models("minimax-h3"), tmp_path_factory.mktemp("minimax"))


def _train(model: Path, tmp: Path, epochs: int = 300):
    from motiontune.testing.clips import write_clip_with_tone

    data = tmp / "data"
    data.mkdir()
    # two frames more than a window: the file's last frame must end after the window's
    clip = write_clip_with_tone(data / "tone.mkv", (FRAMES + 2) / FPS, fps=FPS, tones=((0.0, 440.0),), frames=_shapes(FRAMES + 2),
                                layout="stereo", sample_rate=RATE)
    (data / "tone.txt").write_text(PROMPT + "\n")
    config = base_config(tmp, model, data, model_type="MINIMAX_H3", resolution=str(SIZE), epochs=epochs,
                         learning_rate=1e-2, lora_rank=16, lora_alpha=16,
                         # noise levels where the pipeline's two schedules (shift 12 video, 3 audio) spend their steps,
                         # and the blocks' modulation beside attention: a tiny transformer memorises little otherwise
                         timestep_shift=5.0, layer_filter="attn.to,ff.net.2,adaln_proj",
                         video_config={"max_frames": FRAMES, "target_fps": float(FPS)},
                         samples=[{"prompt": PROMPT, "frames": FRAMES, "height": SIZE, "width": SIZE, "steps": 2, "fps": FPS}],
                         sample_after=epochs, sample_after_unit="EPOCH")
    assert main(["train", "--config", str(write_config(tmp / "config.json", **config))]) == 0
    return model, clip, Path(config["output_model_destination"]), tmp


def test_stock_pipeline_video_and_audio_move_towards_the_trained_clip(trained):
    """No motiontune code below: diffusers' modular pipeline and its LoRA loader, the clip's latents computed here."""
    model, clip, lora, _ = trained
    targets, base, trained_samples = _stock_samples(model, clip, lora)
    video_ratio, audio_ratio = map(_ratio, trained_samples, base, targets)
    # what a trainer with the target's sign flipped would aim at: a LoRA that only shrank the samples would come
    # closer to it too; this one moves away from it
    flipped = [_ratio(with_lora, without, -target) for with_lora, without, target in zip(trained_samples, base, targets)]
    print(f"minimax-h3: MSE ratio with/without LoRA: video {video_ratio:.3f}, audio {audio_ratio:.3f}; against the "
          f"sign-flipped latents (negative control): video {flipped[0]:.3f}, audio {flipped[1]:.3f}")
    # measured: video 0.77, audio 0.85; against the sign-flipped latents 1.24 and 1.35
    assert video_ratio < 0.85, "video samples did not move towards the clip: timestep, sign or normalisation broken"
    assert audio_ratio < 0.92, "audio samples did not move towards the clip's sound: window, packing or normalisation broken"
    assert min(flipped) > 1.0


def test_a_run_with_the_target_sign_flipped_fails_the_check(tiny_models, tmp_path):
    """Negative control: the same run with the flow target's sign flipped (video and audio alike) does not pass."""
    from motiontune.train import step

    flow_target = step.flow_target
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step, "flow_target", lambda x0, noise: -flow_target(x0, noise))
        model, clip, lora, _ = _train(tiny_models("minimax-h3"), tmp_path)
    targets, base, trained_samples = _stock_samples(model, clip, lora)
    video_ratio, audio_ratio = map(_ratio, trained_samples, base, targets)
    print(f"minimax-h3, target sign flipped: MSE ratio video {video_ratio:.3f}, audio {audio_ratio:.3f}")
    assert video_ratio > 0.85 and audio_ratio > 0.92


def _stock_pipeline(model: Path):
    """diffusers' MiniMax H3 pipeline (t2va) from the model folder, and the same blocks without the text encoder
    step (which needs Qwen3-VL's processor, i.e. torchvision, for nothing a text-only prompt uses: `_prompt_embeds`
    does what it does)."""
    from diffusers import ModularPipeline

    full = ModularPipeline.from_pretrained(str(model), workflow="t2va")
    full.load_components(dtype=torch.float32)
    blocks = full.blocks
    blocks.sub_blocks.pop("text_encoder")
    pipe = blocks.init_pipeline(str(model))
    pipe.update_components(**{n: getattr(full, n) for n in ("transformer", "vae", "audio_vae", "scheduler", "audio_scheduler")})
    pipe.set_progress_bar_config(disable=True)
    return full, pipe


def _prompt_embeds(full, prompt: str) -> torch.Tensor:
    """What the pipeline's t2va text block computes: the prompt verbatim, hidden state 50 of Qwen3-VL."""
    ids = full.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        return full.text_encoder.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                       mm_token_type_ids=torch.zeros_like(input_ids), use_cache=False,
                                       output_hidden_states=True).hidden_states[full.text_encoder_layer]


def _stock_samples(model: Path, clip: Path, lora: Path):
    """The clip's (video, audio) latents, then the stock pipeline's samples without and with the LoRA."""
    full, pipe = _stock_pipeline(model)
    targets = _clip_latents(full, clip)
    embeds = _prompt_embeds(full, PROMPT)
    base = _samples(pipe, embeds)
    pipe.load_lora_weights(str(lora))
    return targets, base, _samples(pipe, embeds)


def _ratio(with_lora, without, target) -> float:
    return ((with_lora - target) ** 2).mean().item() / ((without - target) ** 2).mean().item()


def _clip_latents(pipe, clip: Path):
    """The clip's FRAMES frames and their sound (FRAMES / FPS seconds, 32 kHz stereo) as the pipeline's denoiser sees
    them: video (1, C, F', H', W') and audio (2, C, L), normalised as its decode steps denormalise them."""
    with av.open(str(clip)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for _, f in zip(range(FRAMES), container.decode(video=0))])
    with av.open(str(clip)) as container:
        resampler = av.AudioResampler(format="fltp", layout="stereo", rate=RATE)
        sound = np.concatenate([r.to_ndarray() for f in container.decode(audio=0) for r in resampler.resample(f)], axis=1)
    sound = torch.from_numpy(sound[:, : round(FRAMES / FPS * RATE)]).float()
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 255
    mean, std = torch.tensor(pipe.pixel_mean).view(1, 3, 1, 1, 1), torch.tensor(pipe.pixel_std).view(1, 3, 1, 1, 1)
    steps = round(FRAMES / FPS * 40)
    with torch.no_grad():
        video = pipe.vae.encode((pixels - mean) / std).latent_dist.mean
        audio = pipe.audio_vae.encode(sound[:, None]).latent_dist.mode()[..., :steps]
    vae, audio_vae = pipe.vae.config, pipe.audio_vae.config
    video = (video - torch.tensor(vae.latents_mean).view(1, -1, 1, 1, 1)) / torch.tensor(vae.latents_std).view(1, -1, 1, 1, 1)
    audio = (audio - torch.tensor(audio_vae.latents_mean).view(1, -1, 1)) / torch.tensor(audio_vae.latents_std).view(1, -1, 1)
    return video, audio


def _samples(pipe, embeds):
    """Normalised video and audio latents for each seed (what the decode steps would denormalise)."""
    videos, audios = [], []
    for seed in SEEDS:
        out = pipe(prompt_embeds=embeds, text_token_tags=torch.ones(embeds.shape[1], dtype=torch.long), height=SIZE,
                   width=SIZE, num_frames=FRAMES, num_inference_steps=10, generator=torch.Generator().manual_seed(seed),
                   output=["latents", "audio_latents"])
        videos.append(out["latents"])
        audios.append(out["audio_latents"][None])
    return torch.cat(videos), torch.cat(audios)


def test_the_sample_is_an_mp4_with_its_sound_track(trained):
    """The sample rendered during training: H.264 video and the audio VAE's 32 kHz stereo as AAC, equally long."""
    *_, tmp = trained
    sample = next((tmp / "workspace" / "samples").glob("*.mp4"))
    with av.open(str(sample)) as container:
        audio = container.streams.audio[0]
        frames = sum(1 for _ in container.decode(video=0))
        assert (audio.codec_context.name, audio.rate, audio.channels) == ("aac", RATE, 2)
    with av.open(str(sample)) as container:
        samples = sum(f.samples for f in container.decode(audio=0))
    print(f"minimax-h3 sample: {frames} frames, {samples / RATE:.3f} s of sound")
    assert frames == FRAMES and abs(samples / RATE - FRAMES / FPS) < 0.1


def test_lora_file_has_the_original_names_comfyui_reads(trained):
    """The default format (COMFY_LORA): `diffusion_model.` + the original MiniMax H3 names (q, k and v fused into
    `attn.qkv_proj`), each with its `.alpha`. diffusers' converter of such files maps every entry onto a module this
    run trained, and ComfyUI v0.30.0's MiniMax H3 model has these names."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_minimax_h3_lora_to_diffusers
    from safetensors.torch import load_file

    model, _, lora, _ = trained
    weights = load_file(str(lora))
    # the run's layer_filter adapts the text refiner's attention too
    assert all(k.startswith(("diffusion_model.blocks.", "diffusion_model.token_refiner.blocks.")) for k in weights)
    modules = {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] if ".lora_" in k
               else k.removeprefix("diffusion_model.").removesuffix(".alpha") for k in weights}
    for name in ("blocks.0.attn.qkv_proj", "blocks.1.attn.out_proj", "blocks.0.mlp.fc2", "blocks.0.adaln_proj.linear",
                 "token_refiner.blocks.0.attn.qkv_proj"):
        assert name in modules, name
    assert not any("mlp.fc1" in k for k in weights)  # its halves are swapped in the original layout: never adapted here
    assert all(f"diffusion_model.{m}.alpha" in weights for m in modules)
    converted = _convert_non_diffusers_minimax_h3_lora_to_diffusers(dict(weights))
    from diffusers import MiniMaxH3Transformer3DModel

    names = {n for n, _ in MiniMaxH3Transformer3DModel.from_pretrained(model, subfolder="transformer").named_modules()}
    assert all(k.removeprefix("transformer.").rsplit(".lora_", 1)[0] in names for k in converted)
    assert any(".attn.to_v." in k for k in converted) and any(".ff.net.2." in k for k in converted)


@pytest.fixture(scope="module")
def family(tiny_models):
    from motiontune.config import TrainConfig
    from motiontune.models.minimax_h3 import MiniMaxH3Family

    config = TrainConfig.model_validate({"model_type": "MINIMAX_H3", "base_model_name": str(tiny_models("minimax-h3")),
                                         "train_dtype": "FLOAT_32", "concepts": [{"path": "."}]})
    family = MiniMaxH3Family(config, torch.device("cpu"))
    family.load_transformers()
    family.load_text_encoder()
    return family


def test_cached_prompt_is_what_the_pipeline_computes(family):
    """The pipeline's own prompt function (`get_qwen3vl_prompt_embeds`: hidden state 50, unpadded), given the token
    type ids transformers' processor method computes from the tokenizer's vision pads; the cached row, cut back to the
    prompt's tokens, is that."""
    from types import SimpleNamespace

    from diffusers.modular_pipelines.minimax_h3.encoders import get_qwen3vl_prompt_embeds
    from transformers.processing_utils import ProcessorMixin

    tokenizer, qwen = family.encoders["qwen3vl"]
    # Qwen3-VL's processor needs torchvision to be built; its token-type method needs only these ids
    processor = SimpleNamespace(image_token_ids=[tokenizer.convert_tokens_to_ids("<|image_pad|>")],
                                video_token_ids=[tokenizer.convert_tokens_to_ids("<|video_pad|>")], audio_token_ids=[])
    processor.create_mm_token_type_ids = lambda ids: ProcessorMixin.create_mm_token_type_ids(processor, ids)
    rows = family.encode_prompts([PROMPT, "a rabbit walks in the forest"])
    for prompt, row in zip([PROMPT, "a rabbit walks in the forest"], rows):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            stock = get_qwen3vl_prompt_embeds(qwen, processor, ids, {}, text_encoder_layer=50, dtype=torch.float32)
        ours = family._unpack(row)
        assert ours.shape == stock.shape and torch.allclose(ours, stock, atol=1e-5)


def test_config_refuses_what_minimax_h3_cannot_train():
    from motiontune.config import TrainConfig
    from motiontune.models.minimax_h3 import MiniMaxH3Family, sample_frames

    def problems(**keys):
        keys.setdefault("video_config", {"target_fps": 24.0})
        config = TrainConfig.model_validate({"model_type": "MINIMAX_H3", "concepts": [{"path": "."}], **keys})
        return "\n".join(MiniMaxH3Family.config_problems(config))

    assert problems() == "" and problems(training_method="FINE_TUNE") == ""
    assert "EMBEDDING" in problems(training_method="EMBEDDING", embedding={"placeholder": "<x>"})
    assert "text_encoder.train" in problems(training_method="FINE_TUNE", text_encoder={"train": True})
    assert "use_temporal_attention" in problems(video_config={"use_temporal_attention": False, "target_fps": 24.0})
    assert "target_fps = 16: MiniMax H3 generates at 24 fps" in problems(video_config={"target_fps": 16.0})
    assert [sample_frames(n) for n in (5, 120, 124, 125, 345, 400)] == [124, 124, 124, 141, 345, 345]


def test_single_file_weights_have_the_original_names(family):
    """FINE_TUNE's single-file layout (COMFY_TRANSFORMER): diffusers' converter of original MiniMax H3 checkpoints
    gives the model back, every tensor equal (q, k, v un-fused, the feed-forward's halves swapped back)."""
    from diffusers.loaders.single_file_utils import convert_minimax_h3_transformer_checkpoint_to_diffusers

    state = family.transformer.state_dict()
    original = family.single_file_state_dict(family.transformer, torch.float32)
    assert "blocks.0.attn.qkv_proj.weight" in original and "final_layer.video_out.weight" in original
    # what ComfyUI v0.30.0's model detection reads (comfy/model_detection.py, MiniMax H3)
    for key in ("video_patch_proj.weight", "audio_patch_proj.weight", "blocks.0.attn.q_norm.weight", "blocks.0.mlp.fc1.weight",
                "condition_proj.weight", "time_embedder.proj_in.weight", "time_embedder.proj_out.weight", "rope.inv_freq",
                "final_layer.video_out.weight", "final_layer.audio_out.weight", "token_refiner.blocks.0.attn.qkv_proj.weight"):
        assert key in original, key
    converted = convert_minimax_h3_transformer_checkpoint_to_diffusers(dict(original), dict(family.transformer.config))
    assert sorted(converted) == sorted(state) and all(torch.equal(converted[k], state[k]) for k in state)


def test_frame_counts_are_the_vaes(family):
    """17n+5 frames, 5n+2 latent frames: the pipeline's own arithmetic, and the tiny VAE's actual output."""
    from diffusers.modular_pipelines.minimax_h3.modular_pipeline import video_latent_num_frames

    assert [family.valid_frame_count(n) for n in (4, 5, 21, 22, 124, 130)] == [0, 5, 5, 22, 124, 124]
    for frames in (5, 22, 124):
        assert family.latent_frame_count(frames) == video_latent_num_frames(frames, 17, 5)
        assert family.pixel_frames(family.latent_frame_count(frames)) == frames
    family.load_vae()
    latents = family.encode_video(np.zeros((22, 32, 32, 3), dtype=np.uint8))
    assert latents.shape[1] == family.latent_frame_count(22) == 7
