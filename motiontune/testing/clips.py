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


def write_clip_with_tone(
    path: Path,
    seconds: float,
    fps: int = 24,
    tones: tuple[tuple[float, float], ...] = ((0.0, 440.0),),
    audio_start: float = 0.0,
    audio_codec: str = "flac",
    sample_rate: int = 16000,
    layout: str = "mono",
    size: tuple[int, int] = (32, 48),
    frames: np.ndarray | None = None,
) -> Path:
    """A timestamped clip (`write_timestamped_clip`'s frames, from 0 s; or uint8 (F, H, W, 3) `frames`, lossless)
    with a sound track: a sine whose pitch is tones[i][1] Hz from tones[i][0] seconds (on the video's clock) until
    the next tone, starting at `audio_start` seconds (after the video: the audio stream's own start time differs
    from the video's)."""
    path = Path(path)
    video_base = Fraction(1, fps * 100)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.height, video.width = size if frames is None else frames.shape[1:3]
        video.pix_fmt = "yuv444p"
        video.options = {"qp": "0"}
        video.codec_context.time_base = video_base
        audio = container.add_stream(audio_codec, rate=sample_rate, layout=layout)
        channels = audio.codec_context.channels
        for i in range(round(seconds * fps)):
            t = Fraction(i, fps)
            image = timestamp_image(round(t * 1000), *size) if frames is None else frames[i]
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = round(t / video_base), video_base
            container.mux(video.encode(frame))
        container.mux(video.encode())
        total = round((seconds - audio_start) * sample_rate)
        times = audio_start + np.arange(total) / sample_rate
        pitch = np.full(total, tones[0][1])
        for start, hertz in tones:
            pitch[times >= start] = hertz
        wave = 0.5 * np.sin(2 * np.pi * np.cumsum(pitch) / sample_rate)
        pcm = (np.tile(wave, (channels, 1)) * 32767).astype(np.int16)
        block = 1024
        for offset in range(0, total, block):
            chunk = np.ascontiguousarray(pcm[:, offset : offset + block])
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1) if channels > 1 else chunk, format="s16", layout=layout)
            frame.sample_rate = sample_rate
            frame.pts = round(audio_start * sample_rate) + offset
            frame.time_base = Fraction(1, sample_rate)
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
    return path


def write_clip_with_broken_audio(path: Path, frames: int | np.ndarray = 24, fps: int = 24, size: tuple[int, int] = (32, 48)) -> Path:
    """A timestamped clip of `frames` frames (or these uint8 (F, H, W, 3) frames, lossless) whose audio stream (FLAC
    in Matroska) holds random bytes: the video plays, no audio frame decodes."""
    path = Path(path)
    rng = np.random.default_rng(0)
    images = None if isinstance(frames, int) else frames
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.height, video.width = size if images is None else images.shape[1:3]
        video.pix_fmt = "yuv444p"
        video.options = {"qp": "0"}
        audio = container.add_stream("flac", rate=16000, layout="mono")
        frames = len(images) if images is not None else frames
        for i in range(frames):
            image = timestamp_image(round(i * 1000 / fps), *size) if images is None else images[i]
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode())
        for i in range(frames):
            packet = av.Packet(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
            packet.stream, packet.time_base = audio, Fraction(1, 16000)
            packet.pts = packet.dts = i * 1024
            container.mux(packet)
    return path
