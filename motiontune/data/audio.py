"""A clip's sound, read with PyAV: what a file's audio stream is (probed with the video) and the samples over
exactly a clip's time window, resampled to the rate and channel count a family's audio VAE wants.

Times are those of data/video.py: seconds from the video's first frame. The audio stream keeps its own start
(`audio_start`, on the same container clock as the video's `start`), so a stream that starts later than the
video has silence before it, and one that starts earlier is cut to the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..util.lazy import av, np



@dataclass(frozen=True)
class AudioInfo:
    rate: int  # samples per second as stored
    channels: int
    codec: str
    start: float  # presentation time of the first audio sample, on the container clock (seconds)


class AudioError(Exception):
    """An audio stream that cannot be read; the message names the file and says why."""


def probe_audio(container, path: Path) -> tuple[AudioInfo | None, str]:
    """The first audio stream of an open container, and a problem ("" when its first frame decodes). A file without
    sound gives (None, "")."""
    if not container.streams.audio:
        return None, ""
    stream = container.streams.audio[0]
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    info = AudioInfo(int(stream.rate or 0), int(stream.channels or 0), stream.codec_context.name, start)
    try:
        container.seek(0)
        for frame in container.decode(stream):
            if frame.samples:
                return info, ""
        problem = "no audio frame decodes"
    except Exception as error:
        problem = _reason(error)
    return info, f"{path}: the audio stream ({info.codec}) cannot be decoded ({problem}); its clips train without sound"


# Read before a window and thrown away: a decoder starting after a seek lacks the frame before (AAC's overlap, MP3's
# bit reservoir), so its first output is wrong; the rate conversion's filter also settles here.
PRE_ROLL = 0.1  # seconds


def decode_audio(path: Path, video_start: float, window_start: float, seconds: float, rate: int, channels: int) -> np.ndarray:
    """float32 (channels, round(seconds × rate)) samples of the file's first audio stream from `window_start` seconds
    after the video's first frame (at `video_start` on the container clock); silence where the stream has none.

    The samples are those of the whole stream converted to `rate` from its first sample and cut at the window: a
    window near the stream's start is read without a seek (after one, a demuxer no longer drops the encoder's priming
    samples, e.g. AAC's 1024, and the first ~20 ms come out lost), and the conversion starts on a stored sample that
    falls on the `rate` grid counted from the stream's start, so no window is off by a fraction of a sample."""
    count = round(seconds * rate)
    out = np.zeros((channels, count), np.float32)
    begin = video_start + window_start  # on the container clock
    layout = "stereo" if channels == 2 else "mono"
    try:
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            stream_start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            if begin - PRE_ROLL > stream_start:
                container.seek(max(0, math.floor((begin - PRE_ROLL) / stream.time_base)), stream=stream, backward=True)
            native_rate = stream.codec_context.sample_rate
            to_float = av.AudioResampler(format="fltp", layout=layout, rate=native_rate)  # channels only, same rate
            pieces, first = [], None
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                if first is None:
                    first = frame.time
                pieces += [f.to_ndarray() for f in to_float.resample(frame)]
                if frame.time > begin + seconds + PRE_ROLL:
                    break
            pieces += [f.to_ndarray() for f in to_float.resample(None)]
    except Exception as error:
        raise AudioError(f"{path}: decoding the audio stream failed ({_reason(error)})") from None
    if first is None or not pieces:
        return out
    native = np.concatenate(pieces, axis=1)
    # the first stored sample whose time is a whole number of output samples from the stream's zero
    index = round(first * native_rate)
    period = native_rate // math.gcd(native_rate, rate)
    skip = -index % period
    samples = _convert_rate(native[:, skip:], native_rate, rate, layout)
    offset = round(begin * rate) - (index + skip) * rate // native_rate  # the window's first sample in `samples`
    source = samples[:, max(offset, 0) : offset + count] if offset + count > 0 else samples[:, :0]
    at = max(-offset, 0)
    out[:, at : at + source.shape[1]] = source[:, : count - at]
    return out


def _convert_rate(samples: np.ndarray, native_rate: int, rate: int, layout: str) -> np.ndarray:
    """float32 (channels, n) at `native_rate` → at `rate`, with PyAV's resampler (libswresample)."""
    if native_rate == rate or samples.shape[1] == 0:
        return samples
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, np.float32), format="fltp", layout=layout)
    frame.sample_rate = native_rate
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
    return np.concatenate([f.to_ndarray() for f in resampler.resample(frame) + resampler.resample(None)], axis=1)


def _reason(error: Exception) -> str:
    if isinstance(error, av.FFmpegError) and error.strerror:
        return error.strerror
    return str(error).strip() or type(error).__name__
