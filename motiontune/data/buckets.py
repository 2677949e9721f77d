"""What an epoch trains: how often each clip comes (a concept's balancing), in batches of equal latent shape
(frames, height, width) and condition layout (`EncodedClip.batch_shape`: VACE clips with a reference apart from those
without), shuffled reproducibly per epoch; and the aspect-ratio buckets clips are sized to."""

from __future__ import annotations

import math
import random
from collections import defaultdict


def bucket_batch_size(batch_size: int, latent_frames: int, video_multiplier: float) -> int:
    """Videos use max(1, floor(batch_size × video_batch_size_multiplier)); still images use batch_size."""
    if latent_frames <= 1:
        return batch_size
    return max(1, math.floor(batch_size * video_multiplier))


def clip_repeats(balancing: float, strategy: str, clip_count: int) -> float:
    """How many times each of a concept's `clip_count` clips trains per epoch, on average: REPEATS, `balancing`
    times; SAMPLES, the concept gives floor(`balancing`) clips per epoch, shared evenly by its clips."""
    if strategy == "SAMPLES":
        return math.floor(balancing) / clip_count if clip_count else 0.0
    return balancing


def epoch_counts(repeats: list[float], epoch: int) -> list[int]:
    """How many times each clip trains in `epoch`. The whole part of its repeats always; the fractional parts
    exactly, per group of clips with the same repeats (a concept's clips): n clips at 1.5 give floor(n × 0.5)
    extra samples, which the clips take in turns, epoch after epoch (as OneTrainer's balancing cycles)."""
    counts = [math.floor(r + 1e-9) for r in repeats]
    groups: dict[float, list[int]] = defaultdict(list)
    for index, repeat in enumerate(repeats):
        if repeat - counts[index] > 1e-9:
            groups[round(repeat, 9)].append(index)
    for repeat, members in groups.items():
        extra = math.floor(len(members) * (repeat - math.floor(repeat)) + 1e-6)
        for turn in range(epoch * extra, (epoch + 1) * extra):
            counts[members[turn % len(members)]] += 1
    return counts


def epoch_batches(
    shapes: list[tuple[int, ...]],
    repeats: list[float],
    batch_size: int,
    video_multiplier: float,
    seed: int,
    epoch: int,
) -> list[list[int]]:
    """Clip indices grouped into batches for one epoch (`epoch_counts` says how often each clip comes)."""
    rng = random.Random(seed * 100_003 + epoch)
    buckets: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, (shape, times) in enumerate(zip(shapes, epoch_counts(repeats, epoch))):
        buckets[shape].extend([index] * times)
    batches = []
    for shape, indices in sorted(buckets.items()):
        rng.shuffle(indices)
        size = bucket_batch_size(batch_size, shape[1], video_multiplier)
        batches.extend(indices[i : i + size] for i in range(0, len(indices), size))
    rng.shuffle(batches)
    return batches


def batches_per_epoch(shapes, repeats, batch_size, video_multiplier) -> int:
    """Batch count of an epoch, for the progress bar and LR schedule: exact when every clip's repeats is whole;
    with fractional repeats, the expected samples per bucket rounded up (an epoch may differ by a batch)."""
    samples: dict[tuple[int, ...], float] = defaultdict(float)
    for shape, repeat in zip(shapes, repeats):
        samples[shape] += repeat
    return sum(math.ceil(math.ceil(n - 1e-9) / bucket_batch_size(batch_size, shape[1], video_multiplier))
               for shape, n in samples.items())


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
