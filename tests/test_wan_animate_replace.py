"""WAN 2.2 Animate's replace mode (`WanAnimatePipeline(mode="replace", background_video=..., mask_video=...)`): a clip
with `<clip>-background.mp4` and `<clip>-mask.png` (or `.mp4`) beside it trains as the pipeline makes a first segment
in replace mode: the background's latents, and the inverted mask on the latent grid, in place of animate mode's empty
video and zero mask. Clips with and without a background train in one batch (the same shapes).

Checked against the pipeline's own `prepare_prev_segment_cond_latents(task="replace")`, and one short run at batch 2
that mixes a replace clip and an animate clip and samples in replace mode during training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import base_config, write_config
from motiontune.cli import main
from test_first_last_frame import SIZE, _frames, _write_clip
from test_lora_end_to_end import PROMPT
from test_vace import _edges
from test_wan_animate import _face, _video, _write_condition

HOLE = slice(8, 24)  # where the character is (the mask's white square)


def _background(frames: list[np.ndarray]) -> list[np.ndarray]:
    """The clip with its character cut out (grey where the mask is white), as replace-mode backgrounds are made."""
    cut = [frame.copy() for frame in frames]
    for frame in cut:
        frame[HOLE, HOLE] = 128
    return cut


def _masks(count: int) -> list[np.ndarray]:
    """The character's mask: white on the square, black elsewhere; the first frame all black (it changes in time)."""
    masks = [np.zeros((SIZE, SIZE, 3), np.uint8) for _ in range(count)]
    for mask in masks[1:]:
        mask[HOLE, HOLE] = 255
    return masks


def test_replace_condition_is_the_pipelines_own(tiny_models, tmp_path):
    """The condition motiontune caches for a clip's background and mask equals what WanAnimatePipeline makes of
    `background_video` and `mask_video` in replace mode for a first segment, and a step puts it over the clip's frames
    in place of animate mode's empty video (the reference's frame before it unchanged)."""
    from diffusers import WanAnimatePipeline

    from motiontune.config import TrainConfig
    from motiontune.models.wan import WanFamily

    model = tiny_models("wan-2.2-animate")
    frames = _frames(90, 6)
    background, masks = _background(frames), _masks(len(frames))
    config = TrainConfig.model_validate({"model_type": "WAN_2_2_ANIMATE", "base_model_name": str(model),
                                         "concepts": [{"path": str(tmp_path)}], "train_dtype": "FLOAT_32"})
    family = WanFamily(config, torch.device("cpu"))
    family.load_transformers()
    family.load_vae()
    ours = family.encode_condition("background", np.stack(background), {"charactermask": np.stack(masks)})

    pipe = WanAnimatePipeline.from_pretrained(model)
    with torch.no_grad():
        video = pipe.video_processor.preprocess_video([Image.fromarray(f) for f in background], height=SIZE, width=SIZE)
        mask = pipe.video_processor_for_mask.preprocess_video([Image.fromarray(m) for m in masks], height=SIZE, width=SIZE)
        theirs = pipe.prepare_prev_segment_cond_latents(None, background_video=video.float(), mask_video=mask.float(),
                                                        batch_size=1, segment_frame_length=len(frames), start_frame=0,
                                                        height=SIZE, width=SIZE, task="replace", device=torch.device("cpu"))
    gap = (ours[None] - theirs).abs().max().item()
    print(f"replace mode: cached vs the pipeline's condition, shapes {tuple(ours.shape)} / {tuple(theirs.shape[1:])}, "
          f"max difference {gap:.2e}; kept-mask channel means per latent frame {ours[:4].mean(dim=(0, 2, 3)).tolist()}")
    assert ours.shape == theirs.shape[1:] and gap <= 1e-5
    assert ours[:4, 0].min() == 1 and ours[:4, 1:].min() == 0  # all kept in the first frame; the square made after

    channels = family.transformer.config.out_channels
    stored = torch.randn(2, channels + 20, *ours.shape[1:])
    reference = torch.randn(2, 20, 1, *ours.shape[2:])
    extras = {"first_frame_reference": reference, "pose": [torch.zeros(1)] * 2, "face": [torch.zeros(1)] * 2,
              "background": [ours, None]}
    _, conditioning = family.split_conditioning(stored, torch.Generator(), torch.zeros(2, 3, 8), extras)
    assert torch.equal(conditioning.latents[0, :, 1:], ours) and torch.equal(conditioning.latents[1, :, 1:], stored[1, channels:])
    assert torch.equal(conditioning.latents[:, :, :1], reference)


def test_replace_and_animate_clips_train_together(tiny_models, tmp_path, capsys):
    """Batch 2: a clip in replace mode (background and mask) with one in animate mode, one step, and a sample in
    replace mode through the stock pipeline during training; a background without its mask is named and skipped, and a
    sample that gives one of the two is refused."""
    data = tmp_path / "data"
    data.mkdir()
    for name, frames in (("shapes", _frames(90, 6)), ("bunny", _frames(0, 2, source="big_buck_bunny_432_433.webm")),
                         ("lonely", _frames(30, 6))):
        _write_clip(data / f"{name}.mp4", frames)
        _write_condition(data / f"{name}-pose.mp4", _edges(frames))
        _write_condition(data / f"{name}-face.mp4", _face(frames))
        if name != "bunny":
            _write_condition(data / f"{name}-background.mp4", _background(frames))
        if name == "shapes":
            _write_condition(data / f"{name}-mask.mp4", _masks(len(frames)))
    sample = {"prompt": PROMPT, "frames": 9, "height": SIZE, "width": SIZE, "steps": 2, "cfg_scale": 1.0,
              **{key: str(data / f"shapes-{name}") for key, name in
                 (("pose", "pose.mp4"), ("face", "face.mp4"), ("background", "background.mp4"),
                  ("character_mask", "mask.mp4"))},
              "reference": str(tmp_path / "reference.png")}
    Image.fromarray(_frames(90, 6)[4]).save(tmp_path / "reference.png")
    config = base_config(tmp_path, tiny_models("wan-2.2-animate"), data, model_type="WAN_2_2_ANIMATE", epochs=1,
                         batch_size=2, video_config={"max_frames": 9, "target_fps": 16.0, "video_batch_size_multiplier": 1.0},
                         samples=[sample], sample_after=1, sample_after_unit="EPOCH")
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0
    err = capsys.readouterr().err
    assert (f"skipped {data / 'lonely.mp4'}: charactermask condition missing: {data / 'lonely-background.mp4'} needs its "
            "charactermask beside it, lonely-mask.<ext>") in err
    result = json.loads((tmp_path / "workspace" / "result.json").read_text())
    assert result["steps"] == 1 and len(result["samples"]) == 1 and not result["sample_errors"]
    assert len(_video(Path(result["samples"][0]))) == 9

    del sample["character_mask"]
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 2
    assert ("samples[0].background: goes with `character_mask` (both or neither); give `character_mask` too"
            in capsys.readouterr().err)


# The end-to-end acceptance (opt-in: minutes on two cores)
EPOCHS = 800


@pytest.mark.skipif(os.environ.get("MOTIONTUNE_ANIMATE_REPLACE") != "1",
                    reason="end-to-end WAN 2.2 Animate replace-mode training (minutes); set MOTIONTUNE_ANIMATE_REPLACE=1")
def test_stock_animate_pipeline_in_replace_mode_follows_what_the_lora_learnt(tiny_models, tmp_path):
    """Two clips in replace mode that share one pose video, one face video and one reference picture (plain grey):
    only their backgrounds (and the mask, the same square) tell them apart. The stock pipeline in replace mode with the
    LoRA comes closer to the clip than the base; given the other clip's background it comes out further from it."""
    from diffusers import WanAnimatePipeline

    from test_lora_end_to_end import SEEDS, _stock_target_latents
    from test_wan_animate import _conditions

    model = tiny_models("wan-2.2-animate")
    data = tmp_path / "data"
    data.mkdir()
    clips = []
    for name, frames in (("shapes", _frames(90, 6)), ("bunny", _frames(0, 2, source="big_buck_bunny_432_433.webm"))):
        clips.append(_write_clip(data / f"{name}.mp4", frames))
        grey = [np.full_like(frames[0], 128)] * len(frames)
        _write_condition(data / f"{name}-pose.mp4", grey)
        _write_condition(data / f"{name}-face.mp4", _face(grey))
        Image.fromarray(grey[0]).save(data / f"{name}-reference.png")
        _write_condition(data / f"{name}-background.mp4", _background(frames))
        _write_condition(data / f"{name}-mask.mp4", _masks(len(frames)))
    shapes, bunny = clips
    config = base_config(tmp_path, model, data, model_type="WAN_2_2_ANIMATE", timestep_shift=5.0, epochs=EPOCHS,
                         batch_size=2, learning_rate=6e-3, lora_rank=16, lora_alpha=8,
                         video_config={"max_frames": 9, "target_fps": 16.0, "video_batch_size_multiplier": 1.0})
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0

    pipe = WanAnimatePipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    target = _stock_target_latents(pipe, shapes)
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)

    def replace(clip: Path, scene: Path) -> dict:
        return {**_conditions(clip), "mode": "replace", "background_video": _video(scene.with_name(f"{scene.stem}-background.mp4")),
                "mask_video": _video(scene.with_name(f"{scene.stem}-mask.mp4"))}

    def distance(conditions: dict) -> float:
        samples = torch.cat([
            pipe(**conditions, prompt=PROMPT, height=SIZE, width=SIZE, segment_frame_length=9, num_inference_steps=20,
                 guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(seed)).frames
            for seed in SEEDS])
        return ((((samples - mean) / std)[:, :, 1:] - target) ** 2).mean().item()

    base = distance(replace(shapes, shapes))
    pipe.load_lora_weights(config["output_model_destination"])
    own, other = distance(replace(shapes, shapes)), distance(replace(shapes, bunny))
    print(f"Animate replace mode: MSE to the clip with/without the LoRA {own / base:.3f}; with the other clip's "
          f"background and mask / its own {other / own:.3f}")
    assert own / base < 0.75, "the stock pipeline's samples did not move towards the clip"
    assert other / own > 1.05, "the LoRA ignores the background: another clip's did as well"
