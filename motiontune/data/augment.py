"""video_config.temporal_augmentation: per clip and epoch, reproducible from the seed.

- temporal crop (probability 0.5): the window moves by up to half its own length, within the file;
- local shuffle (probability 0.25): two neighbouring frames (never the first) swap places.

Both are expressed as the clip's list of instants (a moved window, a swapped pair), so decoding needs
nothing special and the cache keys each variant by exactly the frames it holds.
"""

from __future__ import annotations

import random
import zlib

CROP_PROBABILITY = 0.5
SHUFFLE_PROBABILITY = 0.25


def augment_clip(clip: tuple[float, ...], duration: float, fps: float, seed: int, variant: int, path: str) -> tuple[float, ...]:
    if len(clip) < 2:
        return clip
    rng = random.Random(f"augment:{seed}:{variant}:{zlib.crc32(path.encode())}:{clip[0]:.6f}")
    span = len(clip) / fps
    if rng.random() < CROP_PROBABILITY:
        latest = max(0.0, duration - span)
        start = min(max(0.0, clip[0] + rng.uniform(-span / 2, span / 2)), latest)
        clip = tuple(start + i / fps for i in range(len(clip)))
    if len(clip) > 2 and rng.random() < SHUFFLE_PROBABILITY:
        i = rng.randrange(1, len(clip) - 1)
        frames = list(clip)
        frames[i], frames[i + 1] = frames[i + 1], frames[i]
        clip = tuple(frames)
    return clip
