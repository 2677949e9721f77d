"""Reading clips with PyAV: probe a file once, plan which instants to sample, decode only those frames.

Frames are chosen by presentation timestamp on a `target_fps` grid, never by frame index, so a
variable-frame-rate file keeps its real motion speed. Times are seconds from the file's first frame.
"""

from __future__ import annotations

import bisect
import math
import random
import zlib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from ..util.lazy import av, np
from .audio import AudioInfo, probe_audio

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".webm", ".mkv", ".m4v", ".gif"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS
MIN_SIDE = 8  # pixels; anything smaller is not a picture worth training on
_EPS = 1e-6


class MediaError(Exception):
    """A file that cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class MediaInfo:
    path: Path
    is_image: bool
    width: int  # as displayed, after rotation
    height: int
    duration: float = 0.0  # seconds; 0 for a still image
    fps: float = 0.0  # average frame rate
    real_fps: float = 0.0  # the stream's base (r_frame_rate) rate
    time_base: Fraction | None = None
    frame_count: int | None = None  # from the header where it says, else counted from packets
    rotation: int = 0  # degrees counter-clockwise the stored frames are turned for display
    pix_fmt: str = ""
    has_alpha: bool = False
    start: float = 0.0  # presentation time of the first frame, in the stream's clock
    keyframes: tuple[float, ...] = field(default=(0.0,), repr=False)  # seconds from the first frame
    frame_times: tuple[float, ...] = field(default=(), repr=False)  # every frame's time, from the packets
    audio: AudioInfo | None = None  # the first audio stream; None: the file has no sound
    audio_problem: str = ""  # why its audio cannot be decoded ("" when it can): its clips train without sound


def probe(path: Path) -> MediaInfo:
    """Everything about a file that planning needs, read once: packets are demuxed (not decoded) for
    keyframes and timing, and the first frame is decoded to prove the file plays and read its rotation."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: empty file (0 bytes)")
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return _probe_image(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                kinds = ", ".join(sorted({s.type for s in container.streams})) or "nothing"
                raise MediaError(f"{path}: no video stream (it holds {kinds})")
            stream = container.streams.video[0]
            keyframes, times, end, packets = _scan_packets(container, stream)
            first = times[0] if times else None
            if first is None:
                raise MediaError(f"{path}: the video stream holds no frames")
            container.seek(0)
            frame = _first_frame(container, stream)
            rotation = int(round(frame.rotation or 0)) % 360
            fmt = frame.format.name
            # WebM marks alpha in metadata (the stock VP9 decoder does not output it); others in the pixel format
            alpha = stream.metadata.get("alpha_mode") == "1" or any(c.is_alpha for c in frame.format.components)
            time_base = stream.time_base
            duration = (end - first) * time_base if end > first else 0
            if not duration and container.duration:  # a one-frame file: the container's word is all there is
                duration = Fraction(container.duration, av.time_base)
            avg = packets / float(duration) if duration and packets > 1 else float(stream.average_rate or stream.guessed_rate or 0)
            real = float(stream.base_rate or avg or 0)
            width, height = frame.width, frame.height
            frame_count = stream.frames or packets
            audio, audio_problem = probe_audio(container, path)
    except MediaError:
        raise
    except Exception as error:
        raise MediaError(f"{path}: not a readable video ({_reason(error)})") from None
    if min(width, height) < MIN_SIDE:
        raise MediaError(f"{path}: frames are {width}x{height} pixels, too small to train on")
    if rotation in (90, 270):
        width, height = height, width
    return MediaInfo(
        path=path,
        is_image=False,
        width=width,
        height=height,
        duration=float(duration),
        fps=avg,
        real_fps=real,
        time_base=time_base,
        frame_count=frame_count,
        rotation=rotation,
        pix_fmt=fmt,
        has_alpha=alpha,
        start=float(first * time_base),
        keyframes=tuple(sorted({float((k - first) * time_base) for k in keyframes})) or (0.0,),
        frame_times=tuple(float((t - first) * time_base) for t in times),
        audio=audio,
        audio_problem=audio_problem,
    )


def _probe_image(path: Path) -> MediaInfo:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            width, height = ImageOps.exif_transpose(image).size
            mode = image.mode
    except Exception as error:
        raise MediaError(f"{path}: not a readable image ({_reason(error)})") from None
    if min(width, height) < MIN_SIDE:
        raise MediaError(f"{path}: the image is {width}x{height} pixels, too small to train on")
    return MediaInfo(path, True, width, height, pix_fmt=mode, has_alpha="A" in mode, frame_count=1)


def _scan_packets(container, stream):
    """Keyframes, first time, end time and frame count from the packets alone (no decoding). The end
    is the last frame's time plus a typical frame duration: muxers often store a made-up last one."""
    keyframes, times, durations = [], [], []
    for packet in container.demux(stream):
        if packet.pts is None:
            continue
        times.append(packet.pts)
        if packet.duration:
            durations.append(packet.duration)
        if packet.is_keyframe:
            keyframes.append(packet.pts)
    if not times:
        return keyframes, [], None, 0
    typical = sorted(durations)[len(durations) // 2] if durations else 0
    times.sort()
    return keyframes, times, times[-1] + typical, len(times)


def _first_frame(container, stream):
    for frame in container.decode(stream):
        return frame
    raise MediaError("no frame could be decoded")


def _reason(error: Exception) -> str:
    if isinstance(error, av.FFmpegError) and error.strerror:  # without the errno and the repeated file name
        return error.strerror
    return str(error).strip() or type(error).__name__


# --- planning ------------------------------------------------------------------------------------


def window_frames(info: MediaInfo, target_fps: float, max_frames: int, max_duration: float, valid_count) -> int:
    """Frames per clip window: up to `max_frames`, within `max_duration` seconds and the file's length,
    rounded down to a count the model accepts (0: the file is too short)."""
    if info.is_image:
        return 1
    span = min(info.duration, max_duration) if info.duration > 0 else max_duration
    return valid_count(min(max_frames, math.floor(span * target_fps + _EPS)))


def plan_clips(
    info: MediaInfo,
    strategy: str,
    target_fps: float,
    max_frames: int,
    max_duration: float,
    clips_per_file: int = 1,
    valid_count=lambda n: n,
    seed: int = 0,
    epoch: int = 0,
    name: str = "",
) -> list[tuple[float, ...]]:
    """Clip windows as tuples of instants. Frames inside a window are consecutive on the target_fps grid;
    the strategy places window starts: `uniform` evenly from the start to the end of the file, `random`
    anywhere (a new draw each epoch, reproducible from the seed and `name`, the file's path in its concept;
    its full path when not given), `keyframe` on keyframes."""
    frames = window_frames(info, target_fps, max_frames, max_duration, valid_count)
    if frames < 1:
        return []
    if info.is_image:
        return [(0.0,)]
    latest = max(0.0, info.duration - frames / target_fps)
    if strategy == "uniform":
        starts = [latest * i / (clips_per_file - 1) for i in range(clips_per_file)] if clips_per_file > 1 else [0.0]
    elif strategy == "random":
        rng = random.Random(f"{seed}:{epoch}:{zlib.crc32((name or str(info.path)).encode())}")
        starts = sorted(rng.uniform(0.0, latest) for _ in range(clips_per_file))
    elif strategy == "keyframe":
        candidates = [k for k in info.keyframes if k <= latest + _EPS] or [0.0]
        picks = np.linspace(0, len(candidates) - 1, min(clips_per_file, len(candidates)))
        starts = [candidates[round(i)] for i in picks]
    else:
        raise ValueError(f"unknown frame_sample_strategy {strategy!r}")
    unique = sorted({round(s, 6) for s in starts})
    return [tuple([start + i / target_fps for i in range(frames)]) for start in unique]


# --- decoding ------------------------------------------------------------------------------------


@dataclass
class DecodeStats:
    decoded: int = 0  # frames the decoder produced
    seeks: int = 0


def decode_clips(
    info: MediaInfo, clips: list[tuple[float, ...]], size: tuple[int, int] | None = None, stats: DecodeStats | None = None
) -> list[np.ndarray]:
    """Each clip's frames as uint8 (F, H, W, 3) RGB, rotated for display, resized and center-cropped to
    cover `size` = (height, width). Only the spans the clips need are decoded: the decoder seeks to the
    keyframe before each span and re-seeks only when a later keyframe is closer than decoding on."""
    if info.is_image:
        return [_image_frames(info.path, size) for _ in clips]
    targets = sorted({t for clip in clips for t in clip})
    shown = _frames_shown_at(info, targets, stats or DecodeStats())
    converted: dict[int, np.ndarray] = {}  # one conversion per source frame, however many instants show it

    def array(t: float) -> np.ndarray:
        frame = shown[t]
        if id(frame) not in converted:
            converted[id(frame)] = _to_array(frame, info.rotation, size)
        return converted[id(frame)]

    return [np.stack([array(t) for t in clip]) for clip in clips]


def _frames_shown_at(info: MediaInfo, targets: list[float], stats: DecodeStats) -> dict:
    """The frame on screen at each instant (the last one whose time is <= the instant)."""
    shown: dict[float, av.VideoFrame] = {}
    pending = list(targets)
    try:
        with av.open(str(info.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            while pending:
                key = _keyframe_before(info, pending[0])
                container.seek(_stream_pts(info, key), stream=stream, backward=True, any_frame=False)
                stats.seeks += 1
                previous = None
                for frame in container.decode(stream):
                    if frame.time is None:
                        continue
                    stats.decoded += 1
                    now = frame.time - info.start
                    while pending and pending[0] < now - _EPS:  # instants before this frame show the previous one
                        shown[pending.pop(0)] = previous if previous is not None else frame
                    # instants the packets say this frame is on screen for: no need to decode the next one
                    while pending and abs(_frame_time_at(info, pending[0]) - now) <= _EPS:
                        shown[pending.pop(0)] = frame
                    if not pending:
                        break
                    previous = frame
                    # a keyframe at or before the next instant that skips frames we do not need: jump there
                    if _keyframe_before(info, pending[0]) > now + 1.5 / (info.fps or 1000):
                        break
                else:  # end of stream: the last frame stays on screen
                    while pending and previous is not None:
                        shown[pending.pop(0)] = previous
                    if pending:
                        raise MediaError(f"{info.path}: no frame decodes at or after {pending[0]:.3f} s")
    except MediaError:
        raise
    except Exception as error:
        raise MediaError(f"{info.path}: decoding failed ({_reason(error)})") from None
    return shown


def _frame_time_at(info: MediaInfo, t: float) -> float:
    """The time of the frame on screen at `t`, from the packet times (nan where they are unknown)."""
    index = bisect.bisect_right(info.frame_times, t + _EPS) - 1
    return info.frame_times[index] if index >= 0 else math.nan


def _keyframe_before(info: MediaInfo, t: float) -> float:
    index = bisect.bisect_right(info.keyframes, t + _EPS) - 1
    return info.keyframes[max(index, 0)]


def _stream_pts(info: MediaInfo, t: float) -> int:
    return int(round((t + info.start) / info.time_base))


def _cover_size(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    """The smallest (width, height) with the picture's aspect that covers `size` = (height, width)."""
    scale = max(size[0] / height, size[1] / width)
    return max(size[1], round(width * scale)), max(size[0], round(height * scale))


def _center_crop(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    top = (array.shape[0] - size[0]) // 2
    left = (array.shape[1] - size[1]) // 2
    return array[top : top + size[0], left : left + size[1]]


def _to_array(frame: av.VideoFrame, rotation: int, size: tuple[int, int] | None) -> np.ndarray:
    """RGB (alpha dropped), resized in the same pass, then turned upright and cropped."""
    turns = rotation // 90
    if size is None:
        array = frame.to_ndarray(format="rgb24")
    else:
        upright = (frame.height, frame.width) if turns % 2 == 0 else (frame.width, frame.height)
        width, height = _cover_size(upright[1], upright[0], size)
        if turns % 2:
            width, height = height, width
        array = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="AREA")
    if turns:
        array = np.rot90(array, k=turns)
    return np.ascontiguousarray(array if size is None else _center_crop(array, size))


def _image_frames(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    if size is not None:
        width, height = _cover_size(rgb.width, rgb.height, size)
        rgb = Image.fromarray(_center_crop(np.asarray(rgb.resize((width, height), Image.Resampling.BOX)), size))
    return np.asarray(rgb)[None].copy()


def decode_frames(path: Path, timestamps: list[float], size: tuple[int, int] | None = None) -> np.ndarray:
    """The frames shown at `timestamps` (seconds from the first frame) of one file."""
    return decode_clips(probe(Path(path)), [tuple(timestamps)], size)[0]


def write_video(path: Path, frames: np.ndarray, fps: float, audio: np.ndarray | None = None, audio_rate: int = 0) -> None:
    """Write uint8 (F, H, W, 3) frames as an H.264 mp4 (yuv420p, so every player opens it), atomically; with `audio`,
    float (channels, samples) in [-1, 1] at `audio_rate`, as its AAC sound track."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    even = np.ascontiguousarray(frames[:, : height - height % 2, : width - width % 2])
    temporary = path.with_name(f".{path.name}.tmp")
    with av.open(str(temporary), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = even.shape[2], even.shape[1]
        stream.pix_fmt = "yuv420p"
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=audio_rate, layout="stereo" if audio.shape[0] == 2 else "mono")
        for array in even:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
        if sound is not None:
            pcm = np.ascontiguousarray(np.clip(audio, -1.0, 1.0).astype(np.float32))
            frame = av.AudioFrame.from_ndarray(pcm, format="fltp", layout=sound.layout.name)
            frame.sample_rate, frame.pts = audio_rate, 0
            container.mux(sound.encode(frame))
            container.mux(sound.encode())
    temporary.replace(path)
