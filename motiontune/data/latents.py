"""Encode what training needs, once: planned clips → VAE latents, captions and prompts → text
embeddings, through the on-disk cache. Encoders load only when something is missing from it. This is
the only place where data meets the model's encoders; the training step reads only these tensors."""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import TrainConfig
from ..models import ModelFamily
from ..util.ranks import Ranks
from .augment import ImageVariant, apply_image_variant, caption_variants, cover_size, image_variant
from .buckets import clip_repeats
from .cache import Cache, Entry, encoder_identity
from .dataset import Item, load_concepts
from .conditions import condition_frames
from .masks import POOLING, clip_masks
from .survey import FileEntry, Survey, plan_entry, sampling_grid
from .audio import AudioError, decode_audio
from .video import MediaError, decode_clips
from .workers import map_isolated

log = logging.getLogger("motiontune")


@dataclass
class EncodedClip:
    source: Path
    stored: Entry | torch.Tensor | dict  # the cache entry, read when a step asks (in memory only without a cache)
    captions: tuple[str, ...]  # one is picked per step: the caption lines, or their drawn variations
    repeats: float  # times per epoch on average, from the concept's balancing
    timestamps: tuple[float, ...]
    loss_weight: float = 1.0  # the concept's loss_weight
    look: ImageVariant = ImageVariant()  # the image changes the frames had before encoding (crop, flip, colour...)
    role: str = "STANDARD"  # the concept's type: STANDARD, PRIOR_PREDICTION, or VALIDATION (never trained on)
    concept: str = ""  # the concept's name (its path when it has none)
    mask_stored: Entry | torch.Tensor | None = None  # masked training: the clip's mask on its latent grid
    conditions_stored: dict = field(default_factory=dict)  # role → the clip's condition as its family encoded it
    layout: tuple[str, ...] = ()  # its conditions in the family's `layout_roles`: a batch holds clips alike in them

    def condition(self, role: str) -> torch.Tensor | None:
        """The clip's condition in `role` (data/conditions.py) as the family encoded it; None: the clip has none."""
        stored = self.conditions_stored.get(role)
        return None if stored is None else _value(stored)

    @property
    def mask(self) -> torch.Tensor | None:
        """(F', H', W') loss weights in [0, 1] (masked training); None: the clip has no mask."""
        return None if self.mask_stored is None else _value(self.mask_stored)

    @property
    def latents(self) -> torch.Tensor:
        """(C, F', H', W'), normalised, on the CPU."""
        value = _value(self.stored)
        return value["value"] if isinstance(value, dict) else value

    @property
    def image_embeds(self) -> torch.Tensor | None:
        """The first frame through the family's image encoder (WAN 2.1 I2V), when the family has one."""
        value = _value(self.stored)
        return value.get("image") if isinstance(value, dict) else None

    def extra(self, name: str) -> torch.Tensor:
        """A tensor the family made from the clip's own frames (`ModelFamily.clip_extras`), cached beside its latents."""
        return _value(self.stored)[name]

    @property
    def audio(self) -> torch.Tensor | None:
        """The clip's normalised audio latents, for a family that generates sound; None when the clip has none."""
        value = _value(self.stored)
        audio = value.get("audio") if isinstance(value, dict) else None
        return audio if audio is not None and audio.numel() else None

    @property
    def batch_shape(self) -> tuple:
        """What a batch's clips share (data/buckets.py): the latents' shape, and the conditions that change what the
        transformer is given (VACE: a reference picture's latent frame before the clip's)."""
        return (*self.shape, self.layout)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.stored.shape) if isinstance(self.stored, Entry) else tuple(self.latents.shape)


def batch_extras(family: ModelFamily, config, clips: list, rows: list[int], device) -> dict:
    """What `split_conditioning` gets beside the latents for a batch: the tensors the family made of each clip's own
    frames (`clip_extra_names`), stacked, and each role's conditions as a list (None for a clip without one)."""
    extras = {name: torch.stack([clips[i].extra(name) for i in rows]).to(device) for name in family.clip_extra_names()}
    for role in family.condition_roles(config):
        extras[role] = [None if (c := clips[i].condition(role)) is None else c.to(device) for i in rows]
    return extras


def _value(stored):
    return stored.load() if isinstance(stored, Entry) else stored


class Embeddings(Mapping):
    """Text → embedding, each read from its cache entry when asked (a dataset's captions need not fit in memory)."""

    def __init__(self, stored: dict):
        self._stored = stored

    def __getitem__(self, text: str) -> torch.Tensor:
        return _value(self._stored[text])

    def __iter__(self):
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)


class Encoding:
    """Cache-backed encoding for one run; `calls` counts what was actually encoded.

    With several ranks and the cache on, each rank encodes its share of what is missing, then all read
    the rest from the cache: no entry is written by two ranks. With the cache off, each encodes all."""

    def __init__(self, family: ModelFamily, config: TrainConfig, cache: Cache, ranks: Ranks | None = None,
                 elsewhere=None, share: tuple[int, int] | None = None):
        """`elsewhere`: a function that fills the cache in another process (data/encoder_process.py), called once when
        something is missing; what it could not encode is then skipped, never encoded here. `share`: (rank, world
        size) of such a process under torchrun: it encodes the items dealt to it over every item, missing or not, so
        shares do not depend on when each process looked at the cache."""
        self.family, self.config, self.cache = family, config, cache
        self.ranks = ranks or Ranks()
        self.split = self.ranks.several and cache.enabled and self._cache_is_shared()
        self.elsewhere, self.share = elsewhere, share
        self.filled_elsewhere = False
        self.child_peak_rss: int | None = None  # the encoding process's own peak, bytes (when one ran)
        base = config.base_model_name
        # float32 keeps the name it always had, so existing caches stay valid
        self.vae_identity = encoder_identity(base, family.ENCODER_PARTS["vae"], str(family.vae_dtype).removeprefix("torch."))
        # conditions: the VAE, and a setting that changes what the family makes of a condition file
        condition_format = family.condition_format(config)
        self.condition_identity = self.vae_identity + (f" | {condition_format}" if condition_format else "")
        storage = config.text_encoder.weight_dtype if config.text_encoder.weight_dtype in ("FLOAT_8", "NFLOAT_4") else ""
        self.text_identity = encoder_identity(base, family.ENCODER_PARTS["text"],
                                              f"{config.model_type}:{family.text_dtype}" + (f":{storage}" if storage else "")
                                              + (f":{family.TEXT_FORMAT}" if family.TEXT_FORMAT else ""))
        self.calls: Counter = Counter()
        self.used: dict[str, set[str]] = {"latents": set(), "text": set(), "masks": set(), "conditions": set()}  # every key this run asked for
        self._text_loaded = False
        video = config.video_config
        self._windows_move = video.frame_sample_strategy == "random" or video.temporal_augmentation
        concepts = load_concepts(config)
        # each concept's image variations come round every image_variations epochs
        self._image_cycles = sorted({c.image_variations for c in concepts if c.varies_image and c.image_variations > 1})
        self._told = False  # the notes on what costs encoding time are logged once

    def _cache_is_shared(self) -> bool:
        """Whether every rank sees the same cache folder (nodes without a shared disk each encode everything)."""
        marker = Path(self.cache.directory) / f".shared-{os.getpid()}-{time.time_ns()}"
        marker = Path(self.ranks.from_main(str(marker)))
        if self.ranks.main:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        self.ranks.barrier()
        shared = self.ranks.all_agree(marker.exists())
        self.ranks.barrier()
        if self.ranks.main:
            marker.unlink(missing_ok=True)
            if not shared:
                log.warning("cache_dir %s is not the same folder on every rank: each rank encodes all clips itself; "
                            "put cache_dir on a shared disk to split the work", self.cache.directory)
        return shared

    def window_variant(self, epoch: int) -> int:
        """Which draw an epoch trains: of its clip windows (random windows, temporal augmentation) and of each
        concept's image variations (crop jitter, random flip); 0 when every epoch trains the same clips. It
        repeats once every cached draw has come round (never for windows drawn anew each epoch)."""
        windows = self.config.video_config.window_variants
        if self._windows_move and windows == 0:
            return epoch
        return epoch % math.lcm(windows if self._windows_move else 1, *self._image_cycles)

    def _window_draw(self, variant: int) -> int:
        if not self._windows_move:
            return 0
        windows = self.config.video_config.window_variants
        return variant % windows if windows else variant

    def _look(self, entry: FileEntry, clip: tuple[float, ...], variant: int) -> ImageVariant:
        """The image changes of one clip in this variant (image_variations draws per clip, in turns)."""
        concept = entry.item.concept
        if not concept.image.changes:
            return ImageVariant()
        index = variant % concept.image_variations if concept.varies_image else 0
        seed = f"{self.config.seed}:{concept.seed}:{entry.item.name_in_concept}:{clip[0]:.6f}"
        return image_variant(concept.image, entry.info.width, entry.info.height, entry.size, seed, index)

    def captions(self, item: Item) -> tuple[str, ...]:
        """The captions a step picks from: text_variations draws of each line when tags shuffle or drop out.
        Prompts shared by the whole concept (prompt_source concept) share their draws too."""
        concept = item.concept
        shared = concept.text.prompt_source in ("concept", "txt")
        seed = f"{self.config.seed}:{concept.seed}" + ("" if shared else f":{item.name_in_concept}")
        return caption_variants(item.captions, concept.text, concept.text_variations, seed)

    def clips(self, survey: Survey, variant: int = 0) -> list[EncodedClip]:
        """Every planned clip of every usable file; a file that fails to decode is reported and skipped."""
        _, max_frames = sampling_grid(self.config, self.family)
        entries = survey.usable
        augment = self.config.video_config.temporal_augmentation
        draw = self._window_draw(variant)
        plans = [
            plan_entry(e, self.config, self.family, max_frames, draw, augment) if draw or augment else e.clips
            for e in entries
        ]
        looks = [[self._look(entry, clip, variant) for clip in plan] for entry, plan in zip(entries, plans)]
        keys = []
        for entry, plan, file_looks in zip(entries, plans, looks):
            fingerprint = self.cache.file_fingerprint(entry.item.path)
            keys.append([Cache.latent_key(fingerprint, clip, entry.size, self.vae_identity, look.crop, look.flip, self._audio_key,
                                         look.pixel_changes)
                         for clip, look in zip(plan, file_looks)])
        if self.ranks.main:
            self.cache.save_fingerprints()
        self.used["latents"].update(k for file_keys in keys for k in file_keys)
        values = self._read_all("latents", [key for file_keys in keys for key in file_keys], self._extras)
        missing = [i for i, file_keys in enumerate(keys) if any(values[k] is None for k in file_keys)]
        encoded_before = self.calls["video"]
        if missing and self._fill_elsewhere():
            values.update({key: self.cache.get("latents", key, self._extras) for key, value in values.items() if value is None})
            not_made = sum(value is None for value in values.values())
            if not_made:
                log.warning("%d clip(s) the encoding process could not encode are skipped (its messages above say why)", not_made)
        mine = [] if self.elsewhere else self._my_share(missing, lambda i: keys[i], range(len(keys)))
        if mine:
            self._encode_missing([entries[i] for i in mine], [plans[i] for i in mine], [looks[i] for i in mine],
                                 [keys[i] for i in mine], values)
        if self.split and missing and not self.elsewhere:
            self.ranks.barrier()  # the other ranks' shares are in the cache now
            values.update({key: self.cache.get("latents", key, self._extras) for key, value in values.items() if value is None})
        found = [(entry, clip, look, values[key]) for entry, plan, file_looks, file_keys in zip(entries, plans, looks, keys)
                 for clip, look, key in zip(plan, file_looks, file_keys) if values.get(key) is not None]
        masks = self._masks(found) if self.config.masked_training else [None] * len(found)
        conditions = self._conditions(found)
        found = [(*clip, mask, condition) for clip, mask, condition in zip(found, masks, conditions)
                 if mask is not _FAILED and condition is not _FAILED]
        clip_counts = Counter(id(entry.item.concept) for entry, *_ in found)
        layout_roles = self.family.layout_roles(self.config)
        encoded = []
        for entry, clip, look, value, mask, condition in found:
            item, concept = entry.item, entry.item.concept
            repeats = clip_repeats(concept.balance, concept.balancing_strategy, clip_counts[id(concept)])
            encoded.append(EncodedClip(item.path, value, self.captions(item), repeats, clip, concept.loss_weight, look,
                                       concept.role, concept.name or concept.path, mask_stored=mask,
                                       conditions_stored=condition,
                                       layout=tuple(role for role in layout_roles if role in condition)))
        if not encoded and not self.share:  # a process encoding a share may have none yet: the ranks read all after
            raise MediaError("no clip could be decoded (reasons above)")
        if not self._told:
            self._told = True
            self._tell_costs(entries, clip_counts)
        log.info("%d clips from %d files (%d encoded now, the rest from the cache)",
                 len(encoded), len({c.source for c in encoded}), self.calls["video"] - encoded_before)
        return encoded

    def _encode_missing(self, entries, plans, looks, keys, values) -> None:
        self.family.load_vae()
        # a jittered crop is cut here from frames decoded at the size that covers the bucket
        jobs = [(e.info, plan, cover_size(e.info.width, e.info.height, e.size) if any(look.cover for look in file_looks) else e.size,
                 self._sound) for e, plan, file_looks in zip(entries, plans, looks)]
        decoded = map_isolated(_decode_job, jobs, self.config.dataloader_threads)
        progress = tqdm(total=sum(len(k) for k in keys), desc="encoding clips", unit="clip", leave=False)
        for entry, plan, file_looks, file_keys, (_, result) in zip(entries, plans, looks, keys, decoded):
            if isinstance(result, Exception):
                reason = str(result) if isinstance(result, MediaError) else f"{entry.item.path}: {type(result).__name__}: {result}"
                log.warning("skipped %s", reason)
                progress.update(len(file_keys))
                continue
            clips_frames, sounds, audio_problem = result
            if audio_problem:
                log.warning("%s", audio_problem)
            for frames, sound, clip, look, key in zip(clips_frames, sounds, plan, file_looks, file_keys):
                if values[key] is None:
                    frames = apply_image_variant(frames, look, entry.size)
                    latents = self.family.encode_video(frames)
                    extras = {}
                    if self.family.encodes_first_frame:
                        extras["image"] = self.family.encode_first_frame(frames[0])
                    extras.update(self.family.clip_extras(frames))
                    if self._sound:  # a clip without sound keeps an empty tensor: it trains the video alone
                        extras["audio"] = torch.zeros(0) if sound is None else self.family.encode_audio(sound, len(clip), self._sound[2])
                    extras = extras or None
                    self.calls["video"] += 1
                    about = {"file": str(entry.item.path), "instants": clip, "crop": look.crop, "flip": look.flip,
                             **(look.pixel_changes or {})}
                    # with a cache, only the reference is kept: memory stays flat however many clips there are
                    values[key] = self.cache.put("latents", key, latents, about, extras) or (
                        {"value": latents, **extras} if extras else latents)
                progress.update()
        progress.close()

    def _masks(self, found: list) -> list:
        """Each clip's mask on its latent grid, from the cache or made now (None: the clip has no mask; _FAILED: its
        mask could not be read, so the clip is skipped rather than trained on what the mask leaves out). Masks are
        small and cheap: with several ranks each makes what it misses, and the first rank writes it."""
        masks: list = [None] * len(found)
        missing: dict = {}  # file entry → indices of its clips whose mask is not in the cache
        for index, (entry, clip, look, value) in enumerate(found):
            if entry.mask is None:
                continue
            key = Cache.mask_key(self.cache.file_fingerprint(entry.mask.path), clip, entry.size,
                                 (entry.info.width, entry.info.height), look.crop, look.flip, _grid(value), POOLING,
                                 look.mask_changes)
            self.used["masks"].add(key)
            masks[index] = self.cache.get("masks", key) or key
            if isinstance(masks[index], str):
                missing.setdefault(id(entry), []).append(index)
        if self.ranks.main:
            self.cache.save_fingerprints()
        jobs = []
        for indices in missing.values():
            entry = found[indices[0]][0]
            jobs.append((entry.info, entry.mask, [found[i][1] for i in indices], [found[i][2] for i in indices],
                         entry.size, [_grid(found[i][3]) for i in indices]))
        made = 0
        for indices, (job, result) in zip(missing.values(), map_isolated(_mask_job, jobs, self.config.dataloader_threads)):
            if isinstance(result, Exception):
                log.warning("skipped %s: its mask %s could not be read (%s)", job[0].path, job[1].path, result)
                for index in indices:
                    masks[index] = _FAILED
                continue
            for index, mask in zip(indices, result):
                entry, clip, look, _ = found[index]
                about = {"file": str(entry.item.path), "mask": str(entry.mask.path), "instants": clip, "crop": look.crop,
                         "flip": look.flip, **(look.mask_changes or {})}
                masks[index] = (self.cache.put("masks", masks[index], mask, about) if self.ranks.main else None) or mask
                made += 1
        self.calls["mask"] += made
        with_mask = sum(mask is not None and mask is not _FAILED for mask in masks)
        if with_mask:
            log.info("masked training: %d of %d clips have a mask (%d made now, the rest from the cache); clips without "
                     "one train on the whole frame", with_mask, len(found), made)
        else:
            log.warning("masked_training is on, but no clip has a mask: every clip trains on the whole frame. A clip's "
                        "mask lies beside it, named <clip name>-masklabel.png (one picture) or -masklabel.mp4 (a video)")
        return masks

    def _conditions(self, found: list) -> list:
        """Each clip's conditions in the roles the family takes ({role: cache entry or tensor}), from the cache or
        encoded now (_FAILED: one could not be read, so the clip is skipped rather than trained without it)."""
        roles = self.family.condition_roles(self.config)
        conditions: list = [{} for _ in found]
        if not roles:
            return conditions
        missing = []  # (index, role, key) not in the cache
        stand_ins: dict = {}  # key → (role, frames, size, indices) of stand-ins not in the cache
        stood_in: Counter = Counter()
        for index, (entry, clip, look, _) in enumerate(found):
            read_with = {other for role in entry.conditions for other in self.family.condition_companions(role)}
            for role in entry.conditions:
                if role in read_with:  # encoded with the condition it belongs to (VACE: a control's mask)
                    continue
                # the condition's file and its companions' (a new mask makes the control again); alone, its own
                together = self._read_together(entry, role)
                fingerprint = "+".join(f"{r}:{self.cache.file_fingerprint(entry.conditions[r].path)}" for r in together)
                if len(together) == 1:
                    fingerprint = self.cache.file_fingerprint(entry.conditions[role].path)
                key = Cache.condition_key(fingerprint, role, clip, entry.size,
                                          (entry.info.width, entry.info.height), look.crop, look.flip, look.rotate,
                                          self.condition_identity)
                self.used["conditions"].add(key)
                conditions[index][role] = self.cache.get("conditions", key)
                if conditions[index][role] is None:
                    missing.append((index, role, key))
            for role in stand_in_roles(self.family, self.config, entry):  # made without a file: shared by clips alike
                stood_in[role] += 1
                key = Cache.stand_in_key(role, len(clip), entry.size, self.condition_identity)
                self.used["conditions"].add(key)
                conditions[index][role] = self.cache.get("conditions", key)
                if conditions[index][role] is None:
                    stand_ins.setdefault(key, (role, len(clip), entry.size, []))[3].append(index)
        for role, count in stood_in.items():
            others = " or ".join(self.family.stand_in_roles(self.config)[role])
            log.info("%d clip(s) have no %s condition but a %s: they train on what the pipeline uses when given no %s",
                     count, role, others, role)
        if self.ranks.main:
            self.cache.save_fingerprints()
        missing_stand_ins = [(index, role, key) for key, (role, _, _, indices) in stand_ins.items() for index in indices]
        if (missing or stand_ins) and self._fill_elsewhere():
            for index, role, key in missing + missing_stand_ins:
                conditions[index][role] = self.cache.get("conditions", key)
            not_made = {index for index, role, key in missing + missing_stand_ins if conditions[index][role] is None}
            for index in not_made:
                conditions[index] = _FAILED
            if not_made:
                log.warning("%d clip(s) whose condition the encoding process could not encode are skipped", len(not_made))
            missing, stand_ins = [], {}
        if missing or stand_ins:
            self.family.load_vae()
        made = 0
        for key, (role, frames, size, indices) in stand_ins.items():
            value = self.family.encode_stand_in(role, frames, size)
            self.calls["condition"] += 1
            made += 1
            value = self.cache.put("conditions", key, value, {"role": role, "stand_in": True, "frames": frames,
                                                               "size": list(size)}) or value
            for index in indices:
                conditions[index][role] = value
        whole = self.family.whole_roles(self.config)
        jobs = [(found[i][0].info, {r: found[i][0].conditions[r] for r in self._read_together(found[i][0], role)},
                 [found[i][1]], [found[i][2]], found[i][0].size, whole) for i, role, _ in missing]
        for (index, role, key), (job, result) in zip(missing, map_isolated(_condition_job, jobs, self.config.dataloader_threads)):
            if isinstance(result, Exception):
                log.warning("skipped %s: its %s condition %s could not be read (%s)", job[0].path, role,
                            ", ".join(str(info.path) for info in job[1].values()), result)
                conditions[index] = _FAILED
                continue
            if conditions[index] is _FAILED:
                continue
            entry, clip, look, _ = found[index]
            frames = {r: clips[0] for r, clips in result.items()}
            value = self.family.encode_condition(role, frames.pop(role), frames)
            self.calls["condition"] += 1
            made += 1
            about = {"file": str(entry.item.path), "condition": " + ".join(str(i.path) for i in job[1].values()),
                     "role": role, "instants": clip, "crop": look.crop, "flip": look.flip, "rotate": look.rotate}
            conditions[index][role] = self.cache.put("conditions", key, value, about) or value
        log.info("conditions (%s): %d encoded now, the rest of %d from the cache", ", ".join(roles), made,
                 sum(len(c) for c in conditions if c is not _FAILED))
        return conditions

    def _read_together(self, entry: FileEntry, role: str) -> list[str]:
        """`role` and the clip's conditions in the roles the family reads with it (`condition_companions`)."""
        return [role] + [r for r in self.family.condition_companions(role) if r in entry.conditions]

    def _tell_costs(self, entries: list[FileEntry], clip_counts: Counter) -> None:
        """Log, per concept, the settings that cost encoding time or change how often its clips train."""
        concepts = {id(e.item.concept): e.item.concept for e in entries}
        windows = self.config.video_config.window_variants
        for key, concept in concepts.items():
            name, image = concept.label, concept.image
            if concept.varies_image:
                # the mask shrink changes masks alone (made again per variation, cheap), never the frames the VAE sees
                what = ", ".join(w.replace("_", " ") for w in image.random_pixel_looks)
                if not what:
                    log.info("concept %s: random circular mask shrink: %d mask variations of every clip, one per epoch in "
                             "turns (the latents are encoded once)", name, concept.image_variations)
                elif concept.image_variations == 1:
                    log.info("concept %s: %s drawn once per clip and kept for every epoch (image_variations 1); each "
                             "more image variation costs one more VAE encoding of every clip", name, what)
                else:
                    log.info("concept %s: %s: %d variations of every clip are VAE-encoded, one per epoch in turns (the "
                             "first %d epochs encode, later ones read the cache%s)", name, what, concept.image_variations,
                             concept.image_variations, "" if self.cache.enabled else "; latent_caching is off, so every epoch encodes")
            if concept.text.varies:
                files = [e.item for e in entries if id(e.item.concept) == key]
                texts = {text for item in files for text in self.captions(item)}
                log.info("concept %s: tag shuffling/dropout/capitals: %d draw(s) of each caption line (text_variations), %d "
                         "distinct captions to encode", name, concept.text_variations, len(texts))
            if concept.balancing_strategy == "SAMPLES":
                log.info("concept %s: balancing SAMPLES %d: that many of its %d clips train per epoch, in turns", name,
                         math.floor(concept.balance), clip_counts[key])
        if self._image_cycles and self._windows_move and windows == 0:
            log.info("clip windows are drawn anew every epoch (window_variants 0), so image variations are encoded anew too")

    def texts(self, texts: set[str], batch: int = 8) -> Embeddings:
        """Each text's embedding, as the stock pipeline computes it."""
        keys = {text: Cache.text_key(text, self.text_identity) for text in texts}
        self.used["text"].update(keys.values())
        by_key = self._read_all("text", list(keys.values()))
        embeddings = {text: by_key[key] for text, key in keys.items()}
        everything_missing = sorted(text for text, value in embeddings.items() if value is None)
        if everything_missing and self._fill_elsewhere():
            embeddings.update({text: self.cache.get("text", keys[text]) for text in everything_missing})
            everything_missing = sorted(text for text, value in embeddings.items() if value is None)
        if everything_missing and self.elsewhere:
            raise RuntimeError(f"the encoding process left {len(everything_missing)} text embedding(s) out of the cache "
                               f"{self.cache.directory} (first: {everything_missing[0]!r}); run again")
        every_text = sorted(embeddings)
        missing = [every_text[i] for i in self._my_share(range(len(every_text)), lambda i: [every_text[i]])
                   if every_text[i] in everything_missing] if self.share else \
            [everything_missing[i] for i in self._my_share(range(len(everything_missing)), lambda i: [everything_missing[i]])]
        if missing and not self._text_loaded:
            self.family.park_vae()  # one encoder on the device at a time: an 8 GB GPU holds either, not both
            self.family.load_text_encoder()
            self._text_loaded = True
        for start in range(0, len(missing), batch):
            chunk = missing[start : start + batch]
            for text, row in zip(chunk, self.family.encode_prompts(chunk)):
                self.calls["text"] += 1
                embeddings[text] = self.cache.put("text", keys[text], row, {"text": text}) or row
        if self.split and everything_missing:
            self.ranks.barrier()
            embeddings.update({text: self.cache.get("text", keys[text]) for text in everything_missing if embeddings[text] is None})
        return Embeddings(embeddings)

    @property
    def _extras(self) -> tuple[str, ...]:
        """Tensors a clip's cache entry holds beside its latents."""
        return ("image",) * self.family.encodes_first_frame + ("audio",) * bool(self._sound) + self.family.clip_extra_names()

    @property
    def _sound(self) -> tuple[int, int, float] | None:
        """(sample rate, channels, frames per second) of the sound decoded with each clip, for a family that
        generates sound and a run that trains it (`train_audio`); None for the others."""
        rate = self.family.AUDIO_SAMPLE_RATE if self.config.train_audio else None
        return (rate, self.family.AUDIO_CHANNELS, sampling_grid(self.config, self.family)[0]) if rate else None

    @property
    def _audio_key(self) -> dict | None:
        sound = self._sound
        return None if sound is None else {"rate": sound[0], "channels": sound[1], "window": "frames / fps",
                                           "read": "from the stream's start, on its rate grid"}

    def _read_all(self, kind: str, keys: list[str], extras: tuple[str, ...] = ()) -> dict:
        """What the cache holds for `keys`; with several ranks, every rank reads before any writes, so all
        see the same gaps and deal them out alike."""
        if self.split:
            self.ranks.barrier()
        values = {key: self.cache.get(kind, key, extras) for key in keys}
        if self.split:
            self.ranks.barrier()
        return values

    def _fill_elsewhere(self) -> bool:
        """Have the encoding process fill the cache (once a run; every rank alike, since all saw the same gaps);
        False when this run encodes in its own process."""
        if not self.elsewhere:
            return False
        if not self.filled_elsewhere:
            self.filled_elsewhere = True
            calls, self.child_peak_rss = self.elsewhere(share=(self.ranks.rank, self.ranks.world_size) if self.split else None)
            self.calls.update(calls)
            if self.split:
                self.ranks.barrier()  # every rank's process has written its share
        return True

    def _my_share(self, items, keys_of, everything=None) -> list:
        """This rank's items, dealt round-robin; an item whose keys an earlier item already covers is dealt to
        nobody (identical clips in two files are encoded once). An encoding process (`share`) deals `everything`
        and keeps its missing `items`."""
        if self.share:
            rank, world_size = self.share
            wanted = set(items)
            return [item for item in self._deal(everything if everything is not None else items, keys_of, rank, world_size)
                    if item in wanted]
        if not self.split:
            return list(items)
        return self._deal(items, keys_of, self.ranks.rank, self.ranks.world_size)

    @staticmethod
    def _deal(items, keys_of, rank: int, world_size: int) -> list:
        mine, seen, dealt = [], set(), 0
        for item in items:
            keys = set(keys_of(item)) - seen
            if not keys:
                continue
            seen |= keys
            if dealt % world_size == rank:
                mine.append(item)
            dealt += 1
        return mine

    def release(self, keep_vae: bool, keep_text: bool = False) -> None:
        """Encoders off the training device before the transformer arrives (the text encoder stays when it
        encodes captions during training)."""
        if self._text_loaded and not keep_text:
            self.family.release_text_encoder()
            self._text_loaded = False
        if keep_vae:
            self.family.park_vae()
        else:
            self.family.release_vae()


_FAILED = object()  # a clip whose mask could not be read


def _grid(value) -> tuple[int, int, int]:
    """(F', H', W') of a clip's latents, however they are held."""
    shape = value.shape if isinstance(value, Entry) else (value["value"] if isinstance(value, dict) else value).shape
    return tuple(shape[-3:])


def _mask_job(job):
    return clip_masks(*job)


def stand_in_roles(family: ModelFamily, config, entry: FileEntry) -> list[str]:
    """The roles the family stands in for in this clip (`ModelFamily.stand_in_roles`): needed, missing, and
    allowed missing by another condition it has (the survey checked that)."""
    return [role for role, others in family.stand_in_roles(config).items()
            if role not in entry.conditions and any(other in entry.conditions for other in others)]


def _condition_job(job):
    """A clip's condition and the conditions read with it: role → frames of each planned clip."""
    clip, files, plan, looks, size, whole = job
    return {role: condition_frames(clip, info, plan, looks, size, role, role in whole) for role, info in files.items()}


def _decode_job(job):
    """A file's clips as frames, with each clip's sound when asked: (frames per clip, sound per clip, a problem
    with the sound or ""). Sound that cannot be decoded is reported and its clips train without it."""
    info, clips, size, sound = job
    frames = decode_clips(info, clips, size)
    sounds, problem = [None] * len(clips), info.audio_problem if sound else ""
    if sound and info.audio is not None and not info.audio_problem and not info.is_image:
        rate, channels, fps = sound
        try:
            sounds = [decode_audio(info.path, info.start, clip[0], len(clip) / fps, rate, channels) for clip in clips]
        except AudioError as error:
            problem = f"{error}; its clips train without sound"
    return frames, sounds, problem
