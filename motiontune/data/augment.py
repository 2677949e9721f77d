"""Random variations of the training data, each reproducible from the seeds, so that the cache can key every
variant by exactly what it holds.

- video_config.temporal_augmentation (per clip and epoch): a temporal crop (probability 0.5: the window moves
  by up to half its own length, within the file) and a local shuffle (probability 0.25: two neighbouring
  frames, never the first, swap places). Both are a changed list of instants, so decoding needs nothing special.
- a concept's `image` block (per clip and image variation): crop jitter (the crop window anywhere inside the
  picture scaled to cover the bucket, not centred) and a left-right flip. One draw applies to every frame.
- a concept's `text` block (per caption line and text variation): tag dropout, then tag shuffling, as
  OneTrainer does them; the first `keep_tags_count` tags are never touched.
"""

from __future__ import annotations

import csv
import random
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..config.concepts import ConceptImageConfig, TextConfig
from ..util.lazy import np
from .video import _cover_size  # the decoder's own rule, so crop offsets fit the frames it produces

CROP_PROBABILITY = 0.5
SHUFFLE_PROBABILITY = 0.25
FLIP_PROBABILITY = 0.5  # OneTrainer's (it has no key for it)


# --- temporal ------------------------------------------------------------------------------------

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


# --- image: crop jitter and flip ---------------------------------------------------------------

@dataclass(frozen=True)
class ImageVariant:
    flip: bool = False
    crop: tuple[int, int] | None = None  # (top, left) in the picture scaled to cover the bucket; None: centred

    @property
    def cover(self) -> bool:
        """Whether the frames must be decoded at the cover size (to crop them here) rather than at the bucket."""
        return self.crop is not None


def cover_size(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a `width` x `height` picture scaled to just cover `size` = (height, width), as the
    decoder scales it before cropping."""
    cover_w, cover_h = _cover_size(width, height, size)
    return cover_h, cover_w


def image_variant(image: ConceptImageConfig, width: int, height: int, size: tuple[int, int], seed: str, index: int) -> ImageVariant:
    """Draw `index` of a clip's look: `seed` names the clip (seeds, file, window), `index` the image variation."""
    rng = random.Random(f"image:{seed}:{index}")
    flip = image.enable_fixed_flip or (image.enable_random_flip and rng.random() < FLIP_PROBABILITY)
    crop = None
    if image.enable_crop_jitter:
        cover_h, cover_w = cover_size(width, height, size)
        if (cover_h, cover_w) != tuple(size):
            crop = (rng.randint(0, cover_h - size[0]), rng.randint(0, cover_w - size[1]))
    return ImageVariant(flip, crop)


def apply_image_variant(frames: np.ndarray, variant: ImageVariant, size: tuple[int, int]) -> np.ndarray:
    """(F, H, W, 3) frames, decoded at the cover size when the variant crops, → the variant at `size`."""
    spare = (frames.shape[1] - size[0], frames.shape[2] - size[1])
    top, left = (spare[0] // 2, spare[1] // 2) if variant.crop is None else (min(variant.crop[0], spare[0]), min(variant.crop[1], spare[1]))
    frames = frames[:, top : top + size[0], left : left + size[1]]
    if variant.flip:
        frames = frames[:, :, ::-1]
    return np.ascontiguousarray(frames)


# --- text: tag dropout and shuffling -------------------------------------------------------------

def caption_variants(captions: tuple[str, ...], text: TextConfig, count: int, seed: str) -> tuple[str, ...]:
    """`count` draws of each caption line (all lines when the captions do not vary)."""
    if not text.varies:
        return captions
    return tuple(vary_caption(line, text, random.Random(f"caption:{seed}:{i}:{v}"))
                 for i, line in enumerate(captions) for v in range(count))


def vary_caption(caption: str, text: TextConfig, rng: random.Random) -> str:
    """Split into tags at the delimiter, drop tags (tag_dropout_*), shuffle (enable_tag_shuffling), join
    with the delimiter and a space. The first keep_tags_count tags stay where they are."""
    tags = [t.strip() for t in caption.split(text.tag_delimiter) if t.strip()]
    kept, rest = tags[: text.keep_tags_count], tags[text.keep_tags_count :]
    if text.tag_dropout_enable and text.tag_dropout_probability > 0:
        rest = _drop_tags(rest, text, rng)
    if text.enable_tag_shuffling:
        rng.shuffle(rest)
    return (text.tag_delimiter + " ").join(kept + rest)


def _drop_tags(tags: list[str], text: TextConfig, rng: random.Random) -> list[str]:
    probability, mode = text.tag_dropout_probability, text.tag_dropout_special_tags_mode
    special = _special_matcher(text.tag_dropout_special_tags, text.tag_delimiter, text.tag_dropout_special_tags_regex)

    def protected(tag: str) -> bool:
        """Tags dropout leaves alone: whitelisted ones, or any that are not blacklisted."""
        return (mode == "WHITELIST" and special(tag)) or (mode == "BLACKLIST" and not special(tag))

    if text.tag_dropout_mode == "FULL":
        return [t for t in tags if protected(t)] if rng.random() < probability else tags
    weighted = text.tag_dropout_mode == "RANDOM WEIGHTED"
    kept = []
    for i, tag in enumerate(tags):
        chance = probability * (i + 1) / len(tags) if weighted else probability
        if rng.random() >= chance or protected(tag):
            kept.append(tag)
    return kept


def _special_matcher(spec: str, delimiter: str, regex: bool):
    patterns = _special_tags(spec, delimiter)
    if not regex:
        return lambda tag: tag in patterns
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern) if any(c in pattern for c in ".^$*+?{}[]|()\\") else pattern)
        except re.error:
            compiled.append(pattern)

    def matches(tag: str) -> bool:
        candidates = (tag, tag.strip("()"))
        return any(p.fullmatch(c) if isinstance(p, re.Pattern) else p == c for p in compiled for c in candidates)

    return matches


@lru_cache(maxsize=64)
def _special_tags(spec: str, delimiter: str) -> tuple[str, ...]:
    """The special tags: a .txt file (one per line), a .csv file (first column), or the text itself."""
    path = Path(spec)
    if spec.endswith(".txt") and path.is_file():
        return tuple(line.rstrip("\n") for line in path.read_text(encoding="utf-8-sig").splitlines())
    if spec.endswith(".csv") and path.is_file():
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return tuple(row[0] for row in csv.reader(handle) if row)
    return tuple(t.strip() for t in spec.split(delimiter))
