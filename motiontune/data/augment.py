"""Random variations of the training data, each reproducible from the seeds, so that the cache can key every
variant by exactly what it holds.

- video_config.temporal_augmentation (per clip and epoch): a temporal crop (probability 0.5: the window moves
  by up to half its own length, within the file) and a local shuffle (probability 0.25: two neighbouring
  frames, never the first, swap places). Both are a changed list of instants, so decoding needs nothing special.
- a concept's `image` block (per clip and image variation): crop jitter (the crop window anywhere inside the
  picture scaled to cover the bucket, not centred), a left-right flip, a rotation, brightness, contrast,
  saturation and hue changes, and (masked training) a circular shrink of the mask. One draw applies to every frame.
- a concept's `text` block (per caption line and text variation): tag dropout, random capitals, then tag
  shuffling, as OneTrainer does them; the first `keep_tags_count` tags are never dropped or moved.
"""

from __future__ import annotations

import csv
import random
import re
import string
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


# --- image: crop jitter, flip, rotation, colour ------------------------------------------------

@dataclass(frozen=True)
class ImageVariant:
    """One clip's look, applied alike to every frame: a change that differed from frame to frame would teach
    flicker. Order as in OneTrainer: crop, flip, rotation, then brightness, contrast, saturation, hue."""

    flip: bool = False
    crop: tuple[int, int] | None = None  # (top, left) in the picture scaled to cover the bucket; None: centred
    rotate: float = 0.0  # degrees, counter-clockwise about the centre; the corners it uncovers are black
    brightness: float = 1.0  # factors as torchvision's adjust_*: 1 leaves the frames alone
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0  # a turn of the colour wheel, in [-0.5, 0.5]
    shrink: tuple[int, float] | None = None  # circular mask shrink (masked training): (centre seed, radius share)

    @property
    def cover(self) -> bool:
        """Whether the frames must be decoded at the cover size (to crop them here) rather than at the bucket."""
        return self.crop is not None

    @property
    def pixel_changes(self) -> dict | None:
        """What changes the pixels besides crop and flip, for the latent cache key (None: nothing, so the
        keys of looks without these stay those of earlier versions)."""
        changes = {name: getattr(self, name) for name, neutral in _NEUTRAL.items() if getattr(self, name) != neutral}
        return changes or None

    @property
    def mask_changes(self) -> dict | None:
        """What changes the mask besides crop and flip, for the mask cache key (None: nothing)."""
        changes = {"rotate": self.rotate} if self.rotate else {}
        if self.shrink is not None:
            changes["shrink"] = list(self.shrink)
        return changes or None


_NEUTRAL = {"rotate": 0.0, "brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
SHRINK_RADIUS = (0.2, 1.0)  # OneTrainer's shrink_factor_min / max for RandomCircularMaskShrink


def cover_size(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a `width` x `height` picture scaled to just cover `size` = (height, width), as the
    decoder scales it before cropping."""
    cover_w, cover_h = _cover_size(width, height, size)
    return cover_h, cover_w


def image_variant(image: ConceptImageConfig, width: int, height: int, size: tuple[int, int], seed: str, index: int) -> ImageVariant:
    """Draw `index` of a clip's look: `seed` names the clip (seeds, file, window), `index` the image variation.
    The draws come in a fixed order, each only when its key is on, so adding a change keeps the others' draws."""
    rng = random.Random(f"image:{seed}:{index}")
    flip = image.enable_fixed_flip or (image.enable_random_flip and rng.random() < FLIP_PROBABILITY)
    crop = None
    if image.enable_crop_jitter:
        cover_h, cover_w = cover_size(width, height, size)
        if (cover_h, cover_w) != tuple(size):
            crop = (rng.randint(0, cover_h - size[0]), rng.randint(0, cover_w - size[1]))

    def draw(name: str, low: float, high: float, fixed: float, neutral: float) -> float:
        """OneTrainer's rule: random (uniform in [low, high]) wins over fixed; neither: neutral."""
        if getattr(image, f"enable_random_{name}"):
            return round(rng.uniform(low, high), 6)
        return round(fixed, 6) if getattr(image, f"enable_fixed_{name}") else neutral

    angle = image.random_rotate_max_angle
    rotate = draw("rotate", -angle, angle, angle, 0.0)
    factors = {}
    for name in ("brightness", "contrast", "saturation"):
        strength = getattr(image, f"random_{name}_max_strength")
        factors[name] = max(0.0, draw(name, 1 - strength, 1 + strength, 1 + strength, 1.0))
    strength = image.random_hue_max_strength
    hue = min(0.5, max(-0.5, draw("hue", -strength / 2, strength / 2, strength / 2, 0.0)))
    shrink = None
    if image.enable_random_circular_mask_shrink:
        shrink = (rng.randint(0, 1 << 30), round(rng.uniform(*SHRINK_RADIUS), 6))
    return ImageVariant(flip, crop, rotate, hue=hue, shrink=shrink, **factors)


def apply_image_variant(frames: np.ndarray, variant: ImageVariant, size: tuple[int, int], colour: bool = True) -> np.ndarray:
    """(F, H, W, 3) frames, decoded at the cover size when the variant crops, → the variant at `size`.
    `colour` False (a mask): the geometry alone."""
    spare = (frames.shape[1] - size[0], frames.shape[2] - size[1])
    top, left = (spare[0] // 2, spare[1] // 2) if variant.crop is None else (min(variant.crop[0], spare[0]), min(variant.crop[1], spare[1]))
    frames = frames[:, top : top + size[0], left : left + size[1]]
    if variant.flip:
        frames = frames[:, :, ::-1]
    frames = np.ascontiguousarray(frames)
    if variant.rotate:
        from PIL import Image  # (imported here: reading the module must stay light, see util/lazy)

        frames = np.stack([np.asarray(Image.fromarray(f).rotate(variant.rotate, resample=Image.BILINEAR)) for f in frames])
    if colour and (variant.brightness, variant.contrast, variant.saturation, variant.hue) != (1.0, 1.0, 1.0, 0.0):
        frames = _recolour(frames, variant)
    return frames


def _recolour(frames: np.ndarray, variant: ImageVariant) -> np.ndarray:
    """Brightness, contrast, saturation, hue as torchvision's adjust_* compute them on [0, 1] pixels (each a blend,
    clamped), rounded to bytes once at the end. Contrast pivots on the mean grey of the whole clip, not of each
    frame, so every frame gets the same mapping. One frame at a time: a float copy of a whole clip (81 x 832 x 480)
    is 400 MB, and the hue's temporaries many times that."""
    mean = 0.0
    if variant.contrast != 1.0:  # the clip's mean grey after the brightness change, a first pass over the frames
        mean = sum(float(_grey(_brightened(frame, variant)).mean(dtype=np.float64)) for frame in frames) / len(frames)
    out = np.empty_like(frames)
    for index, frame in enumerate(frames):
        pixels = _brightened(frame, variant)
        if variant.contrast != 1.0:
            pixels = np.clip(variant.contrast * pixels + (1 - variant.contrast) * mean, 0.0, 1.0)
        if variant.saturation != 1.0:
            pixels = np.clip(variant.saturation * pixels + (1 - variant.saturation) * _grey(pixels)[..., None], 0.0, 1.0)
        if variant.hue:
            pixels = _turn_hue(pixels, variant.hue)
        out[index] = np.rint(pixels * 255.0)
    return out


def _brightened(frame: np.ndarray, variant: ImageVariant) -> np.ndarray:
    pixels = frame.astype(np.float32) / 255.0
    return np.clip(pixels * variant.brightness, 0.0, 1.0) if variant.brightness != 1.0 else pixels


def _grey(pixels: np.ndarray) -> np.ndarray:
    return pixels[..., 0] * GREY[0] + pixels[..., 1] * GREY[1] + pixels[..., 2] * GREY[2]


def _turn_hue(pixels: np.ndarray, turn: float) -> np.ndarray:
    """RGB → HSV, the hue turned by `turn` (a full turn is 1), → RGB."""
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    value = pixels.max(axis=-1)
    chroma = value - pixels.min(axis=-1)
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(value == r, (g - b) / safe, np.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    sixths = ((hue / 6.0 + turn) % 1.0) * 6.0
    saturation = chroma / np.where(value > 0, value, 1.0)
    # HSV → RGB: channel n (R 5, G 3, B 1) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + sixths) % 6.0
        channels.append(value - value * saturation * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    return np.stack(channels, axis=-1)


def shrink_mask(mask: np.ndarray, seed: int, share: float) -> np.ndarray:
    """OneTrainer's random circular mask shrink on a clip's (F, H, W) mask: a centre drawn among the masked pixels,
    a radius of `share` × the farthest masked pixel's distance from it, and the mask outside that disc cleared.
    One disc for the whole clip, from the mask over all its frames."""
    union = mask.max(axis=0)
    noise = np.random.default_rng(seed).random(union.shape, dtype=np.float32)
    centre = np.unravel_index(int(np.argmax(noise * union)), union.shape)
    rows, cols = np.mgrid[0 : union.shape[0], 0 : union.shape[1]]
    distance = np.hypot(rows - centre[0], cols - centre[1]).astype(np.float32)
    radius = share * float((union * distance).max())
    return mask * (distance <= radius)


# --- text: tag dropout and shuffling -------------------------------------------------------------

def caption_variants(captions: tuple[str, ...], text: TextConfig, count: int, seed: str) -> tuple[str, ...]:
    """`count` draws of each caption line (all lines when the captions do not vary; lowercased with
    caps_randomize_lowercase)."""
    if not text.varies:
        return tuple(line.lower() for line in captions) if text.caps_randomize_lowercase else captions
    return tuple(vary_caption(line, text, random.Random(f"caption:{seed}:{i}:{v}"))
                 for i, line in enumerate(captions) for v in range(count))


def vary_caption(caption: str, text: TextConfig, rng: random.Random) -> str:
    """Split into tags at the delimiter, drop tags (tag_dropout_*), change their capitals (caps_randomize_*),
    shuffle (enable_tag_shuffling), join with the delimiter and a space: OneTrainer's order. The first
    keep_tags_count tags stay where they are (capitals change on every tag, as in OneTrainer)."""
    tags = [t.strip() for t in caption.split(text.tag_delimiter) if t.strip()]
    kept, rest = tags[: text.keep_tags_count], tags[text.keep_tags_count :]
    if text.tag_dropout_enable and text.tag_dropout_probability > 0:
        rest = _drop_tags(rest, text, rng)  # special tags match as written: OneTrainer lowercases after DropTags
    if text.caps_randomize_lowercase:  # (CapitalizeTags), whether caps_randomize is on or not
        kept, rest = [t.lower() for t in kept], [t.lower() for t in rest]
    if text.caps_randomize_enable and text.caps_randomize_probability > 0:
        kept, rest = _recapitalise(kept, text, rng), _recapitalise(rest, text, rng)
    if text.enable_tag_shuffling:
        rng.shuffle(rest)
    return (text.tag_delimiter + " ").join(kept + rest)


def _recapitalise(tags: list[str], text: TextConfig, rng: random.Random) -> list[str]:
    """OneTrainer's CapitalizeTags: each tag, with caps_randomize_probability, gets one of the modes, picked
    uniformly: capslock (ALL CAPS), title (Every Word), first (First word only, the rest lower), random (each
    letter upper or lower, even odds)."""
    modes = text.caps_modes
    changed = []
    for tag in tags:
        if rng.random() < text.caps_randomize_probability:
            mode = rng.choice(modes)
            if mode == "capslock":
                tag = tag.upper()
            elif mode == "title":
                tag = string.capwords(tag)
            elif mode == "first":
                tag = tag.capitalize()
            else:
                tag = "".join(rng.choice(pair) for pair in zip(tag.upper(), tag.lower()))
        changed.append(tag)
    return changed


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
