"""Reading a config: shipped presets, JSON files, `--set` overrides, and errors a user can act on."""

from __future__ import annotations

import difflib
import json
import typing
from pathlib import Path

from pydantic import BaseModel, ValidationError

from .concepts import concept_problems
from .schema import (
    DEFAULT_NATIVE_COMPRESSION,
    NATIVE_COMPRESSION,
    NOT_SUPPORTED_YET,
    A14B_MODEL_TYPES,
    TrainConfig,
    get_dotted,
)
from .schema import OUTPUT_FORMATS

PRESETS_DIR = Path(__file__).parent / "presets"


class ConfigError(Exception):
    """A config problem, worded for the user: what is wrong, where, and what to do."""


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def find_config_file(name: str) -> Path:
    """A path, or the name of a shipped preset (with or without `.json`)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (PRESETS_DIR / name, PRESETS_DIR / f"{name}.json"):
        if candidate.is_file():
            return candidate
    hint = ""
    close = difflib.get_close_matches(name.removesuffix(".json"), list_presets(), n=1)
    if close:
        hint = f" Did you mean the preset {close[0]!r}?"
    raise ConfigError(
        f"config {name!r} is neither a file nor a shipped preset.{hint} "
        f"Shipped presets: {', '.join(repr(p) for p in list_presets())} (`motiontune presets`)."
    )


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a JSON object {{...}}, got {type(data).__name__}")
    return data


def apply_override(data: dict, assignment: str) -> None:
    """`--set a.b=value`: the value is read as JSON when it parses (numbers, true, lists), else as text."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: write it as key=value, e.g. --set video_config.max_frames=33")
    key, raw = assignment.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    parts = key.strip().split(".")
    # the two ways of naming the data replace each other: `--set concepts=[...]` on a preset drops its concept file
    other = {"concepts": "concept_file_name", "concept_file_name": "concepts"}.get(key.strip())
    if other and value is not None:
        data.pop(other, None)
    node = data
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def load_config(name: str, overrides: list[str] = ()) -> TrainConfig:
    path = find_config_file(name)
    data = read_json(path)
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, path)) from None
    check_not_supported_yet(config, path)
    return config


def _model_class(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):  # list[X], X | None
        found = _model_class(arg)
        if found is not None:
            return found
    return None


def _known_keys(loc: tuple) -> list[str]:
    """The valid key names inside the section at `loc` (for "did you mean")."""
    model = TrainConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        inner = _model_class(field.annotation) if field is not None else None
        if inner is not None:
            model = inner
    return [field.alias or key for key, field in model.model_fields.items()]


def _sections_with_key(loc: tuple, key: str) -> list[str]:
    """Dotted names of the sections directly inside `loc` that have `key`, e.g. transformer.weight_dtype."""
    model = TrainConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = (_model_class(field.annotation) if field is not None else None) or model
    found = []
    for name, field in model.model_fields.items():
        inner = _model_class(field.annotation)
        if inner is not None and key in inner.model_fields:
            found.append(".".join([*(str(p) for p in loc), name, key]))
    return found


def format_validation_error(error: ValidationError, path: Path) -> str:
    lines = [f"{path}: the config has {error.error_count()} problem(s):"]
    for problem in error.errors():
        loc = tuple(problem["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if problem["type"] == "extra_forbidden":
            known = _known_keys(loc[:-1])
            nested = _sections_with_key(loc[:-1], str(loc[-1]))
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            if nested:  # a key that exists, one level down (`weight_dtype` belongs to each model part)
                hint = f" It is set inside a section: {' or '.join(repr(n) for n in nested)}."
            elif close:
                hint = f" Did you mean {close[0]!r}?"
            else:
                hint = f" Known keys here: {', '.join(sorted(known))}."
            lines.append(f"  - unknown key {key!r}.{hint}")
        elif not loc:  # a rule about several keys: its message says which; the whole config is no help
            lines.append(f"  - {problem['msg'].removeprefix('Value error, ')}")
        elif problem["type"] == "missing":
            lines.append(f"  - {key}: this key is required")
        else:
            value = problem.get("input")
            lines.append(f"  - {key} = {json.dumps(value, default=str)}: {problem['msg']}")
    lines.append("Fix the file (or the --set value) and run again; `docs/config.md` lists every key.")
    return "\n".join(lines)


def _text_training_problems(config: TrainConfig) -> list[str]:
    """Text encoder training and embeddings: which methods and families have them, and sound embedding entries."""
    problems = []
    if config.text_encoder.train and config.training_method != "FINE_TUNE":
        problems.append(f"  - text_encoder.train = true: the text encoder trains in FINE_TUNE runs only, not in "
                        f"{config.training_method} runs; set it to false")
    seen = set()
    for where, entry in [("embedding", config.embedding)] * (config.training_method == "EMBEDDING") + [
        (f"additional_embeddings[{i}]", e) for i, e in enumerate(config.additional_embeddings)
    ]:
        if entry.placeholder in seen:
            problems.append(f"  - {where}.placeholder = {json.dumps(entry.placeholder)}: two embeddings use it; "
                            "give each its own placeholder")
        seen.add(entry.placeholder)
        if entry.is_output_embedding:
            problems.append(f"  - {where}.is_output_embedding = true: not supported yet (output embeddings); leave it false")
        if entry.stop_training_after is not None or entry.stop_training_after_unit != "NEVER":
            problems.append(f"  - {where}.stop_training_after: not supported yet (stopping an embedding early); "
                            "leave it null and stop_training_after_unit NEVER")
        if not entry.train and not entry.model_name:
            problems.append(f"  - {where}.train = false needs {where}.model_name: a saved embedding to use as it is")
        if entry.token_count is None and not entry.model_name:
            problems.append(f"  - {where}.token_count = null takes the count from model_name, which is empty; "
                            "set token_count (1 or more)")
    return problems


def _memory_problems(config: TrainConfig) -> list[str]:
    """Memory options that cannot apply to weights that train, or are not built for a family."""
    problems = []
    if config.text_encoder.weight_dtype in ("FLOAT_8", "NFLOAT_4"):
        if not config.model_type.startswith("WAN_"):
            problems.append(f"  - text_encoder.weight_dtype = {config.text_encoder.weight_dtype}: quantized text encoders are built "
                            "for WAN only; leave it unset (the encoders run once, to fill the cache)")
        elif config.text_encoder.train:
            problems.append(f"  - text_encoder.weight_dtype = {config.text_encoder.weight_dtype}: the text encoder trains in this run, "
                            "and quantized weights cannot train; leave it unset or set text_encoder.train false")
    if config.training_method != "FINE_TUNE":
        return problems
    for part in ("transformer", "transformer_2"):
        settings = getattr(config, part)
        if not settings.train:
            continue
        if settings.weight_dtype in ("FLOAT_8", "NFLOAT_4"):
            problems.append(f"  - {part}.weight_dtype = {settings.weight_dtype}: a full fine-tune trains these weights, and "
                            "quantized weights cannot train; use BFLOAT_16 (or train a LoRA on the quantized model)")
        if settings.offload_fraction or config.layer_offload_fraction:
            problems.append(f"  - layer offloading ({part}.offload_fraction / layer_offload_fraction): it streams frozen "
                            "weights, and a full fine-tune trains all of them; set it to 0 (shard over GPUs with torchrun instead)")
    return problems


def _is_image(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception:  # Pillow raises many kinds for a file that is not a picture
        return False
    return True


def config_notices(config: TrainConfig) -> list[str]:
    """Settings that are valid but change nothing, said once at the start of a run rather than ignored silently."""
    notices = []
    native = NATIVE_COMPRESSION.get(config.model_type, DEFAULT_NATIVE_COMPRESSION)
    for key, own in zip(("spatial_compression_ratio", "temporal_compression_ratio"), native):
        value = getattr(config.video_config, key)
        if value < own and key in config.video_config.model_fields_set:  # the default is below some VAEs' own
            notices.append(f"video_config.{key} = {value} changes nothing: {config.model_type}'s VAE always compresses "
                           f"{own}x {'spatially' if key.startswith('spatial') else 'in time'}, and only a whole multiple of "
                           f"{own} adds compression (frames {'downscaled' if key.startswith('spatial') else 'subsampled'} "
                           "before encoding). Set it to {own} to silence this.".replace("{own}", str(own)))
    return notices


def check_not_supported_yet(config: TrainConfig, path: Path) -> None:
    problems = []
    for key, neutral, what in NOT_SUPPORTED_YET:
        value = get_dotted(config, key)
        allowed = neutral if isinstance(neutral, tuple) else (neutral,)
        if value not in allowed:
            shown = " or ".join(json.dumps(a) for a in allowed)
            problems.append(f"  - {key} = {json.dumps(value)}: not supported yet ({what}); leave it at {shown}")
    problems += _text_training_problems(config) + _memory_problems(config)
    for index, concept in enumerate(config.concepts or []):
        if concept.enabled:
            problems += [f"  - concepts[{index}].{problem}" for problem in concept_problems(concept)]
    allowed = OUTPUT_FORMATS.get(config.training_method, ())
    if allowed and config.output_model_format not in allowed:
        problems.append(
            f"  - output_model_format = {json.dumps(config.output_model_format)}: a {config.training_method} run saves "
            f"as {' or '.join(allowed)}"
        )
    native = NATIVE_COMPRESSION.get(config.model_type, DEFAULT_NATIVE_COMPRESSION)
    for key, own in zip(("spatial_compression_ratio", "temporal_compression_ratio"), native):
        value = getattr(config.video_config, key)
        if value > own and value % own:
            problems.append(
                f"  - video_config.{key} = {value}: the VAE compresses {own}x itself, so a larger ratio must be a "
                f"whole multiple of {own} (frames are {'downscaled' if key.startswith('spatial') else 'subsampled'} "
                f"by ratio / {own} before encoding); use {own}, {2 * own}, {4 * own}, ..."
            )
    if config.image_conditioning_probability > 0 and config.model_type != "WAN_2_2_TI2V_5B":
        problems.append(
            f"  - image_conditioning_probability: only WAN 2.2 TI2V-5B trains both ways; {config.model_type} is "
            f"{'always' if 'I2V' in config.model_type else 'never'} image-conditioned, so remove the key"
        )
    if "_I2V" in config.model_type:
        for index, sample in enumerate(config.samples):
            if not sample.image:
                problems.append(f"  - samples[{index}].image: {config.model_type} makes videos from a first frame; give an image file")
    for index, sample in enumerate(config.samples):
        if sample.image and not Path(sample.image).is_file():
            problems.append(f"  - samples[{index}].image = {sample.image!r}: no such file")
        elif sample.image and not _is_image(Path(sample.image)):
            problems.append(f"  - samples[{index}].image = {sample.image!r}: not an image Pillow can read; give a PNG, JPEG or WebP file")
        elif sample.image and "I2V" not in config.model_type:
            problems.append(f"  - samples[{index}].image: {config.model_type} does not take a first frame; remove the key")
    if config.model_type in A14B_MODEL_TYPES:
        if config.expert_choice() is None:
            problems.append(
                "  - experts: WAN 2.2 A14B needs an expert to train; set experts to both, high or low "
                "(or transformer.train / transformer_2.train: high-noise / low-noise expert)"
            )
    else:
        if config.experts is not None or config.boundary_ratio is not None:
            problems.append(f"  - experts / boundary_ratio: only WAN 2.2 A14B has experts, not {config.model_type}; remove them")
        if config.transformer_2.train:
            problems.append(f"  - transformer_2.train = true: {config.model_type} has no second transformer; set it to false")
        if not config.transformer.train and config.training_method != "EMBEDDING":  # an embedding run freezes it anyway
            problems.append(f"  - transformer.train = false: a {config.training_method} run needs the transformer trained; set it to true")
    if problems:
        raise ConfigError(f"{path}:\n" + "\n".join(problems))
