"""OneTrainer's concept format: a concepts.json as OneTrainer writes it trains; each built key does what it
says; what is not built is refused by name; a bad file is reported like a bad config."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import base_config, write_config
from motiontune.config import ConfigError, TrainConfig

# A concept exactly as OneTrainer's ConceptConfig.default_values().to_dict() writes it (format version 2): every key,
# OneTrainer's default values (crop jitter on), a per-concept random seed, and the statistics its UI stores.
ONETRAINER_CONCEPT = {
    "__version": 2,
    "image": {
        "__version": 0, "enable_crop_jitter": True, "enable_random_flip": False, "enable_fixed_flip": False,
        "enable_random_rotate": False, "enable_fixed_rotate": False, "random_rotate_max_angle": 0.0,
        "enable_random_brightness": False, "enable_fixed_brightness": False, "random_brightness_max_strength": 0.0,
        "enable_random_contrast": False, "enable_fixed_contrast": False, "random_contrast_max_strength": 0.0,
        "enable_random_saturation": False, "enable_fixed_saturation": False, "random_saturation_max_strength": 0.0,
        "enable_random_hue": False, "enable_fixed_hue": False, "random_hue_max_strength": 0.0,
        "enable_resolution_override": False, "resolution_override": "512",
        "enable_random_circular_mask_shrink": False, "enable_random_mask_rotate_crop": False,
    },
    "text": {
        "__version": 0, "prompt_source": "sample", "prompt_path": "", "enable_tag_shuffling": False, "tag_delimiter": ",",
        "keep_tags_count": 1, "tag_dropout_enable": False, "tag_dropout_mode": "FULL", "tag_dropout_probability": 0.0,
        "tag_dropout_special_tags_mode": "NONE", "tag_dropout_special_tags": "", "tag_dropout_special_tags_regex": False,
        "caps_randomize_enable": False, "caps_randomize_mode": "capslock, title, first, random",
        "caps_randomize_probability": 0.0, "caps_randomize_lowercase": False,
    },
    "name": "", "path": "", "seed": -387420489, "enabled": True, "type": "STANDARD", "include_subdirectories": False,
    "image_variations": 1, "text_variations": 1, "balancing": 1.0, "balancing_strategy": "REPEATS", "loss_weight": 1.0,
    "concept_stats": {"file_size": 2048, "directory_count": 1, "image_count": 2, "video_count": 0, "caption_count": 2,
                      "paired_images": 2, "unpaired_images": 0, "max_pixels": [1024, "a.png", [32, 32]]},
}


def ot_concept(path, **changes) -> dict:
    concept = copy.deepcopy(ONETRAINER_CONCEPT)
    concept["path"] = str(path)
    for key, value in changes.items():
        block, _, name = key.rpartition("__")
        (concept[block] if block else concept)[name] = value
    return concept


def picture(path: Path, width: int, height: int, caption: str | None = None) -> Path:
    """A picture whose every pixel differs from its mirror image and its neighbours (flips and shifts show)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x * 7 + y * 13) % 256], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n")
    return path


def config_for(tmp_path, tiny_models, concepts: list[dict], **overrides) -> TrainConfig:
    keys = base_config(tmp_path, tiny_models("wan-2.1"), tmp_path, dataloader_threads=0, **overrides)
    keys["concepts"] = concepts
    return TrainConfig.model_validate(keys)


def encoding_for(config: TrainConfig, one_encoding: bool = False):
    """(family, survey, Encoding) without a cache; the family's VAE records the frames it encodes. `one_encoding`:
    the VAE runs once and its latents stand for every later clip (for tests that check only the frames)."""
    from motiontune.data.cache import Cache
    from motiontune.data.latents import Encoding
    from motiontune.data.survey import survey_dataset
    from motiontune.models.wan import WanFamily

    family = WanFamily(config, torch.device("cpu"))
    survey = survey_dataset(config, family)
    encoding = Encoding(family, config, Cache("unused", enabled=False))
    seen, latents = [], []
    encode = family.encode_video

    def record(frames):
        seen.append(np.array(frames))
        if not (one_encoding and latents):
            latents[:] = [encode(frames)]
        return latents[0]
    family.encode_video = record
    encoding.frames_seen = seen
    return family, survey, encoding


# ---------------------------------------------------------------------------------------------- the file as written


def test_a_onetrainer_concepts_file_with_every_key_trains(tmp_path, tiny_models):
    from motiontune.cli import main
    from motiontune.data.dataset import load_concepts

    folder = tmp_path / "clips"
    picture(folder / "a.png", 48, 32, "a red square, studio")
    picture(folder / "b.png", 32, 48, "a blue square")
    mask = np.zeros((32, 48), np.uint8)
    mask[8:24, 8:40] = 255
    Image.fromarray(mask).save(folder / "a-masklabel.png")
    # every augmentation OneTrainer's concept editor offers, switched on (a random and a fixed of each kind)
    switched_on = {"image__enable_random_flip": True, "image__enable_random_rotate": True, "image__random_rotate_max_angle": 15.0,
                   "image__enable_random_brightness": True, "image__random_brightness_max_strength": 0.3,
                   "image__enable_fixed_contrast": True, "image__random_contrast_max_strength": 0.2,
                   "image__enable_random_saturation": True, "image__random_saturation_max_strength": 0.5,
                   "image__enable_fixed_hue": True, "image__random_hue_max_strength": 0.1,
                   "image__enable_random_circular_mask_shrink": True, "image_variations": 2,
                   "text__caps_randomize_enable": True, "text__caps_randomize_probability": 0.5,
                   "text__caps_randomize_lowercase": True, "text_variations": 2}
    (tmp_path / "concepts.json").write_text(json.dumps([ot_concept(folder, **switched_on)], indent=4))
    keys = base_config(tmp_path, tiny_models("wan-2.1"), folder, epochs=2, dataloader_threads=0, masked_training=True)
    del keys["concepts"]
    keys["concept_file_name"] = str(tmp_path / "concepts.json")

    [concept] = load_concepts(TrainConfig.model_validate(keys))
    assert concept.image.enable_crop_jitter and concept.seed == -387420489 and concept.balance == 1.0
    assert concept.image.enable_random_rotate and concept.text.caps_randomize_enable

    def every_key(data: dict, prefix="") -> set[str]:
        return {prefix + k for k, v in data.items()} | {
            key for k, v in data.items() if isinstance(v, dict) and k != "concept_stats" for key in every_key(v, f"{prefix}{k}.")}

    assert every_key(ONETRAINER_CONCEPT) <= every_key(concept.model_dump(by_alias=True))  # nothing dropped on the way
    assert main(["train", "--config", str(write_config(tmp_path / "c.json", **keys))]) == 0
    assert (tmp_path / "lora.safetensors").is_file()
    # the two epochs encoded both image variations of both pictures, each with its drawn changes, and a's mask
    # shrunk in both
    from safetensors import safe_open

    entries = {}
    for kind in ("latents", "masks"):
        for path in (tmp_path / "cache" / kind).glob("*/*.safetensors"):
            with safe_open(str(path), "pt") as handle:
                entries.setdefault(kind, []).append(json.loads(handle.metadata()["about"]))
    assert len(entries["latents"]) == 4 and all(
        abs(e["rotate"]) <= 15 and 0.7 <= e["brightness"] <= 1.3 and e["contrast"] == 1.2 and e["hue"] == 0.05
        for e in entries["latents"])
    assert len({e["rotate"] for e in entries["latents"]}) == 4
    assert len(entries["masks"]) == 2 and all(0.2 <= e["shrink"][1] <= 1 for e in entries["masks"])


def test_what_is_not_built_or_does_not_fit_the_method_is_refused_by_name_on_an_enabled_concept(tmp_path):
    from motiontune.config.concepts import NOT_BUILT
    from motiontune.data.dataset import load_concepts

    folder = tmp_path / "clips"
    picture(folder / "a.png", 32, 32, "x")
    unbuilt = {f"{block}__{key}": True for block, key, _ in NOT_BUILT}
    inert = {"image__random_rotate_max_angle": 20.0, "text__caps_randomize_probability": 0.5}  # their feature is off
    concepts = [ot_concept(folder, name="all of it", type="PRIOR_PREDICTION", **unbuilt),
                ot_concept(folder, name="validation", validation_concept=True),
                ot_concept(folder, name="parked", enabled=False, type="VALIDATION", image__enable_random_hue=True),
                ot_concept(folder, name="fine", **inert)]
    del concepts[1]["type"]  # a version-1 file says validation_concept instead
    (tmp_path / "concepts.json").write_text(json.dumps(concepts))
    config = TrainConfig.model_validate({"concept_file_name": str(tmp_path / "concepts.json"), "training_method": "FINE_TUNE"})
    with pytest.raises(ConfigError) as error:
        load_concepts(config)
    message = str(error.value)
    assert message.startswith(str(tmp_path / "concepts.json"))
    for block, key, _ in NOT_BUILT:
        assert f"concept 0 ('all of it'): {block}.{key} = true: not built yet" in message
    # the frozen model's prediction is the model with its adapters off: a LoRA's
    assert ("concept 0 ('all of it'): type = \"PRIOR_PREDICTION\": needs training_method LORA (its target is the model "
            "with the adapters off), and this run is FINE_TUNE; set type STANDARD, or train a LoRA") in message
    assert "validation" not in message  # VALIDATION concepts are built, in either spelling
    assert "parked" not in message and "fine" not in message  # disabled concepts and inert settings pass

    # the enabled ones alone train; `concept_type` is read as another spelling of `type`
    concepts = [concepts[2], concepts[3], {"path": str(folder), "concept_type": "STANDARD"}]
    (tmp_path / "concepts.json").write_text(json.dumps(concepts))
    assert [c.name for c in load_concepts(config)] == ["fine", ""]
    config = TrainConfig.model_validate({"concepts": [{"path": str(folder), "concept_type": "VALIDATION"}]})
    assert [c.role for c in load_concepts(config)] == ["VALIDATION"]
    config = TrainConfig.model_validate({"concepts": [{"path": str(folder), "type": "PRIOR_PREDICTION"}], "training_method": "EMBEDDING"})
    with pytest.raises(ConfigError, match=r"the config's `concepts`: .*\n  - concept 0 \('.*clips'\): type = \"PRIOR_PREDICTION\": needs"):
        load_concepts(config)


def test_a_bad_concepts_file_is_reported_like_a_bad_config(tmp_path):
    from motiontune.configure import load_config
    from motiontune.data.dataset import load_concepts

    folder = tmp_path / "clips"
    concepts = [ot_concept(folder, name="people", balancing="lots", balancing_stratgy="SAMPLES",
                           text__tag_dropout_mode="SOMETIMES", image__enable_resolution_override=True,
                           image__resolution_override="big"),
                {"name": "no path"}, ["not", "an", "object"]]
    (tmp_path / "concepts.json").write_text(json.dumps(concepts))
    config = TrainConfig.model_validate({"concept_file_name": str(tmp_path / "concepts.json")})
    with pytest.raises(ConfigError) as error:
        load_concepts(config)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'concepts.json'}: 6 problem(s) in the concepts:")
    assert "  - concept 0 ('people'): balancing = \"lots\": Input should be a valid number" in message
    assert "  - concept 0 ('people'): unknown key 'balancing_stratgy'. Did you mean 'balancing_strategy'?" in message
    assert "  - concept 0 ('people'): text.tag_dropout_mode = \"SOMETIMES\": Input should be 'FULL', 'RANDOM' or 'RANDOM WEIGHTED'" in message
    assert "  - concept 0 ('people'): image.resolution_override = \"big\": Value error, resolution must be a size like" in message
    assert "  - concept 1 ('no path'): path: this key is required" in message
    assert "  - concept 2: [\"not\", \"an\", \"object\"]: each concept must be a JSON object" in message
    assert "pydantic" not in message and "validation error" not in message.lower()

    (tmp_path / "concepts.json").write_text(json.dumps({"path": "x"}))
    with pytest.raises(ConfigError, match="a concepts file is a JSON list of concepts"):
        load_concepts(config)
    (tmp_path / "concepts.json").write_text(json.dumps([{"path": "x", "repeats": 2, "balancing": 3}]))
    with pytest.raises(ConfigError, match=r"concept 0 \('x'\): repeats = 2: Value error, `repeats` is the older name of `balancing`"):
        load_concepts(config)
    # the same keys inline in a config go through the config's own error report
    path = write_config(tmp_path / "c.json", concepts=[ot_concept(folder, balancing_stratgy="SAMPLES")])
    with pytest.raises(ConfigError, match=r"unknown key 'concepts.0.balancing_stratgy'. Did you mean 'balancing_strategy'"):
        load_config(str(path))


# ---------------------------------------------------------------------------------------------- which files, which captions


def test_enabled_subdirectories_and_prompt_sources(tmp_path):
    from motiontune.data.dataset import scan_dataset

    picture(tmp_path / "a" / "top_shot.png", 32, 32, "from its caption file")
    picture(tmp_path / "a" / "deeper" / "low_angle.png", 32, 32, "deeper caption")
    picture(tmp_path / "b" / "other.png", 32, 32, "never read")
    (tmp_path / "prompts.txt").write_text("first prompt\nsecond prompt\n")

    def captions(**concept) -> dict[str, tuple[str, ...]]:
        concepts = [{"path": str(tmp_path / "a"), **concept}, {"path": str(tmp_path / "b"), "enabled": False}]
        return {item.path.name: item.captions for item in scan_dataset(TrainConfig.model_validate({"concepts": concepts}))}

    assert captions() == {"top_shot.png": ("from its caption file",)}  # the disabled concept and the subfolder stay out
    assert captions(include_subdirectories=True) == {"top_shot.png": ("from its caption file",), "low_angle.png": ("deeper caption",)}
    assert captions(text={"prompt_source": "filename"}) == {"top_shot.png": ("top shot",)}  # the stem, _ read as a space
    assert captions(text={"prompt_source": "concept", "prompt_path": str(tmp_path / "prompts.txt")}) == {
        "top_shot.png": ("first prompt", "second prompt")}


# ---------------------------------------------------------------------------------------------- how often, how much


def test_balancing_samples_and_repeats_set_each_concepts_share_of_an_epoch(tmp_path, tiny_models):
    from motiontune.data.buckets import batches_per_epoch, epoch_batches, epoch_counts

    for i in range(5):
        picture(tmp_path / "many" / f"{i}.png", 32, 32, "many")
    for i in range(2):
        picture(tmp_path / "few" / f"{i}.png", 32, 32, "few")
    config = config_for(tmp_path, tiny_models, [
        {"path": str(tmp_path / "many"), "balancing": 2, "balancing_strategy": "SAMPLES"},
        {"path": str(tmp_path / "few"), "repeats": 1.5},  # the older name of balancing (REPEATS)
    ])
    _, survey, encoding = encoding_for(config)
    clips = encoding.clips(survey)
    many = [i for i, c in enumerate(clips) if c.source.parent.name == "many"]
    few = [i for i, c in enumerate(clips) if c.source.parent.name == "few"]
    assert len(many) == 5 and len(few) == 2
    repeats = [c.repeats for c in clips]
    seen = Counter()
    for epoch in range(5):
        batches = epoch_batches([c.shape for c in clips], repeats, 1, 1.0, seed=3, epoch=epoch)
        drawn = Counter(i for batch in batches for i in batch)
        assert sum(drawn[i] for i in many) == 2  # SAMPLES 2: two of its five clips per epoch
        assert sum(drawn[i] for i in few) == 3  # REPEATS 1.5 of two clips: both once, one of them twice
        assert drawn == Counter({i: n for i, n in enumerate(epoch_counts(repeats, epoch)) if n})
        seen.update(drawn)
    assert {seen[i] for i in many} == {2}  # in turns: after five epochs every clip came twice
    assert batches_per_epoch([c.shape for c in clips], repeats, 1, 1.0) == 5
    samples = config_for(tmp_path, tiny_models, [{"path": str(tmp_path / "many"), "balancing": 7, "balancing_strategy": "SAMPLES"}])
    _, survey, encoding = encoding_for(samples)
    assert sum(epoch_counts([c.repeats for c in encoding.clips(survey)], 0)) == 7  # more samples than clips: all, and again


def test_loss_weight_scales_each_samples_share_of_the_loss():
    from motiontune.train.losses import training_loss

    generator = torch.Generator().manual_seed(0)
    x0, noise, prediction = (torch.randn(2, 4, 3, 2, 2, generator=generator) for _ in range(3))
    sigma = torch.tensor([0.3, 0.7])
    noisy, target = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise, noise - x0
    args = (prediction, target, noisy, sigma, x0, 1.0)
    alone = [training_loss(*(a[i : i + 1] if isinstance(a, torch.Tensor) else a for a in args))[0] for i in range(2)]
    plain, _ = training_loss(*args, loss_weights=[1.0, 1.0])
    weighted, parts = training_loss(*args, loss_weights=[3.0, 0.5])
    assert torch.allclose(plain, (alone[0] + alone[1]) / 2)
    assert torch.allclose(weighted, (3.0 * alone[0] + 0.5 * alone[1]) / 2)  # as OneTrainer: weighted, then the mean
    kept = torch.tensor([[True, False, True], [True, True, True]])
    frames, _ = training_loss(*args[:5], 0.0, kept, [2.0, 0.0])
    unweighted, _ = training_loss(*args[:5], 0.0, kept)
    per_frame = (prediction - target).pow(2).mean(dim=(1, 3, 4))
    assert torch.allclose(frames, 2 * (per_frame[0, 0] + per_frame[0, 2]) / 5)
    assert torch.allclose(unweighted, (per_frame * kept).sum() / 5)


def test_a_concept_with_loss_weight_zero_teaches_nothing(tmp_path, tiny_models):
    """The training loop passes each sample's loss_weight: a LoRA trained only on a weight-0 concept keeps its
    up-projections at their initial zeros."""
    from safetensors.torch import load_file

    from motiontune.cli import main

    picture(tmp_path / "clips" / "a.png", 32, 32, "a square")
    config = base_config(tmp_path, tiny_models("wan-2.1"), tmp_path / "clips", epochs=1, dataloader_threads=0,
                         concepts=[{"path": str(tmp_path / "clips"), "loss_weight": 0.0, "repeats": 2}])
    assert main(["train", "--config", str(write_config(tmp_path / "c.json", **config))]) == 0
    weights = load_file(str(tmp_path / "lora.safetensors"))
    up = [v for k, v in weights.items() if "lora_up" in k or "lora_B" in k]
    assert up and all(not v.any() for v in up)


# ---------------------------------------------------------------------------------------------- caption variations


def test_tag_shuffling_keeps_the_first_tags_and_draws_text_variations(tmp_path, tiny_models):
    picture(tmp_path / "clips" / "a.png", 32, 32, "ohwx man; red coat; snow; night; city\nsecond line")
    config = config_for(tmp_path, tiny_models, [{
        "path": str(tmp_path / "clips"), "text_variations": 12,
        "text": {"enable_tag_shuffling": True, "tag_delimiter": ";", "keep_tags_count": 2}}])
    _, survey, encoding = encoding_for(config)
    [clip] = encoding.clips(survey)
    assert len(clip.captions) == 24  # 12 draws of each of the two lines, all encoded up front
    first = clip.captions[:12]
    assert all(c.startswith("ohwx man; red coat; ") for c in first)
    assert all(sorted(c.split("; ")) == sorted(["ohwx man", "red coat", "snow", "night", "city"]) for c in first)
    assert len(set(first)) > 3  # the other tags really move
    assert set(clip.captions[12:]) == {"second line"}  # one tag: nothing to shuffle
    assert encoding_for(config)[2].clips(survey)[0].captions == clip.captions  # reproducible from the seeds


def test_tag_dropout_modes_and_special_tags(tmp_path):
    import random

    from motiontune.config.concepts import TextConfig
    from motiontune.data.augment import vary_caption

    caption = "ohwx, tag1, tag2, tag3, tag4, tag5, tag6, tag7"
    (tmp_path / "special.txt").write_text("tag2\ntag5\n")

    def draws(n=400, **text):
        config = TextConfig(tag_dropout_enable=True, **text)
        return [vary_caption(caption, config, random.Random(i)).split(", ") for i in range(n)]

    full = draws(tag_dropout_probability=1.0)
    assert all(tags == ["ohwx"] for tags in full)  # FULL: every tag after keep_tags_count goes
    whitelist = draws(tag_dropout_probability=1.0, tag_dropout_special_tags_mode="WHITELIST",
                      tag_dropout_special_tags=str(tmp_path / "special.txt"))
    assert all(tags == ["ohwx", "tag2", "tag5"] for tags in whitelist)
    blacklist = draws(tag_dropout_mode="RANDOM", tag_dropout_probability=0.5, tag_dropout_special_tags_mode="BLACKLIST",
                      tag_dropout_special_tags="tag[13]", tag_dropout_special_tags_regex=True)
    dropped = Counter(t for tags in blacklist for t in caption.split(", ") if t not in tags)
    assert set(dropped) == {"tag1", "tag3"} and all(150 < n < 250 for n in dropped.values())  # only they, half the time
    weighted = draws(tag_dropout_mode="RANDOM WEIGHTED", tag_dropout_probability=0.8)
    kept = Counter(t for tags in weighted for t in tags)
    assert kept["ohwx"] == 400 and kept["tag1"] > kept["tag4"] > kept["tag7"]  # later tags go more often
    assert kept["tag7"] < 400 * 0.35
    assert draws(5, tag_dropout_probability=0.0)[0] == caption.split(", ")  # probability 0: nothing changes


# ---------------------------------------------------------------------------------------------- image variations


def test_random_flip_mirrors_every_frame_of_a_clip_in_some_variations(tmp_path, tiny_models):
    from motiontune.data.video import decode_clips, probe

    path = picture(tmp_path / "clips" / "a.png", 32, 32, "x")
    config = config_for(tmp_path, tiny_models, [{"path": str(tmp_path / "clips"), "image_variations": 6,
                                                 "image": {"enable_random_flip": True}}])
    _, survey, encoding = encoding_for(config)
    assert [encoding.window_variant(epoch) for epoch in range(8)] == [0, 1, 2, 3, 4, 5, 0, 1]  # six cached draws in turns
    plain = decode_clips(probe(path), [(0.0,)], (32, 32))[0]
    looks = [encoding.clips(survey, variant)[0].look for variant in range(6)]
    frames = encoding.frames_seen
    assert {look.flip for look in looks} == {True, False}
    for look, seen in zip(looks, frames):
        assert np.array_equal(seen, plain[:, :, ::-1] if look.flip else plain)
    fixed = config_for(tmp_path, tiny_models, [{"path": str(tmp_path / "clips"), "image": {"enable_fixed_flip": True}}])
    _, survey, encoding = encoding_for(fixed)
    assert encoding.clips(survey)[0].look.flip and np.array_equal(encoding.frames_seen[0], plain[:, :, ::-1])


def test_random_draws_follow_the_file_in_its_concept_not_the_folder_the_dataset_lies_in(tmp_path, tiny_models, dataset):
    """Moving a dataset (another machine, another mount) keeps its crops, flips, windows and tag shuffles: the
    draws are seeded by the file's path inside its concept. Seeded by the full path, they changed with the folder."""
    import shutil

    def draws(root: Path) -> list:
        shutil.copytree(dataset, root / "clips")
        picture(root / "clips" / "a.png", 64, 32, "ohwx; red; snow; night; city")
        config = config_for(root, tiny_models, [{
            "path": str(root / "clips"), "image_variations": 4, "text_variations": 4,
            "image": {"enable_crop_jitter": True, "enable_random_flip": True},
            "text": {"enable_tag_shuffling": True, "tag_delimiter": ";"}}],
            video_config={"max_frames": 5, "target_fps": 8.0, "frame_sample_strategy": "random",
                          "temporal_augmentation": True, "window_variants": 3})
        _, survey, encoding = encoding_for(config)
        return [[(c.source.name, c.timestamps, c.look, c.captions) for c in encoding.clips(survey, variant)]
                for variant in range(3)]

    here, moved = draws(tmp_path / "here"), draws(tmp_path / "elsewhere" / "deeper")
    assert here == moved
    # the same file names in two concepts' folders draw apart
    for name in ("a", "b"):
        picture(tmp_path / "two" / name / "x.png", 64, 32, "x")
    config = config_for(tmp_path / "two", tiny_models, [
        {"path": str(tmp_path / "two" / name), "image_variations": 6, "image": {"enable_crop_jitter": True}} for name in ("a", "b")])
    _, survey, encoding = encoding_for(config)
    crops = [[c.look.crop for c in encoding.clips(survey, variant)] for variant in range(6)]
    assert [a for a, _ in crops] != [b for _, b in crops]
    windows = {clip[1] for variant in here for clip in variant if clip[0].endswith(".mp4")}
    assert len(windows) == 3  # the windows do move between variants: the equality above is not of constants


def test_crop_jitter_moves_the_crop_inside_the_covering_picture(tmp_path, tiny_models):
    from motiontune.data.cache import Cache
    from motiontune.data.video import decode_clips, probe

    path = picture(tmp_path / "clips" / "wide.png", 64, 32, "x")  # 2:1 → the 48x16 bucket, scaled to 48x24 to cover it
    config = config_for(tmp_path, tiny_models, [{"path": str(tmp_path / "clips"), "image_variations": 5,
                                                 "image": {"enable_crop_jitter": True}}])
    _, survey, encoding = encoding_for(config)
    assert survey.usable[0].size == (16, 48)
    covering = decode_clips(probe(path), [(0.0,)], (24, 48))[0]
    looks = [encoding.clips(survey, variant)[0].look for variant in range(5)]
    assert len({look.crop for look in looks}) > 1 and all(0 <= look.crop[0] <= 8 and look.crop[1] == 0 for look in looks)
    for look, seen in zip(looks, encoding.frames_seen):
        assert np.array_equal(seen, covering[:, look.crop[0] : look.crop[0] + 16])
    keys = {Cache.latent_key("f", (0.0,), (16, 48), "vae", look.crop, look.flip) for look in looks}
    assert len(keys) == len({look.crop for look in looks})  # each crop is its own cache entry
    assert Cache.latent_key("f", (0.0,), (16, 48), "vae") not in keys


def test_resolution_override_sizes_that_concepts_clips(tmp_path, tiny_models):
    from motiontune.data.survey import survey_dataset
    from motiontune.models.wan import WanFamily

    picture(tmp_path / "small" / "a.png", 40, 40, "x")
    picture(tmp_path / "large" / "b.png", 40, 40, "x")
    picture(tmp_path / "off" / "c.png", 40, 40, "x")
    config = config_for(tmp_path, tiny_models, [
        {"path": str(tmp_path / "small")},
        {"path": str(tmp_path / "large"), "image": {"enable_resolution_override": True, "resolution_override": "64"}},
        {"path": str(tmp_path / "off"), "image": {"resolution_override": "64"}},  # not enabled: the config's resolution
    ])
    survey = survey_dataset(config, WanFamily(config, torch.device("cpu")))
    assert {e.item.path.parent.name: e.size for e in survey.usable} == {"small": (32, 32), "large": (64, 64), "off": (32, 32)}


def test_validation_concept_and_another_type_together_are_refused():
    from pydantic import ValidationError

    from motiontune.config.concepts import ConceptConfig

    assert ConceptConfig.model_validate({"path": ".", "validation_concept": True}).role == "VALIDATION"
    with pytest.raises(ValidationError, match="older form of type VALIDATION, and type is PRIOR_PREDICTION"):
        ConceptConfig.model_validate({"path": ".", "type": "PRIOR_PREDICTION", "validation_concept": True})


# ---------------------------------------------------------------------------------------------- rotation and colour


def colour_clip(path: Path, frames: int = 10, size: int = 32) -> Path:
    """A real, lossless MP4 whose frames all differ: a rainbow sliding right over a grey ramp, a white square
    moving down, the whole getting brighter, so colour changes, rotations and frame-to-frame differences all show."""
    import av

    y, x = np.mgrid[0:size, 0:size]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv444p"
        stream.options = {"qp": "0"}
        for i in range(frames):
            hue = ((x + 3 * i) % size) / size * 2 * np.pi
            image = np.stack([127 + 100 * np.cos(hue + k * 2 * np.pi / 3) * y / size for k in range(3)], axis=-1)
            image[2 + 2 * i : 8 + 2 * i, 20:26] = 245
            image *= 0.8 + 0.04 * i  # brighter frame after frame: each frame's mean differs from the clip's
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image.astype(np.uint8), format="rgb24")))
        container.mux(stream.encode())
    path.with_suffix(".txt").write_text("colours\n")
    return path


def _enhanced(enhancer):
    """PIL's ImageEnhance on all of a clip's frames as one picture: contrast pivots on the whole clip's mean grey."""
    from PIL import ImageEnhance

    def change(frames: np.ndarray, factor: float) -> np.ndarray:
        whole = Image.fromarray(np.concatenate(list(frames), axis=0))
        return np.stack(np.split(np.asarray(getattr(ImageEnhance, enhancer)(whole).enhance(factor)), len(frames)))
    return change


def _hue_turned(frames: np.ndarray, turn: float) -> np.ndarray:
    import colorsys

    def pixel(rgb):
        h, s, v = colorsys.rgb_to_hsv(*(rgb / 255.0))
        return [round(c * 255) for c in colorsys.hsv_to_rgb((h + turn) % 1.0, s, v)]
    return np.array([[[pixel(rgb) for rgb in row] for row in frame] for frame in frames])


def _rotated(frames: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Each frame turned `degrees` counter-clockwise about its centre, bilinear (numpy, pixel centres at +0.5),
    and where that is computed (the source point lies inside the frame)."""
    _, height, width, _ = frames.shape
    angle = np.radians(degrees)
    y, x = np.mgrid[0:height, 0:width] + 0.5
    dx, dy = x - width / 2, y - height / 2
    sx = np.cos(angle) * dx - np.sin(angle) * dy + width / 2 - 0.5
    sy = np.sin(angle) * dx + np.cos(angle) * dy + height / 2 - 0.5
    inside = (sx >= 0) & (sx <= width - 1) & (sy >= 0) & (sy <= height - 1)
    x0, y0 = np.clip(np.floor(sx).astype(int), 0, width - 2), np.clip(np.floor(sy).astype(int), 0, height - 2)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    f = frames.astype(np.float64)
    out = (f[:, y0, x0] * (1 - fx) * (1 - fy) + f[:, y0, x0 + 1] * fx * (1 - fy)
           + f[:, y0 + 1, x0] * (1 - fx) * fy + f[:, y0 + 1, x0 + 1] * fx * fy)
    return out, inside


# name: (strength key, strength, the value a random draw lies in, the fixed value, independent reference)
CHANGES = {
    "brightness": ("random_brightness_max_strength", 0.4, (0.6, 1.4), 1.4, _enhanced("Brightness")),
    "contrast": ("random_contrast_max_strength", 0.5, (0.5, 1.5), 1.5, _enhanced("Contrast")),
    "saturation": ("random_saturation_max_strength", 0.8, (0.2, 1.8), 1.8, _enhanced("Color")),
    "hue": ("random_hue_max_strength", 0.6, (-0.3, 0.3), 0.3, _hue_turned),
    "rotate": ("random_rotate_max_angle", 90.0, (-90.0, 90.0), 90.0, _rotated),
}


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory) -> Path:
    return colour_clip(tmp_path_factory.mktemp("colour") / "clips" / "rainbow.mp4").parent


def test_rotation_and_colour_change_every_frame_of_a_video_clip_as_drawn(tmp_path, tiny_models, colour_folder):
    """Each change, random (three image variations) and fixed: the frames the VAE sees are the frames decoded
    without it, changed by the drawn value as PIL / colorsys / a numpy rotation compute it (within a byte's
    rounding), every frame of the 5-frame clip with the same value."""
    from motiontune.config.concepts import ConceptImageConfig

    config = config_for(tmp_path, tiny_models, [{"path": str(colour_folder)}], video_config={"max_frames": 5, "target_fps": 8.0})
    _, survey, encoding = encoding_for(config, one_encoding=True)  # the frames handed to the VAE are what is checked
    concept = survey.usable[0].item.concept

    def seen(image: dict, variations: int = 1):
        """The looks and the frames encoded for the clip with these settings (one model load for all of them)."""
        concept.image, concept.image_variations = ConceptImageConfig(**image), variations
        encoding.frames_seen.clear()
        return [encoding.clips(survey, variant)[0].look for variant in range(variations)], list(encoding.frames_seen)

    [plain_look], [plain] = seen({})
    assert plain_look.pixel_changes is None and plain.shape == (5, 32, 32, 3)
    assert all(np.abs(plain[i].astype(int) - plain[0]).mean() > 3 for i in range(1, 5))  # every frame differs
    for name, (key, strength, (low, high), fixed, reference) in CHANGES.items():
        looks, frames = seen({f"enable_random_{name}": True, key: strength}, variations=3)
        [fixed_look], fixed_frames = seen({f"enable_fixed_{name}": True, key: strength})
        values = [getattr(look, name) for look in looks]
        assert len(set(values)) == 3 and all(low <= v <= high for v in values), (name, values)
        assert getattr(fixed_look, name) == fixed, name
        for value, changed in zip([*values, fixed], [*frames, *fixed_frames]):
            if name == "rotate":
                expected, inside = reference(plain, value)
                assert inside.mean() > 0.45  # the corners it uncovers are black, no reference there
                assert np.abs(changed.astype(float) - expected)[:, inside].max() <= 1.0, (name, value)
            else:
                assert np.abs(changed.astype(int) - reference(plain, value)).max() <= 1, (name, value)
            assert not np.array_equal(changed, plain), (name, value)  # it did change the frames
        assert np.abs(fixed_frames[0].astype(int) - plain).mean() > 5, name  # the fixed (strongest) change, a lot
    # a quarter turn of the square clip is exact: counter-clockwise, as in OneTrainer (torchvision) and PIL
    assert np.array_equal(fixed_frames[0], np.rot90(plain, axes=(1, 2)))


def test_each_look_is_its_own_cache_entry_and_a_plain_look_keeps_its_key():
    from motiontune.config.concepts import ConceptImageConfig
    from motiontune.data.augment import ImageVariant, image_variant
    from motiontune.data.cache import Cache

    # the keys version 0.x wrote (computed before rotation and colour existed): existing caches stay valid
    flipped, centred = ImageVariant(flip=True, crop=(2, 0)), ImageVariant()
    assert Cache.latent_key("f", (0.0, 0.125), (16, 48), "vae", flipped.crop, flipped.flip, None, flipped.pixel_changes) \
        == "d87d736278202d7edbc49189ad6b67a24d86ccc617a9d58fa35eb90bbdc4d8bf"
    assert Cache.latent_key("f", (0.0, 0.125), (16, 48), "vae", None, False, None, centred.pixel_changes) \
        == "b095208eb0144f89bc0cf12ff6a1c6cb31404af58dd5e71464a98e76bfda6fc9"
    assert Cache.mask_key("m", (0.0, 0.125), (16, 48), (64, 32), (2, 0), True, (1, 2, 6), "area", flipped.mask_changes) \
        == "25533f7049a2faed65d0fee8a28f1e7b251bd9c7f1509fa01e6221f927f92c44"

    jitter = {"enable_crop_jitter": True, "enable_random_flip": True}
    every = ConceptImageConfig(**jitter, **{f"enable_random_{n}": True for n in ("rotate", "brightness", "contrast", "saturation", "hue")},
                               random_rotate_max_angle=10, random_brightness_max_strength=0.2, random_contrast_max_strength=0.2,
                               random_saturation_max_strength=0.2, random_hue_max_strength=0.2)
    before = [image_variant(ConceptImageConfig(**jitter), 64, 32, (16, 48), "clip", i) for i in range(8)]
    looks = [image_variant(every, 64, 32, (16, 48), "clip", i) for i in range(8)]
    # random wins when random and fixed are both on (mgds checks `enabled` first); a random factor is floored at 0
    both = ConceptImageConfig(enable_random_rotate=True, enable_fixed_rotate=True, random_rotate_max_angle=10,
                              enable_random_brightness=True, enable_fixed_brightness=True, random_brightness_max_strength=3)
    drawn = [image_variant(both, 64, 32, (16, 48), "clip", i) for i in range(40)]
    assert len({d.rotate for d in drawn}) == 40 and all(abs(d.rotate) <= 10 for d in drawn)
    assert min(d.brightness for d in drawn) == 0.0 and max(d.brightness for d in drawn) > 2
    # the new draws come after the old ones: switching them on keeps each variation's crop and flip
    assert [(b.crop, b.flip) for b in before] == [(look.crop, look.flip) for look in looks]
    keys = {Cache.latent_key("f", (0.0,), (16, 48), "vae", look.crop, look.flip, None, look.pixel_changes) for look in looks}
    plain = {Cache.latent_key("f", (0.0,), (16, 48), "vae", b.crop, b.flip) for b in before}
    assert len(keys) == 8 and not keys & plain
    for name in ("rotate", "brightness", "contrast", "saturation", "hue"):  # each value alone makes another entry
        one = ImageVariant(**{name: 0.5})
        assert Cache.latent_key("f", (0.0,), (16, 48), "vae", None, False, None, one.pixel_changes) not in plain | keys
    # the mask moves with a rotation and a shrink, never with colour
    mask = lambda look: Cache.mask_key("m", (0.0,), (16, 48), (64, 32), None, False, (1, 2, 6), "area", look.mask_changes)
    assert mask(ImageVariant(brightness=1.3, hue=0.2)) == mask(ImageVariant())
    assert len({mask(ImageVariant()), mask(ImageVariant(rotate=5.0)), mask(ImageVariant(shrink=(1, 0.5)))}) == 3


def test_random_capitals_follow_onetrainers_modes_probability_and_lowercase():
    import random
    import string

    from pydantic import ValidationError

    from motiontune.config.concepts import TextConfig
    from motiontune.data.augment import caption_variants, vary_caption

    caption = "ohwx man, Red coat, snowy NIGHT street, city"
    tags = caption.split(", ")

    def draws(n=300, **text):
        config = TextConfig(**{"caps_randomize_enable": True, "caps_randomize_probability": 1.0, **text})
        return [vary_caption(caption, config, random.Random(i)).split(", ") for i in range(n)]

    assert all(d == [t.upper() for t in tags] for d in draws(caps_randomize_mode="capslock"))  # every tag, the kept one too
    assert all(d == [string.capwords(t) for t in tags] for d in draws(caps_randomize_mode="title"))
    assert all(d == [t.capitalize() for t in tags] for d in draws(caps_randomize_mode="first"))  # the rest lowercase
    mixed = draws(caps_randomize_mode="random")
    assert all([t.lower() for t in d] == [t.lower() for t in tags] for d in mixed)
    letters = [c for d in mixed for t in d for c in t if c.isalpha()]
    assert 0.4 < sum(c.isupper() for c in letters) / len(letters) < 0.6  # each letter upper or lower, even odds
    # probability 0.5 with two modes: half the tags are touched, each mode half of those
    half = draws(400, caps_randomize_probability=0.5, caps_randomize_mode="capslock, title")
    upper = sum(d[3] == "CITY" for d in half) / 400  # "city": title → "City", capslock → "CITY", untouched "city"
    title = sum(d[3] == "City" for d in half) / 400
    assert 0.19 < upper < 0.31 and 0.19 < title < 0.31
    # lowercase comes before the random capitals and works without them, after the dropout (whose special tags match
    # as written), as in OneTrainer
    assert caption_variants((caption,), TextConfig(caps_randomize_lowercase=True), 3, "s") == (caption.lower(),)
    whitelisted = TextConfig(caps_randomize_lowercase=True, tag_dropout_enable=True, tag_dropout_probability=1.0,
                             tag_dropout_special_tags_mode="WHITELIST", tag_dropout_special_tags="Red coat")
    assert vary_caption(caption, whitelisted, random.Random(0)) == "ohwx man, red coat"
    assert all(d == [t.upper() for t in tags] for d in draws(5, caps_randomize_mode="capslock", caps_randomize_lowercase=True))
    # drawn per text variation, reproducibly from the seeds
    text = TextConfig(caps_randomize_enable=True, caps_randomize_probability=0.5)
    variants = caption_variants((caption,), text, 8, "seed")
    assert len(set(variants)) > 4 and variants == caption_variants((caption,), text, 8, "seed")
    assert variants != caption_variants((caption,), text, 8, "other seed")
    with pytest.raises(ValidationError, match="unknown capitalisation mode.*'shout'.*capslock, title, first, random"):
        TextConfig(caps_randomize_enable=True, caps_randomize_mode="capslock, shout")
    TextConfig(caps_randomize_mode="capslock, shout")  # read only while the feature is off


def test_a_strength_out_of_range_is_refused_by_key(tmp_path):
    from motiontune.data.dataset import load_concepts

    folder = tmp_path / "clips"
    picture(folder / "a.png", 32, 32, "x")
    concepts = [ot_concept(folder, image__enable_fixed_hue=True, image__random_hue_max_strength=1.5),
                ot_concept(folder, image__enable_fixed_brightness=True, image__random_brightness_max_strength=-2.0),
                ot_concept(folder, image__random_hue_max_strength=3.0),  # off: any value, as OneTrainer
                # random wins over fixed, and a random turn is clamped to half the wheel: OneTrainer trains these
                ot_concept(folder, image__enable_random_hue=True, image__enable_fixed_hue=True, image__random_hue_max_strength=1.5,
                           image__enable_random_brightness=True, image__enable_fixed_brightness=True,
                           image__random_brightness_max_strength=-2.0)]
    (tmp_path / "concepts.json").write_text(json.dumps(concepts))
    with pytest.raises(ConfigError) as error:
        load_concepts(TrainConfig.model_validate({"concept_file_name": str(tmp_path / "concepts.json")}))
    message = str(error.value)
    assert "2 problem(s)" in message
    assert "concept 0 ('" in message and "image.random_hue_max_strength = 1.5: Value error, the hue turns by at most half" in message
    assert "image.random_brightness_max_strength = -2.0: Value error, the fixed brightness factor is 1 + this strength, -1" in message
