"""WAN 2.1 VACE clips with a reference picture and no control video ("keep this character"), and batches that mix
clips with and without a reference, a control or a control mask.

A clip with `<clip>-reference.png` and no `-control` video trains as `WanVACEPipeline(reference_images=...)` runs
without `video`: on the grey (zero) video it makes then, its mask all ones. Batches hold clips alike in whether they
have a reference (it adds a latent frame: `layout_roles`), so a dataset that mixes them trains at any batch size.

The default suite checks the stand-in against the pipeline's own preprocessing and trains one short run at batch 2 on
a mixed folder; `MOTIONTUNE_VACE_REFERENCE_ONLY=1` runs the end-to-end acceptance (train on reference-only clips, sample
with the stock pipeline given the reference alone).
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
from test_lora_end_to_end import PROMPT, SEEDS, _stock_target_latents
from test_vace import _edges


def _vace(model: Path, data: Path):
    from motiontune.config import TrainConfig
    from motiontune.models.wan import WanFamily

    config = TrainConfig.model_validate({"model_type": "WAN_2_1_VACE", "base_model_name": str(model),
                                         "concepts": [{"path": str(data)}], "train_dtype": "FLOAT_32"})
    family = WanFamily(config, torch.device("cpu"))
    family.load_vae()
    return family


def test_reference_without_control_is_the_pipelines_own(tiny_models, tmp_path):
    """The stand-in control motiontune caches for a clip with a reference and no control, with the reference's latents
    before it, equals the `control_hidden_states` WanVACEPipeline builds from `reference_images` alone (`video=None`:
    a zero video, mask all ones)."""
    from diffusers import WanVACEPipeline

    from motiontune.data.conditions import fitted_whole

    model = tiny_models("wan-2.1-vace")
    frames = _frames(90, 6)
    reference = tmp_path / "reference.png"
    Image.fromarray(frames[4][:, ::2]).save(reference)  # 32 x 16: fitted whole, white left and right
    family = _vace(model, tmp_path)
    control = family.encode_stand_in("control", len(frames), (SIZE, SIZE))
    ours_reference = family.encode_condition("reference", fitted_whole(reference, (SIZE, SIZE)))
    clip = torch.randn(16, 3, SIZE // 8, SIZE // 8)
    x0, conditioning = family.split_conditioning(clip[None], torch.Generator(), None,
                                                 {"control": [control], "reference": [ours_reference]})

    pipe = WanVACEPipeline.from_pretrained(model)
    with torch.no_grad():
        video, masks, references = pipe.preprocess_conditions(
            None, None, [Image.open(reference).convert("RGB")], 1, SIZE, SIZE, len(frames), torch.float32,
            torch.device("cpu"))
        latents = pipe.prepare_video_latents(video, masks, references, None, torch.device("cpu"))
        theirs = torch.cat([latents, pipe.prepare_masks(masks, references)], dim=1)
    gap = (conditioning.latents - theirs).abs().max().item()
    print(f"stand-in control + reference vs the pipeline's (video=None): shapes {tuple(conditioning.latents.shape)} / "
          f"{tuple(theirs.shape)}, max difference {gap:.2e}")
    assert conditioning.latents.shape == theirs.shape and gap <= 1e-5
    assert x0.shape == (1, 16, 1 + clip.shape[1], SIZE // 8, SIZE // 8)


def _mixed(folder: Path) -> dict[str, Path]:
    """Four clips: a control and a reference; a reference alone; a control alone; a control with its mask."""
    folder.mkdir(parents=True)
    clips = {}
    for name, frames in (("both", _frames(90, 6)), ("refonly", _frames(0, 2, source="big_buck_bunny_432_433.webm")),
                         ("control", _frames(30, 6)), ("masked", _frames(60, 3))):
        clips[name] = _write_clip(folder / f"{name}.mp4", frames)
        if name != "refonly":
            _write_clip(folder / f"{name}-control.mp4", _edges(frames)).with_suffix(".txt").unlink()
        if name in ("both", "refonly"):
            Image.fromarray(frames[4]).save(folder / f"{name}-reference.png")
        if name == "both":  # masked training of a clip with a reference: the mask covers the clip's frames
            mask = np.zeros((SIZE, SIZE, 3), np.uint8)
            mask[:, : SIZE // 2] = 255
            Image.fromarray(mask).save(folder / f"{name}-masklabel.png")
        if name == "masked":
            mask = np.zeros((SIZE, SIZE, 3), np.uint8)
            mask[8:24, 8:24] = 255
            Image.fromarray(mask).save(folder / f"{name}-controlmask.png")
    return clips


def test_mixed_vace_batch_of_two_trains(tiny_models, tmp_path, capsys):
    """Batch size 2 over clips with and without a reference, with and without a control, with and without a control
    mask (and masked training, one clip with a reference having a loss mask):
    batches pair the clips alike in having a reference, so every step trains two clips (it used to stop the run); the
    reference-only clip gets the grey stand-in, encoded once."""
    _mixed(tmp_path / "data")
    (tmp_path / "data" / "lonely-controlmask.png").write_bytes((tmp_path / "data" / "masked-controlmask.png").read_bytes())
    _write_clip(tmp_path / "data" / "lonely.mp4", _frames(20, 6))
    Image.fromarray(_frames(20, 6)[0]).save(tmp_path / "data" / "lonely-reference.png")  # a mask without its control
    config = base_config(tmp_path, tiny_models("wan-2.1-vace"), tmp_path / "data", model_type="WAN_2_1_VACE", epochs=1,
                         batch_size=2, masked_training=True,
                         video_config={"max_frames": 9, "target_fps": 16.0, "video_batch_size_multiplier": 1.0},
                         samples=[{"prompt": PROMPT, "reference": str(tmp_path / "data" / "refonly-reference.png")}])
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0
    log = capsys.readouterr().err
    assert "1 clip(s) have no control condition but a reference" in log
    assert ("lonely-controlmask.png goes with a control condition, and there is no lonely-control.<ext> beside "
            "lonely.mp4") in log  # skipped, named
    result = json.loads((tmp_path / "workspace" / "result.json").read_text())
    assert result["steps"] == 2 and result["skipped_steps"] == 0  # 4 clips, 2 per batch: every batch whole


def test_batches_group_clips_by_condition_layout():
    """`epoch_batches` never puts clips of another layout in one batch, however they are shuffled."""
    from motiontune.data.buckets import epoch_batches

    shapes = [(16, 3, 4, 4, ("reference",) if i % 3 == 0 else ()) for i in range(12)]
    for epoch in range(5):
        batches = epoch_batches(shapes, [1.0] * 12, 2, 1.0, seed=7, epoch=epoch)
        assert sorted(i for b in batches for i in b) == list(range(12))
        assert all(len({shapes[i][4] for i in batch}) == 1 for batch in batches)
        assert sorted(len(b) for b in batches) == [2] * 6


def test_vace_sample_with_a_reference_alone_is_accepted(tiny_models, tmp_path):
    from motiontune.configure import family_problems, validate

    reference = tmp_path / "reference.png"
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(reference)

    def problems(**sample):
        return "\n".join(family_problems(validate({"model_type": "WAN_2_1_VACE", "concepts": [{"path": str(tmp_path)}],
                                                   "samples": [{"prompt": PROMPT, **sample}]})))

    assert problems(reference=str(reference)) == ""
    assert ("samples[0].control: WAN_2_1_VACE makes videos that follow a control video; give a video file, or "
            "`reference` alone") in problems()


# The end-to-end acceptance (opt-in: several minutes on two cores): both clips have only a reference picture
EPOCHS = 700
LEARNING_RATE = 1e-2


@pytest.mark.skipif(os.environ.get("MOTIONTUNE_VACE_REFERENCE_ONLY") != "1",
                    reason="end-to-end VACE reference-only training (minutes); set MOTIONTUNE_VACE_REFERENCE_ONLY=1")
def test_stock_vace_pipeline_keeps_the_reference_the_lora_learnt(tiny_models, tmp_path):
    from diffusers import WanVACEPipeline

    model = tiny_models("wan-2.1-vace")
    data = tmp_path / "data"
    data.mkdir()
    clips = []
    for name, frames in (("shapes", _frames(90, 6)), ("bunny", _frames(0, 2, source="big_buck_bunny_432_433.webm"))):
        clips.append(_write_clip(data / f"{name}.mp4", frames))
        Image.fromarray(frames[4]).save(data / f"{name}-reference.png")
    shapes, bunny = clips
    config = base_config(tmp_path, model, data, model_type="WAN_2_1_VACE", timestep_shift=3.0, epochs=EPOCHS, batch_size=2,
                         learning_rate=LEARNING_RATE, lora_rank=16, lora_alpha=8, layer_filter="blocks",
                         output_model_format="DIFFUSERS_LORA",
                         video_config={"max_frames": 9, "target_fps": 16.0, "video_batch_size_multiplier": 1.0},
                         # a sample during training with the reference alone (the pipeline's `video=None`)
                         samples=[{"prompt": PROMPT, "frames": 9, "height": SIZE, "width": SIZE, "steps": 2,
                                   "cfg_scale": 1.0, "reference": str(data / "shapes-reference.png")}],
                         sample_after=EPOCHS, sample_after_unit="EPOCH")
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0
    assert (tmp_path / "workspace" / "samples" / f"epoch{EPOCHS}-0.mp4").is_file()

    pipe = WanVACEPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    target = _stock_target_latents(pipe, shapes)

    def distance(reference: Path) -> float:
        samples = torch.cat([
            pipe(reference_images=[Image.open(reference).convert("RGB")], prompt=PROMPT, height=SIZE, width=SIZE,
                 num_frames=9, num_inference_steps=20, guidance_scale=1.0, output_type="latent",
                 generator=torch.Generator().manual_seed(seed)).frames for seed in SEEDS])
        return ((samples[:, :, 1:] - target) ** 2).mean().item()  # the reference's frame is dropped

    own, other = data / "shapes-reference.png", data / "bunny-reference.png"
    base = distance(own)
    pipe.load_lora_weights(config["output_model_destination"])
    mine, wrong = distance(own), distance(other)
    print(f"VACE reference only (no control video): MSE to the clip with/without the LoRA {mine / base:.3f}; with the "
          f"other clip's reference / its own {wrong / mine:.3f}")
    assert mine / base < 0.75, "the stock pipeline's samples did not move towards the clip"
    assert wrong / mine > 1.05, "the LoRA ignores the reference: another clip's did as well"


def test_masked_training_weighs_a_reference_slot_fully():
    """Masked training of a VACE clip with a reference: its mask covers the clip's latent frames, and the reference's
    frame before them (trained towards the reference's own latents) weighs fully."""
    from motiontune.train.losses import loss_mask

    mask = torch.zeros(3, 4, 4)
    mask[:, :2] = 1
    weights = loss_mask([mask, None], (2, 16, 4, 4, 4), 0.0, 0.1, torch.Generator())
    assert torch.equal(weights[0, 0, 0], torch.ones(4, 4)) and torch.equal(weights[0, 0, 1:], mask.clamp(min=0.1))
    assert torch.equal(weights[1], torch.ones(1, 4, 4, 4))
