"""A config as a run uses it: read and checked by config/, then checked against the family that serves its
`model_type` (models/). config/ knows no family, so the rules that depend on one are applied here, from what the
family declares; the CLI, the UI, the demo and the tests load configs through this module."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from .config import ConfigError, TrainConfig, read_config
from .config.load import config_problems, format_validation_error, image_file_problem
from .models import family_class, model_types

QUANTIZED = ("FLOAT_8", "NFLOAT_4")


def validate(data: dict) -> TrainConfig:
    """The schema, with `model_type` one that a family serves; pydantic's ValidationError otherwise."""
    return TrainConfig.model_validate(data, context={"model_types": model_types()})


def parse_config(data: dict, path: Path) -> TrainConfig:
    """A config's JSON (from `path`, for the messages) → a TrainConfig that passed every check, or ConfigError."""
    try:
        config = validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, path)) from None
    check_config(config, path)
    return config


def load_config(name: str, overrides: list[str] = ()) -> TrainConfig:
    """A config file or shipped preset, with `--set` overrides, checked."""
    return parse_config(*read_config(name, overrides))


def check_config(config: TrainConfig, path: Path) -> None:
    """Everything the schema alone cannot say: values not built yet and combinations that cannot work, the family's
    rules included. One ConfigError lists them all."""
    problems = config_problems(config) + family_problems(config)
    if problems:
        raise ConfigError(f"{path}:\n" + "\n".join(problems))


def family_problems(config: TrainConfig) -> list[str]:
    """The rules that depend on what the family of `config.model_type` declares, then its own."""
    family, model_type = family_class(config.model_type), config.model_type
    problems = []
    storage = config.text_encoder.weight_dtype
    if storage in QUANTIZED and not family.QUANTIZED_TEXT_ENCODER:
        problems.append(f"  - text_encoder.weight_dtype = {storage}: quantized text encoders are built "
                        "for WAN only; leave it unset (the encoders run once, to fill the cache)")
    elif storage in QUANTIZED and config.text_encoder.train:
        problems.append(f"  - text_encoder.weight_dtype = {storage}: the text encoder trains in this run, "
                        "and quantized weights cannot train; leave it unset or set text_encoder.train false")
    for key, own in zip(("spatial_compression_ratio", "temporal_compression_ratio"), family.vae_compression(model_type)):
        value = getattr(config.video_config, key)
        if value > own and value % own:
            problems.append(
                f"  - video_config.{key} = {value}: the VAE compresses {own}x itself, so a larger ratio must be a "
                f"whole multiple of {own} (frames are {'downscaled' if key.startswith('spatial') else 'subsampled'} "
                f"by ratio / {own} before encoding); use {own}, {2 * own}, {4 * own}, ..."
            )
    first_frame = family.first_frame(model_type)
    if config.image_conditioning_probability > 0 and first_frame != "optional":
        problems.append(
            f"  - image_conditioning_probability: only WAN 2.2 TI2V-5B trains both ways; {model_type} is "
            f"{'always' if first_frame == 'required' else 'never'} image-conditioned, so remove the key"
        )
    last_frame = family.takes_last_frame(model_type)
    if config.last_frame_conditioning_probability > 0 and not last_frame:
        problems.append(f"  - last_frame_conditioning_probability: {model_type} does not take a last frame (WAN 2.2 I2V "
                        "A14B does); remove the key")
    takes_control = "control" in family.condition_roles(model_type)
    for index, sample in enumerate(config.samples):
        if sample.control and not takes_control:
            problems.append(f"  - samples[{index}].control: {model_type} does not take a control video; remove the key")
        elif takes_control and not sample.control:
            problems.append(f"  - samples[{index}].control: {model_type} makes videos that follow a control video; "
                            "give a video file")
        elif sample.control and not Path(sample.control).is_file():
            problems.append(f"  - samples[{index}].control = {sample.control!r}: no such file")
        for key, what in (("control_mask", "a control mask"), ("reference", "a reference picture")):
            path = getattr(sample, key)
            if path and key.replace("_", "") not in family.condition_roles(model_type):
                problems.append(f"  - samples[{index}].{key}: {model_type} does not take {what}; remove the key")
            elif path and not Path(path).is_file():
                problems.append(f"  - samples[{index}].{key} = {path!r}: no such file")
            elif path and key == "reference" and (problem := image_file_problem(path)):
                problems.append(f"  - samples[{index}].reference = {path!r}: {problem}")
            elif path and key == "control_mask" and not sample.control:
                problems.append(f"  - samples[{index}].control_mask: a control mask goes with its control video; give "
                                "`control` too")
        if sample.last_image and not last_frame:
            problems.append(f"  - samples[{index}].last_image: {model_type} does not take a last frame; remove the key")
        elif sample.last_image and not sample.image:
            problems.append(f"  - samples[{index}].last_image: a last frame goes with a first one; give `image` too")
        elif sample.last_image and (problem := image_file_problem(sample.last_image)):
            problems.append(f"  - samples[{index}].last_image = {sample.last_image!r}: {problem}")
        problem = image_file_problem(sample.image) if sample.image else None
        if not sample.image and first_frame == "required":
            problems.append(f"  - samples[{index}].image: {model_type} makes videos from a first frame; give an image file")
        elif problem:
            problems.append(f"  - samples[{index}].image = {sample.image!r}: {problem}")
        elif sample.image and first_frame is None:
            problems.append(f"  - samples[{index}].image: {model_type} does not take a first frame; remove the key")
    return problems + family.config_problems(config)


def config_notices(config: TrainConfig) -> list[str]:
    """Settings that are valid but change nothing, said once at the start of a run rather than ignored silently."""
    notices = []
    native = family_class(config.model_type).vae_compression(config.model_type)
    for key, own in zip(("spatial_compression_ratio", "temporal_compression_ratio"), native):
        value = getattr(config.video_config, key)
        if value < own and key in config.video_config.model_fields_set:  # the default is below some VAEs' own
            notices.append(f"video_config.{key} = {value} changes nothing: {config.model_type}'s VAE always compresses "
                           f"{own}x {'spatially' if key.startswith('spatial') else 'in time'}, and only a whole multiple of "
                           f"{own} adds compression (frames {'downscaled' if key.startswith('spatial') else 'subsampled'} "
                           "before encoding). Set it to {own} to silence this.".replace("{own}", str(own)))
    return notices
