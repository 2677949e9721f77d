"""Synthetic clips whose frames carry their own presentation time, so a test can read back exactly
which frames were sampled. Made with PyAV; lossless where the codec allows."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

BLOCK = 8  # pixels per bit: big enough to survive lossy codecs
BITS = 16  # times up to 65.535 s, in milliseconds


def timestamp_image(ms: int, height: int = 32, width: int = 48) -> np.ndarray:
    """A frame showing `ms` as 16 black/white blocks (4x4, top-left), with a white stripe on the right
    quarter so a test can tell which way up the frame is."""
    image = np.zeros((height, width, 3), np.uint8)
    for bit in range(BITS):
        if ms >> bit & 1:
            row, col = divmod(bit, 4)
            image[row * BLOCK : (row + 1) * BLOCK, col * BLOCK : (col + 1) * BLOCK] = 255
    image[:, width - width // 4 :] = 255
    return image


def read_timestamp(frame: np.ndarray) -> int:
    """The milliseconds a `timestamp_image` frame shows (frame upright, at its written size)."""
    value = 0
    for bit in range(BITS):
        row, col = divmod(bit, 4)
        if frame[row * BLOCK : (row + 1) * BLOCK, col * BLOCK : (col + 1) * BLOCK].mean() > 127:
            value |= 1 << bit
    return value


def write_timestamped_clip(
    path: Path,
    times: list[Fraction],
    time_base: Fraction = Fraction(1, 1000),
    codec: str = "libx264",
    rotation: int | None = None,
    keyframe_interval: int | None = None,
    container_options: dict | None = None,
    size: tuple[int, int] = (32, 48),
) -> Path:
    """Frame i is shown from times[i] seconds (exact in `time_base`) and displays that time in
    milliseconds. `rotation` sets the display matrix (degrees counter-clockwise)."""
    path = Path(path)
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=25)
        stream.height, stream.width = size
        stream.codec_context.time_base = time_base
        if codec == "libx264":
            stream.pix_fmt = "yuv444p"
            options = {"qp": "0"}
            if keyframe_interval:
                options["x264-params"] = f"keyint={keyframe_interval}:min-keyint={keyframe_interval}:scenecut=0"
            stream.options = options
        elif codec == "libvpx-vp9":
            stream.pix_fmt = "yuv444p"
            stream.options = {"lossless": "1"}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for t in times:
            frame = av.VideoFrame.from_ndarray(timestamp_image(round(t * 1000), *size), format="rgb24")
            frame.pts = round(Fraction(t) / time_base)
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


# (codec, file suffix) of the synthetic dataset's videos; all in PyAV's bundled FFmpeg
DATASET_CODECS = (("libx264", ".mp4"), ("libvpx-vp9", ".webm"), ("mpeg4", ".mkv"))
DATASET_SIZES = ((32, 48), (48, 32), (40, 40), (36, 64))  # (height, width) as stored
DATASET_RATES = (12, 24, 25, 30)


def write_mixed_dataset(folder: Path, count: int, seed: int = 0) -> dict[str, int]:
    """`count` short files with captions, like a real dataset's mix: videos of several sizes, frame rates and
    codecs (about 1 in 25 rotated), about 1 in 10 an image, and about 1 in 50 broken (cut short, or not media
    at all); no two files have the same content. Returns how many of each kind were written."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = {"video": 0, "image": 0, "broken": 0, "rotated": 0}
    for index in range(count):
        name = folder / f"clip_{index:05d}"
        size = DATASET_SIZES[rng.integers(len(DATASET_SIZES))]
        draw = rng.random()
        if draw < 0.1:
            image = timestamp_image(index, *size)
            path = name.with_suffix(".png" if index % 2 else ".jpg")
            Image.fromarray(image).save(path)
            kinds["image"] += 1
        else:
            codec, suffix = DATASET_CODECS[rng.integers(len(DATASET_CODECS))]
            rate = DATASET_RATES[rng.integers(len(DATASET_RATES))]
            frames = int(rng.integers(rate // 2, rate + 1))  # 0.5 to 1 s
            rotation = 90 if rng.random() < 0.04 else None
            start = Fraction(index, 1000)  # frames show their time: a start of its own makes each file's content unique
            path = write_timestamped_clip(name.with_suffix(suffix), [start + Fraction(i, rate) for i in range(frames)],
                                          time_base=Fraction(1, rate * 100), codec=codec, rotation=rotation, size=size)
            if 0.1 <= draw < 0.12:  # broken: half of them cut short, half not media at all
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 5] if index % 2 else b"not a video\n" * 50)
                kinds["broken"] += 1
            else:
                kinds["video"] += 1
                kinds["rotated"] += rotation is not None
        name.with_suffix(".txt").write_text(f"synthetic clip {index}\n")
    return kinds
