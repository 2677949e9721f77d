"""The config checks the UI shows beside its fields: the same checks as `motiontune train` (the schema, then
what is not built yet and the combinations that cannot work), all of them at once, in words a person can act on
("did you mean", the value that was typed, whole numbers), plus what only matters before a Start: paths that do
not exist, and warnings (settings that are valid but do nothing)."""

from __future__ import annotations

import copy
import difflib
import json
import re
from pathlib import Path

from pydantic import ValidationError

from ..config import ConfigError, TrainConfig
from ..config.load import _known_keys, _sections_with_key, closest_choice, explain
from ..configure import check_config, config_notices
from ..configure import validate as validate_schema
from ..data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

_PROBLEM_KEY = re.compile(r"^\s*-\s+([A-Za-z_0-9.\[\]]+)")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as the Hugging Face Hub names models
MEDIA = set(VIDEO_EXTENSIONS) | set(IMAGE_EXTENSIONS)


def _field_loc(loc: tuple, data, missing: bool) -> str:
    """pydantic's error location cut to the field the user edits (union branch tags such as
    `constrained-float` dropped); empty for a whole-config problem."""
    parts, node = [], data
    for index, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif missing and index == len(loc) - 1 and isinstance(node, dict):
            pass  # a required key that is absent: it is still the field
        else:
            break
        parts.append(str(part))
    return ".".join(parts)


def _message(problem: dict) -> str:
    """pydantic's message, said so that the user knows what to type."""
    kind, value = problem["type"], problem.get("input")
    shown = json.dumps(value, default=str)
    if kind == "missing":
        return "this key is required"
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return f"enter a whole number (got {shown})"
    if kind in ("float_parsing", "float_type"):
        return f"enter a number (got {shown})"
    if kind in ("bool_parsing", "bool_type"):
        return f"enter true or false (got {shown})"
    explained = explain(problem)  # the CLI's words for bounds and choices
    if explained is None:
        return problem["msg"].removeprefix("Value error, ")
    return f"{shown} is {explained}" if kind == "literal_error" else f"{explained} (got {shown})"


def _unknown_key(loc: tuple) -> dict:
    key = str(loc[-1])
    nested = _sections_with_key(loc[:-1], key)
    close = difflib.get_close_matches(key, _known_keys(loc[:-1]), n=1, cutoff=0.6)
    error = {"msg": "unknown key", "unknown": True}
    if nested:
        error["msg"] += f": it belongs inside a section ({' or '.join(nested)})"
    elif close:
        error["msg"] += f"; did you mean {close[0]!r}?"
        error["suggest"] = close[0]
    return error


def _schema_errors(error: ValidationError, data: dict) -> list[dict]:
    errors = []
    for problem in error.errors():
        loc = tuple(problem["loc"])
        if problem["type"] == "extra_forbidden":
            entry = {"loc": ".".join(str(p) for p in loc), **_unknown_key(loc)}
        else:
            entry = {"loc": _field_loc(loc, data, problem["type"] == "missing"), "msg": _message(problem)}
            if problem["type"] != "missing" and "input" in problem and not isinstance(problem["input"], (dict, list)):
                entry["value"] = problem["input"]
            close = closest_choice(problem)
            if close is not None:
                entry["suggest"] = close  # the page offers it as a one-click fix
        errors.append(entry)
    return errors


def _without(data: dict, locs: list[str]) -> dict:
    """The config with the keys that failed the schema taken out (their defaults stand in), so that the rules
    about combinations can still be checked and shown at the same time."""
    trimmed = copy.deepcopy(data)
    for loc in locs:
        parts = [int(p) if p.isdigit() else p for p in loc.split(".")] if loc else []
        node = trimmed
        for part in parts[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        if parts and isinstance(node, dict):
            node.pop(parts[-1], None)
        elif parts and isinstance(node, list) and isinstance(parts[-1], int) and parts[-1] < len(node):
            node[parts[-1]] = None  # keeps the other items' numbers
    return trimmed


def _combination_errors(config: TrainConfig) -> list[dict]:
    if config.concepts is None and config.concept_file_name is None:
        return [{"loc": "", "msg": "the config names no training data: set `concepts` (a list of folders) "
                                   "or `concept_file_name` (a concepts.json file)"}]
    try:
        check_config(config, Path("config"))
    except ConfigError as error:
        errors = []
        for line in str(error).splitlines()[1:]:
            match = _PROBLEM_KEY.match(line)
            loc = re.sub(r"\[(\d+)\]", r".\1", match.group(1)) if match else ""
            errors.append({"loc": loc, "msg": line.strip().removeprefix("- ")})
        return errors
    return []


def validate(data) -> tuple[TrainConfig | None, list[dict]]:
    """Every problem of the config: the schema's and the combinations' together (a key that fails the schema is
    left out to check the rest; the config returned is then that one, for warnings: use it only without errors). Each error: {"loc": "video_config.max_frames", "msg": ...}, loc "" for the whole
    config; unknown keys carry "unknown" and, when one is close, "suggest"; a wrong value carries "value"."""
    if not isinstance(data, dict):
        return None, [{"loc": "", "msg": f"the config must be a JSON object, got {type(data).__name__}"}]
    errors: list[dict] = []
    attempt = data
    for _ in range(3):  # each pass removes the keys that failed; the rest is checked again
        try:
            config = validate_schema(attempt)
        except ValidationError as error:
            found = _schema_errors(error, attempt)
            errors += [e for e in found if e not in errors]
            attempt = _without(attempt, [e["loc"] for e in found])
            continue
        combination = [e for e in _combination_errors(config) if e not in errors]
        return config, errors + combination
    return None, errors


# ---------------------------------------------------------------------------------------------- before a Start

def _local_path(text: str) -> bool:
    """A path on this machine rather than a Hub id (org/name)."""
    return not _HUB_ID.fullmatch(text) or text.startswith((".", "/", "~")) or Path(text).expanduser().exists()


def path_problems(data: dict) -> list[dict]:
    """Folders and files the config names that do not exist, found as they are typed (not after Start)."""
    problems = []

    def need(loc: str, value, kind: str) -> None:
        if not isinstance(value, str) or not value:
            return
        path = Path(value).expanduser()
        if kind == "model":
            if _local_path(value) and not path.exists():
                problems.append({"loc": loc, "msg": f"{value}: no such folder or file (a Hub id is written org/name)"})
        elif kind == "folder" and not path.is_dir():
            problems.append({"loc": loc, "msg": f"{value}: no such folder" + (" (it is a file)" if path.exists() else "")})
        elif kind == "file" and not path.is_file():
            problems.append({"loc": loc, "msg": f"{value}: no such file"})

    need("base_model_name", data.get("base_model_name"), "model")
    for part in ("transformer", "transformer_2", "text_encoder", "vae"):
        section = data.get(part)
        if isinstance(section, dict):
            need(f"{part}.model_name", section.get("model_name"), "model")
    need("concept_file_name", data.get("concept_file_name"), "file")
    if problems and problems[-1]["loc"] == "concept_file_name":  # a preset names OneTrainer's default place
        problems[-1]["msg"] += ": create it, or list your folders in the Concepts tab instead"

    for index, concept in enumerate(data.get("concepts") or []):
        if isinstance(concept, dict) and concept.get("enabled", True) is not False:
            need(f"concepts.{index}.path", concept.get("path"), "folder")
            text = concept.get("text")
            if isinstance(text, dict) and text.get("prompt_source") in ("concept", "txt"):
                need(f"concepts.{index}.text.prompt_path", text.get("prompt_path"), "file")
    for index, sample in enumerate(data.get("samples") or []):
        if isinstance(sample, dict) and sample.get("image"):
            need(f"samples.{index}.image", sample.get("image"), "file")
    return problems


def _media_count(folder: Path, recursive: bool) -> int:
    files = folder.rglob("*") if recursive else folder.glob("*")
    return sum(1 for f in files if f.suffix.lower() in MEDIA and f.is_file())


def planned_steps(config: TrainConfig) -> int | None:
    """About how many optimizer steps the run will take, from a count of the concepts' media files (the survey
    decides exactly; files that turn out unusable make it fewer). None when the data cannot be counted."""
    if not config.concepts:
        return None
    clips = 0.0
    for concept in config.concepts:
        folder = Path(concept.path).expanduser()
        if not concept.enabled or not folder.is_dir():
            continue
        files = _media_count(folder, concept.include_subdirectories)
        balancing = concept.balancing or concept.repeats or 1
        clips += files * config.video_config.clips_per_file * balancing if concept.balancing_strategy == "REPEATS" else int(balancing)
    if clips <= 0:
        return None
    per_batch = max(1, int(config.batch_size * config.video_config.video_batch_size_multiplier))
    batches = max(1, -(-int(clips) // per_batch))
    return -(-batches // config.gradient_accumulation_steps) * config.epochs


def warnings(config: TrainConfig | None) -> list[dict]:
    """Valid settings that do nothing or not what they seem: shown beside their fields, never blocking Start."""
    if config is None:
        return []
    found = []
    for notice in config_notices(config):
        loc = notice.split(" ", 1)[0]
        found.append({"loc": loc, "msg": notice})
    steps = planned_steps(config)
    warmup = config.learning_rate_warmup_steps
    if steps is not None and warmup >= steps:
        found.append({"loc": "learning_rate_warmup_steps",
                      "msg": f"warm-up of {warmup} steps is longer than the run (about {steps} steps): the learning "
                             f"rate never reaches {config.learning_rate:g}; lower it below {steps}"})
    if config.continue_last_backup:
        found.append({"loc": "continue_last_backup", "msg": "every Start continues the newest backup of workspace_dir; "
                                                            "the Runs list resumes one run without this key"})
    return found
