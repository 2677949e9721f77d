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
    if config.guidance_scale != 1.0 and not family.GUIDANCE_EMBEDDING:
        problems.append(f"  - guidance_scale = {config.guidance_scale:g}: {model_type} has no guidance embedding (only "
                        "HunyuanVideo's guidance-distilled transformer takes one); remove the key and set "
                        "samples[].cfg_scale for samples")
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
    if config.in_context_control and not family.IN_CONTEXT_CONTROL:
        problems.append(f"  - in_context_control: {model_type} does not take a control video as in-context tokens (LTX-2, "
                        "2.3 and 2.5 do); remove the key")
    roles = family.sample_roles(config)
    stand_ins = family.stand_in_roles(config)  # VACE: a sample with a reference alone gets the pipeline's grey video
    key_of = {key.replace("_", ""): key for key in SAMPLE_CONDITIONS}
    for index, sample in enumerate(config.samples):
        for key, what in SAMPLE_CONDITIONS.items():  # a sample gives every condition its model needs, and no other
            given, role = getattr(sample, key), key.replace("_", "")
            if given and role not in roles:
                problems.append(f"  - samples[{index}].{key}: {model_type} does not take {what}; remove the key")
            elif roles.get(role) and not given and not any(getattr(sample, key_of[other], None)
                                                           for other in stand_ins.get(role, ())):
                alone = "".join(f", or `{key_of[other]}` alone" for other in stand_ins.get(role, ()))
                problems.append(f"  - samples[{index}].{key}: {model_type} makes videos that follow {what}; "
                                f"give {'an image' if key == 'reference' else 'a video'} file{alone}")
            elif given and key == "reference" and (problem := image_file_problem(given)):
                problems.append(f"  - samples[{index}].{key} = {given!r}: {problem}")
            elif given and not Path(given).is_file():
                problems.append(f"  - samples[{index}].{key} = {given!r}: no such file")
            elif given and key == "control_mask" and not sample.control:
                problems.append(f"  - samples[{index}].control_mask: a control mask goes with its control video; give "
                                "`control` too")
        for pair in family.paired_roles(config):  # both or neither (Animate's replace mode: background and mask)
            given = [key_of[role] for role in pair if getattr(sample, key_of[role], None)]
            if len(given) == 1:
                missing = next(key_of[role] for role in pair if key_of[role] not in given)
                problems.append(f"  - samples[{index}].{given[0]}: goes with `{missing}` (both or neither); give "
                                f"`{missing}` too or remove `{given[0]}`")
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
    return problems + frozen_lora_problems(config) + family.context_parallel_problems(config) + family.config_problems(config)


def frozen_lora_problems(config: TrainConfig) -> list[str]:
    """What can be said of `frozen_loras` before the model loads (their keys are checked against it when it has)."""
    problems = []
    if config.frozen_loras and config.training_method == "FINE_TUNE":
        problems.append("  - frozen_loras: a fine-tune saves the whole transformer, the frozen LoRAs merged into it; "
                        "merge them first (`motiontune lora merge`) and fine-tune that model, or train a LORA")
    for index, item in enumerate(config.frozen_loras):
        path = Path(item.model_name)
        if not path.is_file():
            problems.append(f"  - frozen_loras[{index}].model_name = {item.model_name!r}: no such file; give a LoRA "
                            ".safetensors file")
        elif path.suffix != ".safetensors":
            problems.append(f"  - frozen_loras[{index}].model_name = {item.model_name!r}: not a .safetensors file "
                            "(other formats can run code when read); convert it first")
    return problems


# a sample's condition keys (the roles of data/conditions.py, without their "_"), and what each is
SAMPLE_CONDITIONS = {"control": "a control video", "control_mask": "a control mask", "pose": "a pose video",
                     "face": "a face video", "reference": "a reference picture", "background": "a background video",
                     "character_mask": "a character mask"}


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


AUDIO_KEYS = ("train_audio", "audio_loss_weight", "audio_noise_level")


def keys_that_do_not_apply(config: TrainConfig) -> dict[str, str]:
    """The keys that `config.model_type` and `training_method` never read, each with why (dotted; `*` stands for any
    item of a list). The UI hides them while they are unset; train refuses those that would silently do nothing."""
    family, model_type, method = family_class(config.model_type), config.model_type, config.training_method
    keys = list(TrainConfig.model_fields)
    skipped: dict[str, str] = {}

    def skip(names, why: str) -> None:
        for name in names:
            skipped.setdefault(name, why)

    if method != "LORA":
        skip([k for k in keys if k.startswith(("lora_", "lokr_"))] + ["peft_type"],
             f"LoRA settings: training_method is {method}")
    elif config.peft_type == "LOKR":
        skip([k for k in keys if k.startswith("lora_")], "LORA / LOHA settings: peft_type is LOKR (its rank is lokr_dim)")
    else:
        skip([k for k in keys if k.startswith("lokr_")], f"LOKR settings: peft_type is {config.peft_type}")
        if config.peft_type != "LORA":
            skip([k for k in keys if k.startswith("lora_decompose")], f"DoRA settings: peft_type is {config.peft_type}")
    if method != "EMBEDDING":
        skip(["embedding"], f"the embedding an EMBEDDING run trains: training_method is {method}")
    experts = family.expert_parts(model_type)
    if len(experts) < 2:
        skip(["experts", "boundary_ratio", "experts_on", "transformer_2"], f"{model_type} has one transformer, not two experts")
    if not family.CONTEXT_PARALLEL or model_type in family.CONTEXT_PARALLEL_EXCEPT:
        skip(["context_parallel"], f"{model_type}'s transformer has no plan to split a clip's tokens")
    if method == "FINE_TUNE":
        skip(["frozen_loras"], "a fine-tune saves the whole transformer: merge LoRAs into the base first")
    if family.AUDIO_SAMPLE_RATE is None:
        skip(AUDIO_KEYS, f"{model_type} makes no sound")
    if not family.GUIDANCE_EMBEDDING:
        skip(["guidance_scale"], f"{model_type} is not guidance-distilled (samples[].cfg_scale is its guidance)")
    first_frame = family.first_frame(model_type)
    if first_frame != "optional":
        skip(["image_conditioning_probability"], f"{model_type} is {'always' if first_frame else 'never'} image-conditioned")
    if first_frame is None:
        skip(["samples.*.image"], f"{model_type} does not take a first frame")
    if not family.takes_last_frame(model_type):
        skip(["last_frame_conditioning_probability", "samples.*.last_image"], f"{model_type} does not take a last frame")
    if not family.IN_CONTEXT_CONTROL:
        skip(["in_context_control", "reference_downscale_factor"],
             f"{model_type} does not take a control video as in-context tokens")
    elif not config.in_context_control:
        skip(["reference_downscale_factor"], "in_context_control is false (the factor is an in-context control's)")
    roles = family.sample_roles(config)
    for key, what in SAMPLE_CONDITIONS.items():
        if key.replace("_", "") not in roles:
            skip([f"samples.*.{key}"], f"{model_type} does not take {what}"
                 + (" (it does with in_context_control: true)" if key == "control" and family.IN_CONTEXT_CONTROL else ""))
    return skipped
