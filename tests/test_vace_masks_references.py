"""WAN 2.1 VACE with masks (inpainting) and reference pictures: `<clip>-controlmask.png` and `<clip>-reference.png`
beside each clip, given to `WanVACEPipeline` as `mask` and `reference_images`.

Two real clips (moving shapes, Big Buck Bunny) with one caption, as in tests/test_vace.py, trained twice:
- inpainting: each clip's control video is the clip with a square in the middle painted grey, and its mask is white
  on that square (made anew) and black elsewhere (kept);
- reference: both clips share one grey control video (nothing to follow), and each has one of its own frames as its
  reference picture: only the reference tells the clips apart.
Each LoRA, sampled by the stock pipeline (no motiontune code) with the clip's own conditions, comes closer to the clip
than the base model does; given the other clip's control (inpainting) or reference, it comes out further from it.
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
from test_first_last_frame import SIZE, _frames, _write_clip
from test_lora_end_to_end import PROMPT, SEEDS, _stock_target_latents

# (steps, learning rate), both clips in each batch: a reference is one latent frame, learnt later than a whole control
# video (150 steps left it ignored: 1.000; 700 gave 0.361 / 1.184; measured figures in docs/control.md)
EPOCHS = {"inpainting": 300, "reference": 450}
LEARNING_RATE = {"inpainting": 6e-3, "reference": 1e-2}
HOLE = slice(8, 24)  # the square the inpainting mask makes anew


def _hole_mask() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE, 3), np.uint8)
    mask[HOLE, HOLE] = 255
    return mask


def _holed(frames: list[np.ndarray]) -> list[np.ndarray]:
    """The clip with the masked square grey, as an inpainting control video is made."""
    holed = [frame.copy() for frame in frames]
    for frame in holed:
        frame[HOLE, HOLE] = 128
    return holed


def _make(folder: Path, kind: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True)
    made = []
    for name, frames in (("shapes", _frames(90, 6)), ("bunny", _frames(0, 2, source="big_buck_bunny_432_433.webm"))):
        made.append(_write_clip(folder / f"{name}.mp4", frames))
        if kind == "inpainting":
            control = _holed(frames)
            Image.fromarray(_hole_mask()).save(folder / f"{name}-controlmask.png")
        else:
            control = [np.full_like(frames[0], 128)] * len(frames)
            Image.fromarray(frames[4]).save(folder / f"{name}-reference.png")  # one of the clip's own frames
        _write_clip(folder / f"{name}-control.mp4", control).with_suffix(".txt").unlink()
    return tuple(made)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("vace-masks")
    return {kind: _make(root / kind, kind) for kind in ("inpainting", "reference")}


def _conditions(clip: Path) -> dict:
    """The pipeline's arguments for a clip's conditions: `video`, and `mask` or `reference_images` when it has them."""
    with av.open(str(clip.with_name(f"{clip.stem}-control.mp4"))) as container:
        found = {"video": [f.to_image() for f in container.decode(video=0)]}
    mask, reference = clip.with_name(f"{clip.stem}-controlmask.png"), clip.with_name(f"{clip.stem}-reference.png")
    if mask.exists():
        found["mask"] = [Image.open(mask).convert("RGB")] * len(found["video"])
    if reference.exists():
        found["reference_images"] = [Image.open(reference).convert("RGB")]
    return found


def test_cached_mask_and_reference_conditions_are_the_pipelines_own(tiny_models, tmp_path):
    """The control latents motiontune caches with their mask, and a reference's latents before them, equal the
    `control_hidden_states` WanVACEPipeline builds from `video`, `mask` and `reference_images`; the latents to denoise
    get the reference's latents in front, as many frames as the pipeline denoises."""
    from diffusers import WanVACEPipeline

    from motiontune.config import TrainConfig
    from motiontune.data.conditions import fitted_whole
    from motiontune.models.wan import WanFamily

    model = tiny_models("wan-2.1-vace")
    frames = _frames(90, 6)
    reference = tmp_path / "reference.png"
    Image.fromarray(frames[4][::2]).save(reference)  # 16 x 32: fitted whole, white above and below
    mask = [_hole_mask()] * len(frames)
    mask[0] = np.zeros_like(mask[0])  # the first frame kept whole: a mask that changes over time
    config = TrainConfig.model_validate({"model_type": "WAN_2_1_VACE", "base_model_name": str(model),
                                         "concepts": [{"path": str(tmp_path)}], "train_dtype": "FLOAT_32"})
    family = WanFamily(config, torch.device("cpu"))
    family.load_vae()
    control = family.encode_condition("control", np.stack(_holed(frames)), {"controlmask": np.stack(mask)})
    ours_reference = family.encode_condition("reference", fitted_whole(reference, (SIZE, SIZE)))
    clip = torch.randn(16, 3, SIZE // 8, SIZE // 8)
    x0, conditioning = family.split_conditioning(clip[None], torch.Generator(), None,
                                                 {"control": [control], "reference": [ours_reference]})

    pipe = WanVACEPipeline.from_pretrained(model)
    with torch.no_grad():
        video, masks, references = pipe.preprocess_conditions(
            [Image.fromarray(f) for f in _holed(frames)], [Image.fromarray(m) for m in mask],
            [Image.open(reference).convert("RGB")], 1, SIZE, SIZE, len(frames), torch.float32, torch.device("cpu"))
        latents = pipe.prepare_video_latents(video, masks, references, None, torch.device("cpu"))
        theirs = torch.cat([latents, pipe.prepare_masks(masks, references)], dim=1)
    print(f"cached vs pipeline control with mask and reference: shapes {tuple(conditioning.latents.shape)} / "
          f"{tuple(theirs.shape)}, max difference {(conditioning.latents - theirs).abs().max():.2e}")
    assert conditioning.latents.shape == theirs.shape
    assert torch.allclose(conditioning.latents, theirs, atol=1e-5)
    assert x0.shape == (1, 16, 1 + clip.shape[1], SIZE // 8, SIZE // 8)  # the reference's latent frame first
    assert torch.equal(x0[0, :, 1:], clip) and torch.equal(x0[0, :, :1], ours_reference[:16])


def test_vace_sample_keys_are_checked(tiny_models, data, tmp_path, capsys):
    shapes = data["inpainting"][0]
    config = base_config(tmp_path, tiny_models("wan-2.1-vace"), shapes.parent, model_type="WAN_2_1_VACE",
                         samples=[{"prompt": PROMPT, "control_mask": str(shapes.with_name("shapes-controlmask.png")),
                                   "reference": str(tmp_path / "missing.png"),
                                   "control": str(shapes.with_name("shapes-control.mp4"))},
                                  {"prompt": PROMPT, "control": str(shapes.with_name("shapes-control.mp4"))}])
    config["samples"][1]["control"] = None
    config["samples"][1]["control_mask"] = str(shapes.with_name("shapes-controlmask.png"))
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 2
    err = capsys.readouterr().err
    assert "samples[0].reference = " in err and "missing.png" in err
    assert "samples[1].control_mask: a control mask goes with its control video" in err
    config = base_config(tmp_path, tiny_models("wan-2.1"), shapes.parent,
                         samples=[{"prompt": PROMPT, "reference": str(shapes.with_name("shapes-controlmask.png"))}])
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 2
    assert "samples[0].reference: WAN_2_1_T2V does not take a reference picture" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["inpainting", "reference"])
def test_stock_vace_pipeline_follows_the_mask_and_reference_the_lora_learnt(kind, tiny_models, data, tmp_path):
    from diffusers import WanVACEPipeline

    model = tiny_models("wan-2.1-vace")
    shapes, bunny = data[kind]
    own = _conditions(shapes)
    sample = {key: str(shapes.with_name(f"shapes-{name}")) for key, name in
              (("control", "control.mp4"), ("control_mask", "controlmask.png"), ("reference", "reference.png"))
              if shapes.with_name(f"shapes-{name}").exists()}
    config = base_config(tmp_path, model, shapes.parent, model_type="WAN_2_1_VACE", timestep_shift=3.0,
                         epochs=EPOCHS[kind], batch_size=2, learning_rate=LEARNING_RATE[kind], lora_rank=16, lora_alpha=8,
                         layer_filter="blocks", output_model_format="DIFFUSERS_LORA",
                         video_config={"max_frames": 9, "target_fps": 16.0, "video_batch_size_multiplier": 1.0},
                         # a sample during training takes the same conditions
                         samples=[{"prompt": PROMPT, "frames": 9, "height": SIZE, "width": SIZE, "steps": 2,
                                   "cfg_scale": 1.0, **sample}],
                         sample_after=EPOCHS[kind], sample_after_unit="EPOCH")
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0
    assert (tmp_path / "workspace" / "samples" / f"epoch{EPOCHS[kind]}-0.mp4").is_file()

    pipe = WanVACEPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    target = _stock_target_latents(pipe, shapes)

    def distance(conditions: dict) -> float:
        samples = torch.cat([
            pipe(**conditions, prompt=PROMPT, height=SIZE, width=SIZE, num_frames=9, num_inference_steps=20,
                 guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(seed)).frames
            for seed in SEEDS])
        samples = samples[:, :, len(conditions.get("reference_images", ())):]  # the reference's frame is dropped
        return ((samples - target) ** 2).mean().item()

    wrong = dict(own, **{key: value for key, value in _conditions(bunny).items()
                         if key == {"inpainting": "video", "reference": "reference_images"}[kind]})
    base = distance(own)
    pipe.load_lora_weights(config["output_model_destination"])
    mine, other = distance(own), distance(wrong)
    print(f"VACE {kind}: MSE to the clip with/without the LoRA {mine / base:.3f}; with the other clip's "
          f"{'control' if kind == 'inpainting' else 'reference'} / its own {other / mine:.3f}")
    assert mine / base < 0.75, "the stock pipeline's samples did not move towards the clip"
    assert other / mine > 1.05, "the LoRA ignores the condition: another clip's did as well"
