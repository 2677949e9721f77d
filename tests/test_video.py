"""Clip reading: exact timestamps per strategy (variable frame rate, 60 → 24 fps, rotation, WebM
without duration), seeking, real files and containers users bring."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from conftest import DATA
from motiontune.data.video import DecodeStats, MediaError, decode_clips, decode_frames, plan_clips, probe
from motiontune.testing.clips import read_timestamp, write_timestamped_clip

SHARED = Path(__file__).resolve().parents[2] / "shared" / "videos"


def shown_ms(frames: np.ndarray) -> list[int]:
    return [read_timestamp(frame) for frame in frames]


def on_screen(frame_times_ms: list[int], instants: list[float]) -> list[int]:
    """What a player shows at each instant: the last frame whose time is <= the instant."""
    return [max(ms for ms in frame_times_ms if ms <= round(t * 1000)) for t in instants]


def four_n_plus_one(n: int) -> int:
    return (n - 1) // 4 * 4 + 1 if n >= 1 else 0


# Presentation times (ms) of a variable-frame-rate clip: bursts and gaps, as phones record.
VFR_MS = [0, 40, 80, 200, 240, 500, 520, 540, 900, 1000, 1100, 1400, 1500, 1540, 1580, 1990]


@pytest.fixture(scope="module")
def vfr_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("vfr") / "vfr.mp4"
    return write_timestamped_clip(path, [Fraction(ms, 1000) for ms in VFR_MS])


def test_variable_frame_rate_is_sampled_by_timestamp(vfr_clip):
    info = probe(vfr_clip)
    [clip] = plan_clips(info, "uniform", 10.0, 15, 10.0)
    assert clip == tuple(i / 10 for i in range(15))
    assert shown_ms(decode_clips(info, [clip])[0]) == on_screen(VFR_MS, clip)
    # by frame index the first six would have been 0, 40, 80, 200, 240, 500 ms: motion 2.5x too fast
    assert shown_ms(decode_clips(info, [clip])[0])[:6] == [0, 80, 200, 240, 240, 500]


def test_60_fps_resampled_to_24_fps_takes_the_frame_on_screen(tmp_path):
    path = write_timestamped_clip(tmp_path / "60.mp4", [Fraction(i, 60) for i in range(120)], time_base=Fraction(1, 60))
    info = probe(path)
    assert info.fps == pytest.approx(60.0) and info.duration == pytest.approx(2.0)
    [clip] = plan_clips(info, "uniform", 24.0, 17, 10.0, valid_count=four_n_plus_one)
    frames = decode_clips(info, [clip])[0]
    # instant k/24 s shows frame floor(2.5 k) of the 60 fps file
    assert shown_ms(frames) == [round(1000 * (5 * k // 2) / 60) for k in range(17)]


def test_uniform_windows_are_evenly_spaced_across_the_file(vfr_clip):
    info = probe(vfr_clip)  # 2.0 s long (the last frame lasts until the file's end)
    clips = plan_clips(info, "uniform", 10.0, 5, 10.0, clips_per_file=3)
    assert [c[0] for c in clips] == pytest.approx([0.0, (info.duration - 0.5) / 2, info.duration - 0.5])
    for clip in clips:  # frames inside a window are consecutive on the target_fps grid
        assert np.allclose(np.diff(clip), 0.1)
    decoded = decode_clips(info, clips)
    assert [shown_ms(f) for f in decoded] == [on_screen(VFR_MS, c) for c in clips]


def test_random_windows_move_each_epoch_and_repeat_with_the_seed(vfr_clip):
    info = probe(vfr_clip)
    plan = lambda seed, epoch: plan_clips(info, "random", 10.0, 5, 10.0, seed=seed, epoch=epoch)  # noqa: E731
    starts = [plan(7, epoch)[0][0] for epoch in range(6)]
    assert len(set(starts)) == 6 and all(0 <= s <= info.duration - 0.5 for s in starts)
    assert plan(7, 3) == plan(7, 3) and plan(7, 3) != plan(8, 3)
    [clip] = plan(7, 2)
    assert shown_ms(decode_clips(info, [clip])[0]) == on_screen(VFR_MS, clip)


def test_keyframe_windows_start_on_keyframes(tmp_path):
    times = [Fraction(i, 25) for i in range(100)]  # 4 s at 25 fps, a keyframe every 20 frames
    path = write_timestamped_clip(tmp_path / "gop.mp4", times, keyframe_interval=20)
    info = probe(path)
    assert info.keyframes == pytest.approx((0.0, 0.8, 1.6, 2.4, 3.2))
    clips = plan_clips(info, "keyframe", 25.0, 9, 10.0, clips_per_file=3)
    assert [c[0] for c in clips] == pytest.approx([0.0, 1.6, 3.2])
    assert [shown_ms(f)[0] for f in decode_clips(info, clips)] == [0, 1600, 3200]


def test_decoding_seeks_to_the_keyframe_before_each_window(tmp_path):
    times = [Fraction(i, 25) for i in range(250)]  # 10 s, keyframes every 2 s
    info = probe(write_timestamped_clip(tmp_path / "long.mp4", times, keyframe_interval=50))
    window = tuple(6.4 + i / 25 for i in range(17))  # frames 160..176; keyframe at 6.0 s (frame 150)
    stats = DecodeStats()
    frames = decode_clips(info, [window], None, stats)[0]
    assert shown_ms(frames) == [round(t * 1000) for t in window]
    assert stats.decoded == 176 - 150 + 1  # exactly the frames the GOP forces, not the 177 from the start


def test_rotation_from_the_display_matrix_is_applied(tmp_path):
    path = write_timestamped_clip(tmp_path / "rot.mp4", [Fraction(i, 25) for i in range(25)], rotation=90)
    info = probe(path)
    assert info.rotation == 90 and (info.width, info.height) == (32, 48)  # shown upright: 32 wide, 48 tall
    frames = decode_clips(info, [(0.0, 0.52)])[0]
    assert frames.shape == (2, 48, 32, 3)
    # written with a white stripe on the right; turned 90° counter-clockwise for display it is on top
    assert frames[0, :8].mean() > 250 and frames[0, -8:, 16:].mean() < 5
    assert shown_ms(np.rot90(frames, k=-1, axes=(1, 2))) == [0, 520]


def test_webm_without_duration_in_its_header(tmp_path):
    path = write_timestamped_clip(
        tmp_path / "live.webm", [Fraction(i, 25) for i in range(50)], codec="libvpx-vp9", container_options={"live": "1"}
    )
    with av.open(str(path)) as container:
        assert container.duration is None and container.streams.video[0].duration is None
    info = probe(path)
    assert info.duration == pytest.approx(2.0)
    [clip] = plan_clips(info, "uniform", 10.0, 20, 10.0)
    assert len(clip) == 20
    assert shown_ms(decode_clips(info, [clip])[0]) == on_screen([i * 40 for i in range(50)], clip)


def test_short_files_get_the_largest_valid_count_or_nothing(vfr_clip):
    info = probe(vfr_clip)  # about 2 s (the last frame's own length is a guess: the typical frame's)
    assert 1.99 < info.duration < 2.1
    instants = int(info.duration * 24)
    assert len(plan_clips(info, "uniform", 24.0, 81, 10.0, valid_count=four_n_plus_one)[0]) == four_n_plus_one(instants)
    assert len(plan_clips(info, "uniform", 24.0, 81, 0.5, valid_count=four_n_plus_one)[0]) == 9  # max_duration caps the window
    tiny = probe(write_timestamped_clip(vfr_clip.parent / "one.mp4", [Fraction(0)]))
    assert plan_clips(tiny, "uniform", 24.0, 17, 10.0, valid_count=lambda n: 0 if n < 5 else n) == []


@pytest.mark.parametrize("name, start", [("shapes_200px_30fps.mp4", 2.0), ("big_buck_bunny_432_433.webm", 0), ("transparent.webm", 0)])
def test_real_files_decode_to_the_requested_size(name, start):
    info = probe(DATA / name)
    assert info.duration > 0.9 and info.fps > 0
    frames = decode_frames(DATA / name, [start + i / 8 for i in range(8)], (48, 80))
    assert frames.shape == (8, 48, 80, 3) and frames.dtype == np.uint8
    assert frames.std() > 1  # real picture content, not a blank


def test_alpha_is_detected_and_dropped():
    info = probe(DATA / "transparent.webm")  # VP9 with alpha, no frame count in the header
    assert info.has_alpha and info.duration == pytest.approx(5.0, abs=0.1)
    assert decode_frames(DATA / "transparent.webm", [0.0], (32, 32)).shape == (1, 32, 32, 3)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/videos is not beside this checkout")
def test_every_shared_video_loads():
    for path in sorted(SHARED.glob("*")):
        if path.suffix == ".md":
            continue
        info = probe(path)
        clips = plan_clips(info, "uniform", 16.0, 17, 10.0, clips_per_file=2, valid_count=four_n_plus_one)
        decoded = decode_clips(info, clips, (64, 96))
        expected = min(17, four_n_plus_one(int(info.duration * 16)))  # the 1 s WebM holds 16 instants → 13
        assert len(decoded) == 2 and all(f.shape == (expected, 64, 96, 3) for f in decoded), path.name


def test_still_images_are_one_frame(tmp_path):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), np.uint8)).save(tmp_path / "a.png")
    info = probe(tmp_path / "a.png")
    assert info.is_image and plan_clips(info, "random", 24.0, 17, 10.0) == [(0.0,)]
    assert decode_frames(tmp_path / "a.png", [0.0], (32, 32)).shape == (1, 32, 32, 3)


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
    [clip] = plan_clips(info, "uniform", 5.0, 9, 10.0)
    frames = decode_clips(info, [clip], (32, 32))[0]
    assert frames.shape == (9, 32, 32, 3)
    levels = frames[:, 16, 16].mean(axis=1)
    # later instants show later frames (0, 0.2, 0.4 s → frames 0, 2, 4, ...); GIF's 8-bit palette merges some levels
    assert np.all(np.diff(levels) >= 0) and levels[-1] - levels[0] > 150


BAD_FILES = {
    "empty.mp4": (b"", r"empty file \(0 bytes\)"),
    "notes.mp4": (b"these are my notes, not a video\n" * 20, "not a readable video"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_raise_a_named_reason(tmp_path, name):
    content, reason = BAD_FILES[name]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(MediaError, match=reason) as error:
        probe(tmp_path / name)
    assert name in str(error.value)


def test_truncated_audio_only_and_tiny_files_raise_a_named_reason(tmp_path):
    whole = (DATA / "shapes_200px_30fps.mp4").read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(whole[: len(whole) // 3])
    with pytest.raises(MediaError, match="truncated.mp4"):
        info = probe(tmp_path / "truncated.mp4")
        decode_clips(info, plan_clips(info, "uniform", 8.0, 60, 10.0))

    with av.open(str(tmp_path / "audio.m4a"), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=44100)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 44100
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    (tmp_path / "audio.mp4").write_bytes((tmp_path / "audio.m4a").read_bytes())
    with pytest.raises(MediaError, match=r"audio.mp4: no video stream \(it holds audio\)"):
        probe(tmp_path / "audio.mp4")

    path = write_timestamped_clip(tmp_path / "dot.mp4", [Fraction(i, 25) for i in range(5)], codec="mpeg4", size=(2, 2))
    with pytest.raises(MediaError, match="2x2 pixels, too small"):
        probe(path)
