"""The memory planner (motiontune/planner.py) and the estimate it stands on, for every shipped preset at full size.

Each preset's tests share one xdist group, so its simulations (kept per process) are made once. Nothing here is
timed: the estimate's cost is counted in fake ops (models/fake_memory.py), which its time follows."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import pytest

from motiontune.config import list_presets
from motiontune.configure import load_config
from motiontune.estimate import GB, EstimateError, Options, estimate
from motiontune.estimate.host import HOST_HEADROOM, LOADING, HOST_STEP, pinned
from motiontune.models.fake_memory import LiveBytes
from motiontune.planner import Candidate, PlanError, base_options, cost, evaluate, plan

FIGURES = json.loads((Path(__file__).parent / "data" / "estimate_figures.json").read_text())
CARDS, HOSTS = (8, 12, 16, 24, 48, 80), (32, 128)
TOLERANCE = 0.005  # the figures recorded before this work: each within half a percent
OPS_BUDGET = 60_000  # fake ops of one preset's whole estimate, every moment: a few seconds on 2 cores


def per_preset(names):
    return [pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in names]


# The suite checks a preset of each kind (a few seconds of fake ops each on a quiet machine, minutes when loaded);
# MOTIONTUNE_ALL_PRESET_PLANS=1 checks every shipped preset.
IN_THE_SUITE = ["#wan 2.2 LoRA 8GB", "#wan 2.2 LoRA", "#hunyuan video 1.5 LoRA", "#hidream Finetune", "#hidream Embedding"]
CHECKED = list_presets() if os.environ.get("MOTIONTUNE_ALL_PRESET_PLANS") else IN_THE_SUITE


# the embedding presets whose live text encoder the estimate does not model
NOT_ESTIMABLE = {"#hidream Embedding", "#hunyuan video Embedding"}


def estimable(preset: str) -> bool:
    return preset not in NOT_ESTIMABLE


@pytest.mark.parametrize("preset", per_preset([p for p in CHECKED if p in FIGURES or p in NOT_ESTIMABLE]))
def test_the_figures_are_those_recorded_before_the_estimate_was_made_fast(preset):
    config = load_config(preset)
    if not estimable(preset):
        with pytest.raises(EstimateError, match="text encoder that trains live"):
            estimate(config, phases=True)
        return
    before = LiveBytes.all_ops
    result = estimate(config, phases=True)
    ops = LiveBytes.all_ops - before
    recorded = FIGURES[preset]
    now = {line.name: [line.device, line.host] for line in result.lines}
    assert set(now) == set(recorded["step"])
    for name, (device, host) in recorded["step"].items():
        assert now[name][0] == pytest.approx(device, rel=TOLERANCE, abs=2**20), name
        assert now[name][1] == pytest.approx(host, rel=TOLERANCE, abs=2**20), name
    moments = {name: sum(line.device for line in lines) for name, lines in result.phases.items()}
    assert moments == pytest.approx(recorded["moments"], rel=TOLERANCE)
    assert result.tiled_decode == pytest.approx(recorded["tiled_decode"], rel=TOLERANCE)
    print(f"{preset}: step {result.device / GB:.2f} GB (recorded {sum(d for d, _ in recorded['step'].values()) / GB:.2f}), "
          f"{ops} fake ops")
    assert ops < OPS_BUDGET  # cold: a second estimate of the same preset costs none


def test_the_step_is_simulated_with_three_blocks_of_each_kind_whatever_the_depth():
    """A 40-block model is simulated with 3 blocks; 40 runs of a block would be the full depth's cost."""
    from motiontune.estimate import simulation, transformer_config
    from motiontune.estimate.shapes import make_shape

    config = load_config("#wan 2.1 LoRA")
    cfg = dict(transformer_config(config)[0], num_layers=40)
    shape = make_shape(config, 1, 9, 128, 128)
    runs = []
    original = simulation.meta_transformer

    def counting(*args, **kwargs):
        model = original(*args, **kwargs)
        for block in model.blocks:
            block.register_forward_pre_hook(lambda *_: runs.append(1))
        return model

    simulation.meta_transformer = counting
    try:
        simulation._STEPS.clear()
        simulation.activation_peak(cfg, config, shape, True, False)
    finally:
        simulation.meta_transformer = original
    print(f"block runs for a 40-block step with checkpointing: {len(runs)}")
    assert len(runs) == 3 * 2  # three blocks, each run forward and again in backward's recompute


def all_option_sets(config) -> list[Candidate]:
    """Every combination of the memory options, written out here apart from the planner's own list: the config's
    checkpointing or stronger, layer offloading from the config's fraction up, frozen weights in the config's
    dtype or a smaller one, 8-bit AdamW for a fine-tune."""
    base = base_options(config)
    levels = ["OFF", "ON", "CPU_OFFLOADED"]
    fine_tune = config.training_method == "FINE_TUNE"
    plain_lora = config.training_method != "LORA" or (config.peft_type == "LORA" and not config.lora_decompose)
    dtypes = {"FLOAT_8": ["FLOAT_8", "NFLOAT_4"], "NFLOAT_4": ["NFLOAT_4"]}.get(base.weight_dtype,
                                                                               [base.weight_dtype, "FLOAT_8", "NFLOAT_4"])
    sets = set()
    for c, f, d, o in itertools.product(
            levels[levels.index(base.checkpointing):],
            [base.offload_fraction] if fine_tune else sorted({base.offload_fraction, *(x for x in (0.25, 0.5, 0.75, 1.0)
                                                                                     if x > base.offload_fraction)}),
            [base.weight_dtype] if fine_tune or not plain_lora else dtypes,
            [base.optimizer, "ADAMW_8BIT"] if fine_tune and base.optimizer == "ADAMW" else [base.optimizer]):
        sets.add(Candidate(Options(c, f, base.prefetch, d, o).effective()))
    return sorted(sets, key=lambda s: cost(config, s))


def fits_both(result, gpu_gb: float, host_gb: float) -> bool:
    """Every moment within the card (95 %) and the host (90 %), read off the estimate itself."""
    card, ram = int(gpu_gb * GB * 0.95), int(host_gb * GB * (1 - HOST_HEADROOM))
    device = [result.device] + [result.phase_peak(name, int(gpu_gb * GB)) for name in result.phases]
    host = [sum(line.host for line in lines) for lines in result.host_moments.values()]
    return max(device) <= card and max(host) <= ram


@pytest.mark.parametrize("preset", per_preset(CHECKED))
def test_the_plan_fits_card_and_host_and_no_cheaper_option_set_does(preset):
    config = load_config(preset)
    if not estimable(preset):
        with pytest.raises(EstimateError):
            plan(config, 24, 128)
        return
    every = all_option_sets(config)
    table = []
    for gpu, host in itertools.product(CARDS, HOSTS):
        try:
            chosen = plan(config, gpu, host)
        except PlanError as refusal:
            assert "What to change:" in str(refusal)
            chosen = None
        if chosen:
            assert fits_both(chosen.estimate, gpu, host)
            assert chosen.candidate in every  # the plan is one of the sets enumerated here
        limit = chosen.cost if chosen else math.inf
        cheaper = [s for s in every if cost(config, s) < limit - 1e-9]
        assert not [s for s in cheaper if fits_both(evaluate(config, s), gpu, host)], (gpu, host)
        table.append(f"{gpu:>3} GB / {host:>3} GB: " + (f"{chosen.describe()} (cost {chosen.cost:g}; step "
                                                        f"{chosen.estimate.device / GB:.1f} GB, host "
                                                        f"{chosen.estimate.host_peak / GB:.1f} GB)" if chosen else "refused"))
    print(f"\n{preset} ({len(every)} option sets):\n  " + "\n  ".join(table))


def test_a_refusal_names_the_moment_and_what_to_change():
    config = load_config("#wan 2.2 LoRA")
    with pytest.raises(PlanError) as refusal:
        plan(config, 80, 32)
    message = str(refusal.value)
    print(message)
    assert "loading the model" in message and "host memory" in message and "--host-gb" in message


def test_the_host_side_of_musubi_tuners_documented_a14b_setting():
    """musubi-tuner docs/wan.md: both A14B experts in fp8 with the inactive one offloaded need "about 42GB of shared
    VRAM for the two models combined, which means that about 96GB or more of main RAM" (Windows gives shared GPU
    memory at most half the RAM). motiontune's host side for the same setting: docs/memory.md compares."""
    config = load_config("#wan 2.2 LoRA", ["transformer.train=true", "transformer.weight_dtype=FLOAT_8",
                                           "transformer_2.weight_dtype=FLOAT_8"])
    result = estimate(config, phases=True)
    moments = {name: sum(line.host for line in lines) for name, lines in result.host_moments.items()}
    step = {line.name: line.host for line in result.host_moments[HOST_STEP]}
    both_fp8 = step["the other expert"] + result.lines[0].device  # the trained expert is the one on the card
    print({name: f"{value / GB:.1f} GB" for name, value in moments.items()},
          f"two FLOAT_8 experts {both_fp8 / GB:.1f} GB; as Windows counts shared memory: {2 * both_fp8 / GB:.1f} GB")
    # the waiting expert is one FLOAT_8 expert: its frozen Linear weights at a byte each, plus its LoRA
    assert 13 * GB < step["the other expert"] < 15 * GB
    # the peak is loading, where both experts arrive in bf16 before FLOAT_8 applies
    assert result.host_peak == moments[LOADING]
    assert 50 * GB < moments[LOADING] < 60 * GB
    assert moments[HOST_STEP] < 0.4 * 96 * GB


def test_pinned_buffers_are_counted_at_the_host_allocators_power_of_two():
    assert [pinned(n) for n in (0, 1, 4096, 4097, 143_769_600)] == [0, 1, 4096, 8192, 268_435_456]
    config = load_config("#wan 2.2 LoRA")
    plain = estimate(config)
    offloaded = estimate(config, options=Options("CPU_OFFLOADED", 0.5, 2, "BFLOAT_16", "ADAMW"))
    step = {line.name: line.host for line in offloaded.host_moments[HOST_STEP]}
    assert step["offloaded blocks (pinned)"] > 20 * plain.lines[0].host  # 20 blocks, each weight rounded up
    inputs = next(line.host for line in offloaded.lines if line.name.startswith("activations"))
    assert step["block inputs, CPU_OFFLOADED (pinned)"] > inputs  # the same tensors, each rounded up
    assert offloaded.host_peak >= sum(step.values())


def test_hunyuan_video_15_frame_causal_mask_is_diffusers_mask():
    import torch
    from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import HunyuanVideo15AttnBlock

    from motiontune.models.hunyuan15 import frame_causal_mask

    for frames, hw, batch in ((1, 6, None), (3, 4, 2), (5, 3, None)):
        ours = frame_causal_mask(frames, hw, torch.float32, "cpu", batch)
        theirs = HunyuanVideo15AttnBlock.prepare_causal_attention_mask(frames, hw, torch.float32, "cpu", batch)
        assert torch.equal(ours, theirs)


@pytest.mark.xdist_group("#wan 2.2 LoRA 8GB")
def test_train_refuses_before_loading_anything_when_nothing_fits(capsys):
    from motiontune.cli import main

    assert main(["train", "--config", "#wan 2.2 LoRA 8GB", "--gpu-gb", "4", "--host-gb", "64"]) == 2
    err = capsys.readouterr().err
    print(err)
    assert "4 GB card" in err and "captions" in err and "What to change:" in err


@pytest.mark.xdist_group("#wan 2.2 LoRA 8GB")
def test_memory_auto_plans_for_the_machines_card_as_gpu_gb_does(tmp_path, capsys, monkeypatch):
    """`memory: auto` asks the planner for the card PyTorch sees: none here, so a clear refusal; with an 80 GB card (as
    `torch.cuda` would report it) the plan `--gpu-gb 80` logs (the preset's own options fit: one estimate), then the
    run goes on to its data (an empty folder here: it stops there, before any model loads)."""
    from motiontune import planner
    from motiontune.cli import main

    (tmp_path / "empty").mkdir()
    where = ["--set", f"concepts={json.dumps([{'path': str(tmp_path / 'empty')}])}", "--set", f"workspace_dir={tmp_path / 'w'}",
             "--set", f"cache_dir={tmp_path / 'c'}", "--host-gb", "64"]
    auto = ["train", "--config", "#wan 2.2 LoRA 8GB", "--set", "memory=auto", *where]
    assert main(auto) == 2
    err = capsys.readouterr().err
    assert "memory: auto" in err and "--gpu-gb N" in err and "sees none" in err

    monkeypatch.setattr(planner, "card_gb", lambda config: 80.0)
    assert main(auto) == 2  # planned, then no training file in the dataset
    by_card = capsys.readouterr().err
    assert main(["train", "--config", "#wan 2.2 LoRA 8GB", "--gpu-gb", "80", *where]) == 2
    assert "memory plan for a 80 GB card and a 64 GB host" in by_card and "no training files found" in by_card
    assert by_card == capsys.readouterr().err
