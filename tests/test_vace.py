"""WAN 2.1 VACE with control videos (`WanVACEPipeline(video=...)`): each clip follows `<clip>-control.mp4` beside it.

End to end: two real clips (moving shapes, Big Buck Bunny) with one caption, each with an edge video made from its own
frames as its control, so only the control tells them apart. A LoRA trained with `motiontune train` and sampled by the stock pipeline (no motiontune
code) given a clip's control comes closer to that clip than the base model does, and the same LoRA given the other
clip's control comes out clearly further from it: the LoRA follows the control.

The LoRA adapts the VACE blocks too (`layer_filter: "blocks"`): on the tiny random model, the main blocks alone learn
the clips' average and ignore the control (1.000). Like the first-and-last-frame test, the margin is held down by the
tiny random VAE, which maps different videos to nearby latents.
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

# both clips in each batch: 300 steps at 6e-3 (measured: 0.439 and 1.149; 600 at 3e-3 gave 0.405 and 1.159; with the
# main blocks alone 0.70 and 1.000)
EPOCHS = 300


def _edges(frames: list[np.ndarray]) -> list[np.ndarray]:
    """An edge video, as people make control videos from their clips: the grey level's gradient magnitude, white on black."""
    edges = []
    for frame in frames:
        grey = frame.astype(np.float32).mean(axis=-1)
        magnitude = np.hypot(*np.gradient(grey))
        edges.append(np.repeat(np.clip(magnitude * 4, 0, 255).astype(np.uint8)[..., None], 3, axis=-1))
    return edges


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("vace") / "data"
    folder.mkdir()
    made = []
    for name, frames in (("shapes", _frames(90, 6)), ("bunny", _frames(0, 2, source="big_buck_bunny_432_433.webm"))):
        made.append(_write_clip(folder / f"{name}.mp4", frames))
        _write_clip(folder / f"{name}-control.mp4", _edges(frames)).with_suffix(".txt").unlink()
    return tuple(made)


def _control(clip: Path) -> list[Image.Image]:
    with av.open(str(clip.with_name(f"{clip.stem}-control.mp4"))) as container:
        return [f.to_image() for f in container.decode(video=0)]


def test_cached_control_is_the_pipelines_own(tiny_models, clips):
    """The control latents motiontune caches, with VACE's mask channels added, equal the `control_hidden_states`
    WanVACEPipeline builds from `video` (no mask, no reference)."""
    from diffusers import WanVACEPipeline

    from motiontune.config import TrainConfig
    from motiontune.models.wan import WanFamily

    model = tiny_models("wan-2.1-vace")
    control = _control(clips[0])
    config = TrainConfig.model_validate({"model_type": "WAN_2_1_VACE", "base_model_name": str(model),
                                         "concepts": [{"path": str(clips[0].parent)}], "train_dtype": "FLOAT_32"})
    family = WanFamily(config, torch.device("cpu"))
    family.load_vae()
    stored = family.encode_condition("control", np.stack([np.asarray(frame) for frame in control]))
    ours = family._vace_context([stored])

    pipe = WanVACEPipeline.from_pretrained(model)
    with torch.no_grad():
        video, mask, references = pipe.preprocess_conditions(control, None, None, 1, SIZE, SIZE, len(control), torch.float32,
                                                             torch.device("cpu"))
        latents = pipe.prepare_video_latents(video, mask, references, None, torch.device("cpu"))
        theirs = torch.cat([latents, pipe.prepare_masks(mask, references)], dim=1)
    print(f"cached vs pipeline control: shapes {tuple(ours.shape)} / {tuple(theirs.shape)}, max difference "
          f"{(ours - theirs).abs().max():.2e}")
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_vace_clips_need_their_control(tiny_models, clips, tmp_path, capsys):
    """A clip without a control is skipped, named, and a sample needs a control video."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(clips[0].parent, data)
    (data / "bunny-control.mp4").unlink()
    config = base_config(tmp_path, tiny_models("wan-2.1-vace"), data, model_type="WAN_2_1_VACE", epochs=1,
                         video_config={"max_frames": 9, "target_fps": 16.0})
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0
    err = capsys.readouterr().err
    assert f"skipped {data / 'bunny.mp4'}: control condition missing: no bunny-control.<ext> beside bunny.mp4" in err
    capsys.readouterr()
    assert main(["cache", "--config", str(tmp_path / "config.json"), "--clear"]) == 0  # the control stays cached
    assert "1 conditions (0 encoded now)" in capsys.readouterr().out
    assert main(["cache", "--config", str(tmp_path / "config.json")]) == 0
    assert "1 conditions (0 encoded now)" in capsys.readouterr().out
    config["samples"] = [{"prompt": PROMPT}]
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 2
    assert "samples[0].control: WAN_2_1_VACE makes videos that follow a control video" in capsys.readouterr().err


def test_stock_vace_pipeline_follows_the_control_the_lora_learnt(tiny_models, clips, tmp_path):
    from diffusers import WanVACEPipeline

    model = tiny_models("wan-2.1-vace")
    shapes, bunny = clips
    config = base_config(tmp_path, model, shapes.parent, model_type="WAN_2_1_VACE", timestep_shift=3.0,
                         epochs=EPOCHS, batch_size=2, learning_rate=6e-3, lora_rank=16, lora_alpha=8,
                         # the VACE blocks too, where the control comes in (diffusers' names: the original-layout
                         # converter does not know VACE blocks)
                         layer_filter="blocks", output_model_format="DIFFUSERS_LORA",
                         video_config={"max_frames": 9, "target_fps": 16.0, "video_batch_size_multiplier": 1.0},
                         # a sample during training follows a control video
                         samples=[{"prompt": PROMPT, "frames": 9, "height": SIZE, "width": SIZE, "steps": 2, "cfg_scale": 1.0,
                                   "control": str(shapes.with_name("shapes-control.mp4"))}],
                         sample_after=EPOCHS, sample_after_unit="EPOCH")
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0
    assert (tmp_path / "workspace" / "samples" / f"epoch{EPOCHS}-0.mp4").is_file()
    lora = Path(config["output_model_destination"])

    pipe = WanVACEPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    target = _stock_target_latents(pipe, shapes)

    def distance(control: list[Image.Image]) -> float:
        samples = torch.cat([
            pipe(video=control, prompt=PROMPT, height=SIZE, width=SIZE, num_frames=9, num_inference_steps=20,
                 guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(seed)).frames
            for seed in SEEDS])
        return ((samples - target) ** 2).mean().item()

    base = distance(_control(shapes))
    pipe.load_lora_weights(str(lora))
    own, other = distance(_control(shapes)), distance(_control(bunny))
    print(f"VACE control: MSE to the clip with/without the LoRA {own / base:.3f}; "
          f"with the other clip's control / its own {other / own:.3f}")
    assert own / base < 0.75, "the stock pipeline's samples did not move towards the clip"
    assert other / own > 1.05, "the LoRA ignores the control: another clip's control did as well"
