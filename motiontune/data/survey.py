"""Survey a dataset before any model loads: probe every file (in worker processes), plan its clip
windows and bucket, and say what is wrong with each file that cannot be used. `motiontune inspect`
prints this; training decodes exactly what it planned."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from ..config import TrainConfig
from ..models import ModelFamily
from .buckets import aspect_buckets, nearest_bucket
from .dataset import Item, scan_dataset
from .video import MediaError, MediaInfo, plan_clips, probe
from .workers import WorkerCrash, map_isolated

log = logging.getLogger("motiontune")


@dataclass
class FileEntry:
    item: Item
    info: MediaInfo | None = None
    problem: str = ""  # why the file is skipped; empty when it trains
    size: tuple[int, int] | None = None  # training (height, width)
    clips: list[tuple[float, ...]] = field(default_factory=list)  # planned windows (first epoch)

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


def training_resolution(config: TrainConfig, family: ModelFamily) -> tuple[int, int]:
    """The configured resolution rounded down to the multiple the VAE and patching need."""
    height, width = config.resolution_hw()
    multiple = family.spatial_multiple
    rounded = (max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple))
    if rounded != (height, width):
        log.info("resolution %s → %dx%d (width x height must be multiples of %d)", config.resolution, rounded[1], rounded[0], multiple)
    return rounded


def valid_max_frames(config: TrainConfig, family: ModelFamily) -> int:
    requested = config.video_config.max_frames
    valid = family.valid_frame_count(requested)
    if valid != requested:
        log.info("video_config.max_frames %d → %d: the VAE takes 4n+1 frames", requested, valid)
    return valid


def plan_entry(entry: FileEntry, config: TrainConfig, family: ModelFamily, max_frames: int, epoch: int) -> list:
    video = config.video_config
    return plan_clips(
        entry.info, video.frame_sample_strategy, video.target_fps, max_frames, video.max_duration,
        video.clips_per_file, family.valid_frame_count, config.seed, epoch,
    )


def survey_dataset(config: TrainConfig, family: ModelFamily, require_usable: bool = True) -> Survey:
    """Probe, plan and bucket every file; raise a MediaError when nothing is usable (if required)."""
    items = scan_dataset(config)
    resolution = training_resolution(config, family)
    buckets = aspect_buckets(resolution, family.spatial_multiple) if config.aspect_ratio_bucketing else [resolution]
    max_frames = valid_max_frames(config, family)
    video = config.video_config
    entries = []
    probes = map_isolated(probe, [item.path for item in items], config.dataloader_threads)
    for item, (_, info) in zip(items, probes):
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
                entry.size = nearest_bucket(info.width, info.height, buckets)
    survey = Survey(entries)
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


def _reason_kind(problem: str) -> str:
    """A short category for the summary: the message after the file name, up to its first detail."""
    text = problem.split(": ", 1)[-1]
    return text.split(" (")[0]
