"""LTX-2 IC-LoRA with a control at a lower resolution than its clip (`reference_downscale_factor`, as
`LTX2InContextPipeline(reference_downscale_factor=N)` and Lightricks' IC-LoRA files call it).

The control is encoded at 1/N of the clip's height and width (the pipeline's own video processor resizes it) and its
tokens sit on the clip's grid (spatial positions times N). Checked against the stock pipeline's first transformer call:
the reference tokens and positions are motiontune's, and `predict` returns the pipeline's prediction. One short run
trains at N = 2 and writes the factor into the LoRA file's metadata. `MOTIONTUNE_LTX2_IC_DOWNSCALE=1` runs the
end-to-end acceptance (train, then sample with the stock IC pipeline at the same factor).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import base_config, write_config
from motiontune.cli import main
from test_ltx2 import FPS, FRAMES, GUIDANCE_OFF, PROMPT, SEEDS, _ratio
from test_ltx2_ic_lora import _control, _ic_config, _latents, _reference, clips_with_edge_controls

FACTOR = 2
SIZE = 128  # the control at 64 x 64: 2 x 2 latent pixels per frame through the 32x VAE


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> tuple[Path, Path]:
    return clips_with_edge_controls(tmp_path_factory.mktemp("ic-downscale") / "data", SIZE)


def test_downscaled_control_is_the_pipelines_own(tiny_models, clips):
    """The stock IC pipeline's first transformer call at reference_downscale_factor 2: its reference tokens are the
    control latents motiontune caches, their positions the ones `predict` gives them, and `predict` returns the
    pipeline's own prediction for the same noisy tokens."""
    from diffusers import LTX2InContextPipeline, LTX2Pipeline

    from motiontune.config import TrainConfig
    from motiontune.models.base import Conditioning, Sound
    from motiontune.models.ltx2 import LTX2Family

    model = tiny_models("ltx-2")
    config = TrainConfig.model_validate(_ic_config(model, clips[0].parent, reference_downscale_factor=FACTOR,
                                                   resolution=str(SIZE), video_config={"target_fps": float(FPS)}))
    family = LTX2Family(config, torch.device("cpu"))
    family.load_vae()
    family.load_transformers()
    family.load_text_encoder()
    stored = family.encode_condition("control", np.stack([np.asarray(frame) for frame in _control(clips[0])]))
    assert stored.shape[2:] == (SIZE // 32 // FACTOR, SIZE // 32 // FACTOR)

    pipe = LTX2InContextPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda m, args, kwargs, out: calls.append((kwargs, out)), with_kwargs=True)
    pipe(PROMPT, reference_conditions=_reference(clips[0]), reference_downscale_factor=FACTOR, height=SIZE, width=SIZE,
         num_frames=FRAMES, frame_rate=float(FPS), num_inference_steps=2, use_cross_timestep=False, output_type="latent",
         generator=torch.Generator().manual_seed(0), **GUIDANCE_OFF)
    hook.remove()
    inputs, (video_out, _) = calls[0]
    grid = (stored.shape[1], SIZE // 32, SIZE // 32)
    tokens = grid[0] * grid[1] * grid[2]
    reference = LTX2Pipeline._pack_latents(stored[None])
    hidden, t = inputs["hidden_states"], inputs["timestep"][0, 0]
    token_gap = (hidden[:, tokens:] - reference).abs().max().item()
    noisy = LTX2Pipeline._unpack_latents(hidden[:, :tokens], *grid)
    expert = family.trained_experts()[0]
    _, _, coords = family._in_context(expert.module, noisy, hidden[:, :tokens], t[None], stored[None])
    sound = Sound(inputs["audio_hidden_states"], inputs["audio_timestep"] / 1000)
    with torch.no_grad():
        ours, _ = family.predict(noisy, (t / 1000)[None], family.encode_prompts([PROMPT]), expert,
                                 Conditioning(stored[None], torch.ones(1, dtype=torch.bool)), sound=sound)
    theirs = LTX2Pipeline._unpack_latents(video_out[:, :tokens], *grid)
    gap = ((ours - theirs).norm() / theirs.norm()).item()
    print(f"downscale {FACTOR}: pipeline tokens {tuple(hidden.shape)} ({tokens} clip + {reference.shape[1]} control); "
          f"control tokens max difference {token_gap:.2e}; positions equal "
          f"{torch.equal(coords, inputs['video_coords'])}; predict vs the pipeline's call {gap:.2e} relative")
    assert hidden.shape[1] == tokens + tokens // FACTOR**2 and token_gap <= 1e-5
    assert torch.equal(coords, inputs["video_coords"])
    assert inputs["video_coords"][0, 1, tokens:].max() > inputs["video_coords"][0, 1, tokens:].min()  # scaled, not 0
    assert gap < 1e-5


def test_downscaled_ic_lora_trains_a_step_and_says_its_factor(tiny_models, clips, tmp_path, capsys):
    """One step at batch 2: the clips are sized in multiples of 32 x 2, the control encoded at half size, and the LoRA
    file carries `reference_downscale_factor` in its metadata as Lightricks' IC-LoRA files do. The factor changes the
    control's cache key; it is refused where it does nothing."""
    from motiontune.configure import family_problems, keys_that_do_not_apply, validate
    from motiontune.models.ltx2 import LTX2Family

    config = base_config(tmp_path, tiny_models("ltx-2"), clips[0].parent, model_type="LTX_2", in_context_control=True,
                         train_audio=False, reference_downscale_factor=FACTOR, resolution="160", epochs=1, batch_size=2,
                         video_config={"max_frames": FRAMES, "target_fps": float(FPS), "video_batch_size_multiplier": 1.0})
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0
    err = capsys.readouterr().err
    assert "width x height must be multiples of 64" in err  # 160 → 128: the half-size control is whole VAE cells
    with safe_open(config["output_model_destination"], "pt") as lora:
        assert lora.metadata()["reference_downscale_factor"] == str(FACTOR)
    plain = validate(_ic_config(Path("m"), clips[0].parent))
    assert LTX2Family.condition_format(validate(_ic_config(Path("m"), clips[0].parent, reference_downscale_factor=2))) \
        != LTX2Family.condition_format(plain) == ""
    assert "reference_downscale_factor" in keys_that_do_not_apply(validate(
        {"model_type": "LTX_2", "concepts": [{"path": "."}]}))
    assert "reference_downscale_factor" in keys_that_do_not_apply(validate(
        {"model_type": "WAN_2_1_T2V", "concepts": [{"path": "."}]}))
    assert family_problems(plain) == []


EPOCHS = 150


@pytest.mark.skipif(os.environ.get("MOTIONTUNE_LTX2_IC_DOWNSCALE") != "1",
                    reason="end-to-end LTX-2 IC-LoRA at reference_downscale_factor 2 (minutes); set MOTIONTUNE_LTX2_IC_DOWNSCALE=1")
def test_stock_ic_pipeline_follows_the_downscaled_control_the_lora_learnt(tiny_models, clips, tmp_path):
    from diffusers import LTX2InContextPipeline
    from diffusers.pipelines.ltx2.pipeline_ltx2_ic_lora import LTX2ReferenceCondition

    import av

    model, (shapes, bunny) = tiny_models("ltx-2"), clips
    config = base_config(tmp_path, model, shapes.parent, model_type="LTX_2", in_context_control=True, train_audio=False,
                         reference_downscale_factor=FACTOR, resolution=str(SIZE), epochs=EPOCHS, batch_size=2,
                         learning_rate=1e-2, lora_rank=16, lora_alpha=16,
                         video_config={"max_frames": FRAMES, "target_fps": float(FPS), "video_batch_size_multiplier": 1.0},
                         samples=[{"prompt": PROMPT, "frames": FRAMES, "height": SIZE, "width": SIZE, "steps": 2, "fps": FPS,
                                   "control": str(shapes.with_name("shapes-control.mp4"))}],
                         sample_after=EPOCHS, sample_after_unit="EPOCH")
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0
    assert (tmp_path / "workspace" / "samples" / f"epoch{EPOCHS}-0.mp4").is_file()

    pipe = LTX2InContextPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    with av.open(str(shapes)) as container:
        target = _latents(pipe, np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]))

    def samples(control: Path) -> torch.Tensor:
        reference = [LTX2ReferenceCondition(frames=_control(control), strength=1.0)]
        return torch.cat([
            pipe._normalize_latents(pipe(PROMPT, reference_conditions=reference, reference_downscale_factor=FACTOR,
                                         height=SIZE, width=SIZE, num_frames=FRAMES, frame_rate=float(FPS),
                                         num_inference_steps=10, use_cross_timestep=False, output_type="latent",
                                         return_dict=False, generator=torch.Generator().manual_seed(seed),
                                         **GUIDANCE_OFF)[0],
                                    pipe.vae.latents_mean, pipe.vae.latents_std, pipe.vae.config.scaling_factor)
            for seed in SEEDS])

    base = samples(shapes)
    pipe.load_lora_weights(config["output_model_destination"])
    own, other = samples(shapes), samples(bunny)
    lora_ratio, control_ratio = _ratio(own, base, target), _ratio(other, own, target)
    print(f"LTX-2 IC-LoRA, control at 1/{FACTOR}: MSE to the clip with/without the LoRA {lora_ratio:.3f}; with the "
          f"other clip's control / its own {control_ratio:.3f}")
    assert lora_ratio < 0.7, "the stock IC pipeline's samples did not move towards the clip"
    assert control_ratio > 1.05, "the LoRA ignores the control: another clip's control did as well"
