"""`motiontune inspect`: what will train, before any GPU time is spent. A summary (readable however large the
dataset), the table of every file on request, or one JSON document."""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

from .config import TrainConfig, find_config_file
from .config.load import ConfigError, apply_override
from .configure import load_config, validate
from .data.survey import FileEntry, Survey, survey_dataset
from .models import family_for


def config_for(target: str, overrides: list[str]) -> TrainConfig:
    """A config file or preset as it is, or a dataset folder with default settings."""
    if Path(target).is_dir():
        data = {"concepts": [{"path": target, "include_subdirectories": True}]}
        for assignment in overrides:
            apply_override(data, assignment)
        return validate(data)
    try:
        find_config_file(target)
    except ConfigError:
        raise ConfigError(f"{target!r} is neither a dataset folder nor a config file or preset") from None
    return load_config(target, overrides)


def inspect(target: str, overrides: list[str] = ()) -> Survey:
    config = config_for(target, list(overrides))
    # masks are checked whatever masked_training says: inspect is where a user finds out whether theirs fit
    return survey_dataset(config, family_for(config, None), require_usable=False, masks=True, every_condition=True), config


def file_record(entry: FileEntry) -> dict:
    info = entry.info
    problems = [entry.problem.split(": ", 1)[-1]] if entry.problem else []
    if entry.item.caption_problem:
        problems.append(f"caption: {entry.item.caption_problem}")
    if entry.mask_problem and not entry.problem:  # with masked_training on, it is the file's problem already
        problems.append(entry.mask_problem)
    if info is not None and info.audio_problem:
        problems.append(info.audio_problem.split(": ", 1)[-1])
    problems += [p for p in entry.condition_problems.values() if p not in entry.problem]  # a skipping one is the file's already
    return {
        "path": str(entry.item.path),
        "usable": entry.usable,
        "metadata": None if info is None else {
            "kind": "image" if info.is_image else "video",
            "duration": round(info.duration, 4),
            "fps": round(info.fps, 3),
            "real_fps": round(info.real_fps, 3),
            "frames": info.frame_count,
            "width": info.width,
            "height": info.height,
            "rotation": info.rotation,
            "pix_fmt": info.pix_fmt,
            "alpha": info.has_alpha,
            "keyframes": len(info.keyframes),
            "audio": None if info.audio is None else {"codec": info.audio.codec, "rate": info.audio.rate,
                                                      "channels": info.audio.channels, "start": round(info.audio.start, 6),
                                                      "decodes": not info.audio_problem},
        },
        "caption": entry.item.captions[0] if entry.item.captions != ("",) else None,
        "bucket": None if entry.size is None else {"height": entry.size[0], "width": entry.size[1]},
        "clips": [[round(t, 6) for t in clip] for clip in entry.clips],
        "mask": {"path": str(entry.item.masks[0]) if len(entry.item.masks) == 1 else [str(m) for m in entry.item.masks],
                 "fits": entry.mask is not None, "problem": entry.mask_problem or None} if entry.item.masks else None,
        "conditions": _conditions_record(entry),
        "problems": problems,
    }


def _conditions_record(entry: FileEntry) -> dict:
    """role → its file(s) beside the clip (null when expected but missing), whether it fits, and what is wrong."""
    record = {}
    for role in sorted(set(entry.item.conditions) | set(entry.condition_problems)):
        files = [str(f) for f in entry.item.conditions.get(role, ())]
        record[role] = {"path": files[0] if len(files) == 1 else files or None, "fits": role in entry.conditions,
                        "problem": entry.condition_problems.get(role)}
    return record


def summary_record(survey: Survey) -> dict:
    usable = survey.usable
    videos = [e.info for e in usable if not e.info.is_image]
    return {
        "files": len(survey.entries),
        "usable_files": len(usable),
        "videos": len(videos),
        "images": len(usable) - len(videos),
        "total_duration": round(sum(info.duration for info in videos), 3),  # seconds, of the usable videos
        "fps_mix": {f"{fps:g}": n for fps, n in sorted(Counter(_typical_fps(info) for info in videos).items())},
        "rotated": sum(1 for e in usable if e.info.rotation),
        "with_sound": sum(1 for info in videos if info.audio is not None and not info.audio_problem),
        "sound_problems": sum(1 for info in videos if info.audio_problem),
        "clips_per_bucket": {f"{f}x{w}x{h}": n for (f, h, w), n in sorted(survey.clips_per_bucket().items())},
        "skipped_by_reason": dict(survey.skipped_by_reason()),
        "caption_problems": dict(Counter(_caption_kind(e.item.caption_problem) for e in survey.entries if e.item.caption_problem)),
        "total_frames": sum(len(c) for e in usable for c in e.clips),
        "masks": sum(1 for e in survey.entries if e.item.masks),  # files with a -masklabel mask beside them
        "masks_not_fitting": sum(1 for e in survey.entries if e.mask_problem),
        # role → files with a condition in that role beside them
        "conditions": dict(sorted(Counter(role for e in survey.entries for role in e.item.conditions).items())),
        "conditions_not_fitting": sum(len(e.condition_problems) for e in survey.entries),  # missing ones too
    }


COMMON_RATES = (8, 10, 12, 15, 16, 23.976, 24, 25, 29.97, 30, 48, 50, 59.94, 60)


def _typical_fps(info) -> float:
    """A file's frame rate for the summary: frames over the span of their timestamps (muxers often store a nominal
    rate in the header, and frames / duration is off by the last frame's length in a short file), shown as the
    common rate it is within 0.5 % of (timestamps in milliseconds make 30 fps look like 29.99)."""
    times = info.frame_times
    if len(times) < 2 or times[-1] <= times[0]:
        return round(info.fps, 2)
    return _shown_rate((len(times) - 1) / (times[-1] - times[0]))


@lru_cache(maxsize=4096)  # files of one rate and length give the same float: a large dataset has few of them
def _shown_rate(rate: float) -> float:
    common = min(COMMON_RATES, key=lambda c: abs(c - rate))
    return common if abs(common - rate) < 0.005 * rate else round(rate, 2)


def _caption_kind(problem: str) -> str:
    """A short category, without the file name: 'caption a.txt is empty' → 'caption is empty'."""
    return re.sub(r" \S+\.txt", "", problem).split(" (")[0].split(";")[0]


def as_json(survey: Survey) -> str:
    return json.dumps({"files": [file_record(e) for e in survey.entries], "summary": summary_record(survey)}, indent=2)


def as_summary(survey: Survey, problems_shown: int = 10) -> str:
    """What a dataset of any size trains on, in a screenful: counts per bucket and per problem, total duration,
    frame-rate mix, and the first few files with a problem."""
    summary = summary_record(survey)
    hours, rest = divmod(summary["total_duration"], 3600)
    lines = [f"{summary['usable_files']} of {summary['files']} files usable: {summary['videos']} videos "
             f"({int(hours)}h {int(rest // 60):02d}m {rest % 60:04.1f}s in all, {summary['rotated']} rotated), "
             f"{summary['images']} images; {summary['total_frames']} frames in all"]
    lines.append(f"sound: {summary['with_sound']} of {summary['videos']} videos carry an audio stream that decodes")
    sound_problems = [e.info.audio_problem for e in survey.usable if e.info.audio_problem]
    if sound_problems and problems_shown:
        lines.append(f"audio that cannot be decoded ({len(sound_problems)}; those clips train without sound):")
        lines += [f"  {problem}" for problem in sound_problems[:problems_shown]]
        if len(sound_problems) > problems_shown:
            lines.append(f"  ... and {len(sound_problems) - problems_shown} more")
    if summary["fps_mix"]:
        lines.append("frame rates: " + ", ".join(f"{fps} fps x{n}" for fps, n in summary["fps_mix"].items()))
    for bucket, count in summary["clips_per_bucket"].items():
        frames, width, height = bucket.split("x")
        lines.append(f"  bucket {width}x{height}, {frames} frames: {count} clips")
    for reason, count in summary["skipped_by_reason"].items():
        lines.append(f"  skipped ({reason}): {count}")
    for reason, count in summary["caption_problems"].items():
        lines.append(f"  trained with an empty caption ({reason}): {count}")
    if summary["masks"]:
        lines.append(f"masks (masked training): {summary['masks']} of {summary['files']} files have one"
                     + (f", {summary['masks_not_fitting']} of them do not fit their clip" if summary["masks_not_fitting"] else ""))
    unfit = [e for e in survey.entries if e.mask_problem and not e.problem]
    if unfit and problems_shown:
        lines.append(f"masks that do not fit their clips ({len(unfit)}; with masked_training on, these clips are skipped):")
        lines += [f"  {e.item.path}: {e.mask_problem}" for e in unfit[:problems_shown]]
        if len(unfit) > problems_shown:
            lines.append(f"  ... and {len(unfit) - problems_shown} more")
    if summary["conditions"]:
        lines.append("conditions beside the clips: " + ", ".join(f"{role} {n} of {summary['files']} files"
                                                              for role, n in summary["conditions"].items()))
    unfit = [(e, p) for e in survey.entries for p in e.condition_problems.values() if p not in e.problem]
    if unfit and problems_shown:
        lines.append(f"conditions missing or not fitting their clips ({len(unfit)}):")
        lines += [f"  {e.item.path}: {p}" for e, p in unfit[:problems_shown]]
        if len(unfit) > problems_shown:
            lines.append(f"  ... and {len(unfit) - problems_shown} more")
    bad = [e for e in survey.entries if e.problem]
    if bad and problems_shown:
        lines.append(f"files that cannot be used ({len(bad)}; --files lists every file):")
        lines += [f"  {e.problem}" for e in bad[:problems_shown]]
        if len(bad) > problems_shown:
            lines.append(f"  ... and {len(bad) - problems_shown} more")
    return "\n".join(lines)


def _audio_cell(meta: dict) -> str:
    audio = meta.get("audio")
    if audio is None:
        return "no" if meta.get("kind") == "video" else "-"
    return f"{audio['codec']} {audio['rate']}Hz" if audio["decodes"] else "bad"


def as_table(survey: Survey) -> str:
    """One row per file, then the summary."""
    header = ("file", "duration", "fps", "frames", "size", "rot", "audio", "clips", "bucket", "caption", "mask", "conditions",
              "problems")
    rows = [header]
    for entry in survey.entries:
        record = file_record(entry)
        meta = record["metadata"] or {}
        clip_frames = {len(c) for c in entry.clips}
        rows.append((
            entry.item.path.name,
            f"{meta['duration']:.2f}s" if meta.get("kind") == "video" else ("image" if meta else "-"),
            f"{meta['fps']:.2f}" if meta.get("fps") else "-",
            str(meta.get("frames") or "-"),
            f"{meta['width']}x{meta['height']}" if meta else "-",
            str(meta.get("rotation", "-")),
            _audio_cell(meta),
            str(len(entry.clips)) if entry.clips else "-",
            f"{'/'.join(map(str, sorted(clip_frames)))}f {entry.size[1]}x{entry.size[0]}" if entry.size else "-",
            "yes" if record["caption"] else "no",
            "-" if not entry.item.masks else "bad" if entry.mask_problem else "yes",
            ",".join(f"{role}{'' if fits['fits'] else '(bad)'}" for role, fits in record["conditions"].items()) or "-",
            "; ".join(record["problems"]) or "",
        ))
    widths = [max(len(row[i]) for row in rows[:]) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    return "\n".join(lines) + "\n\n" + as_summary(survey, problems_shown=0)
