"""LTX-2 in-context control LoRAs (IC-LoRA, `in_context_control`): each clip's `-control` video is trained as the
in-context tokens of `LTX2InContextPipeline(reference_conditions=...)`.

First, the layout against the stock pipeline: the control latents motiontune caches are the reference tokens the
pipeline appends, and the family's transformer call (noisy tokens, then the clean control tokens at timestep 0, each
at its position) gives exactly the pipeline's own prediction for the same inputs.

End to end: two real clips (moving shapes, Big Buck Bunny) with one caption, each with an edge video made from its own
frames (PyAV) as its control, so only the control tells them apart. A LoRA trained with `motiontune train` and sampled
by the stock IC pipeline (no motiontune code) given a clip's control comes closer to that clip than the base model
does, and the same LoRA given the other clip's control comes out further from it: the LoRA follows the control. It
trains the video alone (no audio key in the file), and ComfyUI v0.30.0 applies every key of it.
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
from test_first_last_frame import _frames, _write_clip
from test_ltx2 import FPS, FRAMES, GUIDANCE_OFF, PROMPT, SEEDS, SIZE, _ratio
from test_vace import _edges

EPOCHS = 120  # both clips in each batch: 120 steps (measured: 0.380 and 1.424)
VERSIONS = {"LTX_2": "ltx-2", "LTX_2_3": "ltx-2.3", "LTX_2_5": "ltx-2.5"}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> tuple[Path, Path]:
    """Two real clips at SIZE (no sound), one caption, each with its edge video as `<clip>-control.mp4`."""
    return clips_with_edge_controls(tmp_path_factory.mktemp("ic-lora") / "data", SIZE)


def clips_with_edge_controls(folder: Path, size: int) -> tuple[Path, Path]:
    """The shapes and bunny clips at `size` in `folder`, each with its edge video as `<clip>-control.mp4`."""
    folder.mkdir()
    made = []
    for name, frames in (("shapes", _frames(90, 6, size=size)),
                         ("bunny", _frames(0, 2, source="big_buck_bunny_432_433.webm", size=size))):
        made.append(_write_clip(folder / f"{name}.mp4", frames))
        _write_clip(folder / f"{name}-control.mp4", _edges(frames)).with_suffix(".txt").unlink()
    return tuple(made)


def _control(clip: Path) -> list[Image.Image]:
    with av.open(str(clip.with_name(f"{clip.stem}-control.mp4"))) as container:
        return [f.to_image() for f in container.decode(video=0)]


def _reference(clip: Path):
    from diffusers.pipelines.ltx2.pipeline_ltx2_ic_lora import LTX2ReferenceCondition

    return [LTX2ReferenceCondition(frames=_control(clip), strength=1.0)]


def _ic_config(model: Path, data: Path, **keys) -> dict:
    return {"model_type": "LTX_2", "base_model_name": str(model), "concepts": [{"path": str(data)}],
            "in_context_control": True, "train_audio": False, "train_dtype": "FLOAT_32", **keys}


@pytest.mark.parametrize("model_type", VERSIONS)
def test_cached_control_and_transformer_call_are_the_pipelines_own(model_type, tiny_models, clips):
    """The first step of the stock IC pipeline, its transformer call recorded: its reference tokens are the control
    latents motiontune caches, and `predict` given the same noisy tokens, σ and sound returns the pipeline's own video
    and audio predictions (token order, per-token timesteps 0 / t, positions and frame rate all as the pipeline's).
    LTX-2.3 and 2.5 through the same pipeline, with their cross-modal timestep (`use_cross_timestep`)."""
    from diffusers import LTX2InContextPipeline, LTX2Pipeline

    from motiontune.config import TrainConfig
    from motiontune.models.base import Conditioning, Sound
    from motiontune.models.ltx2 import VERSIONS as CHECKPOINTS, LTX2Family

    model = tiny_models(VERSIONS[model_type])
    config = TrainConfig.model_validate(_ic_config(model, clips[0].parent, model_type=model_type,
                                                   video_config={"target_fps": float(FPS)}))
    family = LTX2Family(config, torch.device("cpu"))
    family.load_vae()
    family.load_transformers()
    family.load_text_encoder()
    stored = family.encode_condition("control", np.stack([np.asarray(frame) for frame in _control(clips[0])]))

    pipe = LTX2InContextPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda m, args, kwargs, out: calls.append((kwargs, out)), with_kwargs=True)
    pipe(PROMPT, reference_conditions=_reference(clips[0]), height=SIZE, width=SIZE, num_frames=FRAMES, frame_rate=float(FPS),
         num_inference_steps=2, use_cross_timestep=CHECKPOINTS[model_type].cross_timestep, output_type="latent",
         generator=torch.Generator().manual_seed(0), **GUIDANCE_OFF)
    hook.remove()
    tokens = stored[0].numel()  # the clip's latent grid: as many tokens as the control's
    reference = LTX2Pipeline._pack_latents(stored[None])
    text = family.encode_prompts([PROMPT])
    expert = family.trained_experts()[0]
    for step, (inputs, (video_out, audio_out)) in enumerate(calls):  # σ = 1, then a partly denoised clip
        hidden, t = inputs["hidden_states"], inputs["timestep"][0, 0]
        print(f"step {step}: pipeline tokens {tuple(hidden.shape)}, timesteps {inputs['timestep'][0].tolist()}; cached "
              f"control vs its reference tokens: max difference {(hidden[:, tokens:] - reference).abs().max():.2e}")
        assert hidden.shape[1] == 2 * tokens and torch.allclose(hidden[:, tokens:], reference, atol=1e-5)
        assert t > 0 and torch.equal(inputs["timestep"][0, tokens:], torch.zeros(tokens))  # clean, at timestep 0
        noisy = LTX2Pipeline._unpack_latents(hidden[:, :tokens], *stored.shape[1:])
        sound = Sound(inputs["audio_hidden_states"], inputs["audio_timestep"] / 1000)
        with torch.no_grad():
            ours_video, ours_audio = family.predict(noisy, (t / 1000)[None], text, expert,
                                                    Conditioning(stored[None], torch.ones(1, dtype=torch.bool)), sound=sound)
            plain, _ = family.predict(noisy, (t / 1000)[None], text, expert, None, sound=sound)  # without the control
        theirs = LTX2Pipeline._unpack_latents(video_out[:, :tokens], *stored.shape[1:])
        gap = ((ours_video - theirs).norm() / theirs.norm()).item()
        control_effect = ((plain - theirs).norm() / theirs.norm()).item()
        print(f"{model_type} step {step}, predict vs the pipeline's transformer call: video {gap:.2e}, audio "
              f"{((ours_audio - audio_out).norm() / audio_out.norm()).item():.2e} relative; without the control tokens "
              f"{control_effect:.2e}")
        assert gap < 1e-5 and torch.allclose(ours_audio, audio_out, atol=1e-5)
        assert control_effect > 1e-3  # the control tokens matter to the call: the comparison above could tell
    assert len(calls) == 2 and calls[1][0]["timestep"][0, 0] < 1000


def test_in_context_control_config_rules(tiny_models, clips):
    """in_context_control is LTX's alone, trains the video alone, and a sample needs a control video."""
    from motiontune.configure import family_problems, validate

    def problems(**keys):
        return "\n".join(family_problems(validate(_ic_config(Path("model"), clips[0].parent, **keys))))

    control = str(clips[0].with_name("shapes-control.mp4"))
    assert problems(samples=[{"prompt": PROMPT, "control": control}]) == ""
    assert "in_context_control with train_audio = true" in problems(train_audio=True)
    assert "in_context_control: WAN_2_1_T2V does not take a control video as in-context tokens" in problems(model_type="WAN_2_1_T2V")
    assert "samples[0].control: LTX_2 makes videos that follow a control video" in problems(samples=[{"prompt": PROMPT}])
    plain = "\n".join(family_problems(validate({"model_type": "LTX_2", "concepts": [{"path": "."}],
                                                "samples": [{"prompt": PROMPT, "control": control}]})))
    assert "samples[0].control: LTX_2 does not take a control video" in plain


@pytest.fixture(scope="module")
def trained(tiny_models, clips, tmp_path_factory):
    """One IC-LoRA run over both clips with their controls; a sample during training follows the shapes control."""
    tmp = tmp_path_factory.mktemp("ic-lora-run")
    model, (shapes, _) = tiny_models("ltx-2"), clips
    sample = {"prompt": PROMPT, "frames": FRAMES, "height": SIZE, "width": SIZE, "steps": 2, "fps": FPS,
              "control": str(shapes.with_name("shapes-control.mp4"))}
    config = base_config(tmp, model, shapes.parent, model_type="LTX_2", in_context_control=True, train_audio=False,
                         resolution=str(SIZE), epochs=EPOCHS, batch_size=2, learning_rate=1e-2, lora_rank=16, lora_alpha=16,
                         video_config={"max_frames": FRAMES, "target_fps": float(FPS), "video_batch_size_multiplier": 1.0},
                         samples=[sample], sample_after=EPOCHS, sample_after_unit="EPOCH")
    assert main(["train", "--config", str(write_config(tmp / "config.json", **config))]) == 0
    return model, Path(config["output_model_destination"]), tmp


def _latents(pipe, frames: np.ndarray) -> torch.Tensor:
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean
    return pipe._normalize_latents(latents, pipe.vae.latents_mean, pipe.vae.latents_std, pipe.vae.config.scaling_factor)


def test_stock_ic_pipeline_follows_the_control_the_lora_learnt(trained, clips):
    """No motiontune code: the stock LTX2InContextPipeline, its LoRA loader, the clip's latents computed here."""
    from diffusers import LTX2InContextPipeline

    model, lora, tmp = trained
    shapes, bunny = clips
    assert (tmp / "workspace" / "samples" / f"epoch{EPOCHS}-0.mp4").is_file()  # sampled through the IC pipeline
    keys = list(load_file(str(lora)))
    assert keys and not any("audio" in k for k in keys)  # the video alone trained

    pipe = LTX2InContextPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    with av.open(str(shapes)) as container:
        target = _latents(pipe, np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]))

    def samples(control: Path) -> torch.Tensor:
        return torch.cat([
            pipe._normalize_latents(pipe(PROMPT, reference_conditions=_reference(control), height=SIZE, width=SIZE,
                                         num_frames=FRAMES, frame_rate=float(FPS), num_inference_steps=10,
                                         use_cross_timestep=False, output_type="latent", return_dict=False,
                                         generator=torch.Generator().manual_seed(seed), **GUIDANCE_OFF)[0],
                                    pipe.vae.latents_mean, pipe.vae.latents_std, pipe.vae.config.scaling_factor)
            for seed in SEEDS])

    base = samples(shapes)
    pipe.load_lora_weights(str(lora))
    own, other = samples(shapes), samples(bunny)
    lora_ratio, control_ratio = _ratio(own, base, target), _ratio(other, own, target)
    print(f"LTX-2 IC-LoRA: MSE to the clip with/without the LoRA {lora_ratio:.3f}; with the other clip's control / its "
          f"own {control_ratio:.3f}; {len(keys)} LoRA tensors, none audio")
    assert lora_ratio < 0.7, "the stock IC pipeline's samples did not move towards the clip"
    assert control_ratio > 1.1, "the LoRA ignores the control: another clip's control did as well"


def test_comfyui_applies_every_key_of_the_ic_lora(trained, tmp_path):
    """ComfyUI v0.30.0's own loaders take the IC-LoRA file (video keys only) as they take any LTX-2 LoRA: every key
    applied, and the weights change by what diffusers' stock pipeline fuses from the same file."""
    from comfyui.harness import comfy_lora_deltas
    from test_lora_formats import comfy_transformer_files, family_of, fused_weights

    model, lora, _ = trained
    [base] = comfy_transformer_files("LTX_2", model, tmp_path).values()
    result = comfy_lora_deltas("LTX_2", base, lora, model)
    family, _ = family_of("LTX_2", model)
    fused = family.single_file_state_dict(None, torch.float32, fused_weights("LTX_2", model, {"": lora})["transformer"])
    stock = load_file(str(base))
    theirs = {k: fused[k] - stock[k] for k in stock if not torch.equal(fused[k], stock[k])}
    ours = result.deltas(stock)
    gap = max(((ours[k] - theirs[k]).norm() / theirs[k].norm()).item() for k in theirs)
    print(f"IC-LoRA in ComfyUI {result.model_class}: {result.lora_keys} tensors, {len(result.not_loaded)} not loaded, "
          f"{len(theirs)} weights changed; deltas vs diffusers' {gap:.2e} relative")
    assert result.not_loaded == [] and result.lora_keys == len(load_file(str(lora)))
    assert set(ours) == set(theirs) and not any("audio" in k for k in ours) and gap <= 1e-5
