"""Concepts: the folders a run trains on, in OneTrainer's concept format (`concepts`, or a concepts.json
named by `concept_file_name`).

Every key OneTrainer writes for a concept is read, its `__version`, `image` and `text` blocks included. The
ones that matter for video training are built (docs/config.md, "Concepts"). The others are accepted while
they do what OneTrainer's defaults do, and an enabled concept that switches one on is refused by name
(`concept_problems`), so a OneTrainer file never trains differently without a word.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator

from ..util.files import read_json_file
from .resolution import parse_resolution


def _home(path: str) -> str:
    """`~/` (and `~user/`) expanded as a shell would: a JSON file has no shell to do it."""
    return os.path.expanduser(path) if path.startswith("~") else path


# a file or folder path of the config: `~` stands for the home folder (marked in the JSON schema: the UI's pickers)
LocalPath = Annotated[str, AfterValidator(_home), WithJsonSchema({"type": "string", "x-path": True})]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


VERSION_HELP = "OneTrainer's format version of this block (read, not used: older keys are still understood)"


# the image block's random changes of the frames themselves (enable_<name>); the mask shrink changes masks only
RANDOM_PIXEL_LOOKS = ("crop_jitter", "random_flip", "random_rotate", "random_brightness", "random_contrast",
                      "random_saturation", "random_hue")


class ConceptImageConfig(_Section):
    """OneTrainer's `image` block: per-clip augmentations. One draw applies to every frame of a clip."""

    version: int | None = Field(None, alias="__version", description=VERSION_HELP)
    enable_crop_jitter: bool = Field(
        False, description="crop each clip at a random place inside the picture scaled to cover its bucket, instead "
        "of its centre (OneTrainer's default is true; drawn per image variation)")
    enable_random_flip: bool = Field(
        False, description="mirror each clip left-right with probability 0.5 (drawn per image variation)")
    enable_fixed_flip: bool = Field(False, description="mirror every clip of the concept left-right")
    enable_random_rotate: bool = Field(
        False, description="rotate each clip by an angle drawn uniformly in ±random_rotate_max_angle (drawn per image "
        "variation; the uncovered corners are black, and out of the mask in masked training)")
    enable_fixed_rotate: bool = Field(False, description="rotate every clip by random_rotate_max_angle (random wins when both are on)")
    random_rotate_max_angle: float = Field(0.0, description="degrees, counter-clockwise")
    enable_random_brightness: bool = Field(
        False, description="multiply the brightness by a factor drawn uniformly in 1 ± random_brightness_max_strength (drawn per "
        "image variation)")
    enable_fixed_brightness: bool = Field(False, description="multiply the brightness of every clip by 1 + random_brightness_max_strength")
    random_brightness_max_strength: float = Field(0.0, description="0.2: factors 0.8 to 1.2 (random), 1.2 (fixed); at least -1")
    enable_random_contrast: bool = Field(
        False, description="multiply the contrast by a factor drawn uniformly in 1 ± random_contrast_max_strength (drawn per "
        "image variation)")
    enable_fixed_contrast: bool = Field(False, description="multiply the contrast of every clip by 1 + random_contrast_max_strength")
    random_contrast_max_strength: float = Field(0.0, description="0.2: factors 0.8 to 1.2 (random), 1.2 (fixed); at least -1")
    enable_random_saturation: bool = Field(
        False, description="multiply the saturation by a factor drawn uniformly in 1 ± random_saturation_max_strength (drawn per "
        "image variation)")
    enable_fixed_saturation: bool = Field(False, description="multiply the saturation of every clip by 1 + random_saturation_max_strength")
    random_saturation_max_strength: float = Field(0.0, description="0.2: factors 0.8 to 1.2 (random), 1.2 (fixed); at least -1")
    enable_random_hue: bool = Field(
        False, description="turn the hue by a share of the colour wheel drawn uniformly in ±random_hue_max_strength / 2 "
        "(drawn per image variation)")
    enable_fixed_hue: bool = Field(False, description="turn the hue of every clip by random_hue_max_strength / 2 of the colour wheel")
    random_hue_max_strength: float = Field(0.0, description="1: up to half a turn either way; the fixed turn takes -1 to 1, a random one is clamped to half a turn")
    enable_resolution_override: bool = Field(
        False, description="train this concept's clips at resolution_override instead of the config's resolution")
    resolution_override: str = Field(
        "512", description="'512' or '832x480' (width x height), as `resolution`; used when enable_resolution_override is true")
    enable_random_circular_mask_shrink: bool = Field(
        False, description="masked training: keep only a disc of each clip's mask (centre drawn inside the mask, radius "
        "0.2 to 1 times its farthest masked pixel's distance); drawn per image variation")
    enable_random_mask_rotate_crop: bool = Field(False, description="not built: masked training")

    @field_validator("random_brightness_max_strength", "random_contrast_max_strength", "random_saturation_max_strength")
    @classmethod
    def _factor_not_negative(cls, value: float, info):
        name = info.field_name.removeprefix("random_").removesuffix("_max_strength")
        if info.data.get(f"enable_fixed_{name}") and not info.data.get(f"enable_random_{name}") and value < -1:  # random wins
            raise ValueError(f"the fixed {name} factor is 1 + this strength, {1 + value:g}, and must not be negative; "
                             "use -1 or more")
        return value

    @field_validator("random_hue_max_strength")
    @classmethod
    def _hue_in_range(cls, value: float, info):
        # only the fixed turn must fit torchvision's ±0.5; a random one is clamped there (OneTrainer), and random wins
        if info.data.get("enable_fixed_hue") and not info.data.get("enable_random_hue") and abs(value) > 1:
            raise ValueError("the hue turns by at most half the colour wheel, strength 1; use a value between -1 and 1")
        return value

    @property
    def random_pixel_looks(self) -> list[str]:
        """The random changes switched on that change the frames the VAE sees (each image variation is encoded)."""
        return [name for name in RANDOM_PIXEL_LOOKS if getattr(self, f"enable_{name}")]

    @property
    def random(self) -> bool:
        """Whether a clip's look is drawn at random, so image variations differ (the mask shrink included)."""
        return bool(self.random_pixel_looks) or self.enable_random_circular_mask_shrink

    @property
    def changes(self) -> bool:
        """Whether any look is switched on, random or fixed (otherwise every clip is centred and untouched)."""
        return self.random or any(getattr(self, f"enable_fixed_{name}") for name in (
            "flip", "rotate", "brightness", "contrast", "saturation", "hue"))

    @field_validator("resolution_override")
    @classmethod
    def _resolution_form(cls, value: str, info):
        if info.data.get("enable_resolution_override"):
            parse_resolution(value)
        return value


class TextConfig(_Section):
    """OneTrainer's `text` block: where captions come from and how they vary."""

    version: int | None = Field(None, alias="__version", description=VERSION_HELP)
    prompt_source: Literal["sample", "concept", "txt", "filename"] = Field(
        "sample", description="sample: a .txt caption beside each file; concept (or txt): the lines of prompt_path; "
        "filename: the file's name without its extension")
    prompt_path: LocalPath = Field("", description="prompt_source concept: a .txt file, one caption per line")
    enable_tag_shuffling: bool = Field(
        False, description="shuffle the caption's tags (split at tag_delimiter), keeping the first keep_tags_count in place")
    tag_delimiter: str = Field(",", min_length=1, description="what separates tags in a caption")
    keep_tags_count: int = Field(1, ge=0, description="leading tags that shuffling and dropout never touch")
    tag_dropout_enable: bool = Field(False, description="leave tags out of captions (see tag_dropout_mode)")
    tag_dropout_mode: Literal["FULL", "RANDOM", "RANDOM WEIGHTED"] = Field(
        "FULL", description="FULL: with tag_dropout_probability, every tag after the kept ones goes; RANDOM: each goes "
        "with that probability; RANDOM WEIGHTED: later tags go more often (probability × position / count)")
    tag_dropout_probability: float = Field(0.0, ge=0, le=1, description="see tag_dropout_mode")
    tag_dropout_special_tags_mode: Literal["NONE", "BLACKLIST", "WHITELIST"] = Field(
        "NONE", description="WHITELIST: the special tags are never dropped; BLACKLIST: only they can be dropped")
    tag_dropout_special_tags: str = Field(
        "", description="the special tags, separated by tag_delimiter, or a .txt (one per line) or .csv (first column) file")
    tag_dropout_special_tags_regex: bool = Field(
        False, description="special tags with regular-expression characters match tags as regular expressions")
    caps_randomize_enable: bool = Field(
        False, description="change the capitals of tags at random: each tag, with caps_randomize_probability, gets one "
        "of caps_randomize_mode (drawn per text variation)")
    caps_randomize_mode: str = Field(
        "capslock, title, first, random", description="the modes to pick from, comma-separated: capslock (ALL CAPS), "
        "title (Every Word), first (First word only), random (rAnDoM letters)")
    caps_randomize_probability: float = Field(0.0, ge=0, le=1, description="each tag's chance of a new capitalisation")
    caps_randomize_lowercase: bool = Field(
        False, description="lowercase the caption after tag dropout, before the random capitals (as OneTrainer, also while "
        "caps_randomize_enable is false)")

    @field_validator("caps_randomize_mode")
    @classmethod
    def _known_modes(cls, value: str, info):
        unknown = [m for m in _modes(value) if m not in CAPS_MODES]
        if info.data.get("caps_randomize_enable") and (unknown or not _modes(value)):
            raise ValueError(f"unknown capitalisation mode(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                             f"list some of {', '.join(CAPS_MODES)}, separated by commas")
        return value

    @property
    def caps_modes(self) -> list[str]:
        return _modes(self.caps_randomize_mode)

    @property
    def varies(self) -> bool:
        """Whether captions change at random (shuffling, dropout, capitals), so variants are drawn and encoded."""
        return (self.enable_tag_shuffling or (self.tag_dropout_enable and self.tag_dropout_probability > 0)
                or (self.caps_randomize_enable and self.caps_randomize_probability > 0))


CAPS_MODES = ("capslock", "title", "first", "random")


def _modes(value: str) -> list[str]:
    return [m.strip() for m in value.split(",") if m.strip()]


class ConceptConfig(_Section):
    version: int | None = Field(None, alias="__version", description=VERSION_HELP)
    name: str = ""
    path: LocalPath
    seed: int = Field(0, description="this concept's random draws (caption and image variations), with the config's seed")
    enabled: bool = Field(True, description="false: the concept is left out (and its settings are not checked)")
    concept_type: Literal["STANDARD", "VALIDATION", "PRIOR_PREDICTION"] = Field(
        "STANDARD", alias="type", validation_alias=AliasChoices("type", "concept_type"),
        description="STANDARD trains on the clips; VALIDATION: never trained on, its loss is logged (with `validation` on); "
        "PRIOR_PREDICTION (LoRA): the target is the model's own prediction with the adapters off, to keep what it knew")
    include_subdirectories: bool = Field(False, description="also read files in subfolders of path")
    image_variations: int = Field(
        1, ge=1, le=1000, description="with a random image change (crop jitter, flip, rotation, colour, mask shrink): that many draws of each clip are encoded and cached; "
        "epoch N trains draw N modulo this count")
    text_variations: int = Field(
        1, ge=1, le=1000, description="with tag shuffling, dropout or random capitals: that many draws of each caption line are encoded "
        "and cached; each step picks one")
    balancing: float | None = Field(
        None, gt=0, description="REPEATS: each clip trains this many times per epoch (1.5: all once, half of them "
        "twice, in turns); SAMPLES: the concept gives this many clips per epoch. Null: 1, or `repeats`")
    repeats: float | None = Field(None, gt=0, description="the older name of balancing (OneTrainer concepts of version 0)")
    balancing_strategy: Literal["REPEATS", "SAMPLES"] = "REPEATS"
    loss_weight: float = Field(1.0, ge=0, description="each of this concept's samples counts this many times in the loss")
    concept_stats: dict = Field(default_factory=dict, description="OneTrainer's dataset statistics; read, not used",
                                json_schema_extra={"properties": {}})  # (no fields of its own for the UI's form)
    validation_concept: bool | None = Field(
        None, description="the older form of type VALIDATION (OneTrainer concepts of version 1)")
    image: ConceptImageConfig = ConceptImageConfig()
    text: TextConfig = TextConfig()

    @field_validator("validation_concept")
    @classmethod
    def _one_type(cls, value, info):
        kind = info.data.get("concept_type", "STANDARD")
        if value and kind not in ("STANDARD", "VALIDATION"):
            raise ValueError(f"`validation_concept` true is the older form of type VALIDATION, and type is {kind}; "
                             "keep only `type`")
        return value

    @field_validator("repeats")
    @classmethod
    def _one_balancing(cls, value, info):
        balancing = info.data.get("balancing")
        if value is not None and balancing is not None and value != balancing:
            raise ValueError(f"`repeats` is the older name of `balancing`, which is {balancing:g}; keep only `balancing`")
        return value

    @field_validator("balancing_strategy")
    @classmethod
    def _whole_samples(cls, value, info):
        balance = info.data.get("balancing") or info.data.get("repeats") or 1.0
        if value == "SAMPLES" and balance < 1:
            raise ValueError(f"SAMPLES takes balancing as the number of clips per epoch, and {balance:g} is less than one; "
                             "set balancing to 1 or more")
        return value

    @property
    def balance(self) -> float:
        """balancing, or its older name repeats (1 when neither is set)."""
        return self.balancing if self.balancing is not None else self.repeats if self.repeats is not None else 1.0

    @property
    def role(self) -> str:
        """STANDARD, VALIDATION or PRIOR_PREDICTION, from `type` or its older form `validation_concept`."""
        return "VALIDATION" if self.validation_concept else self.concept_type

    @property
    def label(self) -> str:
        return repr(self.name or self.path)

    @property
    def varies_image(self) -> bool:
        """Whether each clip's look is drawn at random (crop jitter, random flip, rotation, colour, mask shrink), so
        variants are encoded."""
        return self.image.random


# OneTrainer features not built here, refused on an enabled concept when switched on:
# (block, key, what OneTrainer does with it)
NOT_BUILT: list[tuple[str, str, str]] = [
    ("image", "enable_random_mask_rotate_crop", "rotates and crops around the training mask (masked training)"),
]


def concept_problems(concept: ConceptConfig, training_method: str) -> list[str]:
    """What an enabled concept asks for that is not built: one line per key, `key = value: why; what to do`."""
    problems = []
    if concept.role == "PRIOR_PREDICTION" and training_method != "LORA":
        problems.append(  # the frozen model's prediction is the model with its adapters switched off
            f"type = \"PRIOR_PREDICTION\": needs training_method LORA (its target is the model with the adapters off), "
            f"and this run is {training_method}; set type STANDARD, or train a LoRA")
    for block, key, what in NOT_BUILT:
        if getattr(getattr(concept, block), key):
            problems.append(f"{block}.{key} = true: not built yet (in OneTrainer it {what}); set it to false and the "
                            "concept trains without it")
    return problems


def format_concept_errors(error: ValidationError, source: str, raw: list) -> str:
    """A concepts file's validation errors, worded like config errors: where (file, concept, key), the value,
    and what to do."""
    lines = [f"{source}: {error.error_count()} problem(s) in the concepts:"]
    for problem in error.errors():
        index, *loc = problem["loc"]
        lines.append(f"  - {concept_where(index, raw[index] if isinstance(raw[index], dict) else {})}: "
                     + _problem_text(problem, tuple(loc)))
    lines.append("Fix the file and run again; docs/config.md (Concepts) lists every key.")
    return "\n".join(lines)


def concept_where(index: int, concept) -> str:
    """`concept 0 ('name')`: the list position (from 0, as in `--set concepts.0.path=...`) and the name or path."""
    get = concept.get if isinstance(concept, dict) else lambda key: getattr(concept, key, None)
    shown = get("name") or get("path")
    return f"concept {index}" + (f" ({shown!r})" if shown else "")


def _problem_text(problem: dict, loc: tuple) -> str:
    key = ".".join(str(p) for p in loc)
    if problem["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"Did you mean {close[0]!r}?" if close else f"Known keys here: {', '.join(sorted(known))}."
        return f"unknown key {key!r}. {hint}"
    if problem["type"] == "missing":
        return f"{key}: this key is required"
    if not loc:  # the concept itself is not an object
        return f"{json.dumps(problem.get('input'), default=str)[:80]}: each concept must be a JSON object {{...}}"
    return f"{key} = {json.dumps(problem.get('input'), default=str)}: {problem['msg']}"


def _known_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = ConceptConfig
    for part in loc:
        field = model.model_fields.get(part) or next((f for f in model.model_fields.values() if f.alias == part), None)
        inner = field.annotation if field is not None else None
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            model = inner
    names = []
    for name, field in model.model_fields.items():
        names.append(field.alias or name)
        choices = getattr(field.validation_alias, "choices", [])
        names += [c for c in choices if isinstance(c, str) and c not in names]
    return names


def read_concept_list(path: Path) -> list:
    """The raw JSON list of a concepts file; ValueError with the reason when it is not one."""
    raw = read_json_file(path)
    if not isinstance(raw, list):
        raise ValueError(f"a concepts file is a JSON list of concepts [{{\"path\": ...}}, ...], as OneTrainer writes it; "
                         f"this one holds a {type(raw).__name__}")
    return raw

