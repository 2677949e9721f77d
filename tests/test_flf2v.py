"""WAN 2.1 FLF2V (first-last-frame-to-video; `WanImageToVideoPipeline(image=..., last_image=...)` with the FLF2V
transformer): trained from each clip's own first and last frames.

End to end, as tests/test_first_last_frame.py does for WAN 2.2 I2V A14B (its clips and helpers): two real clips with
one caption, so only their frames tell them apart. A LoRA trained with `motiontune train` and sampled by the stock
pipeline (no motiontune code) with a clip's own first and last frames comes closer to that clip than the base model
does, and the same LoRA given the other clip's first and last frames comes out further from it.
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
from test_first_last_frame import SIZE, _ends, clips, ends_distance  # noqa: F401 (clips: the module's fixture)
from test_lora_end_to_end import PROMPT, _stock_target_latents

EPOCHS = 150  # both clips in each batch: 150 steps (measured: see docs/control.md)


def _family(model: Path, folder: Path, **keys):
    from motiontune.config import TrainConfig
    from motiontune.models.wan import WanFamily

    config = TrainConfig.model_validate({"model_type": "WAN_2_1_FLF2V", "base_model_name": str(model),
                                         "concepts": [{"path": str(folder)}], "train_dtype": "FLOAT_32",
                                         "last_frame_conditioning_probability": 1.0, **keys})
    return WanFamily(config, torch.device("cpu"))


def test_cached_first_and_last_frame_conditions_are_the_pipelines_own(tiny_models, clips):  # noqa: F811
    """What a step gives the FLF2V transformer equals what WanImageToVideoPipeline builds from `image` and `last_image`:
    the condition channels (`prepare_latents`), and both frames' CLIP embeddings in the pipeline's order (`encode_image`),
    which the transformer's learnt position embedding tells apart."""
    from diffusers import WanImageToVideoPipeline

    model = tiny_models("wan-2.1-flf2v")
    frames = [np.stack([f.to_ndarray(format="rgb24") for f in av.open(str(clip)).decode(video=0)]) for clip in clips]
    family = _family(model, clips[0].parent)
    family.load_transformers()
    family.load_vae()
    assert family.clip_extra_names() == ("last_frame", "last_image_embeds")
    stored = torch.stack([family.encode_video(f) for f in frames])
    extras = [family.clip_extras(f) for f in frames]
    images = torch.stack([family.encode_first_frame(f[0]) for f in frames])
    _, conditioning = family.split_conditioning(
        stored, torch.Generator().manual_seed(0), images,
        {name: torch.stack([e[name] for e in extras]) for name in family.clip_extra_names()})

    pipe = WanImageToVideoPipeline.from_pretrained(model)
    theirs_latents, theirs_images = [], []
    with torch.no_grad():
        for f in frames:
            first, last = (pipe.video_processor.preprocess(Image.fromarray(x), height=SIZE, width=SIZE).float()
                           for x in (f[0], f[-1]))
            _, condition = pipe.prepare_latents(first, 1, 16, SIZE, SIZE, len(f), torch.float32, torch.device("cpu"),
                                                torch.Generator().manual_seed(0), last_image=last)
            theirs_latents.append(condition[0])
            theirs_images.append(pipe.encode_image([Image.fromarray(f[0]), Image.fromarray(f[-1])], torch.device("cpu")))
    theirs_latents, theirs_images = torch.stack(theirs_latents), torch.cat(theirs_images)
    ours_images = conditioning.image_embeds.flatten(0, 1)  # (B, 2, ...) as `predict` gives them to the transformer
    print(f"FLF2V: cached vs pipeline condition channels {(conditioning.latents - theirs_latents).abs().max():.2e}, "
          f"CLIP embeddings {(ours_images - theirs_images).abs().max():.2e} (shapes "
          f"{tuple(ours_images.shape)} / {tuple(theirs_images.shape)})")
    assert torch.allclose(conditioning.latents, theirs_latents, atol=1e-5)
    assert ours_images.shape == theirs_images.shape
    assert torch.allclose(ours_images, theirs_images, atol=1e-5)


def test_flf2v_config_rules(tiny_models, clips, tmp_path, capsys):  # noqa: F811
    """FLF2V has no first-frame-only mode: the probability must be 1 and a sample needs its last frame; an I2V
    checkpoint given as FLF2V is refused by name."""
    image = tmp_path / "frame.png"
    Image.new("RGB", (SIZE, SIZE)).save(image)
    config = base_config(tmp_path, tiny_models("wan-2.1-flf2v"), clips[0].parent, model_type="WAN_2_1_FLF2V",
                         last_frame_conditioning_probability=0.5, samples=[{"prompt": PROMPT, "image": str(image)}])
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 2
    err = capsys.readouterr().err
    assert "last_frame_conditioning_probability = 0.5: WAN_2_1_FLF2V always takes a first and a last frame" in err
    assert "samples[0].last_image: WAN_2_1_FLF2V makes videos between a first and a last frame" in err

    family = _family(tiny_models("wan-2.1-i2v"), clips[0].parent)
    with pytest.raises(ValueError, match="its transformer takes one image .* not WAN 2.1 FLF2V"):
        family.load_transformers()


def test_stock_flf2v_pipeline_with_first_and_last_frame_follows_the_lora(tiny_models, clips, tmp_path):  # noqa: F811
    from diffusers import WanImageToVideoPipeline

    model = tiny_models("wan-2.1-flf2v")
    shapes, bunny = clips
    sample_first, sample_last = tmp_path / "first.png", tmp_path / "last.png"
    for image, path in zip(_ends(shapes), (sample_first, sample_last)):
        image.save(path)
    config = base_config(tmp_path, model, shapes.parent, model_type="WAN_2_1_FLF2V", timestep_shift=3.0,
                         epochs=EPOCHS, batch_size=2, learning_rate=6e-3, lora_rank=16, lora_alpha=8,
                         last_frame_conditioning_probability=1.0,
                         video_config={"max_frames": 9, "target_fps": 16.0, "video_batch_size_multiplier": 1.0},
                         samples=[{"prompt": PROMPT, "frames": 9, "height": SIZE, "width": SIZE, "steps": 2, "cfg_scale": 1.0,
                                   "image": str(sample_first), "last_image": str(sample_last)}],
                         sample_after=EPOCHS, sample_after_unit="EPOCH")
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0
    assert (tmp_path / "workspace" / "samples" / f"epoch{EPOCHS}-0.mp4").is_file()

    pipe = WanImageToVideoPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    target = _stock_target_latents(pipe, shapes)
    base = ends_distance(pipe, target, _ends(shapes))
    pipe.load_lora_weights(config["output_model_destination"])
    own, other = ends_distance(pipe, target, _ends(shapes)), ends_distance(pipe, target, _ends(bunny))
    print(f"FLF2V: MSE to the clip with/without the LoRA {own / base:.3f}; "
          f"with the other clip's first and last frames / its own {other / own:.3f}")
    assert own / base < 0.75, "the stock pipeline's samples did not move towards the clip"
    assert other / own > 1.05, "the LoRA ignores its condition: another clip's first and last frames did as well"
