"""Config errors are caught before any model loads, and say what is wrong, where, and what is allowed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import write_config
from motiontune.cli import main
from motiontune.config import ConfigError
from motiontune.configure import load_config

MISSING_MODEL = "/nonexistent/model-folder"  # a run that got as far as loading would fail differently


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "motiontune", *args], capture_output=True, text=True, timeout=120)


def minimal(**keys):
    config = {"base_model_name": MISSING_MODEL, "concepts": [{"path": "clips"}]}
    config.update(keys)
    return config


@pytest.mark.parametrize(
    "keys, expected",
    [
        ({"learnig_rate": 1e-4}, ["unknown key 'learnig_rate'", "Did you mean 'learning_rate'?"]),
        ({"video_config": {"max_frame": 16}}, ["unknown key 'video_config.max_frame'", "Did you mean 'max_frames'?"]),
        ({"optimizer": {"optimizer": "ADAM"}}, ["optimizer.optimizer", '"ADAM"', "'ADAMW'"]),
        ({"timestep_distribution": "GAUSSIAN"}, ["timestep_distribution", '"GAUSSIAN"', "'UNIFORM', 'LOGIT_NORMAL' or 'SIGMOID'"]),
        ({"video_config": {"frame_dropout_probability": 0.9}}, ["video_config.frame_dropout_probability", "0.9", "must be at most 0.3"]),
        ({"video_config": {"temporal_consistency_weight": -1}}, ["video_config.temporal_consistency_weight", "-1", "must be at least 0"]),
        ({"resolution": "wide"}, ["resolution", "'832x480'"]),
        ({"train_dtype": "bf16"}, ["train_dtype = \"bf16\": not a choice: use 'FLOAT_32', 'BFLOAT_16' or 'FLOAT_16'; did you mean 'BFLOAT_16'?"]),
    ],
)
def test_cli_rejects_bad_config_before_loading_anything(tmp_path, keys, expected, capsys):
    # in this process (an interpreter start each would cost more than the check): the command's own entry point
    code = main(["train", "--config", str(write_config(tmp_path / "c.json", **minimal(**keys)))])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    for text in expected:
        assert text in stderr
    assert "loading" not in stderr  # stopped before the model


def test_the_command_exits_2_with_the_message_on_a_bad_config(tmp_path):
    """The same through `python -m motiontune`, as a user's shell sees it."""
    result = run_cli("train", "--config", str(write_config(tmp_path / "c.json", **minimal(learnig_rate=1e-4))))
    assert result.returncode == 2, result.stderr
    assert "unknown key 'learnig_rate'" in result.stderr and "Did you mean 'learning_rate'?" in result.stderr
    assert "loading" not in result.stderr


def test_not_built_yet_values_are_refused_not_ignored(tmp_path):
    path = write_config(
        tmp_path / "c.json",
        **minimal(preserve_embedding_norm=True, output_dtype="FLOAT_8", vae={"train": True}),
    )
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    message = str(error.value)
    assert "preserve_embedding_norm = true: not supported yet" in message
    assert 'output_dtype = "FLOAT_8": not supported yet' in message
    assert "vae.train = true: not supported yet" in message
    # the VAE loads and encodes in FLOAT_32, BFLOAT_16 or FLOAT_16; stored quantized it is refused, not ignored
    path = write_config(tmp_path / "d.json", **minimal(vae={"weight_dtype": "FLOAT_8"}))
    with pytest.raises(ConfigError, match='vae.weight_dtype = "FLOAT_8": not supported yet'):
        load_config(str(path))


def test_a_part_section_given_in_part_keeps_that_parts_defaults(tmp_path):
    """`"text_encoder": {"weight_dtype": "FLOAT_8"}` quantizes the frozen text encoder; it does not make it train."""
    config = load_config(str(write_config(tmp_path / "c.json", **minimal(text_encoder={"weight_dtype": "FLOAT_8"},
                                                                           vae={"model_name": ""}))))
    assert config.text_encoder.weight_dtype == "FLOAT_8"
    assert config.text_encoder.train is False and config.vae.train is False
    assert config.transformer.train is True
    # WAN 2.2 A14B: a noise range for the low-noise expert does not make it train as well
    config = load_config(str(write_config(tmp_path / "d.json", **minimal(
        model_type="WAN_2_2_T2V_A14B", transformer={"train": True}, transformer_2={"max_noising_strength": 0.8}))))
    assert config.transformer_2.train is False and config.transformer_2.max_noising_strength == 0.8


def test_compression_ratios_are_checked_against_each_vae(tmp_path):
    ti2v = minimal(model_type="WAN_2_2_TI2V_5B", video_config={"spatial_compression_ratio": 16})
    assert load_config(str(write_config(tmp_path / "a.json", **ti2v))).video_config.spatial_compression_ratio == 16
    assert load_config(str(write_config(tmp_path / "b.json", **minimal(video_config={"spatial_compression_ratio": 16}))))
    wan21 = minimal(video_config={"spatial_compression_ratio": 12, "temporal_compression_ratio": 6})
    with pytest.raises(ConfigError) as error:
        load_config(str(write_config(tmp_path / "c.json", **wan21)))
    assert "spatial_compression_ratio = 12: the VAE compresses 8x itself, so a larger ratio must be a whole multiple of 8" in str(error.value)
    assert "temporal_compression_ratio = 6: the VAE compresses 4x itself" in str(error.value)


def test_an_unknown_model_type_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(str(write_config(tmp_path / "c.json", **minimal(model_type="HUNYUAN"))))
    assert "model_type" in str(error.value) and "HUNYUAN_VIDEO" in str(error.value) and "HI_DREAM_DEV" in str(error.value)


def test_a14b_experts_follow_the_experts_key_or_the_part_flags(tmp_path):
    def choice(**keys):
        return load_config(str(write_config(tmp_path / "c.json", **minimal(model_type="WAN_2_2_T2V_A14B", **keys)))).expert_choice()

    assert choice(transformer={"train": True}, transformer_2={"train": True}) == "both"
    assert choice(transformer={"train": False}, transformer_2={"train": True}) == "low"
    assert choice(experts="high", transformer_2={"train": True}) == "high"
    with pytest.raises(ConfigError, match="needs an expert to train"):
        choice(transformer={"train": False})
    with pytest.raises(ConfigError, match="only WAN 2.2 A14B has experts"):
        load_config(str(write_config(tmp_path / "d.json", **minimal(experts="both"))))


def test_set_overrides_dotted_keys_and_list_items(tmp_path):
    path = write_config(tmp_path / "c.json", **minimal())
    config = load_config(str(path), ["video_config.max_frames=33", "epochs=3", "concepts.0.path=other", "seed=7"])
    assert (config.video_config.max_frames, config.epochs, config.concepts[0].path, config.seed) == (33, 3, "other", 7)
    with pytest.raises(ConfigError, match="video_config.max_frames"):
        load_config(str(path), ["video_config.max_frames=lots"])


def test_defaults_match_the_documented_video_config(tmp_path):
    video = load_config(str(write_config(tmp_path / "c.json", **minimal()))).video_config
    assert video.model_dump() == {
        "max_frames": 16, "frame_sample_strategy": "uniform", "clips_per_file": 1, "window_variants": 0, "target_fps": 24.0, "max_duration": 10.0,
        "temporal_consistency_weight": 1.0, "use_temporal_attention": True, "spatial_compression_ratio": 8,
        "temporal_compression_ratio": 4, "video_batch_size_multiplier": 0.5, "frame_dropout_probability": 0.0,
        "temporal_augmentation": False,
    }


def test_both_onetrainer_memory_forms_are_read(tmp_path):
    old = load_config(str(write_config(tmp_path / "old.json", **minimal(gradient_checkpointing="ON"))))
    new = load_config(str(write_config(tmp_path / "new.json", **minimal(transformer={"gradient_checkpointing": True}))))
    off = load_config(str(write_config(tmp_path / "off.json", **minimal(gradient_checkpointing="OFF"))))
    assert old.use_gradient_checkpointing() and new.use_gradient_checkpointing() and not off.use_gradient_checkpointing()
    assert old.memory_config_form.startswith("older") and new.memory_config_form.startswith("newer")


def test_shipped_presets_are_valid_and_found_by_name():
    result = run_cli("presets")
    assert result.returncode == 0
    names = result.stdout.split("\n")
    assert {"#wan 2.2 LoRA", "#wan 2.2 LoRA 8GB", "#wan 2.2 Finetune"} <= set(names)
    for name, method in (("#wan 2.2 LoRA", "LORA"), ("#wan 2.2 LoRA 8GB.json", "LORA"), ("#wan 2.2 Finetune", "FINE_TUNE")):
        assert load_config(name).training_method == method
    with pytest.raises(ConfigError, match="Did you mean the preset '#wan 2.2 LoRA'"):
        load_config("#wan 2.2 lora")


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"epochs": 3,\n "seed": }')
    with pytest.raises(ConfigError, match=r"not valid JSON \(line 2"):
        load_config(str(path))


def test_a_config_saved_with_a_byte_order_mark_loads(tmp_path):
    """Windows editors (Notepad) write UTF-8 with a BOM; concept files were read that way already, configs too now."""
    path = tmp_path / "c.json"
    path.write_text('{"epochs": 3, "concepts": [{"path": "."}]}', encoding="utf-8-sig")
    assert load_config(str(path)).epochs == 3


@pytest.mark.parametrize("preset, refused", [("#wan 2.1 LoRA", True), ("#ltx 2 LoRA", True), ("#kandinsky 5 LoRA", True),
                                             ("#hunyuan video 1.5 LoRA", True), ("#hunyuan video LoRA", False)])
def test_guidance_scale_is_refused_where_no_guidance_embedding_reads_it(preset, refused):
    """Only a guidance-distilled transformer (GUIDANCE_EMBEDDING: HunyuanVideo) reads guidance_scale; elsewhere a value
    would silently do nothing, so it is refused by name."""
    from motiontune.config import ConfigError
    from motiontune.configure import load_config

    if not refused:
        assert load_config(preset, ["guidance_scale=3.5"]).guidance_scale == 3.5
        return
    with pytest.raises(ConfigError, match="guidance_scale = 3.5: .* has no guidance embedding"):
        load_config(preset, ["guidance_scale=3.5"])


def test_keys_that_do_not_apply_follow_what_families_declare():
    """The keys the UI hides: those a model type / method never reads, from what each family declares."""
    from motiontune.configure import keys_that_do_not_apply, load_config

    wan21, a14b = keys_that_do_not_apply(load_config("#wan 2.1 LoRA")), keys_that_do_not_apply(load_config("#wan 2.2 LoRA"))
    ltx, hunyuan = keys_that_do_not_apply(load_config("#ltx 2 LoRA")), keys_that_do_not_apply(load_config("#hunyuan video Finetune"))
    assert {"experts_on", "transformer_2", "train_audio", "guidance_scale", "samples.*.control", "in_context_control"} <= set(wan21)
    assert not {"experts_on", "transformer_2", "context_parallel"} & set(a14b)
    assert "train_audio" not in ltx and "in_context_control" not in ltx and "samples.*.control" in ltx
    assert {"lora_rank", "frozen_loras", "context_parallel"} <= set(hunyuan) and "guidance_scale" not in hunyuan
