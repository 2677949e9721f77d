"""Finding training items: concept folders, media files and their captions.

Two layouts are read: captions beside the files (`clip.mp4` + `clip.txt`), and the split layout
`videos/` (or `images/`) + `captions/` with the same file stem. In both, a clip's conditions lie beside the clip
itself, named by role (`clip-masklabel.png`, `clip-control.mp4`, `clip-reference.png`...: data/conditions.py);
conditions are never items.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from ..config import ConfigError, TrainConfig
from ..config.concepts import ConceptConfig, concept_problems, concept_where, format_concept_errors, read_concept_list
from .conditions import MASK_ROLE, conditions_by_clip, role_of
from .video import MEDIA_EXTENSIONS

MEDIA_FOLDERS = ("videos", "images")


@dataclass(frozen=True)
class Item:
    path: Path
    captions: tuple[str, ...]  # one is picked per step; a caption file may hold several lines
    concept: ConceptConfig = field(compare=False, repr=False)  # the concept the file belongs to
    caption_problem: str = ""  # why the caption is empty, when it is
    masks: tuple[Path, ...] = ()  # the files named as this clip's mask (more than one is a problem)
    # role → the files named as this clip's condition in that role (masks aside; more than one is a problem)
    conditions: dict = field(default_factory=dict, compare=False)

    @property
    def name_in_concept(self) -> str:
        """The concept folder's name and the file's path inside it. Random draws (windows, augmentations, tag
        shuffles) are seeded with it, not the full path, so the same dataset in another folder or on another
        machine draws the same, and `a/0001.mp4` and `b/0001.mp4` of two concepts draw apart."""
        try:
            inside = self.path.relative_to(self.concept.path).as_posix()
        except ValueError:
            inside = self.path.name
        return f"{_folder_name(self.concept.path)}/{inside}"


@lru_cache(maxsize=None)
def _folder_name(path: str) -> str:
    return Path(path).resolve().name  # "." and "clips/" have a name too


def load_concepts(config: TrainConfig) -> list[ConceptConfig]:
    """The enabled concepts, from the config or its concepts file; a concept that asks for something not built
    stops the run here, before any model loads."""
    if config.concepts is not None:
        concepts, source = config.concepts, "the config's `concepts`"
    else:
        if config.concept_file_name is None:
            raise ConfigError("the config names no training data: set `concepts` (a list of folders) or `concept_file_name` "
                              "(a concepts.json file), e.g. --set 'concepts=[{\"path\": \"my_clips\"}]'")
        concepts, source = _read_concept_file(Path(config.concept_file_name)), config.concept_file_name
    problems = [f"  - {concept_where(i, c)}: {problem}" for i, c in enumerate(concepts) if c.enabled
                for problem in concept_problems(c, config.training_method)]
    if problems:
        raise ConfigError(f"{source}: a concept asks for what is not built yet:\n" + "\n".join(problems))
    enabled = [c for c in concepts if c.enabled]
    if not enabled:
        raise ConfigError(f"{source}: every concept is disabled (enabled false); enable at least one")
    return enabled


def _read_concept_file(path: Path) -> list[ConceptConfig]:
    if not path.is_file():
        raise ConfigError(f"concept_file_name = {str(path)!r}: no such file. Point it at a concepts.json list.")
    try:
        raw = read_concept_list(path)
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from None
    try:
        return TypeAdapter(list[ConceptConfig]).validate_python(raw)
    except ValidationError as error:
        raise ConfigError(format_concept_errors(error, str(path), raw)) from None


def scan_concept(concept: ConceptConfig) -> list[Item]:
    root = Path(concept.path)
    if not root.is_dir():
        raise ConfigError(f"concept path {str(root)!r} is not a folder. Set `path` to the folder with your clips.")
    captions_dir = root / "captions"
    split_layout = captions_dir.is_dir() and any((root / f).is_dir() for f in MEDIA_FOLDERS)
    search_roots = [root / f for f in MEDIA_FOLDERS if (root / f).is_dir()] if split_layout else [root]
    media, condition_files = [], []
    for search_root in search_roots:
        for path in _media_files(search_root, concept.include_subdirectories):
            (media if role_of(path) is None else condition_files).append(path)
    conditions = conditions_by_clip(condition_files)
    media.sort(key=lambda path: path.parts)
    source = concept.text.prompt_source
    concept_lines = _concept_prompts(concept) if source in ("concept", "txt") else ()
    items = []
    for path in media:
        problem = ""
        if source == "filename":
            captions = (path.stem.replace("_", " "),)
        elif source in ("concept", "txt"):
            captions = concept_lines
        else:
            if split_layout:
                caption_file = (captions_dir / path.relative_to(_owning_root(path, search_roots))).with_suffix(".txt")
            else:
                caption_file = os.path.splitext(path)[0] + ".txt"  # path.with_suffix(".txt"), at a third of the cost
            captions, problem = _read_caption(caption_file)
        roles = conditions.get(path.with_suffix(""), {}) if conditions else {}
        items.append(Item(path, captions, concept, problem, roles.get(MASK_ROLE, ()),
                          {role: files for role, files in roles.items() if role != MASK_ROLE}))
    return items


def scan_dataset(config: TrainConfig) -> list[Item]:
    items = [item for concept in load_concepts(config) for item in scan_concept(concept)]
    if not items:
        raise ConfigError(
            "no training files found: the concepts' folders hold no "
            f"{', '.join(sorted(MEDIA_EXTENSIONS))} files"
        )
    return items


def _media_files(folder: Path, recursive: bool) -> list[Path]:
    """The video and image files in `folder`, not hidden ones, and in its subfolders when `recursive` (links to
    folders are not followed, unreadable subfolders are passed over, as Path.glob("**/*") does). Names are
    checked before anything else: a directory entry knows its type, so no file is stat'ed."""
    files = []
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if os.path.splitext(name)[1].lower() in MEDIA_EXTENSIONS and not name.startswith(".") and entry.is_file():
                files.append(folder / name)
            elif recursive and entry.is_dir(follow_symlinks=False):
                try:
                    files += _media_files(folder / name, recursive)
                except PermissionError:
                    pass
    return files


def _owning_root(path: Path, roots: list[Path]) -> Path:
    return next(r for r in roots if r in path.parents)


def _read_lines(path: Path | str) -> tuple[str, ...]:
    with open(path, "rb") as file:  # bytes, decoded at once: a text file object costs more than the read
        text = file.read().decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of the caption
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    return lines or ("",)


def _read_caption(path: Path | str) -> tuple[tuple[str, ...], str]:
    """The caption lines and, when there are none, why (trained with an empty caption)."""
    try:
        lines = _read_lines(path)
    except (FileNotFoundError, IsADirectoryError):
        return ("",), f"no caption file ({os.path.basename(path)})"
    except UnicodeDecodeError as error:
        name = os.path.basename(path)
        return ("",), f"caption {name} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
    return lines, "" if lines != ("",) else f"caption {os.path.basename(path)} is empty"


def _concept_prompts(concept: ConceptConfig) -> tuple[str, ...]:
    path = Path(concept.text.prompt_path)
    if not path.is_file():
        raise ConfigError(
            f"concept {concept.name or concept.path!r}: text.prompt_source is 'concept' but text.prompt_path = "
            f"{str(path)!r} is not a file. Point it at a .txt file with one prompt per line."
        )
    return _read_lines(path)
