"""LoHa, LoKr and DoRA (`peft_type`, `lora_decompose`): trained with `motiontune train` on WAN 2.1 and
HunyuanVideo, then
- loaded with no motiontune code into the stock pipeline (DoRA: `load_lora_weights`; LoKr: diffusers'
  `transformer.load_lora_adapter`, as the WAN and HunyuanVideo pipelines' `load_lora_weights` only take LoRA names;
  LoHa, which diffusers does not read: peft's `inject_adapter_in_model` + `set_peft_model_state_dict`), whose samples
  move towards the trained clip. Measured (150 steps, 4 seeds), MSE ratio with/without the adapter and per-channel
  statistics ratio: WAN 2.1 LoHa 0.79 / 0.22, LoKr 0.79 / 0.25, DoRA 0.79 / 0.23; HunyuanVideo LoHa 0.77 / 0.57,
  LoKr 0.81 / 0.63 (without the fused q, k, v, which a ComfyUI LoKr cannot hold), DoRA 0.78 / 0.57;
- the default file (COMFY_LORA, ComfyUI's LyCORIS names) applied by the real ComfyUI (tests/comfyui/) to motiontune's
  COMFY_TRANSFORMER file of the base model: every key applied, and the patched weights equal the transformer with the
  trained adapter merged by peft (its own `get_delta_weight`, DoRA's magnitude included), in the original layout;
- the same formulas written out here from comfy/weight_adapter/ (`comfy_applied`), converted back by diffusers, give
  peft's merge too, and negative controls (a fused entry's rows swapped, `.alpha` or `dora_scale` left out) fail them;
- a run continued from a backup ends with the same adapter as the run that was not stopped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import base_config, write_config
from motiontune.cli import main
from motiontune.methods import lora
from stock_checks import stock_samples
from test_lora_end_to_end import _channel_stats_distance, _make_clip, _stock_target_latents
from test_lora_formats import also_saved_as, hunyuan_width, original_layout, real_width_as

KINDS = {"loha": {"peft_type": "LOHA"}, "lokr": {"peft_type": "LOKR", "lokr_dim": 2}, "dora": {"lora_decompose": True}}
# tiny model → model type, stock pipeline, config keys (timestep shifts as the tiny models' schedulers)
FAMILIES = {
    "wan-2.1": ("WAN_2_1_T2V", "WanPipeline", {"timestep_shift": 3.0}),
    "hunyuan-video": ("HUNYUAN_VIDEO", "HunyuanVideoPipeline", {"timestep_shift": 7.0}),
}
EPOCHS, SEEDS, STEPS = 150, range(4), 12
EQUAL = 1e-5  # relative difference of weights that counts as equal (float32 rounding)
SUFFIXES = {  # ComfyUI's names for each kind's tensors (comfy/weight_adapter/lora.py, loha.py, lokr.py, comfy/lora.py)
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"),
    "dora": ("lora_A.weight", "lora_B.weight", "dora_scale", "alpha"),
}


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return _make_clip(tmp_path_factory.mktemp("lycoris") / "data", 32)


@pytest.fixture(scope="module")
def runs(tiny_models, clip, tmp_path_factory):
    """(kind, tiny model) → (model folder, clip, default COMFY_LORA file, DIFFUSERS_LORA file of the same adapter)."""
    done = {}

    def get(kind: str, family: str):
        if (kind, family) not in done:
            model_type, _, keys = FAMILIES[family]
            model, folder = tiny_models(family), tmp_path_factory.mktemp(f"{kind}-{family}")
            config = base_config(folder, model, clip.parent, model_type=model_type, resolution="32", epochs=EPOCHS,
                                 learning_rate=1e-2, lora_rank=8, lora_alpha=4,  # alpha != rank: files keep the scale
                                 video_config={"max_frames": 9, "target_fps": 16.0}, **keys, **KINDS[kind])
            with also_saved_as(lora, "DIFFUSERS_LORA", lambda path: path.with_name(f"{path.stem}-diffusers{path.suffix}")):
                assert main(["train", "--config", str(write_config(folder / "config.json", **config))]) == 0
            done[kind, family] = (model, clip, folder / "lora.safetensors", folder / "lora-diffusers.safetensors")
        return done[kind, family]

    return get


def load_stock(kind: str, transformer_or_pipe, path: Path) -> None:
    """The adapter file into the stock pipeline (or transformer) by diffusers where it can, else by peft."""
    if kind == "dora":
        transformer_or_pipe.load_lora_weights(str(path))
        return
    transformer = getattr(transformer_or_pipe, "transformer", transformer_or_pipe)
    if kind == "lokr":
        # a folder and weight_name: given only a file's path, diffusers 0.42.1 skips its metadata (alpha)
        transformer.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="transformer")
        return
    from peft import LoHaConfig, inject_adapter_in_model, set_peft_model_state_dict

    with safe_open(str(path), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    config = LoHaConfig(**{k.removeprefix("transformer."): v for k, v in metadata.items()})
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(path)).items()}
    inject_adapter_in_model(config, transformer)
    assert not set_peft_model_state_dict(transformer, state).unexpected_keys


def stock_pipeline(family: str, model: Path):
    import diffusers

    pipe = getattr(diffusers, FAMILIES[family][1]).from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clip_latents(family: str, pipe, clip: Path) -> torch.Tensor:
    if family == "wan-2.1":
        return _stock_target_latents(pipe, clip)
    from test_hunyuan import _clip_latents

    return _clip_latents(pipe, clip)


def samples(pipe) -> torch.Tensor:
    return stock_samples(pipe, SEEDS, prompt="moving shapes", height=32, width=32, num_frames=9, num_inference_steps=STEPS,
                         guidance_scale=1.0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_stock_pipeline_samples_move_towards_the_trained_clip(kind, family, runs):
    model, clip, _, diffusers_file = runs(kind, family)
    pipe = stock_pipeline(family, model)
    target = clip_latents(family, pipe, clip)
    without = samples(pipe)
    load_stock(kind, pipe, diffusers_file)
    adapted = samples(pipe)
    mse_ratio = ((adapted - target) ** 2).mean().item() / ((without - target) ** 2).mean().item()
    stats_ratio = _channel_stats_distance(adapted, target) / _channel_stats_distance(without, target)
    print(f"{kind} on {family}: MSE ratio to the clip with/without the adapter {mse_ratio:.3f}; "
          f"channel statistics ratio {stats_ratio:.3f}")
    assert mse_ratio < 0.85 and stats_ratio < 0.7, "samples did not move towards the clip: adapter or loading broken"


def merged_by_peft(kind: str, family: str, model: Path, path: Path) -> dict[str, torch.Tensor]:
    """The stock transformer with the adapter of `path` loaded as above and merged by peft (get_delta_weight)."""
    import diffusers

    from peft.tuners.tuners_utils import BaseTunerLayer

    transformer = getattr(diffusers, _transformer_class(family)).from_pretrained(model, subfolder="transformer")
    if kind == "dora":  # the same reader as the pipeline's load_lora_weights, on the transformer alone
        transformer.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="transformer")
    else:
        load_stock(kind, transformer, path)
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    return plain(transformer)


def _transformer_class(family: str) -> str:
    return {"wan-2.1": "WanTransformer3DModel", "hunyuan-video": "HunyuanVideoTransformer3DModel"}[family]


def plain(transformer) -> dict[str, torch.Tensor]:
    """Weights under the model's own names, adapters left out (a merged layer keeps its weight in `base_layer`)."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in transformer.state_dict().items()
            if not any(f".{a}" in k for a in lora.ADAPTER_PARAMETERS)}


def comfy_applied(kind: str, family: str, model: Path, path: Path) -> tuple[dict, dict]:
    """(the stock weights, the weights after ComfyUI's way with the file on the original layout, converted back by
    diffusers). Every key must name an original weight with ComfyUI's suffixes for `kind`, shapes matching."""
    model_type = FAMILIES[family][0]
    transformer, original, convert = original_layout(model_type, model, "transformer")
    stock = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    entries = load_file(str(path))
    modules = {}
    for key in entries:
        suffix = next((s for s in SUFFIXES[kind] if key.endswith(f".{s}")), None)
        assert suffix is not None, f"{key}: not one of ComfyUI's names for {kind}"
        modules.setdefault(key.removesuffix(f".{suffix}"), {})[suffix] = entries[key]
    for module, found in modules.items():
        name = module.removeprefix("diffusion_model.") + ".weight"
        assert module.startswith("diffusion_model.") and name in original, f"{module}: no such weight in the original layout"
        original[name] = comfy_weight(original[name], found)
    with real_width_as(hunyuan_width(model_type, transformer)):
        return stock, convert(original)


def comfy_weight(weight: torch.Tensor, entry: dict[str, torch.Tensor]) -> torch.Tensor:
    """One weight as ComfyUI patches it at strength 1 (read from comfy/weight_adapter/*.py, calculate_weight):
    LoRA ΔW = up @ down, LoHa ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b), LoKr ΔW = kron(w1, w2) with w = w_a @ w_b where
    split; scale alpha / rank of the entry (LoRA: down's rows; LoHa: w1_b's; LoKr: w2_b's, else w1_b's; LoKr of two
    full factors: 1) and 1 without `.alpha`; with `dora_scale` of shape (rows, 1) (its output axis),
    W' = (W + scale ΔW) · dora_scale / ‖W‖ (row norms of the base weight, plus the dtype's eps)."""
    if "lora_A.weight" in entry:
        delta, rank = entry["lora_B.weight"] @ entry["lora_A.weight"], entry["lora_A.weight"].shape[0]
    elif "hada_w1_a" in entry:
        delta = (entry["hada_w1_a"] @ entry["hada_w1_b"]) * (entry["hada_w2_a"] @ entry["hada_w2_b"])
        rank = entry["hada_w1_b"].shape[0]
    else:
        w1 = entry["lokr_w1"] if "lokr_w1" in entry else entry["lokr_w1_a"] @ entry["lokr_w1_b"]
        w2 = entry["lokr_w2"] if "lokr_w2" in entry else entry["lokr_w2_a"] @ entry["lokr_w2_b"]
        delta = torch.kron(w1, w2)
        rank = entry["lokr_w2_b"].shape[0] if "lokr_w2_b" in entry else entry["lokr_w1_b"].shape[0] if "lokr_w1_b" in entry else None
    scale = entry["alpha"].item() / rank if "alpha" in entry and rank is not None else 1.0
    if "dora_scale" not in entry:
        return weight + scale * delta.reshape(weight.shape)
    dora_scale = entry["dora_scale"]
    assert dora_scale.shape == (weight.shape[0], 1)  # the output axis, where ComfyUI divides by the base weight's norm
    norm = weight.norm(dim=1, keepdim=True) + torch.finfo(weight.dtype).eps
    return (weight + scale * delta) * (dora_scale / norm)


def relative_difference(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """The largest relative difference of a weight (absolute where the reference is zero, as some biases are)."""
    assert sorted(ours) == sorted(reference)
    return max(((ours[k] - reference[k]).norm() / max(reference[k].norm(), 1.0)).item() for k in reference)


@pytest.fixture(scope="module")
def comfy(runs, tmp_path_factory):
    """(kind, tiny model) → (the tiny base model as motiontune's COMFY_TRANSFORMER file, what the real ComfyUI made of it
    with the default file applied: tests/comfyui/), every case in one ComfyUI process."""
    from comfyui.harness import ComfyJob, run_comfy
    from test_lora_formats import comfy_transformer_files

    cases = [(kind, family) for family in FAMILIES for kind in KINDS]
    bases, jobs = {}, []
    for kind, family in cases:
        model, _, comfy_file, _ = runs(kind, family)
        if family not in bases:
            folder = tmp_path_factory.mktemp(f"comfy-{family}")
            bases[family] = comfy_transformer_files(FAMILIES[family][0], model, folder)[""]
        jobs.append(ComfyJob(FAMILIES[family][0], bases[family], comfy_file, model))
    return {case: (bases[case[1]], result) for case, result in zip(cases, run_comfy(jobs))}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_comfyui_applies_the_file_as_the_trained_adapter_merged_by_peft(kind, family, runs, comfy):
    """ComfyUI's own LoraLoader code on the default file: every key applied, and the original-layout weights it patches
    equal the trained adapter merged by peft (in the same layout)."""
    from test_lora_formats import family_of

    model, _, _, diffusers_file = runs(kind, family)
    base, result = comfy[kind, family]
    stock = load_file(str(base))
    layout, _ = family_of(FAMILIES[family][0], model)
    reference = layout.single_file_state_dict(None, torch.float32, merged_by_peft(kind, family, model, diffusers_file))
    gap = relative_difference({**stock, **result.weights}, reference)
    change = relative_difference(reference, stock)
    print(f"{kind} on {family}: ComfyUI applied {result.lora_keys - len(result.not_loaded)}/{result.lora_keys} keys, "
          f"patched {len(result.weights)} weights; vs peft's merge {gap:.2e} (largest change {change:.2e})")
    assert result.not_loaded == [] and change > 1e-3 and gap <= EQUAL


# memory options ride along (checkpointing with block inputs in host memory, half the blocks streamed; or checkpointing)
RESUME_MEMORY = {"loha": {"gradient_checkpointing": "CPU_OFFLOADED", "layer_offload_fraction": 0.5},
                 "lokr": {"transformer": {"gradient_checkpointing": True}}, "dora": {}}


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_continued_from_a_mid_run_backup_ends_with_the_same_adapter(kind, tiny_models, clip, tmp_path):
    config = base_config(tmp_path, tiny_models("wan-2.1"), clip.parent, epochs=6, learning_rate=1e-2, backup_after=2,
                         backup_after_unit="STEP", video_config={"max_frames": 9, "target_fps": 16.0},
                         **KINDS[kind], **RESUME_MEMORY[kind])
    path = write_config(tmp_path / "config.json", **config)
    assert main(["train", "--config", str(path)]) == 0
    reference = load_file(config["output_model_destination"])
    backups = sorted((tmp_path / "workspace" / "backup").glob("step-*"))
    middle = backups[0]  # after 2 of the 6 steps
    assert json.loads((middle / "backup.json").read_text())["step"] == 2
    for later in backups[1:]:
        shutil.rmtree(later)
    Path(config["output_model_destination"]).unlink()
    assert main(["train", "--config", str(path), "--resume", str(middle)]) == 0
    resumed = load_file(config["output_model_destination"])
    assert sorted(resumed) == sorted(reference) and any(k.endswith(SUFFIXES[kind][0]) for k in resumed)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_adapter_settings_are_checked_by_name(tmp_path):
    """OneTrainer's spellings load; combinations peft cannot do are refused naming the keys and what to do."""
    from motiontune.config import ConfigError
    from motiontune.configure import load_config

    def problems(**keys) -> str:
        path = write_config(tmp_path / "c.json", **{"concepts": [{"path": str(tmp_path)}], **keys})
        with pytest.raises(ConfigError) as error:
            load_config(str(path))
        return str(error.value)

    path = write_config(tmp_path / "ot.json", peft_type="LOKR", lokr_dim=8, lokr_decompose_both=False, lokr_decompose_factor=-1,
                        lokr_use_tucker=False, lokr_weight_decompose=False, lokr_dora_on_output=True, lokr_full_matrix=False,
                        lokr_vec_trick=True, lora_decompose=False, lora_decompose_norm_epsilon=True,
                        lora_decompose_output_axis=True, min_noising_strength=0.1, max_noising_strength=0.9)
    assert load_config(str(path)).peft_type == "LOKR"
    assert "transformer.weight_dtype = FLOAT_8 with LOHA" in problems(peft_type="LOHA", transformer={"weight_dtype": "FLOAT_8"})
    assert "DoRA (lora_decompose)" in problems(lora_decompose=True, transformer={"weight_dtype": "NFLOAT_4"})
    assert "lora_decompose = true with peft_type = LOKR" in problems(peft_type="LOKR", lora_decompose=True)
    assert "lora_dropout = 0.1 with peft_type = LOHA" in problems(peft_type="LOHA", lora_dropout=0.1)
    assert "peft_type = \"OFT_2\": not supported yet" in problems(peft_type="OFT_2")
    assert "lora_decompose_output_axis = false" in problems(lora_decompose=True, lora_decompose_output_axis=False)
    assert "lokr_weight_decompose = true" in problems(peft_type="LOKR", lokr_weight_decompose=True)
    assert "peft_type" in problems(peft_type="LOCON")
    assert "text_encoder.min_noising_strength" in problems(text_encoder={"min_noising_strength": 0.2})
    assert "WAN_2_1_T2V has no second transformer" in problems(transformer_2={"max_noising_strength": 0.5})
    assert "peft_type = \"LOHA\": a FINE_TUNE run trains no adapter" in problems(peft_type="LOHA", training_method="FINE_TUNE",
                                                                                 output_model_format="DIFFUSERS")


def test_negative_controls_fail_the_comfy_check(runs, tmp_path):
    """The check above catches a wrong file: HunyuanVideo's fused LoHa entry with its q and k rows swapped, a WAN
    LoKr without its `.alpha`, a DoRA file without `dora_scale`."""
    from safetensors.torch import save_file

    def gap(kind: str, family: str, change) -> float:
        model, _, comfy_file, diffusers_file = runs(kind, family)
        entries = load_file(str(comfy_file))
        change(entries)
        save_file(entries, str(tmp_path / "changed.safetensors"))
        _, comfy = comfy_applied(kind, family, model, tmp_path / "changed.safetensors")
        return relative_difference(comfy, merged_by_peft(kind, family, model, diffusers_file))

    def swap_q_k(entries):
        key = "diffusion_model.double_blocks.0.img_attn_qkv.hada_w1_a"
        q, k, v = entries[key].chunk(3)
        entries[key] = torch.cat([k, q, v])

    def drop(suffix):
        return lambda entries: [entries.pop(k) for k in [k for k in entries if k.endswith(suffix)]]

    gaps = [gap("loha", "hunyuan-video", swap_q_k), gap("lokr", "wan-2.1", drop(".alpha")), gap("dora", "wan-2.1", drop(".dora_scale"))]
    print("negative controls (LoHa q/k swapped, LoKr without alpha, DoRA without dora_scale):", [f"{g:.2e}" for g in gaps])
    assert all(g > 1e3 * EQUAL for g in gaps)
