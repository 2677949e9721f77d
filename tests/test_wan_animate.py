"""WAN 2.2 Animate (`WanAnimatePipeline`, "animate" mode): each clip follows `<clip>-pose.mp4` and `<clip>-face.mp4`
beside it, and keeps `<clip>-reference.png` (or its own first frame when there is none).

End to end: two real clips (moving shapes, Big Buck Bunny) with one caption. Their conditions are made from their own
frames, as people make them with pose and face detectors: the pose video is an edge video of the clip, the face video
the middle of each frame (its own square, as face crops are); the shapes clip has a reference picture (its middle
frame), the bunny clip none (its first frame stands in). A LoRA trained with `motiontune train` and sampled by the
stock pipeline (no motiontune code) given a clip's conditions comes closer to that clip than the base model does, and
the same LoRA given the other clip's conditions comes out clearly further from it: the LoRA follows its conditions.
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
from test_vace import _edges

EPOCHS = 400  # both clips in each batch
FACE = 16  # the face crops' side (the tiny model's motion encoder reads 16 x 16; the release 512 x 512)


def _face(frames: list[np.ndarray]) -> list[np.ndarray]:
    """A face video as face detectors crop one: a square around the subject (here the middle of the frame)."""
    start = (SIZE - FACE) // 2
    return [np.ascontiguousarray(frame[start : start + FACE, start : start + FACE]) for frame in frames]


def _write_condition(path: Path, frames: list[np.ndarray]) -> Path:
    """A lossless 16 fps condition video of any size (no caption: a condition is not a clip)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=16)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv444p"
        stream.options = {"qp": "0"}
        for array in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        out.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("animate") / "data"
    folder.mkdir()
    made = []
    for name, frames in (("shapes", _frames(90, 6)), ("bunny", _frames(0, 2, source="big_buck_bunny_432_433.webm"))):
        made.append(_write_clip(folder / f"{name}.mp4", frames))
        _write_condition(folder / f"{name}-pose.mp4", _edges(frames))
        _write_condition(folder / f"{name}-face.mp4", _face(frames))
    Image.fromarray(_frames(90, 6)[4]).save(folder / "shapes-reference.png")
    return tuple(made)


def _video(path: Path) -> list[Image.Image]:
    with av.open(str(path)) as container:
        return [f.to_image() for f in container.decode(video=0)]


def _conditions(clip: Path) -> dict:
    """The stock pipeline's inputs for a clip: its pose and face videos, and its reference (or first frame)."""
    reference = clip.with_name(f"{clip.stem}-reference.png")
    image = Image.open(reference).convert("RGB") if reference.is_file() else _video(clip)[0]
    return {"image": image, "pose_video": _video(clip.with_name(f"{clip.stem}-pose.mp4")),
            "face_video": _video(clip.with_name(f"{clip.stem}-face.mp4"))}


def test_cached_conditions_are_the_pipelines_own(tiny_models, clips):
    """What motiontune caches of a clip and its conditions, as a step gives it to the transformer, equals what
    WanAnimatePipeline builds from the same pictures: the reference's mask and latents, the empty video's condition over
    the clip's frames, the pose latents, the face frames and CLIP's embedding of the reference."""
    from diffusers import WanAnimatePipeline

    from motiontune.config import TrainConfig
    from motiontune.models.wan import WanFamily

    model = tiny_models("wan-2.2-animate")
    shapes = clips[0]
    config = TrainConfig.model_validate({"model_type": "WAN_2_2_ANIMATE", "base_model_name": str(model),
                                         "concepts": [{"path": str(shapes.parent)}], "train_dtype": "FLOAT_32"})
    family = WanFamily(config, torch.device("cpu"))
    family.load_transformers()
    family.load_vae()
    given = _conditions(shapes)
    frames = np.stack([np.asarray(frame) for frame in _video(shapes)])
    stored = family.encode_video(frames)
    encoded = {role: family.encode_condition(role, np.stack([np.asarray(f) for f in given[key]]))
               for role, key in (("pose", "pose_video"), ("face", "face_video"))}
    encoded["reference"] = family.encode_condition("reference", np.asarray(given["image"])[None].repeat(len(frames), 0))
    first = family.clip_extras(frames)
    x0, conditioning = family.split_conditioning(stored[None], torch.Generator(), family.encode_first_frame(frames[0])[None],
                                                 {**{k: v[None] for k, v in first.items()},
                                                  **{role: [value] for role, value in encoded.items()}})

    pipe = WanAnimatePipeline.from_pretrained(model)
    device = torch.device("cpu")
    with torch.no_grad():
        pixels = pipe.vae_image_processor.preprocess(given["image"], height=SIZE, width=SIZE, resize_mode="fill")
        reference = pipe.prepare_reference_image_latents(pixels.float(), 1, device=device)
        empty = pipe.prepare_prev_segment_cond_latents(None, batch_size=1, segment_frame_length=len(frames), height=SIZE,
                                                       width=SIZE, device=device)
        pose = pipe.prepare_pose_latents(pipe.video_processor.preprocess_video(given["pose_video"], height=SIZE,
                                                                               width=SIZE).float(), device=device)
        face = pipe.video_processor.preprocess_video(given["face_video"], height=FACE, width=FACE)
        image_embeds = pipe.encode_image(given["image"], device)
    theirs = torch.cat([reference, empty], dim=2)
    differences = {"condition": (conditioning.latents - theirs).abs().max(), "pose": (conditioning.inputs["pose"] - pose).abs().max(),
                   "face": (conditioning.inputs["face"].float() / 127.5 - 1 - face).abs().max(),
                   "clip": (conditioning.image_embeds - image_embeds).abs().max()}
    print("cached vs pipeline: " + ", ".join(f"{k} {v:.2e}" for k, v in differences.items()))
    assert conditioning.latents.shape == theirs.shape and x0.shape[2] == theirs.shape[2]
    assert all(value < 1e-5 for value in differences.values()), differences
    assert torch.allclose(x0[:, :, 0], reference[:, 4:, 0], atol=1e-5) and conditioning.loss_frames[0].tolist() == [0, 1, 1, 1]


def test_config_rules_for_animate(tiny_models, clips, tmp_path, capsys):
    """A sample needs all three conditions; what is not built yet is refused with what to do instead."""
    shapes = clips[0]
    config = base_config(tmp_path, tiny_models("wan-2.2-animate"), shapes.parent, model_type="WAN_2_2_ANIMATE",
                         masked_training=True, layer_filter="blocks.,face_adapter",
                         samples=[{"prompt": PROMPT, "pose": str(shapes.with_name("shapes-pose.mp4")),
                                   "control": str(shapes.with_name("shapes-pose.mp4"))}])
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 2
    err = capsys.readouterr().err
    for said in ("samples[0].face: WAN_2_2_ANIMATE makes videos that follow a face video; give a video file",
                 "samples[0].reference: WAN_2_2_ANIMATE makes videos that follow a reference picture; give an image file",
                 "samples[0].control: WAN_2_2_ANIMATE does not take a control video; remove the key",
                 "masked_training: not built for WAN_2_2_ANIMATE",
                 "layer_filter = 'blocks.,face_adapter' adapts face_adapter.0.to_q"):
        assert said in err, err
    assert "samples[0].pose" not in err


@pytest.fixture(scope="module")
def trained(tiny_models, clips, tmp_path_factory) -> Path:
    """The LoRA (COMFY_LORA, the default) `motiontune train` makes of the two clips and their conditions."""
    tmp_path = tmp_path_factory.mktemp("animate-run")
    model = tiny_models("wan-2.2-animate")
    shapes = clips[0]
    config = base_config(tmp_path, model, shapes.parent, model_type="WAN_2_2_ANIMATE", timestep_shift=5.0,
                         epochs=EPOCHS, batch_size=2, learning_rate=3e-3, lora_rank=16, lora_alpha=8,
                         video_config={"max_frames": 9, "target_fps": 16.0, "video_batch_size_multiplier": 1.0},
                         # a sample during training, through the stock pipeline with the clip's conditions
                         samples=[{"prompt": PROMPT, "frames": 9, "height": SIZE, "width": SIZE, "steps": 2, "cfg_scale": 1.0,
                                   "pose": str(shapes.with_name("shapes-pose.mp4")),
                                   "face": str(shapes.with_name("shapes-face.mp4")),
                                   "reference": str(shapes.with_name("shapes-reference.png"))}],
                         sample_after=EPOCHS, sample_after_unit="EPOCH")
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0
    assert (tmp_path / "workspace" / "samples" / f"epoch{EPOCHS}-0.mp4").is_file()
    return Path(config["output_model_destination"])


def test_stock_animate_pipeline_follows_the_conditions_the_lora_learnt(tiny_models, clips, trained):
    from diffusers import WanAnimatePipeline

    model = tiny_models("wan-2.2-animate")
    shapes, bunny = clips
    pipe = WanAnimatePipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    target = _stock_target_latents(pipe, shapes)
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)

    def distance(conditions: dict) -> float:
        """MSE to the clip's latents of the frames the model makes (the pipeline returns them un-normalised, with the
        reference's slot first)."""
        samples = torch.cat([
            pipe(**conditions, prompt=PROMPT, height=SIZE, width=SIZE, segment_frame_length=9, num_inference_steps=20,
                 guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(seed)).frames
            for seed in SEEDS])
        return ((((samples - mean) / std)[:, :, 1:] - target) ** 2).mean().item()

    base = distance(_conditions(shapes))
    pipe.load_lora_weights(str(trained))
    own, other = distance(_conditions(shapes)), distance(_conditions(bunny))
    print(f"Animate: MSE to the clip with/without the LoRA {own / base:.3f}; "
          f"with the other clip's pose, face and reference / its own {other / own:.3f}")
    assert own / base < 0.75, "the stock pipeline's samples did not move towards the clip"
    assert other / own > 1.05, "the LoRA ignores the conditions: another clip's did as well"


def test_comfyui_applies_the_lora_as_diffusers_does(tiny_models, trained, tmp_path):
    """ComfyUI v0.30.0 loads WAN 2.2 Animate (`WAN22_Animate`): every tensor of the default LoRA file is applied, and
    the weights change by what the stock pipeline fuses from the same file. ComfyUI's Animate model has a motion encoder
    for 512-pixel faces and a face adapter after every 5th block, sizes it does not read from the file: the tiny model's
    own are left out of the base file (reported missing), but for the face adapter's norm that tells ComfyUI it is
    Animate (unexpected in a 2-block model). The LoRA adapts the blocks, which ComfyUI's model has as WAN's."""
    from diffusers import WanAnimatePipeline
    from safetensors.torch import save_file

    from comfyui.harness import ComfyJob, run_comfy
    from motiontune.models.wan import original_name

    model = tiny_models("wan-2.2-animate")
    pipe = WanAnimatePipeline.from_pretrained(model, text_encoder=None, tokenizer=None)
    own = ("motion_encoder.", "face_encoder.", "face_adapter.")
    base = {original_name(k): v.detach().clone().contiguous() for k, v in pipe.transformer.state_dict().items()
            if not k.startswith(own)}
    marker = "face_adapter.fuser_blocks.0.k_norm.weight"
    base[marker] = pipe.transformer.state_dict()["face_adapter.0.norm_k.weight"].clone()
    save_file(base, str(tmp_path / "base.safetensors"))
    [result] = run_comfy([ComfyJob("WAN_2_2_ANIMATE", tmp_path / "base.safetensors", trained, model)])

    pipe.load_lora_weights(str(trained))
    pipe.fuse_lora()
    fused = {original_name(k.replace(".base_layer", "")): v for k, v in pipe.transformer.state_dict().items()
             if ".lora_" not in k and not k.startswith(own)}
    theirs = {k: fused[k] - base[k] for k in fused if not torch.equal(fused[k], base[k])}
    ours = result.deltas(base)
    gap = max(((ours[k] - theirs[k]).norm() / theirs[k].norm()).item() for k in theirs)
    print(f"ComfyUI {result.model_class} ({result.image_model}): {result.lora_keys} LoRA tensors, {len(result.not_loaded)} "
          f"not loaded, {len(theirs)} weights changed; deltas vs diffusers' {gap:.2e} relative; base: "
          f"{len(result.unet_missing)} missing (motion / face encoders), unexpected {result.unet_unexpected}")
    assert result.model_class == "WAN22_Animate" and result.not_loaded == [] and result.lora_keys > 0
    assert all(k.startswith(own) for k in result.unet_missing) and result.unet_unexpected == [marker]
    assert set(theirs) == set(ours) and len(theirs) > 0
    assert gap <= 1e-5
