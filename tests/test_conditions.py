"""Conditions beside a clip (data/conditions.py): found by role, read at the clip's instants through its crop, flip
and rotation, cached by the condition file's content, and reported by `motiontune inspect` when missing or unfit.

The encoding tests run the real survey, decoding and cache (`Encoding`) with the tiny WAN 2.1 model, whose family is
told here to take a `control` condition and to "encode" it as its pixels: what the test reads back from the cache is
exactly what a family's encoder is handed. Its clips' own frames are recorded on their way into the VAE.
"""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import base_config, write_config
from motiontune.cli import main
from motiontune.testing.clips import read_timestamp, timestamp_image, write_timestamped_clip


def _family_taking_control(seen: list):
    """WAN 2.1 taking a `control` condition (and a `controlmask` read with it, as VACE does), its encoder the identity
    (the mask's frames after the control's); the clip frames its VAE encodes go to `seen`."""
    from motiontune.models.wan import WanFamily

    class WanWithControl(WanFamily):
        @classmethod
        def condition_roles(cls, config):
            return {"control": True, "controlmask": False}

        def encode_condition(self, role, frames, companions=None):
            return torch.from_numpy(np.concatenate([frames, *(companions or {}).values()]))

        def encode_video(self, frames):
            seen.append(frames.copy())
            return super().encode_video(frames)

    return WanWithControl


def _encode(config_keys: dict, tmp_path: Path, model: Path, data: Path):
    """(Encoding, encoded clips, clip frames the VAE saw) for a run over `data` with `config_keys`."""
    from motiontune.config import TrainConfig
    from motiontune.data.cache import Cache
    from motiontune.data.latents import Encoding
    from motiontune.data.survey import survey_dataset

    config = TrainConfig.model_validate(base_config(tmp_path, model, data, dataloader_threads=0, **config_keys))
    seen = []
    family = _family_taking_control(seen)(config, torch.device("cpu"))
    encoding = Encoding(family, config, Cache(tmp_path / "cache"))
    clips = encoding.clips(survey_dataset(config, family))
    return encoding, clips, seen


def test_a_condition_follows_the_clips_crop_flip_and_rotation(tiny_models, tmp_path):
    """The condition is the clip's own file: through crop jitter, a flip and a 15 degree rotation it must reach the
    encoder pixel for pixel as the clip's frames reach the VAE. A 64 x 32 clip trained at 32 x 32 has room to crop."""
    data = tmp_path / "data"
    data.mkdir()
    clip = write_timestamped_clip(data / "walk.mp4", [Fraction(i, 16) for i in range(12)], size=(32, 64))
    shutil.copy(clip, data / "walk-control.mp4")
    (data / "walk.txt").write_text("a clip\n")
    keys = {"aspect_ratio_bucketing": False, "video_config": {"max_frames": 9, "target_fps": 16.0},
            "concepts": [{"path": str(data), "image": {"enable_crop_jitter": True, "enable_fixed_flip": True,
                                                      "enable_fixed_rotate": True, "random_rotate_max_angle": 15}}]}
    _, [encoded], [frames] = _encode(keys, tmp_path, tiny_models("wan-2.1"), data)
    control = encoded.condition("control").numpy()
    look = encoded.look
    print(f"look: crop {look.crop}, flip {look.flip}, rotate {look.rotate}; frames {frames.shape}, control {control.shape}")
    assert look.crop is not None and look.crop[1] > 0 and look.flip and look.rotate == 15
    assert control.shape == frames.shape == (9, 32, 32, 3)
    assert np.array_equal(control, frames)
    # and the geometry did something: the frames are not the centre crop, upright and unflipped
    from motiontune.data.video import decode_clips, probe

    [plain] = decode_clips(probe(clip), [encoded.timestamps], (32, 32))
    assert not np.array_equal(plain, frames)


def test_a_condition_at_another_frame_rate_is_read_at_the_clips_instants(tmp_path):
    """A 16 fps clip sampled at 16 fps, its control at 30 fps: each instant gets the control frame on screen then (the
    last one shown at or before it), not the control's frame of the same index. Frames show their own times."""
    from motiontune.data.augment import ImageVariant
    from motiontune.data.conditions import condition_frames
    from motiontune.data.video import probe

    clip = probe(write_timestamped_clip(tmp_path / "walk.mp4", [Fraction(i, 16) for i in range(16)], size=(32, 48)))
    control = probe(write_timestamped_clip(tmp_path / "walk-control.mp4", [Fraction(i, 30) for i in range(30)],
                                           size=(32, 48)))
    instants = tuple(i / 16 for i in range(9))
    [frames] = condition_frames(clip, control, [instants], [ImageVariant()], (32, 48))
    shown = [read_timestamp(frame) for frame in frames]
    expected = [round(int(t * 30 + 1e-9) / 30 * 1000) for t in instants]
    print(f"instants (ms) {[round(t * 1000) for t in instants]} → control frames shown (ms) {shown}")
    assert shown == expected
    assert shown != [round(i / 30 * 1000) for i in range(9)]  # by index it would be 0, 33, 67, ...


def test_the_cache_encodes_a_condition_again_when_its_file_changes_and_only_then(tiny_models, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    times = [Fraction(i, 16) for i in range(12)]
    for offset, name in enumerate(("a", "b")):  # clips and controls of their own content
        write_timestamped_clip(data / f"{name}.mp4", [t + offset for t in times], size=(32, 32))
        (data / f"{name}.txt").write_text("a clip\n")
        Image.fromarray(timestamp_image(100 + offset, 32, 32)).save(data / f"{name}-control.png")
    keys = {"video_config": {"max_frames": 9, "target_fps": 16.0}}
    model = tiny_models("wan-2.1")
    counts = []

    def run():
        encoding, clips, _ = _encode(keys, tmp_path, model, data)
        counts.append((encoding.calls["video"], encoding.calls["condition"]))
        return {c.source.stem: c.condition("control") for c in clips}

    first = run()
    second = run()  # nothing changed
    (data / "a-control.png").touch()  # a new date, the same content
    third = run()
    Image.fromarray(timestamp_image(900, 32, 32)).save(data / "a-control.png")  # new content
    fourth = run()
    Image.fromarray(timestamp_image(500, 32, 32)).save(data / "b-controlmask.png")  # a mask read with b's control
    fifth = run()
    Image.fromarray(timestamp_image(600, 32, 32)).save(data / "b-controlmask.png")  # the mask edited
    sixth = run()
    print(f"(clips, conditions) encoded per run: {counts}")
    assert counts == [(2, 2), (0, 0), (0, 0), (0, 1), (0, 1), (0, 1)]
    assert torch.equal(fifth["a"], fourth["a"]) and not torch.equal(sixth["b"], fifth["b"])
    assert np.array_equal(sixth["b"][-1].numpy(), timestamp_image(600, 32, 32))  # the control, then its mask
    assert torch.equal(first["a"], second["a"]) and torch.equal(first["a"], third["a"])
    assert not torch.equal(fourth["a"], first["a"]) and torch.equal(fourth["b"], first["b"])
    assert np.array_equal(fourth["a"][0].numpy(), timestamp_image(900, 32, 32))  # the edited picture, for every frame


def test_inspect_names_each_condition_that_is_missing_short_or_the_wrong_size(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    times = [Fraction(i, 16) for i in range(16)]
    for name in ("good", "missing", "short", "wide"):
        write_timestamped_clip(data / f"{name}.mp4", times, size=(32, 32))
        (data / f"{name}.txt").write_text("a clip\n")
    write_timestamped_clip(data / "good-control.mp4", [Fraction(i, 24) for i in range(24)], size=(16, 16))  # fits
    write_timestamped_clip(data / "short-control.mp4", times[:8], size=(32, 32))
    write_timestamped_clip(data / "wide-control.mp4", times, size=(32, 48))
    Image.new("RGB", (40, 30)).save(data / "good-reference.png")  # a reference is read whole: any size

    assert main(["inspect", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    files = {Path(f["path"]).name: f for f in report["files"]}
    assert sorted(files) == ["good.mp4", "missing.mp4", "short.mp4", "wide.mp4"]  # conditions are not training files
    assert files["good.mp4"]["conditions"] == {
        "control": {"path": str(data / "good-control.mp4"), "fits": True, "problem": None},
        "reference": {"path": str(data / "good-reference.png"), "fits": True, "problem": None}}
    missing = files["missing.mp4"]["conditions"]["control"]
    assert missing["path"] is None and not missing["fits"]
    assert missing["problem"].startswith("control condition missing: no missing-control.<ext> beside missing.mp4")
    short = files["short.mp4"]["conditions"]["control"]["problem"]
    assert short.startswith(f"control condition length does not fit the clip ({data / 'short-control.mp4'} lasts 0.50")
    assert "too short" in short
    wide = files["wide.mp4"]["conditions"]["control"]["problem"]
    assert wide.startswith(f"control condition size does not fit the clip ({data / 'wide-control.mp4'} is 48x32")
    assert report["summary"]["conditions"] == {"control": 3, "reference": 1}
    # the three bad controls, and the reference the other clips lack (a clip of the concept has one)
    assert report["summary"]["conditions_not_fitting"] == 6
    assert files["wide.mp4"]["conditions"]["reference"]["problem"].startswith("reference condition missing")

    assert main(["inspect", str(data)]) == 0
    text = capsys.readouterr().out
    print(text)
    assert "conditions beside the clips: control 3 of 4 files, reference 1 of 4 files" in text
    for name in ("missing", "short", "wide"):
        assert f"{data / name}.mp4: control condition" in text


def test_a_face_video_is_read_whole_and_flipped_with_its_clip(tmp_path):
    """A face video is a crop around the face, square whatever the clip's shape: it fits a 48 x 32 clip (a pose video of
    its shape would not), keeps its own size and frames (the clip's instants), and only the clip's flip reaches it."""
    from motiontune.data.augment import ImageVariant
    from motiontune.data.conditions import condition_frames, fit_problem
    from motiontune.data.video import decode_clips, probe

    clip = probe(write_timestamped_clip(tmp_path / "walk.mp4", [Fraction(i, 16) for i in range(16)], size=(32, 48)))
    face = probe(write_timestamped_clip(tmp_path / "walk-face.mp4", [Fraction(i, 30) for i in range(30)], size=(40, 40)))
    assert fit_problem(clip, face, "face") == ""
    assert "size does not fit the clip" in fit_problem(clip, face, "pose")
    instants = tuple(i / 16 for i in range(9))
    [plain] = decode_clips(face, [instants])
    [frames] = condition_frames(clip, face, [instants], [ImageVariant(flip=True, crop=(0, 8), rotate=15.0)], (32, 32),
                                role="face")
    print(f"face video {face.width}x{face.height} → {frames.shape}")
    assert frames.shape == (9, 40, 40, 3) and np.array_equal(frames, plain[:, :, ::-1])


@pytest.mark.parametrize("model_type", ["WAN_2_1_VACE", "WAN_2_2_ANIMATE"])
def test_a_reference_is_read_whole_for_vace_and_through_the_clips_crop_for_animate(tmp_path, model_type):
    """Both models take a `-reference` picture, read two ways (`ModelFamily.whole_roles`, given to the job that reads a
    clip's conditions): VACE places it whole in the frame, fitted on white as WanVACEPipeline does; Animate's is the
    clip's character, cut by the clip's crop and flipped with it like one of its frames. The picture is 64 x 32, red on
    the left and blue on the right; the clip (64 x 32 too) trains at 32 x 32, cropped to its right half and flipped."""
    from motiontune.config import TrainConfig
    from motiontune.data.augment import ImageVariant
    from motiontune.data.latents import _condition_job
    from motiontune.data.video import probe
    from motiontune.models.wan import WanFamily

    clip = probe(write_timestamped_clip(tmp_path / "walk.mp4", [Fraction(i, 16) for i in range(8)], size=(32, 64)))
    picture = np.zeros((32, 64, 3), dtype=np.uint8)
    picture[:, :32, 0] = picture[:, 32:, 2] = 255
    Image.fromarray(picture).save(tmp_path / "walk-reference.png")
    whole = WanFamily.whole_roles(TrainConfig.model_validate({"model_type": model_type}))
    instants = tuple(i / 16 for i in range(5))
    job = (clip, {"reference": probe(tmp_path / "walk-reference.png")}, [instants], [ImageVariant(flip=True, crop=(0, 32))],
           (32, 32), whole)
    [frames] = _condition_job(job)["reference"]
    print(f"{model_type}: whole roles {whole}, reference {frames.shape}, mean colour {frames.reshape(-1, 3).mean(0)}")
    if model_type == "WAN_2_1_VACE":
        assert whole == ("reference",) and frames.shape == (1, 32, 32, 3)
        assert (frames[0, :8] == 255).all() and (frames[0, -8:] == 255).all()  # 32 x 16 inside 32 x 32: white around
        # red left, blue right (not flipped); the bilinear scaling blends the two middle columns
        assert (frames[0, 8:24, :15] == (255, 0, 0)).all() and (frames[0, 8:24, 17:] == (0, 0, 255)).all()
    else:
        assert whole == () and frames.shape == (5, 32, 32, 3)
        assert (frames == (0, 0, 255)).all()  # the right half only, every frame: no red, no white
