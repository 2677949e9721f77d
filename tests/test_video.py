"""Clip reading: frames chosen by timestamp (variable frame rate included), real files, bad files."""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from conftest import DATA
from motiontune.data.video import MediaError, decode_frames, plan_timestamps, probe

# Presentation times (ms) of a variable-frame-rate clip: bursts and gaps, as phones record.
VFR_TIMES_MS = [0, 40, 80, 200, 240, 500, 520, 540, 900, 1000, 1100, 1400, 1500]


def gray_level(index: int) -> int:
    return 10 + 18 * index


def make_vfr_clip(path: Path) -> Path:
    """Frame i is a flat gray of level gray_level(i), shown from VFR_TIMES_MS[i]; lossless, so levels survive."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv444p"
        stream.options = {"qp": "0"}
        stream.codec_context.time_base = Fraction(1, 1000)
        for index, ms in enumerate(VFR_TIMES_MS):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), gray_level(index), np.uint8), format="rgb24")
            frame.pts = ms
            frame.time_base = Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def frame_indices(frames: np.ndarray) -> list[int]:
    levels = frames[:, 16, 16, 1].astype(int)
    return [int(np.argmin([abs(level - gray_level(i)) for i in range(len(VFR_TIMES_MS))])) for level in levels]


def test_variable_frame_rate_is_sampled_by_timestamp(tmp_path):
    clip = make_vfr_clip(tmp_path / "vfr.mp4")
    instants = [i / 10 for i in range(15)]  # 10 fps grid over 1.5 s
    chosen = frame_indices(decode_frames(clip, instants))
    # the frame on screen at t is the last one whose time is <= t
    expected = [max(i for i, ms in enumerate(VFR_TIMES_MS) if ms <= round(t * 1000)) for t in instants]
    assert chosen == expected
    # sampling by index would have taken frames 0, 1, 2, ... instead
    assert chosen[:6] == [0, 2, 3, 4, 4, 5]


def test_plan_rounds_to_valid_counts_and_respects_max_duration(tmp_path):
    info = probe(DATA / "shapes_200px_30fps.mp4")  # 10 s at 30 fps
    four_n_plus_one = lambda n: (n - 1) // 4 * 4 + 1  # noqa: E731
    assert len(plan_timestamps(info, 24.0, 16, 10.0, four_n_plus_one)) == 13
    # 0.5 s at 16 fps holds 8 instants → 5 valid frames
    assert plan_timestamps(info, 16.0, 33, 0.5, four_n_plus_one) == [i / 16 for i in range(5)]
    short = probe(DATA / "big_buck_bunny_432_433.webm")  # 1 s
    assert len(plan_timestamps(short, 24.0, 81, 10.0, four_n_plus_one)) == 21  # 24 instants → 21


@pytest.mark.parametrize("name, start", [("shapes_200px_30fps.mp4", 2.0), ("big_buck_bunny_432_433.webm", 0), ("transparent.webm", 0)])
def test_real_files_decode_to_the_requested_size(name, start):
    info = probe(DATA / name)
    assert info.duration > 0.9 and info.fps > 0
    frames = decode_frames(DATA / name, [start + i / 8 for i in range(8)], (48, 80))
    assert frames.shape == (8, 48, 80, 3) and frames.dtype == np.uint8
    assert frames.std() > 1  # real picture content, not a blank


def test_webm_without_stream_duration_uses_the_container_duration():
    info = probe(DATA / "transparent.webm")  # VP9 with alpha, no frame count in the header
    assert info.duration == pytest.approx(5.0, abs=0.1)


def test_still_images_are_one_frame(tmp_path):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), np.uint8)).save(tmp_path / "a.png")
    info = probe(tmp_path / "a.png")
    assert info.is_image and plan_timestamps(info, 24.0, 17, 10.0) == [0.0]
    assert decode_frames(tmp_path / "a.png", [0.0], (32, 32)).shape == (1, 32, 32, 3)


def test_a_broken_file_is_reported_and_skipped(tmp_path, tiny_models, caplog):
    """One bad file never kills the run: it is named in a warning and the rest trains."""
    import torch

    from motiontune.config import TrainConfig
    from motiontune.data.dataset import scan_dataset
    from motiontune.data.latents import encode_clips
    from motiontune.models import family_for

    data = tmp_path / "data"
    data.mkdir()
    (data / "good.mp4").write_bytes((DATA / "shapes_200px_30fps.mp4").read_bytes())
    (data / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    config = TrainConfig.model_validate({
        "base_model_name": str(tiny_models("wan-2.1")), "concepts": [{"path": str(data)}], "resolution": "32",
        "train_dtype": "FLOAT_32", "video_config": {"max_frames": 5, "target_fps": 8.0},
    })
    family = family_for(config, torch.device("cpu"))
    family.load()
    with caplog.at_level(logging.WARNING, logger="motiontune"):
        clips = encode_clips(scan_dataset(config), family, config)
    assert [c.source.name for c in clips] == ["good.mp4"]
    assert "broken.mp4" in caplog.text
    with pytest.raises(MediaError, match="broken.mp4"):
        probe(data / "broken.mp4")


@pytest.mark.parametrize("suffix, codec", [(".avi", "mpeg4"), (".mov", "libx264"), (".mkv", "libx264"), (".gif", "gif")])
def test_containers_users_bring_decode(tmp_path, suffix, codec):
    path = tmp_path / f"clip{suffix}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height = 48, 32
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for i in range(20):
            array = np.full((32, 48, 3), 12 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24").reformat(format=stream.pix_fmt)))
        container.mux(stream.encode())
    info = probe(path)
    assert info.duration == pytest.approx(2.0, abs=0.15)
    frames = decode_frames(path, plan_timestamps(info, 5.0, 9, 10.0), (32, 32))
    assert frames.shape == (9, 32, 32, 3)
    levels = frames[:, 16, 16].mean(axis=1)
    # later instants show later frames (0, 0.2, 0.4 s → frames 0, 2, 4, ...); GIF's 8-bit palette merges some levels
    assert np.all(np.diff(levels) >= 0) and levels[-1] - levels[0] > 150


def test_split_layout_reads_captions_from_the_captions_folder(tmp_path):
    from motiontune.config import TrainConfig
    from motiontune.data.dataset import scan_dataset

    (tmp_path / "videos" / "sub").mkdir(parents=True)
    (tmp_path / "captions" / "sub").mkdir(parents=True)
    (tmp_path / "videos" / "a.mp4").write_bytes(b"")
    (tmp_path / "videos" / "sub" / "b.webm").write_bytes(b"")
    (tmp_path / "captions" / "a.txt").write_text("first caption\nsecond caption\n")
    (tmp_path / "captions" / "sub" / "b.txt").write_text("nested\n")
    config = TrainConfig.model_validate({"concepts": [{"path": str(tmp_path), "include_subdirectories": True}]})
    items = {item.path.name: item.captions for item in scan_dataset(config)}
    assert items == {"a.mp4": ("first caption", "second caption"), "b.webm": ("nested",)}
    by_name = TrainConfig.model_validate({"concepts": [{"path": str(tmp_path / "videos"), "text": {"prompt_source": "filename"}}]})
    assert [item.captions for item in scan_dataset(by_name)] == [("a",)]
