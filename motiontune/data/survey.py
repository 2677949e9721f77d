"""Survey a dataset before any model loads: probe every file (in worker processes), plan its clip
windows and bucket, and say what is wrong with each file that cannot be used. `motiontune inspect`
prints this; training decodes exactly what it planned. Probe results are kept in the cache folder
(`probes.json`), so a file whose size and date are unchanged is not probed again."""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from ..config import TrainConfig
from ..config.schema import parse_resolution
from ..models import ModelFamily, compression_factors
from .augment import augment_clip
from .buckets import aspect_buckets, nearest_bucket
from .audio import AudioInfo
from .cache import FileFacts
from .dataset import Item, scan_dataset
from .conditions import ROLE_SUFFIXES
from .conditions import fit_problem as condition_fit_problem
from .masks import fit_problem
from .video import MediaError, MediaInfo, plan_clips, probe
from .workers import WorkerCrash, map_isolated

log = logging.getLogger("motiontune")

PROBE_VERSION = 3  # raise when probe() learns something new: older probes are then made again


@dataclass
class FileEntry:
    item: Item
    info: MediaInfo | None = None
    problem: str = ""  # why the file is skipped; empty when it trains
    size: tuple[int, int] | None = None  # training (height, width)
    clips: list[tuple[float, ...]] = field(default_factory=list)  # planned windows (first epoch)
    mask: MediaInfo | None = None  # the clip's mask, when it has one that fits (masks are looked at when asked)
    mask_problem: str = ""  # why its mask cannot be used (with masked_training on, the clip is skipped for it)
    conditions: dict = field(default_factory=dict)  # role → the MediaInfo of the clip's condition that fits
    condition_problems: dict = field(default_factory=dict)  # role → why its condition is missing or cannot be used

    @property
    def usable(self) -> bool:
        return not self.problem


@dataclass
class Survey:
    entries: list[FileEntry]

    @property
    def usable(self) -> list[FileEntry]:
        return [e for e in self.entries if e.usable]

    def skipped_by_reason(self) -> Counter:
        return Counter(_reason_kind(e.problem) for e in self.entries if e.problem)

    def clips_per_bucket(self) -> Counter:
        return Counter((len(c), *e.size) for e in self.usable for c in e.clips)


def training_resolution(config: TrainConfig, family: ModelFamily, resolution: str | None = None) -> tuple[int, int]:
    """The size frames are encoded at: the resolution (the config's, or a concept's resolution_override) rounded
    down to the multiple the VAE and patching need, divided by the extra spatial compression
    (spatial_compression_ratio beyond the VAE's own)."""
    resolution = resolution or config.resolution
    height, width = parse_resolution(resolution)
    spatial, _ = compression_factors(config)
    multiple = family.spatial_multiple * spatial
    rounded = (max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple))
    if rounded != (height, width):
        log.info("resolution %s → %dx%d (width x height must be multiples of %d)", resolution, rounded[1], rounded[0], multiple)
    if spatial > 1:
        log.info("spatial_compression_ratio %d: frames are downscaled %dx before encoding, to %dx%d",
                 config.video_config.spatial_compression_ratio, spatial, rounded[1] // spatial, rounded[0] // spatial)
    return rounded[0] // spatial, rounded[1] // spatial


def sampling_grid(config: TrainConfig, family: ModelFamily) -> tuple[float, int]:
    """(frames per second, frames per clip) actually sampled: target_fps and max_frames, subsampled by the
    extra temporal compression (temporal_compression_ratio beyond the VAE's own) and rounded to a valid count."""
    _, temporal = compression_factors(config)
    video = config.video_config
    return video.target_fps / temporal, family.valid_frame_count((video.max_frames - 1) // temporal + 1)


def valid_max_frames(config: TrainConfig, family: ModelFamily) -> int:
    requested = config.video_config.max_frames
    fps, valid = sampling_grid(config, family)
    if valid != requested:
        _, temporal = compression_factors(config)
        how = f", subsampled {temporal}x (temporal_compression_ratio) to {fps:g} fps" if temporal > 1 else ""
        log.info("video_config.max_frames %d → %d frames per clip (%s%s)", requested, valid, family.frame_rule, how)
    return valid


def plan_entry(entry: FileEntry, config: TrainConfig, family: ModelFamily, max_frames: int, epoch: int, augment: bool = False) -> list:
    """The entry's clip windows for one epoch (or window variant), temporally augmented when asked."""
    video = config.video_config
    fps, _ = sampling_grid(config, family)
    clips = plan_clips(
        entry.info, video.frame_sample_strategy, fps, max_frames, video.max_duration,
        video.clips_per_file, family.valid_frame_count, config.seed, epoch, entry.item.name_in_concept,
    )
    if augment and not entry.info.is_image:
        clips = [augment_clip(c, entry.info.duration, fps, config.seed, epoch, entry.item.name_in_concept) for c in clips]
    return clips


def _without_cycle_collection(function):
    """Run `function` with Python's cyclic garbage collector paused. A survey makes a few objects per file that all
    live as long as it does and form no cycles; at 10,000 files the collector, started again and again while they
    are made, walked them for a seventh of a warm survey's time and freed nothing."""

    @functools.wraps(function)
    def paused(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return paused


@_without_cycle_collection
def survey_dataset(config: TrainConfig, family: ModelFamily, require_usable: bool = True, masks: bool | None = None,
                   every_condition: bool = False) -> Survey:
    """Probe, plan and bucket every file; raise a MediaError when nothing is usable (if required). Masks are probed
    and checked against their clips when `masks` (default: with masked_training on); the conditions in the roles the
    family takes always, those in every role with `every_condition` (inspect)."""
    items = scan_dataset(config)
    buckets = _bucket_sets(config, family, {id(item.concept): item.concept for item in items}.values())
    max_frames = valid_max_frames(config, family)
    video = config.video_config
    entries = []
    check_masks = config.masked_training if masks is None else masks
    mask_files = sorted({m for item in items for m in item.masks}) if check_masks else []
    taken = family.condition_roles(config)  # role → whether every clip needs one
    roles = set(ROLE_SUFFIXES) if every_condition else set(taken)
    condition_files = sorted({f for item in items for role, files in item.conditions.items() if role in roles for f in files})
    probes = probe_all([item.path for item in items] + mask_files + condition_files, config)
    mask_probes = dict(zip(mask_files, probes[len(items):]))
    condition_probes = dict(zip(condition_files, probes[len(items) + len(mask_files):]))
    expected = _expected_roles(items, taken, roles)
    stand_ins = family.stand_in_roles(config)  # role → the roles that let a clip go without it
    companion_of = {companion: role for role in taken for companion in family.condition_companions(role)}
    pairs = {one: other for pair in family.paired_roles(config) for one, other in (pair, pair[::-1])}  # both or neither
    nearest = {}  # (width, height, resolution) → bucket: files of one size share it, and a dataset has few sizes
    for item, info in zip(items, probes):
        entry = FileEntry(item)
        entries.append(entry)
        if isinstance(info, WorkerCrash):
            entry.problem = f"{item.path}: {info}"
        elif isinstance(info, MediaError):
            entry.problem = str(info)
        elif isinstance(info, Exception):
            entry.problem = f"{item.path}: unexpected error while probing ({type(info).__name__}: {info})"
        else:
            entry.info = info
            entry.clips = plan_entry(entry, config, family, max_frames, epoch=0)
            if not entry.clips:
                entry.problem = (
                    f"{item.path}: too short: {info.duration:.3f} s holds no frame on the {video.target_fps:g} fps grid"
                )
            else:
                shape = (info.width, info.height, _resolution_of(item.concept, config))
                if shape not in nearest:
                    nearest[shape] = nearest_bucket(info.width, info.height, buckets[shape[2]])
                entry.size = nearest[shape]
                if item.masks and check_masks:
                    _check_mask(entry, mask_probes, config.masked_training)
                if roles:
                    _check_conditions(entry, condition_probes, expected[id(item)] | (set(item.conditions) & roles), taken,
                                      stand_ins, companion_of, pairs)
    survey = Survey(entries)
    unused = sum(1 for item in items if item.masks) if not check_masks else 0
    if unused:
        log.info("%d clips have a -masklabel mask; masked_training is off, so they train on the whole frame", unused)
    if survey.usable:
        frames = len(survey.usable[0].clips[0])
        spatial = family.vae_compression(config.model_type)[0]
        shapes = sorted({(h // spatial, w // spatial) for h, w in (e.size for e in survey.usable)})
        log.info("latent grid per clip: %d frames x %s (frames x height x width)", family.latent_frame_count(frames),
                 ", ".join(f"{h}x{w}" for h, w in shapes))
    if not require_usable:
        return survey
    for entry in entries:
        if entry.problem:
            log.warning("skipped %s", entry.problem)
    if not survey.usable:
        raise MediaError(
            f"none of the {len(entries)} dataset files can be used (reasons above); "
            "check the concept paths and run `motiontune inspect` on them"
        )
    return survey


def _check_mask(entry: FileEntry, probes: dict, skip_bad: bool) -> None:
    """Attach the clip's mask, or say why it cannot be used; with `skip_bad` (masked training) such a clip is
    skipped: trained unmasked, it would learn what its mask leaves out."""
    masks = entry.item.masks
    mask = probes[masks[0]]
    if len(masks) > 1:
        entry.mask_problem = f"several masks ({', '.join(str(m) for m in masks)}); keep one"
    elif isinstance(mask, Exception):
        entry.mask_problem = f"mask unreadable ({mask})"  # the probe's message names the mask file
    else:
        entry.mask_problem = fit_problem(entry.info, mask)
    if not entry.mask_problem:
        entry.mask = mask
    elif skip_bad:
        entry.problem = f"{entry.item.path}: {entry.mask_problem}"


def _expected_roles(items: list[Item], taken: dict, roles: set) -> dict:
    """id(item) → the roles its clip should have a condition in: those the family needs of every clip, and those
    that other clips of its concept have (a clip without one is most likely one the user missed)."""
    in_concept: dict = {}
    for item in items:
        in_concept.setdefault(id(item.concept), set()).update(r for r in item.conditions if r in roles)
    needed = {role for role, required in taken.items() if required}
    return {id(item): needed | in_concept[id(item.concept)] for item in items}


def _check_conditions(entry: FileEntry, probes: dict, roles: set, taken: dict, stand_ins: dict | None = None,
                      companion_of: dict | None = None, pairs: dict | None = None) -> None:
    """Attach each condition of the clip that fits; say why one is missing or does not fit. A clip without a condition
    the family needs of every clip, or whose condition in a role the family takes does not fit, is skipped. A needed
    role may be missing where the clip has a condition in one of its `stand_ins` roles (the family stands in for it);
    a companion (`condition_companions`: VACE's control mask) needs the condition it goes with; of a pair
    (`paired_roles`), a clip has both or neither."""
    item = entry.item
    stand_ins, companion_of, pairs = stand_ins or {}, companion_of or {}, pairs or {}
    roles = set(roles) | {pairs[role] for role in roles if role in pairs and role in item.conditions}
    for role in sorted(roles):
        files = item.conditions.get(role, ())
        example = f"{item.path.stem}{ROLE_SUFFIXES[role]}"
        if not files and any(other in item.conditions for other in stand_ins.get(role, ())):
            continue  # e.g. a VACE reference without a control video: trained on the pipeline's grey video
        principal = companion_of.get(role)
        if files and principal and principal not in item.conditions:
            problem = (f"{role} condition {files[0]} goes with a {principal} condition, and there is no "
                       f"{item.path.stem}{ROLE_SUFFIXES[principal]}.<ext> beside {item.path.name}; give one or remove "
                       f"the {role}")
        elif not files and item.conditions.get(pairs.get(role)):
            problem = (f"{role} condition missing: {item.conditions[pairs[role]][0]} needs its {role} beside it, "
                       f"{example}.<ext>; give one or remove the {pairs[role]}")
        elif not files:
            others = "the model needs one for every clip" if taken.get(role) else "other clips of its concept have one"
            problem = f"{role} condition missing: no {example}.<ext> beside {item.path.name} ({others})"
        elif len(files) > 1:
            problem = f"several {role} conditions ({', '.join(str(f) for f in files)}); keep one"
        elif isinstance(probes[files[0]], Exception):
            problem = f"{role} condition unreadable ({probes[files[0]]})"  # the probe's message names the file
        else:
            problem = condition_fit_problem(entry.info, probes[files[0]], role)
        if not problem:
            entry.conditions[role] = probes[files[0]]
            continue
        entry.condition_problems[role] = problem
        if role in taken and (files or taken[role] or item.conditions.get(pairs.get(role))) and not entry.problem:
            entry.problem = f"{item.path}: {problem}"


def probe_all(paths: list[Path], config: TrainConfig) -> list:
    """Each file's MediaInfo, or the exception that says why it cannot be used: from the cache folder's
    probes.json when the file is unchanged, else probed in worker processes (and remembered, problems too;
    not a worker crash, which may be the machine's fault rather than the file's)."""
    facts = FileFacts(Path(config.cache_dir) / "probes.json" if config.latent_caching else None, PROBE_VERSION)
    shared = {}  # what files alike have in common, made once (see _from_fact)
    results = [_from_fact(path, facts.get(path), shared) for path in paths]
    unknown = [path for path, result in zip(paths, results) if result is None]
    if unknown:
        if len(unknown) < len(paths):
            log.info("probing %d new or changed files (%d known from the cache)", len(unknown), len(paths) - len(unknown))
        found = dict(map_isolated(probe, unknown, config.dataloader_threads))
        for index, path in enumerate(paths):
            if results[index] is None:
                results[index] = result = found[path]
                if isinstance(result, (MediaInfo, MediaError)):
                    facts.put(path, _as_fact(path, result))
        facts.save()
    return results


def _as_fact(path: Path, result: MediaInfo | MediaError):
    if isinstance(result, MediaError):  # kept without the file name, which is the key
        return {"problem": str(result).removeprefix(f"{path}: ")}
    fact = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    fact["path"] = None
    fact["audio"] = None if result.audio is None else dataclasses.asdict(result.audio)
    fact["time_base"] = None if result.time_base is None else [result.time_base.numerator, result.time_base.denominator]
    fact["frame_times"] = _packed_times(result.frame_times, result.time_base)
    return fact


def _packed_times(times: tuple[float, ...], time_base: Fraction | None):
    """A constant frame rate's times as [p, q, r, count]: frame i at round(i·p/q + r/q) − round(r/q) ticks of
    time_base, the rounding a muxer does when a clip's times start off the tick grid. An hour at 30 fps is
    108,000 floats, which would make probes.json, and every warm survey, slow. Kept as the list when the rate
    is not constant, or when no such rule gives back exactly the same floats."""
    if time_base is None or len(times) < 3:
        return list(times)
    step = Fraction(times[-1]) / time_base / (len(times) - 1)  # ticks per frame, give or take the rounding
    for rate in {step.limit_denominator(1001), step.limit_denominator(100)}:
        for phase in range(rate.denominator):
            packed = [rate.numerator, rate.denominator, phase, len(times)]
            if _ticks_match(packed, times, time_base):
                return packed
    return list(times)


def _is_packed(stored: list) -> bool:
    return len(stored) == 4 and all(isinstance(value, int) for value in stored)  # else the times themselves (floats)


def _ticked_times(packed: list[int], time_base: Fraction):
    p, q, r, count = packed
    numerator, denominator = time_base.numerator, time_base.denominator
    first = (2 * r + q) // (2 * q)  # rounded half up
    for i in range(count):
        tick = (2 * (i * p + r) + q) // (2 * q) - first
        yield tick * numerator / denominator  # int / int rounds exactly as float(Fraction)


def _ticks_match(packed: list[int], times: tuple[float, ...], time_base: Fraction) -> bool:
    return all(t == u for t, u in zip(_ticked_times(packed, time_base), times))  # stops at the first difference


def _from_fact(path: Path, fact, shared: dict) -> MediaInfo | MediaError | None:
    """A stored fact as the probe made it. Files alike share their time base and, when their frame times follow
    one rule for as many frames, the tuple of times: `shared` keeps them, each made once (immutable, so sharing is
    safe; in a large dataset most files are alike)."""
    if fact is None:
        return None
    if "problem" in fact:
        return MediaError(f"{path}: {fact['problem']}")
    base, stored = fact["time_base"], fact["frame_times"]  # base: [numerator, denominator] or None
    time_base = base and _once(shared, tuple(base), lambda: Fraction(*base))
    if base and _is_packed(stored):
        frame_times = _once(shared, (*stored, *base), lambda: tuple(_ticked_times(stored, time_base)))
    else:
        frame_times = tuple(stored)
    audio = fact.get("audio") and AudioInfo(**fact["audio"])
    return MediaInfo(**{**fact, "path": path, "time_base": time_base, "keyframes": tuple(fact["keyframes"]),
                        "frame_times": frame_times, "audio": audio})


def _once(shared: dict, key, make):
    if key not in shared:
        shared[key] = make()
    return shared[key]


def _resolution_of(concept, config: TrainConfig) -> str:
    return concept.image.resolution_override if concept.image.enable_resolution_override else config.resolution


def _bucket_sets(config: TrainConfig, family: ModelFamily, concepts) -> dict[str, list[tuple[int, int]]]:
    """Resolution text → the (height, width) buckets clips are sized to: the config's resolution, and each
    concept's resolution_override."""
    sets = {}
    for concept in [None, *concepts]:
        resolution = config.resolution if concept is None else _resolution_of(concept, config)
        if concept is not None and concept.image.enable_resolution_override:
            log.info("concept %s: resolution_override %s (instead of resolution %s)", concept.label, resolution, config.resolution)
        if resolution not in sets:
            size = training_resolution(config, family, resolution)
            sets[resolution] = aspect_buckets(size, family.spatial_multiple) if config.aspect_ratio_bucketing else [size]
    return sets


def _reason_kind(problem: str) -> str:
    """A short category for the summary: the message after the file name, up to its first detail."""
    text = problem.split(": ", 1)[-1]
    return text.split(" (")[0]
