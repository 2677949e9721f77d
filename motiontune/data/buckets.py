"""Batches of equal latent shape (frames, height, width), shuffled reproducibly per epoch."""

from __future__ import annotations

import math
import random
from collections import defaultdict


def bucket_batch_size(batch_size: int, latent_frames: int, video_multiplier: float) -> int:
    """Videos use max(1, floor(batch_size × video_batch_size_multiplier)); still images use batch_size."""
    if latent_frames <= 1:
        return batch_size
    return max(1, math.floor(batch_size * video_multiplier))


def epoch_batches(
    shapes: list[tuple[int, ...]],
    repeats: list[float],
    batch_size: int,
    video_multiplier: float,
    seed: int,
    epoch: int,
) -> list[list[int]]:
    """Clip indices grouped into batches for one epoch. `repeats` 1.5 means every clip once and
    half of them (chosen per epoch) a second time."""
    rng = random.Random(seed * 100_003 + epoch)
    buckets: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, (shape, repeat) in enumerate(zip(shapes, repeats)):
        times = int(repeat) + (1 if rng.random() < repeat - int(repeat) else 0)
        buckets[shape].extend([index] * times)
    batches = []
    for shape, indices in sorted(buckets.items()):
        rng.shuffle(indices)
        size = bucket_batch_size(batch_size, shape[1], video_multiplier)
        batches.extend(indices[i : i + size] for i in range(0, len(indices), size))
    rng.shuffle(batches)
    return batches


def batches_per_epoch(shapes, repeats, batch_size, video_multiplier) -> int:
    """Expected batch count of an epoch (fractional repeats rounded up), for the progress bar and LR schedule."""
    counts: dict[tuple[int, ...], int] = defaultdict(int)
    for shape, repeat in zip(shapes, repeats):
        counts[shape] += math.ceil(repeat)
    return sum(math.ceil(n / bucket_batch_size(batch_size, s[1], video_multiplier)) for s, n in counts.items())


def aspect_buckets(resolution: tuple[int, int], multiple: int, max_ratio: float = 3.0) -> list[tuple[int, int]]:
    """(height, width) sizes with about the resolution's area, in multiples of `multiple`, from 1:max_ratio to max_ratio:1."""
    area = resolution[0] * resolution[1]
    buckets = set()
    for width in range(multiple, int(math.sqrt(area * max_ratio)) + multiple, multiple):
        height = area // width // multiple * multiple
        if height >= multiple and 1 / max_ratio <= width / height <= max_ratio:
            buckets.add((height, width))
    buckets.add(resolution)
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the picture's (ties: the larger area)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[1] / b[0]) - aspect), 6), -b[0] * b[1]))
