"""Reading clips with PyAV: probe a file once, plan which instants to sample, decode only those frames.

Frames are chosen by presentation timestamp on a `target_fps` grid, never by frame index, so a
variable-frame-rate file keeps its real motion speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".webm", ".mkv", ".m4v", ".gif"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
_EPS = 1e-6


class MediaError(Exception):
    """A file that cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class MediaInfo:
    path: Path
    is_image: bool
    width: int
    height: int
    duration: float  # seconds; 0 for a still image
    fps: float  # average frame rate; 0 for a still image


def probe(path: Path) -> MediaInfo:
    path = Path(path)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        try:
            with Image.open(path) as image:
                width, height = ImageOps.exif_transpose(image).size
        except Exception as error:
            raise MediaError(f"{path}: not a readable image ({error})") from None
        return MediaInfo(path, True, width, height, 0.0, 0.0)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:  # WebM and others keep only the container's duration
                duration = container.duration / av.time_base
            elif stream.frames and fps:
                duration = stream.frames / fps
            else:
                duration = 0.0
            width, height = stream.codec_context.width, stream.codec_context.height
    except MediaError:
        raise
    except Exception as error:
        raise MediaError(f"{path}: not a readable video ({error})") from None
    if width <= 0 or height <= 0:
        raise MediaError(f"{path}: the video stream reports no frame size")
    return MediaInfo(path, False, width, height, duration, fps)


def plan_timestamps(
    info: MediaInfo, target_fps: float, max_frames: int, max_duration: float, valid_count=lambda n: n
) -> list[float]:
    """Instants (seconds from the first frame) of the frames to sample: up to `max_frames` on the
    `target_fps` grid within the first `max_duration` seconds, as many as `valid_count` allows
    (the model's valid frame counts). A still image gives one instant."""
    if info.is_image:
        return [0.0]
    usable = min(info.duration, max_duration) if info.duration > 0 else max_duration
    available = max(1, math.floor(usable * target_fps + _EPS))
    count = valid_count(min(max_frames, available))
    return [i / target_fps for i in range(count)]


def decode_frames(path: Path, timestamps: list[float], size: tuple[int, int] | None = None) -> np.ndarray:
    """Frames shown at each instant, as uint8 (F, H, W, 3) RGB; `size` = (height, width) resizes and
    center-crops to cover that size. Decoding stops after the last instant needed."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        with Image.open(path) as image:
            rgb = ImageOps.exif_transpose(image).convert("RGB")
        frame = np.asarray(rgb if size is None else _cover_crop_image(rgb, size))
        return frame[None].copy()

    targets = sorted(timestamps)
    chosen: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            start = None
            previous = None
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                if start is None:
                    start = frame.time
                now = frame.time - start
                # every target before this frame's instant shows the previous frame
                while len(chosen) < len(targets) and targets[len(chosen)] < now - _EPS:
                    chosen.append(_to_array(previous if previous is not None else frame, size))
                if len(chosen) == len(targets):
                    break
                previous = frame
            while len(chosen) < len(targets) and previous is not None:  # targets in the last frame's span
                chosen.append(_to_array(previous, size))
    except Exception as error:
        raise MediaError(f"{path}: decoding failed ({error})") from None
    if len(chosen) < len(targets):
        raise MediaError(f"{path}: only {len(chosen)} of {len(targets)} frames could be decoded")
    return np.stack(chosen)


def _cover_size(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    """The smallest (width, height) with the file's aspect that covers `size` = (height, width)."""
    scale = max(size[0] / height, size[1] / width)
    return max(size[1], round(width * scale)), max(size[0], round(height * scale))


def _center_crop(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    top = (array.shape[0] - size[0]) // 2
    left = (array.shape[1] - size[1]) // 2
    return array[top : top + size[0], left : left + size[1]]


def _to_array(frame: av.VideoFrame, size: tuple[int, int] | None) -> np.ndarray:
    if size is None:
        return frame.to_ndarray(format="rgb24")
    width, height = _cover_size(frame.width, frame.height, size)
    array = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="AREA")
    return np.ascontiguousarray(_center_crop(array, size))


def _cover_crop_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    width, height = _cover_size(image.width, image.height, size)
    return Image.fromarray(_center_crop(np.asarray(image.resize((width, height), Image.Resampling.BOX)), size))


def write_video(path: Path, frames: np.ndarray, fps: float) -> None:
    """Write uint8 (F, H, W, 3) frames as an H.264 mp4 (yuv420p, so every player opens it)."""
    from fractions import Fraction

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    even = np.ascontiguousarray(frames[:, : height - height % 2, : width - width % 2])
    temporary = path.with_name(f".{path.name}.tmp")
    with av.open(str(temporary), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = even.shape[2], even.shape[1]
        stream.pix_fmt = "yuv420p"
        for array in even:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    temporary.replace(path)
