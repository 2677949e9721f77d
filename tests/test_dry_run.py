"""`motiontune check`: the real code path of a run on a fake CUDA device, at the released models' sizes, finds the
device bugs users hit on their first GPU run (each planted in the real code), and passes the shipped presets."""

import json
import os
import time
from pathlib import Path

import pytest

from motiontune.check import check
from motiontune.check.report import report

TESTS = Path(__file__).parent
PRESETS = TESTS.parent / "motiontune" / "config" / "presets"


def short_transformer(tmp_path: Path, release_config: dict, blocks: int) -> Path:
    """A folder with a released transformer's config at fewer blocks (real width): `transformer.model_name` points
    estimate's config lookup, and so the dry run, at it."""
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(release_config, num_layers=blocks)))
    return folder


def wan_13b_config() -> dict:
    from motiontune.models.wan import RELEASES

    return RELEASES["Wan-AI/Wan2.1-T2V-1.3B-Diffusers"]["transformer"]


def run(preset: str, overrides=(), before=(), gpu_gb=24.0, monkeypatch=None) -> dict:
    started = time.perf_counter()
    result = check(preset, list(overrides), gpu_gb=gpu_gb, before=list(before))
    print(f"\n{report(preset, result)}\n{preset} {' '.join(overrides)}: {time.perf_counter() - started:.1f} s")
    return result


def by_kind(result: dict, kind: str) -> list[dict]:
    return [f for f in result["findings"] if f["kind"] == kind]


PLANTS = ["dry_run_plants:cpu_tensor_in_step", "dry_run_plants:cpu_generator_for_cuda_noise",
          "dry_run_plants:saved_tensor_left_on_device"]


def test_three_planted_device_bugs_are_each_reported_with_module_and_origin(tmp_path, monkeypatch):
    """WAN 2.1 1.3B at its real width (two of its blocks), with a CPU tensor made inside the step, a CPU generator
    for the GPU noise and a LoRA saved from the device: each is a finding naming where, the module and the origin.
    A process of its own: after other runs in the same process, the saved LoRA's finding goes missing (seen once,
    not yet explained)."""
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}:{Path(__file__).parents[1]}")
    short = short_transformer(tmp_path, wan_13b_config(), 2)
    result = run("#wan 2.1 LoRA", [f"transformer.model_name={short}", "video_config.max_frames=9", "resolution=256x256",
                                   "samples=[]"], before=PLANTS)
    assert [s["status"] for s in result["stages"]] == ["ok"] * 7

    [mismatch] = by_kind(result, "mismatch")
    assert mismatch["stage"] == "training step"
    assert mismatch["module"].startswith("transformer.condition_embedder")  # where the host tensor met the weights
    assert any("cpu" in o and "dry_run_plants.py" in o and "predict_with_host_sigma" in o for o in mismatch["origins"])

    [generator] = by_kind(result, "generator")
    assert generator["stage"] == "training step"
    assert "made for cpu" in generator["message"] and "init_with_host_generator" in generator["message"]
    assert generator["where"][0].startswith("motiontune/train/step.py")  # the step's noise draw

    [saved] = by_kind(result, "saved")
    assert saved["stage"] == "save"
    assert "lora_A.weight" in saved["message"] and "cuda:0" in saved["message"]
    assert any(w.startswith("motiontune/methods/lora.py") for w in saved["where"])
    assert saved["origins"] and all(o.startswith("cuda:0") for o in saved["origins"])
    assert not by_kind(result, "error")


MEMORY_OPTIONS = ["video_config.max_frames=9", "resolution=256x256", "transformer.activation_offloading=true",
                  "transformer.offload_fraction=0.5", "transformer.weight_dtype=NFLOAT_4"]


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory, tiny_models):
    """The dry runs without plants in one process (one start-up): the memory options' run on the short WAN 2.1
    model, then one preset of each family on its tiny model. The libraries' objects are frozen out of the collector's reach first
    (tests/dry_run_plants.py), which the runs' frequent `gc.collect` would otherwise scan each time."""
    short = short_transformer(tmp_path_factory.mktemp("short"), wan_13b_config(), 2)
    sample = {"prompt": "a clip", "frames": 9, "height": 384, "width": 384, "steps": 2, "cfg_scale": 4.0, "seed": 1, "fps": 16}
    memory = {"config": "#wan 2.1 LoRA", "overrides": [f"transformer.model_name={short}", *MEMORY_OPTIONS,
                                                      f"samples={json.dumps([sample])}"], "gpu_gb": 0.1}
    families = tiny_runs(tiny_models)
    started = time.perf_counter()
    from motiontune.check import check_several

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", f"{TESTS}:{Path(__file__).parents[1]}")
        results = check_several([memory, *families], before=["dry_run_plants:imported_objects_frozen"])
    print(f"\nthe memory options' run and {len(families)} families at tiny size: {time.perf_counter() - started:.1f} s")
    return {"memory": (memory["config"], results[0]), "families": [(run[0], result) for run, result in zip(families, results[1:])]}


@pytest.mark.xdist_group("dry-run")
def test_every_memory_option_runs_clean_without_plants(dry_runs):
    """The same short model (two blocks, one of them offloaded) without plants, with CPU_OFFLOADED checkpointing,
    layer offloading and NFLOAT_4 weights, and a decode too large for the card (tiles): no finding. (Before layer
    offloading moved NF4 weights whole, this found their lookup table left in host memory.)"""
    preset, result = dry_runs["memory"]
    print(f"\n{report(preset, result)}")
    assert result["gpu_gb"] == 0.1
    assert result["findings"] == []
    assert [s["status"] for s in result["stages"]] == ["ok"] * 7


def one_preset_per_family() -> list[Path]:
    """A text-to-video (or image) LoRA preset of each family module: the first that names one of its model types."""
    from motiontune.models.registry import families

    from motiontune.configure import validate

    def needs_inputs(preset: Path) -> bool:  # a first frame, or a condition beside each clip: not a plain preset
        config = validate(json.loads(preset.read_text()))
        family = family_class(config.model_type)
        return family.first_frame(config.model_type) == "required" or bool(family.condition_roles(config))

    from motiontune.models.registry import family_class

    presets = sorted(PRESETS.glob("*.json"))
    chosen = []
    for family in families():
        mine = [p for p in presets if json.loads(p.read_text()).get("model_type", "WAN_2_1_T2V") in family.MODEL_TYPES]
        plain = [p for p in mine if "LoRA" in p.stem and not needs_inputs(p)]
        chosen.append((plain or mine)[0])
    return chosen


def tiny_runs(tiny_models) -> list[tuple[str, list[str]]]:
    """One preset of each family on its tiny model (base_model_name: the dry run reads a local folder's configs). WAN
    2.1's too: the planted test runs its stages but only its plants are findings there, and the memory options' run
    decodes its sample tiled, so its whole-frame decode is checked only here."""
    from motiontune.models.registry import family_class

    runs = []
    for path in one_preset_per_family():
        preset = json.loads(path.read_text())
        model_type = preset.get("model_type", "WAN_2_1_T2V")
        tiny = family_class(model_type).tiny_model(model_type)
        size = 64 if tiny.startswith("ltx") else 32  # LTX-2's decoder needs two latent pixels a side
        frames = 1 if preset.get("video_config", {}).get("max_frames") == 1 else 9
        sample = {"prompt": "a clip", "frames": frames, "height": size, "width": size, "steps": 1, "seed": 1, "fps": 8}
        runs.append((path.stem, [f"base_model_name={tiny_models(tiny)}", f"resolution={size}",
                                 f"video_config.max_frames={frames}", f"samples={json.dumps([sample])}"]))
    return runs


@pytest.mark.xdist_group("dry-run")
def test_every_family_runs_clean_at_tiny_size(dry_runs):
    """One preset of each family, on its tiny model, every stage in one process: each family's load, encodings,
    step, backup, save and sample code runs on the fake GPU without a finding. The full sizes are the opt-in test
    below."""
    runs = dry_runs["families"]
    for preset, result in runs:
        print(report(preset, result))
    assert len(runs) == len(one_preset_per_family())
    assert {preset: result["findings"] for preset, result in runs if result["findings"]} == {}
    assert all([s["status"] for s in result["stages"]] == ["ok"] * 7 for _, result in runs)
    # what a CPU cannot check is in every report (and docs/memory.md): streams and events, pinned copies
    printed = report(*runs[0])
    assert "CUDA streams and events" in printed and "pinned host memory" in printed


# a full-depth run of a released model is minutes of Python per op on two cores: outside the suite's budget, run on
# demand (docs/memory.md has each preset's time from `motiontune check`)
@pytest.mark.skipif(not os.environ.get("MOTIONTUNE_FULL_SIZE_CHECKS"),
                    reason="a full-size dry run takes minutes: MOTIONTUNE_FULL_SIZE_CHECKS=1 runs it")
@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS.glob("*.json")))
def test_a_shipped_preset_passes_at_its_real_size(preset):
    result = run(preset, gpu_gb=8.0 if "8GB" in preset else 24.0)
    assert result["findings"] == []
    assert [s["status"] for s in result["stages"]] == ["ok"] * 7
