"""Clip loading: motiontune's seek-and-decode-the-span against decoding everything, and against ffmpeg.

For a 17-frame window at 24 fps (resized to 832x480, as training does) it prints, from one run:
- frames motiontune decoded against the minimum the GOP forces (keyframe before the window → last frame shown);
- ms per clip against the naive loader (decode the whole file to RGB arrays, keep 17);
- ms per clip against the `ffmpeg` command line decoding the same span at the same size (if installed:
  `apt-get install -y ffmpeg`).

    .venv/bin/python benchmarks/video_loading.py [--shared ../shared/videos]
"""

from __future__ import annotations

import argparse
import bisect
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from motiontune.data.video import DecodeStats, decode_clips, plan_clips, probe

SIZE = (480, 832)
FPS = 24.0
FRAMES = 17


def make_long_gop_file(path: Path) -> Path:
    """10 s of 1280x720 at 60 fps, H.264 with one keyframe every 5 s (a long GOP, as cameras write)."""
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 255, (720, 1280 + 600, 3), np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=60)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.options = {"preset": "ultrafast", "x264-params": "keyint=300:min-keyint=300:scenecut=0"}
        for i in range(600):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(texture[:, i : i + 1280]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def frame_times(path: Path) -> list[float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        times = sorted(float(p.pts * stream.time_base) for p in container.demux(stream) if p.pts is not None)
    return [t - times[0] for t in times]


def minimum_frames(info, clip, times: list[float]) -> int:
    """Frames a decoder must produce: from the keyframe before the window to the frame shown at its last instant."""
    key = max(k for k in info.keyframes if k <= clip[0] + 1e-6)
    first = bisect.bisect_left(times, key - 1e-6)
    last = bisect.bisect_right(times, clip[-1] + 1e-6) - 1
    return last - first + 1


def naive_clip(path: Path, clip) -> np.ndarray:
    """What many loaders do: decode every frame to an RGB array, then keep the ones wanted."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [(f.time, f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
    start = frames[0][0]
    times = [t - start for t, _ in frames]
    return np.stack([frames[max(bisect.bisect_right(times, t + 1e-6) - 1, 0)][1] for t in clip])


def ffmpeg_clip(path: Path, clip, info) -> float:
    """Seconds for ffmpeg to decode the same span, resample to 24 fps and scale to the same size."""
    span = clip[-1] - clip[0] + 1 / FPS
    scale = max(SIZE[0] / info.height, SIZE[1] / info.width)
    width, height = round(info.width * scale / 2) * 2, round(info.height * scale / 2) * 2
    command = [
        "ffmpeg", "-v", "error", "-threads", "2", "-ss", f"{clip[0]:.4f}", "-i", str(path), "-t", f"{span:.4f}",
        "-vf", f"fps={FPS},scale={width}:{height}:flags=area,crop={SIZE[1]}:{SIZE[0]}", "-f", "rawvideo", "-pix_fmt", "rgb24", "-",
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def best_of(repeats: int, function) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(path: Path, window_start: float | None, repeats: int = 3) -> dict:
    info = probe(path)
    clips = plan_clips(info, "uniform", FPS, FRAMES, 10.0)
    if window_start is not None:
        clips = [tuple(window_start + i / FPS for i in range(len(clips[0])))]
    clip = clips[0]
    stats = DecodeStats()
    decode_clips(info, [clip], SIZE, stats)
    ours = best_of(repeats, lambda: decode_clips(info, [clip], SIZE))
    naive = best_of(1 if info.duration > 5 else repeats, lambda: naive_clip(path, clip))
    row = {
        "file": path.name,
        "window": f"{clip[0]:.2f}-{clip[-1]:.2f}s",
        "decoded": stats.decoded,
        "minimum": minimum_frames(info, clip, frame_times(path)),
        "ours_ms": ours * 1000,
        "naive_ms": naive * 1000,
    }
    if shutil.which("ffmpeg"):
        row["ffmpeg_ms"] = min(ffmpeg_clip(path, clip, info) for _ in range(repeats)) * 1000
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "videos"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        long_gop = make_long_gop_file(Path(scratch) / "720p60_longgop.mp4")
        rows.append(measure(long_gop, 7.0))  # a window deep in the second GOP
        rows.append(measure(long_gop, 0.0))  # a window at the start
        for path in sorted(Path(args.shared).glob("*")):
            if path.suffix != ".md":
                rows.append(measure(path, None))
    print(f"17 frames at {FPS:g} fps, resized to {SIZE[1]}x{SIZE[0]}; best of 3 (the naive loader: 1 on long files)")
    print(f"{'file':30} {'window':12} {'decoded/min':>12} {'ratio':>6} {'ours ms':>8} {'naive ms':>9} {'speed-up':>8} {'ffmpeg ms':>9} {'vs ffmpeg':>9}")
    for r in rows:
        ffmpeg = r.get("ffmpeg_ms")
        print(
            f"{r['file'][:30]:30} {r['window']:12} {r['decoded']:>5}/{r['minimum']:<6} {r['decoded'] / r['minimum']:6.3f} "
            f"{r['ours_ms']:8.1f} {r['naive_ms']:9.1f} {r['naive_ms'] / r['ours_ms']:7.1f}x "
            + (f"{ffmpeg:9.1f} {r['ours_ms'] / ffmpeg:8.2f}x" if ffmpeg else f"{'-':>9} {'-':>9}")
        )


if __name__ == "__main__":
    main()
