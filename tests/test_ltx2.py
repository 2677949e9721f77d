"""LTX-2 against the stock `LTX2Pipeline`: a LoRA trained with `motiontune train` on a real clip with a known tone
moves the stock pipeline's video AND audio latents towards that clip's (each measured on its own), the cached
prompt is what the pipeline computes, clips without sound (or with sound that cannot be decoded) train the video
alone, samples are mp4 files with their sound track, and the LoRA file has the original (ComfyUI) names.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from conftest import DATA, base_config, write_config
from motiontune.cli import main

PROMPT = "moving shapes"
SEEDS = range(4)
FPS, FRAMES, SIZE = 16, 9, 64
GUIDANCE_OFF = dict(guidance_scale=1.0, audio_guidance_scale=1.0, stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0,
                    audio_modality_scale=1.0)


def _shapes(count: int) -> np.ndarray:
    """`count` frames of the real shapes clip from 3 s in (its first second is black), SIZE x SIZE."""
    with av.open(str(DATA / "shapes_200px_30fps.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24", width=SIZE, height=SIZE) for _, f in zip(range(90 + count), container.decode(video=0))]
    return np.stack(frames[90:])


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """One LoRA run on 12 frames of a real clip with a 440 Hz stereo tone (FLAC, lossless); 9 frames at 16 fps train."""
    return _train(tiny_models("ltx-2"), tmp_path_factory.mktemp("ltx2"))


def _train(model: Path, tmp: Path, model_type: str = "LTX_2", epochs: int = 300, **keys):
    from motiontune.testing.clips import write_clip_with_tone

    data = tmp / "data"
    data.mkdir(parents=True)
    frames = _shapes(12)
    clip = write_clip_with_tone(data / "tone.mkv", 12 / FPS, fps=FPS, tones=((0.0, 440.0),), frames=frames, layout="stereo")
    (data / "tone.txt").write_text(PROMPT + "\n")
    config = base_config(tmp, model, data, model_type=model_type, resolution=str(SIZE), epochs=epochs, learning_rate=5e-3,
                         lora_rank=16, lora_alpha=16, video_config={"max_frames": FRAMES, "target_fps": float(FPS)},
                         samples=[{"prompt": PROMPT, "frames": FRAMES, "height": SIZE, "width": SIZE, "steps": 2, "fps": FPS}],
                         sample_after=epochs, sample_after_unit="EPOCH")
    config.update(keys)
    assert main(["train", "--config", str(write_config(tmp / "config.json", **config))]) == 0
    return model, clip, Path(config["output_model_destination"]), tmp


def test_stock_pipeline_video_and_audio_move_towards_the_trained_clip(trained):
    """No motiontune code below: the stock pipeline, its LoRA loader, and the clip's latents computed here (the
    log-mel with transformers' numpy spectrogram, not the family's torch one)."""
    model, clip, lora, _ = trained
    targets, base, trained_samples = _stock_samples(model, clip, lora)
    video_ratio, audio_ratio = map(_ratio, trained_samples, base, targets)
    # the negative control: what a trainer with the target's sign flipped would aim at. A LoRA that only shrank the
    # samples would come closer to it too; this one moves away from it
    flipped = [_ratio(with_lora, without, -target) for with_lora, without, target in zip(trained_samples, base, targets)]
    print(f"ltx-2: MSE ratio with/without LoRA: video {video_ratio:.3f}, audio {audio_ratio:.3f}; against the "
          f"sign-flipped latents (negative control): video {flipped[0]:.3f}, audio {flipped[1]:.3f}")
    assert video_ratio < 0.6, "video samples did not move towards the clip: timestep, sign or normalisation broken"
    assert audio_ratio < 0.75, "audio samples did not move towards the clip's sound: window, mel or normalisation broken"
    assert min(flipped) > 1.0


def test_a_run_with_the_target_sign_flipped_fails_the_check(tiny_models, tmp_path):
    """Negative control: the same run with the flow target's sign flipped (video and audio alike) does not pass
    (measured: MSE ratios 1.29 video, 1.35 audio)."""
    from motiontune.train import step

    flow_target = step.flow_target
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step, "flow_target", lambda x0, noise: -flow_target(x0, noise))
        model, clip, lora, _ = _train(tiny_models("ltx-2"), tmp_path)
    targets, base, trained_samples = _stock_samples(model, clip, lora)
    video_ratio, audio_ratio = map(_ratio, trained_samples, base, targets)
    print(f"ltx-2, target sign flipped: MSE ratio video {video_ratio:.3f}, audio {audio_ratio:.3f}")
    assert video_ratio > 0.6 and audio_ratio > 0.75


def _stock_samples(model: Path, clip: Path, lora: Path):
    """The clip's (video, audio) latents, then the stock pipeline's samples without and with the LoRA."""
    from diffusers import LTX2Pipeline

    pipe = LTX2Pipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    targets, base = _clip_latents(pipe, clip), _samples(pipe)
    pipe.load_lora_weights(str(lora))
    return targets, base, _samples(pipe)


def _ratio(with_lora, without, target) -> float:
    return ((with_lora - target) ** 2).mean().item() / ((without - target) ** 2).mean().item()


def _clip_latents(pipe, clip: Path):
    """The clip's first FRAMES frames and their sound (FRAMES / FPS seconds, 16 kHz stereo) as the pipeline's
    denoiser sees them: video (1, C, F', H', W'), audio packed (1, L, C × M)."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    with av.open(str(clip)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for _, f in zip(range(FRAMES), container.decode(video=0))])
    with av.open(str(clip)) as container:
        resampler = av.AudioResampler(format="fltp", layout="stereo", rate=16000)
        sound = np.concatenate([r.to_ndarray() for f in container.decode(audio=0) for r in resampler.resample(f)], axis=1)
    sound = sound[:, : round(FRAMES / FPS * 16000)]
    cfg = pipe.audio_vae.config
    bank = mel_filter_bank(num_frequency_bins=513, num_mel_filters=cfg.mel_bins, min_frequency=0.0, max_frequency=8000.0,
                           sampling_rate=16000, norm="slaney", mel_scale="slaney")
    mel = np.stack([spectrogram(channel, window_function(1024, "hann"), frame_length=1024, hop_length=cfg.mel_hop_length,
                                power=1.0, mel_filters=bank, mel_floor=1e-5, log_mel=None).T for channel in sound])
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        video = pipe.vae.encode(pixels).latent_dist.mean
        audio = pipe.audio_vae.encode(torch.log(torch.from_numpy(mel).float())[None]).latent_dist.mean
    steps = round(FRAMES / FPS * 16000 / cfg.mel_hop_length / 4)  # the pipeline's audio_num_frames
    audio = pipe._pack_audio_latents(audio)[:, :steps]
    return (pipe._normalize_latents(video, pipe.vae.latents_mean, pipe.vae.latents_std, pipe.vae.config.scaling_factor),
            pipe._normalize_audio_latents(audio, pipe.audio_vae.latents_mean, pipe.audio_vae.latents_std))


def _samples(pipe):
    """Normalised video and packed audio latents for each seed (the pipeline returns both denormalised)."""
    videos, audios = [], []
    for seed in SEEDS:
        video, audio = pipe(PROMPT, height=SIZE, width=SIZE, num_frames=FRAMES, frame_rate=float(FPS), num_inference_steps=10,
                            output_type="latent", return_dict=False, generator=torch.Generator().manual_seed(seed), **GUIDANCE_OFF)
        videos.append(pipe._normalize_latents(video, pipe.vae.latents_mean, pipe.vae.latents_std, pipe.vae.config.scaling_factor))
        audios.append(pipe._normalize_audio_latents(pipe._pack_audio_latents(audio), pipe.audio_vae.latents_mean,
                                                    pipe.audio_vae.latents_std))
    return torch.cat(videos), torch.cat(audios)


def test_the_sample_is_an_mp4_with_its_sound_track(trained):
    """The sample rendered during training: H.264 video and the vocoder's 24 kHz stereo as AAC, equally long."""
    *_, tmp = trained
    sample = tmp / "workspace" / "samples" / "epoch300-0.mp4"
    with av.open(str(sample)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        frames = sum(1 for _ in container.decode(video=0))
        assert (audio.codec_context.name, audio.rate, audio.channels) == ("aac", 24000, 2)
    with av.open(str(sample)) as container:
        samples = sum(f.samples for f in container.decode(audio=0))
    assert frames == FRAMES and abs(samples / 24000 - FRAMES / FPS) < 0.1


def test_lora_file_has_the_original_names_comfyui_reads(trained):
    """The default format (COMFY_LORA): `diffusion_model.` + the original LTX-2 names, the audio, video and
    audio↔video modules, alpha / rank folded into lora_B. diffusers' own converter of original LTX-2 checkpoints
    maps every name to the module trained, so ComfyUI's LTX-2 model (whose state dict has those original names)
    takes the file as it is."""
    from diffusers import LTX2VideoTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_ltx2_transformer_to_diffusers
    from safetensors.torch import load_file

    model, _, lora, _ = trained
    weights = load_file(str(lora))
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in weights) and not any(k.endswith(".alpha") for k in weights)
    modules = {k.removeprefix("diffusion_model.").rsplit(".lora_", 1)[0] for k in weights}
    for name in ("attn1.to_q", "attn2.to_k", "audio_attn1.to_v", "audio_attn2.to_out.0", "audio_to_video_attn.to_q",
                 "video_to_audio_attn.to_k", "ff.net.0.proj", "audio_ff.net.2"):
        assert f"transformer_blocks.0.{name}" in modules, name
    stock = LTX2VideoTransformer3DModel.from_pretrained(model, subfolder="transformer").state_dict()
    converted = convert_ltx2_transformer_to_diffusers({f"model.diffusion_model.{m}.weight": torch.zeros(1) for m in modules})
    assert sorted(converted) == sorted(f"{m}.weight" for m in modules) and all(k in stock for k in converted)


@pytest.fixture(scope="module")
def family(tiny_models):
    from motiontune.config import TrainConfig
    from motiontune.models.ltx2 import LTX2Family

    config = TrainConfig.model_validate({"model_type": "LTX_2", "base_model_name": str(tiny_models("ltx-2")),
                                         "train_dtype": "FLOAT_32", "concepts": [{"path": "."}]})
    ltx = LTX2Family(config, torch.device("cpu"))
    ltx.load_transformers()
    ltx.load_text_encoder()
    return ltx


def test_cached_prompt_is_what_the_pipeline_computes(family):
    """Gemma 3's every hidden state through the pipeline's connectors: video and audio embeddings and their mask."""
    from diffusers import LTX2Pipeline

    pipe = LTX2Pipeline.from_pretrained(family.config.base_model_name)
    embeds, mask, _, _ = pipe.encode_prompt([PROMPT, " a rabbit "], do_classifier_free_guidance=False, device=torch.device("cpu"))
    video, audio, connector_mask = pipe.connectors(embeds, mask, padding_side="left")
    ours = family._unpack(family.encode_prompts([PROMPT, " a rabbit "]))
    assert torch.equal(ours[2], connector_mask.long())
    assert torch.allclose(ours[0], video, atol=1e-5) and torch.allclose(ours[1], audio, atol=1e-5)


def test_single_file_weights_have_the_original_names(family):
    """FINE_TUNE's single-file layout: diffusers' converter of original LTX-2 checkpoints gives the model back."""
    from diffusers.loaders.single_file_utils import convert_ltx2_transformer_to_diffusers

    state = family.transformer.state_dict()
    original = family.single_file_state_dict(family.transformer, torch.float32)
    assert "patchify_proj.weight" in original and "adaln_single.linear.weight" in original
    assert "transformer_blocks.0.attn1.q_norm.weight" in original and "transformer_blocks.0.scale_shift_table_a2v_ca_audio" in original
    converted = convert_ltx2_transformer_to_diffusers({f"model.diffusion_model.{k}": v for k, v in original.items()})
    assert sorted(converted) == sorted(state) and all(torch.equal(converted[k], state[k]) for k in state)


def test_clips_without_sound_train_the_video_alone(tiny_models, tmp_path, capsys):
    """A clip without an audio stream and one whose audio cannot be decoded train beside one with sound: the run
    finishes, the bad file is named, and their cache entries hold no audio (their audio loss is left out)."""
    from safetensors.torch import load_file

    from motiontune.testing.clips import write_clip_with_broken_audio, write_clip_with_tone

    data = tmp_path / "data"
    data.mkdir()
    frames = _shapes(12)
    write_clip_with_tone(data / "tone.mkv", 12 / FPS, fps=FPS, frames=frames, layout="stereo")
    write_clip_with_broken_audio(data / "broken.mkv", frames, fps=FPS)
    with av.open(str(data / "silent.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv444p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    config = base_config(tmp_path, tiny_models("ltx-2"), data, model_type="LTX_2", resolution=str(SIZE), epochs=1,
                         video_config={"max_frames": FRAMES, "target_fps": float(FPS)})
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0
    captured = capsys.readouterr()
    assert f"{data / 'broken.mkv'}: the audio stream (flac) cannot be decoded" in captured.err + captured.out
    entries = [load_file(str(p)) for p in (tmp_path / "cache" / "latents").rglob("*.safetensors")]
    assert sorted(tuple(e["audio"].shape) for e in entries) == [(0,), (0,), (round(FRAMES / FPS * 25), 16)]


def test_config_refuses_what_ltx2_cannot_train():
    from motiontune.config import TrainConfig
    from motiontune.models.ltx2 import LTX2Family

    def problems(**keys):
        return "\n".join(LTX2Family.config_problems(TrainConfig.model_validate({"model_type": "LTX_2", "concepts": [{"path": "."}], **keys})))

    assert problems() == "" and problems(training_method="FINE_TUNE") == ""
    assert "EMBEDDING" in problems(training_method="EMBEDDING", embedding={"placeholder": "<x>"})
    assert "text_encoder.train" in problems(training_method="FINE_TUNE", text_encoder={"train": True})
    assert "use_temporal_attention" in problems(video_config={"use_temporal_attention": False})


def test_a_sample_too_small_to_decode_is_refused_before_training(tiny_models, tmp_path, capsys):
    """64x32 used to train and then fail in the VAE decoder at the final sample. The smallest side the config
    allows is the smallest the stock pipeline decodes: 64x64 decodes, 64x32 does not."""
    import torch
    from diffusers import LTX2Pipeline

    from motiontune.cli import main
    from motiontune.models.ltx2 import LTX2Family

    model = tiny_models("ltx-2")
    config = {"model_type": "LTX_2", "base_model_name": str(model), "concepts": [{"path": str(tmp_path)}],
              "resolution": "64x64", "workspace_dir": str(tmp_path / "workspace"),
              "samples": [{"prompt": "a", "height": 32, "width": 64, "frames": 9, "steps": 1}]}
    (tmp_path / "small.json").write_text(json.dumps(config))
    assert main(["train", "--config", str(tmp_path / "small.json")]) != 0
    said = capsys.readouterr().err
    assert "samples[0].height = 32" in said and "use 64 or more" in said, said
    assert not (tmp_path / "workspace").exists()  # refused before anything ran

    smallest = LTX2Family.SMALLEST_SAMPLE_SIDE
    pipe = LTX2Pipeline.from_pretrained(model)
    decode = dict(prompt="a", num_frames=9, num_inference_steps=1, output_type="np")
    assert pipe(height=smallest, width=smallest, generator=torch.Generator().manual_seed(0), **decode).frames[0].shape[1:3] == (smallest, smallest)
    with pytest.raises(RuntimeError, match="[Pp]adding"):
        pipe(height=smallest - LTX2Family.spatial_multiple, width=smallest, generator=torch.Generator().manual_seed(0), **decode)


def test_estimate_for_the_released_model(tmp_path, capsys):
    """The released LTX-2 (19B transformer, Gemma 3 12B) from the configs the family file declares; no weights read."""
    import diffusers

    from motiontune.models.ltx2 import RELEASE

    path = write_config(tmp_path / "c.json", model_type="LTX_2", base_model_name="Lightricks/LTX-2", resolution="256",
                        lora_rank=16, video_config={"max_frames": 17})
    assert main(["estimate", "--config", str(path), "--gpu-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "the embedded config of Lightricks/LTX-2" in out and "Gemma 3 + connectors" in out
    assert "17 frames × 256x256 (latents 3×8×8" in out
    with torch.device("meta"):
        count = sum(p.numel() for p in diffusers.LTX2VideoTransformer3DModel(**RELEASE["transformer"]).parameters())
    assert 18.5e9 < count < 19.2e9


def test_memory_options_on_ltx2_blocks_give_the_same_gradients(family):
    """LTX-2's blocks take video and audio streams, rotary tables and masks, and return two tensors: the LoRA
    gradients through CPU_OFFLOADED checkpointing and through fully offloaded blocks equal those through plain
    checkpointing."""
    from diffusers import LTX2VideoTransformer3DModel
    from peft import LoraConfig

    from motiontune.models.base import Expert, Sound
    from motiontune.train import memory

    text = family.encode_prompts([PROMPT])
    gradients = {}
    for mode in ("ON", "CPU_OFFLOADED", "offloaded"):
        model = LTX2VideoTransformer3DModel.from_pretrained(family.config.base_model_name, subfolder="transformer").requires_grad_(False)
        torch.manual_seed(0)
        model.add_adapter(LoraConfig(r=2, target_modules=family.lora_target_modules(model, ""), init_lora_weights="gaussian"))
        host = memory.HostCheckpoint(torch.device("cpu")) if mode == "CPU_OFFLOADED" else None
        model.enable_gradient_checkpointing(**({"gradient_checkpointing_func": host} if host else {}))
        if mode == "offloaded":
            offloader = memory.BlockOffloader(family.fsdp_units(model), 1.0, 1, torch.device("cpu"))
        model.train()
        g = torch.Generator().manual_seed(1)
        sound = Sound(torch.randn(1, 14, 16, generator=g), torch.tensor([0.3]))
        video, audio = family.predict(torch.randn(1, 16, 2, 2, 2, generator=g), torch.tensor([0.3]), text,
                                      Expert("transformer", "", model, (0.0, 1.0)), sound=sound)
        (video.square().mean() + audio.square().mean()).backward()
        gradients[mode] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    assert gradients["ON"].norm() > 0
    assert torch.equal(gradients["CPU_OFFLOADED"], gradients["ON"]) and torch.equal(gradients["offloaded"], gradients["ON"])
    assert offloader.max_resident <= 1


def test_fine_tune_saves_load_in_diffusers_both_ways(tiny_models, tmp_path):
    """FINE_TUNE of the transformer: the COMFY_TRANSFORMER file (original names) read by `from_single_file` holds
    exactly the weights the same run saved as a diffusers folder, and they trained."""
    from diffusers import LTX2VideoTransformer3DModel
    from test_lora_formats import also_saved_as

    from motiontune.methods import finetune
    from motiontune.testing.clips import write_clip_with_tone

    model = tiny_models("ltx-2")
    (tmp_path / "data").mkdir()
    write_clip_with_tone(tmp_path / "data" / "tone.mkv", 12 / FPS, fps=FPS, frames=_shapes(12), layout="stereo")
    config = base_config(tmp_path, model, tmp_path / "data", model_type="LTX_2", training_method="FINE_TUNE",
                         output_model_format="COMFY_TRANSFORMER", output_model_destination=str(tmp_path / "tuned.safetensors"),
                         resolution=str(SIZE), epochs=1, video_config={"max_frames": FRAMES, "target_fps": float(FPS)})
    with also_saved_as(finetune, "DIFFUSERS", lambda path: path.with_name("tuned-folder")):
        assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0
    folder = LTX2VideoTransformer3DModel.from_pretrained(tmp_path / "tuned-folder").state_dict()
    single = LTX2VideoTransformer3DModel.from_single_file(str(tmp_path / "tuned.safetensors"), config=str(model),
                                                          subfolder="transformer").state_dict()
    assert sorted(single) == sorted(folder) and all(torch.equal(single[k], folder[k]) for k in folder)
    stock = LTX2VideoTransformer3DModel.from_pretrained(model, subfolder="transformer").state_dict()
    assert not torch.equal(folder["audio_proj_out.weight"], stock["audio_proj_out.weight"])  # the audio side trained too


CLICKS = (0.0, 0.3, 0.7, 1.1, 1.5, 1.9)  # seconds on the video's clock; the first at the stream's very start


def _write_clip_with_clicks(path: Path, seconds: float = 2.0, rate: int = 48000) -> Path:
    """The shapes frames at FPS with an AAC (MP4) track that is silent but for a 1 ms click at each of CLICKS: AAC's
    encoder delay (1024 priming samples, dropped by the demuxer only when the stream is read from its start) is
    what put LTX-2's sound windows about 20 ms off."""
    from fractions import Fraction

    frames = _shapes(round(seconds * FPS))
    wave = np.zeros(round(seconds * rate), np.float32)
    for t in CLICKS:
        wave[round(t * rate): round(t * rate) + rate // 1000] = 0.8
    pcm = (np.stack([wave, wave]) * 32767).astype(np.int16)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width = video.height = SIZE
        video.pix_fmt = "yuv444p"
        audio = container.add_stream("aac", rate=rate, layout="stereo")
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            container.mux(video.encode(frame))
        container.mux(video.encode())
        for start in range(0, pcm.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, start:start + 1024].T).reshape(1, -1), format="s16",
                                               layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
    return path


def _independent_sound(clip: Path, start: float, count: int) -> np.ndarray:
    """PyAV, nothing of motiontune: the whole stream decoded from its start, converted to 16 kHz stereo in one pass,
    cut at the window (`start` seconds, `count` samples)."""
    with av.open(str(clip)) as container:
        resampler = av.AudioResampler(format="fltp", layout="stereo", rate=16000)
        frames = list(container.decode(audio=0))
        first = frames[0].time
        sound = np.concatenate([r.to_ndarray() for f in frames + [None] for r in resampler.resample(f)], axis=1)
    at = round(start * 16000) - round(first * 16000)
    return sound[:, at: at + count]


def test_sound_windows_start_where_their_first_frame_starts(tiny_models, tmp_path, monkeypatch):
    """AAC in MP4, two windows (one at the file's start): each click lands at its own sample in what motiontune feeds
    the audio VAE, the waveform equals an independent PyAV decode of the window, and the cached latents equal that
    waveform's through the stock audio VAE (transformers' numpy log-mel)."""
    from diffusers import LTX2Pipeline
    from safetensors.torch import load_file

    from motiontune.data import latents as latents_module

    data = tmp_path / "data"
    data.mkdir()
    clip = _write_clip_with_clicks(data / "clicks.mp4")
    (data / "clicks.txt").write_text(PROMPT)
    fed = []
    decode = latents_module.decode_audio
    monkeypatch.setattr(latents_module, "decode_audio", lambda *args: fed.append((args[2], decode(*args))) or fed[-1][1])
    config = base_config(tmp_path, tiny_models("ltx-2"), data, model_type="LTX_2", resolution=str(SIZE), dataloader_threads=0,
                         video_config={"max_frames": FRAMES, "target_fps": float(FPS), "clips_per_file": 2})
    assert main(["cache", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0
    assert sorted(start for start, _ in fed)[0] == 0.0 and len(fed) == 2
    pipe = LTX2Pipeline.from_pretrained(tiny_models("ltx-2"))
    cached = [load_file(str(p))["audio"] for p in (tmp_path / "cache" / "latents").rglob("*.safetensors")]
    expected_latents = []
    for start, sound in sorted(fed):
        count = round(FRAMES / FPS * 16000)
        onsets = np.flatnonzero(np.abs(sound[0]) > 0.2)
        onsets = onsets[np.r_[True, np.diff(onsets) > 100]] if len(onsets) else onsets
        expected = [round((t - start) * 16000) for t in CLICKS if 0 <= t - start < FRAMES / FPS - 0.002]
        independent = _independent_sound(clip, start, count)
        error = np.linalg.norm(sound - independent) / np.linalg.norm(independent)
        print(f"window from {start:.4f} s: clicks at samples {onsets.tolist()}, expected {expected}; relative "
              f"difference from the independent decode {error:.2e}")
        assert len(onsets) == len(expected) and all(abs(a - b) <= 1 for a, b in zip(onsets, expected))
        assert error < 1e-4
        expected_latents.append(_audio_latents(pipe, independent))
    assert len(cached) == 2
    for theirs in expected_latents:  # each window's latents are in the cache (entries do not name their window)
        error = min(((ours - theirs).norm() / theirs.norm()).item() for ours in cached)
        print(f"cached audio latents against the independent path's: relative difference {error:.2e}")
        assert error < 1e-3


def _audio_latents(pipe, sound: np.ndarray) -> torch.Tensor:
    """16 kHz stereo samples → the packed, normalised audio latents the stock pipeline denoises (transformers' numpy
    log-mel with the audio VAE's own settings)."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    cfg = pipe.audio_vae.config
    bank = mel_filter_bank(num_frequency_bins=513, num_mel_filters=cfg.mel_bins, min_frequency=0.0, max_frequency=8000.0,
                           sampling_rate=16000, norm="slaney", mel_scale="slaney")
    mel = np.stack([spectrogram(channel, window_function(1024, "hann"), frame_length=1024, hop_length=cfg.mel_hop_length,
                                power=1.0, mel_filters=bank, mel_floor=1e-5, log_mel=None).T for channel in sound])
    with torch.no_grad():
        audio = pipe.audio_vae.encode(torch.log(torch.from_numpy(mel).float())[None]).latent_dist.mean
    steps = round(FRAMES / FPS * 16000 / cfg.mel_hop_length / 4)
    return pipe._normalize_audio_latents(pipe._pack_audio_latents(audio)[:, :steps], pipe.audio_vae.latents_mean,
                                         pipe.audio_vae.latents_std)[0]


# --- LTX-2.3 and LTX-2.5: their own model types, the same acceptance as LTX-2 ---------------------------------------
VARIANTS = {"LTX_2_3": "ltx-2.3", "LTX_2_5": "ltx-2.5"}
VARIANT_EPOCHS = {"LTX_2_3": 120, "LTX_2_5": 250}  # steps each needs to pass with room (2.5 at 120: video 0.74)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant_run(request, tiny_models, tmp_path_factory):
    """One LoRA run per newer checkpoint on the clip with a 440 Hz tone, audio and video noised apart (the default)."""
    model_type = request.param
    return model_type, _train(tiny_models(VARIANTS[model_type]), tmp_path_factory.mktemp(model_type.lower()), model_type,
                              epochs=VARIANT_EPOCHS[model_type], learning_rate=1e-2)


def test_newer_checkpoints_move_the_stock_pipeline_towards_the_clip(variant_run):
    """The stock pipeline of LTX-2.3 / 2.5 (their connectors, Gemma, vocoder) plus the saved LoRA: video and audio
    latents each come closer to the clip's; against the sign-flipped latents (negative control) they do not, compared
    at the base samples' energy (`_energy_matched`)."""
    model_type, (model, clip, lora, _) = variant_run
    targets, base, trained_samples = _stock_samples(model, clip, lora)
    video_ratio, audio_ratio = map(_ratio, trained_samples, base, targets)
    flipped = [_ratio(_energy_matched(with_lora, without), without, -target)
               for with_lora, without, target in zip(trained_samples, base, targets)]
    shrunk = [(w.norm() / b.norm()).item() for w, b in zip(trained_samples, base)]
    print(f"{model_type}: MSE ratio with/without LoRA: video {video_ratio:.3f}, audio {audio_ratio:.3f}; against the "
          f"sign-flipped latents at the base samples' energy (negative control): video {flipped[0]:.3f}, audio "
          f"{flipped[1]:.3f}; norm with/without LoRA: video {shrunk[0]:.3f}, audio {shrunk[1]:.3f}")
    # measured: LTX-2.3 (120 steps) video 0.593, audio 0.704, flipped (as they were, unmatched) 1.205 / 1.400; LTX-2.5
    # (250 steps) video 0.649, audio 0.739, flipped unmatched 0.929 / 1.263 (the reason for matching: _energy_matched),
    # matched 1.167 / 1.253 (the LoRA's samples at 0.818 / 1.008 of the base samples' norm)
    assert video_ratio < 0.7 and audio_ratio < 0.8, "the samples did not move towards the clip"
    assert min(flipped) > 1.0


def _energy_matched(with_lora: torch.Tensor, without: torch.Tensor) -> torch.Tensor:
    """Each LoRA sample scaled to its base sample's norm (per seed). The sign-flipped clip is a fair negative control
    only for samples of the clip's energy: these tiny models' base samples carry about twice the energy of the clip's
    normalised latents (LTX-2.5 video: mean square 1.22 against 0.70), so a LoRA that learns the clip also shrinks
    them, which alone lowers the error to any latent of smaller energy, the flipped clip included (LTX-2.5's LoRA took
    a third of the energy off while its cosine with the clip rose from 0.01 to about 0.19: 0.929 unmatched). At equal
    energy the flipped error falls only if the samples turned towards the flipped clip."""
    dims = tuple(range(1, with_lora.ndim))
    norm = functools.partial(torch.linalg.vector_norm, dim=dims, keepdim=True)
    return with_lora * (norm(without) / norm(with_lora))


def test_the_energy_matched_control_fails_a_lora_that_only_shrinks_or_turns_away():
    """The matched negative control cannot be passed by shrinking: base samples of twice a target's energy, a "LoRA"
    that only halves them lands at ratio 1 against the flipped target (not above), one that turns them away from the
    target below 1, one that turns them towards it above 1; unmatched, the halving alone comes out below 1 too."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(1, 16, 3, 2, 2, generator=generator)
    base = 2 ** 0.5 * torch.randn(4, 16, 3, 2, 2, generator=generator)
    ratios = {name: _ratio(_energy_matched(sample, base), base, -target)
              for name, sample in (("shrunk", 0.5 * base), ("away", 0.6 * base - 0.4 * target), ("towards", 0.6 * base + 0.4 * target))}
    print(f"matched flipped ratios: {ratios}; unmatched, shrunk: {_ratio(0.5 * base, base, -target):.3f}")
    assert abs(ratios["shrunk"] - 1) < 1e-5 and ratios["away"] < 1 < ratios["towards"]
    assert _ratio(0.5 * base, base, -target) < 1


def test_newer_checkpoints_sample_at_their_vocoders_rate(variant_run):
    """The sample written during training has the bandwidth-extended vocoder's 48 kHz stereo track."""
    model_type, (*_, tmp) = variant_run
    with av.open(str(tmp / "workspace" / "samples" / f"epoch{VARIANT_EPOCHS[model_type]}-0.mp4")) as container:
        audio = container.streams.audio[0]
        assert (audio.codec_context.name, audio.rate, audio.channels) == ("aac", 48000, 2)


@pytest.mark.parametrize("model_type", sorted(VARIANTS))
def test_video_only_writes_no_audio_keys_and_keeps_the_audio_branch(model_type, tiny_models, tmp_path):
    """train_audio false with a clip that has sound: the LoRA names no audio module, and through the stock
    transformer with the modalities isolated (the pipeline's own switch) the audio prediction is bit-identical to the
    base model's. In the joint pipeline the audio still attends to the (changed) video: that change is printed."""
    from diffusers import LTX2Pipeline
    from safetensors.torch import load_file

    model = tiny_models(VARIANTS[model_type])
    _, _, lora, _ = _train(model, tmp_path, model_type, epochs=8, learning_rate=1e-2, train_audio=False, sample_after_unit="NEVER")
    keys = list(load_file(str(lora)))
    assert keys and not any("audio" in k for k in keys)
    assert any(".attn1." in k for k in keys) and any(".ff." in k for k in keys)
    pipe = LTX2Pipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    inputs = _transformer_inputs(pipe)
    with torch.no_grad():
        base_isolated, base_joint = (pipe.transformer(**inputs, isolate_modalities=i) for i in (True, False))
        pipe.load_lora_weights(str(lora))
        isolated, joint = (pipe.transformer(**inputs, isolate_modalities=i) for i in (True, False))
    video_change = ((joint[0] - base_joint[0]).norm() / base_joint[0].norm()).item()
    joint_change = ((joint[1] - base_joint[1]).norm() / base_joint[1].norm()).item()
    print(f"{model_type} video only: {len(keys)} LoRA tensors, none audio; audio prediction with modalities isolated "
          f"identical; video prediction moved {video_change:.3f}, joint audio prediction moved {joint_change:.4f} (via "
          "video-to-audio attention)")
    assert torch.equal(isolated[1], base_isolated[1]) and video_change > 0.01


def _transformer_inputs(pipe) -> dict:
    """One denoising call's inputs as the stock pipeline builds them: its connectors' outputs for PROMPT, noise."""
    g = torch.Generator().manual_seed(0)
    embeds, mask, _, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, device=torch.device("cpu"))
    video_text, audio_text, text_mask = pipe.connectors(embeds, mask, padding_side="left")
    steps = round(FRAMES / FPS * 25)
    t = torch.tensor([500.0])
    return dict(hidden_states=torch.randn(1, 2 * 2 * 2, 16, generator=g), audio_hidden_states=torch.randn(1, steps, 16, generator=g),
                encoder_hidden_states=video_text, audio_encoder_hidden_states=audio_text, timestep=t, sigma=t,
                encoder_attention_mask=text_mask, audio_encoder_attention_mask=text_mask, num_frames=2, height=2, width=2,
                fps=float(FPS), audio_num_frames=steps, use_cross_timestep=True, return_dict=False)


def test_audio_noise_levels_loss_weight_and_log(tiny_models, tmp_path, monkeypatch, capsys):
    """INDEPENDENT (the default) gives the audio a noise level of its own, SHARED the video's; the audio loss is its own
    scalar in TensorBoard (`loss/audio`) and the progress line, and `loss` adds it times audio_loss_weight."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from motiontune.models.ltx2 import LTX2Family

    def scalars_of(run: Path, tag: str) -> list[float]:
        events = EventAccumulator(str(run / "workspace" / "tensorboard"))
        events.Reload()
        return [e.value for e in events.Scalars(tag)]

    seen = []
    predict = LTX2Family.predict
    monkeypatch.setattr(LTX2Family, "predict", lambda self, noisy, sigma, *args, sound=None, **kw: (
        seen.append((sigma.clone(), None if sound is None else sound.sigma.clone())), predict(self, noisy, sigma, *args, sound=sound, **kw))[1])
    model = tiny_models("ltx-2")
    scalars = {}
    for how, weight in (("INDEPENDENT", 0.0), ("SHARED", 2.0)):
        seen.clear()
        _, _, _, run = _train(model, tmp_path / how, epochs=4, audio_noise_level=how, audio_loss_weight=weight,
                              sample_after_unit="NEVER", video_config={"max_frames": FRAMES, "target_fps": float(FPS),
                                                                       "temporal_consistency_weight": 0.0})
        video, audio = map(torch.cat, zip(*seen))
        with capsys.disabled():  # capsys holds the progress line, read below
            print(f"{how}: video σ {[round(v, 3) for v in video.tolist()]}, audio σ {[round(a, 3) for a in audio.tolist()]}; "
                  f"loss/audio {[round(a, 4) for a in scalars_of(run, 'loss/audio')]}")
        assert torch.equal(video, audio) == (how == "SHARED")
        scalars[how] = {tag: scalars_of(run, tag) for tag in ("loss", "loss/flow", "loss/audio")}
        total = [flow + weight * audio for flow, audio in zip(scalars[how]["loss/flow"], scalars[how]["loss/audio"])]
        assert all(abs(a - b) < 1e-4 * max(1.0, abs(b)) for a, b in zip(scalars[how]["loss"], total))
        assert min(scalars[how]["loss/audio"]) > 0
    assert "audio=" in capsys.readouterr().err


def test_help_and_readme_name_every_family_and_ltx_checkpoint(capsys):
    """`motiontune --help` and the README's first paragraph name every family (HunyuanVideo 1.5 and LTX-2 were missing)
    and each LTX checkpoint."""
    from motiontune.models.ltx2 import VERSIONS
    from motiontune.models.registry import families

    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split("\n\n")[1].split())
    names = [family.NAME for family in families()] + [version.name for version in VERSIONS.values()]
    for name in names:
        assert name in help_text and name in readme, name
