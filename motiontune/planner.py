"""Memory settings chosen for a card and a host (`motiontune train --gpu-gb N [--host-gb M]`).

The planner starts from the config's own memory options and tries the stronger ones motiontune has (the options
`estimate/advice.py` offers: checkpointing ON then CPU_OFFLOADED, layer offloading 0.25-1, FLOAT_8 / NFLOAT_4
frozen weights, 8-bit AdamW for a fine-tune; and, only when the user allows it, a smaller batch with more gradient
accumulation), cheapest first, and takes the first set with which every moment of the run fits both: the training
step and a first run's encoding and the samples on the card (sampling tiles its decode by itself when whole frames
do not fit), and every moment's host memory in the host's RAM. "Cheapest" is the sum of each option's cost in
advice.COSTS (docs/memory.md, "What the planner chooses"): step time for the savings that copy or recompute,
quality for those that round weights. It never undoes a saving the config already makes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from .config import TrainConfig
from .estimate import GB, Estimate, Options, estimate
from .estimate.advice import COSTS, OFFLOAD_STEPS, _offload_cost, _overrides
from .estimate.host import HOST_HEADROOM, host_usable
from .estimate.step import trained_parts

log = logging.getLogger("motiontune")

BATCH_HALVING_COST = 3.0  # each halving of the batch, its rows made up by gradient accumulation: slower steps


class PlanError(Exception):
    """Nothing fits; the message says what does not and what to change."""


@dataclass(frozen=True)
class Candidate:
    """One set of memory options the planner may choose, and the batch it trains (None: the config's)."""

    options: Options
    batch_halvings: int = 0


@dataclass
class Plan:
    candidate: Candidate
    cost: float
    estimate: Estimate
    overrides: list[str]  # --set KEY=VALUE that make it
    changes: list[str]  # human-readable
    gpu_bytes: int
    host_bytes: int
    moments: dict[str, tuple[int, int]] = field(default_factory=dict)  # moment → (device bytes, host bytes)

    def describe(self) -> str:
        return ", ".join(self.changes) or "the config's own memory options"


def machine_ram() -> int:
    """This machine's RAM in bytes (the default host size)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**62


def card_gb(config: TrainConfig) -> float:
    """`memory: auto`: the memory of the GPU the run trains on, in GB; PlanError where there is none to size for."""
    import torch

    if config.train_device in ("cpu", "mps") or not torch.cuda.is_available():
        raise PlanError("memory: auto chooses the memory options for this machine's CUDA GPU, and PyTorch sees none "
                        f"(train_device {config.train_device!r}): give the card's size with `train --gpu-gb N`, or set "
                        "memory to manual")
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GB


def base_options(config: TrainConfig) -> Options:
    return Options.of(config, trained_parts(config)[0])


def quantizable(config: TrainConfig) -> bool:
    """FLOAT_8 / NFLOAT_4 apply to frozen weights of plain LoRA adapters, embeddings (config/load.py refuses the rest)."""
    if config.training_method == "FINE_TUNE":
        return False
    return config.training_method != "LORA" or (config.peft_type == "LORA" and not config.lora_decompose)


def cost(config: TrainConfig, candidate: Candidate) -> float:
    """What a candidate costs beyond the config's own options: the sum of its changes' costs (advice.COSTS)."""
    base, new = base_options(config), candidate.options
    total = 0.0
    if new.checkpointing != base.checkpointing:
        total += COSTS[new.checkpointing][0] - COSTS.get(base.checkpointing, (0.0,))[0]
    if new.offload_fraction != base.offload_fraction:
        total += _offload_cost(new.offload_fraction) - (_offload_cost(base.offload_fraction) if base.offload_fraction else 0)
    if new.weight_dtype != base.weight_dtype:
        total += COSTS[new.weight_dtype][0] - COSTS.get(base.weight_dtype, (0.0,))[0]
    if new.optimizer != base.optimizer:
        total += COSTS[new.optimizer][0]
    return total + BATCH_HALVING_COST * candidate.batch_halvings


def candidates(config: TrainConfig, allow_smaller_batch: bool = False) -> list[Candidate]:
    """Every option set the planner may choose, cheapest first (none weaker than the config's own)."""
    base = base_options(config)
    order = ["OFF", "ON", "CPU_OFFLOADED"]
    checkpointing = order[order.index(base.checkpointing):]
    frozen = config.training_method != "FINE_TUNE"  # offloading and quantizing apply to weights that do not train
    fractions = [base.offload_fraction] + ([f for f in OFFLOAD_STEPS if f > base.offload_fraction] if frozen else [])
    dtypes = [base.weight_dtype]
    if quantizable(config) and base.compute_dtype is None:  # FLOAT_8 / INT_8 compute reads the unquantized weight
        dtypes += {"FLOAT_8": ["NFLOAT_4"], "NFLOAT_4": []}.get(base.weight_dtype, ["FLOAT_8", "NFLOAT_4"])
    optimizers = [base.optimizer] + (["ADAMW_8BIT"] if base.optimizer == "ADAMW" and not frozen else [])
    halvings = range(max_halvings(config) + 1) if allow_smaller_batch else [0]
    seen, found = set(), []
    for c in checkpointing:
        for f in fractions:
            for d in dtypes:
                for o in optimizers:
                    options = Options(c, f, base.prefetch, d, o, base.compute_dtype).effective()  # offloading turns checkpointing on
                    for h in halvings:
                        if (options, h) not in seen:
                            seen.add((options, h))
                            found.append(Candidate(options, h))
    return sorted(found, key=lambda candidate: cost(config, candidate))


def max_halvings(config: TrainConfig) -> int:
    halvings, batch = 0, config.batch_size
    while batch > 1:
        batch //= 2
        halvings += 1
    return halvings


def configured(config: TrainConfig, candidate: Candidate) -> TrainConfig:
    """The config with a candidate's batch (its rows made up by gradient accumulation)."""
    if not candidate.batch_halvings:
        return config
    factor = 2 ** candidate.batch_halvings
    return config.model_copy(update={"batch_size": max(1, config.batch_size // factor),
                                     "gradient_accumulation_steps": config.gradient_accumulation_steps * factor})


_EVALUATED: dict = {}


def evaluate(config: TrainConfig, candidate: Candidate) -> Estimate:
    """The estimate of every moment of a run with a candidate's options, as it would run on a CUDA card (kept:
    a plan for another card or host asks again)."""
    key = (config.model_dump_json(), candidate)
    if key not in _EVALUATED:
        _EVALUATED[key] = estimate(configured(config, candidate), options=candidate.options, phases=True)
    return _EVALUATED[key]


def moments(result: Estimate, gpu_bytes: int) -> dict[str, tuple[int, int]]:
    """Each moment's (device bytes on a card of `gpu_bytes`, host bytes); host-only moments have 0 device bytes."""
    found = {"training step": (result.device, 0)}
    for name in result.phases:
        found[name] = (result.phase_peak(name, gpu_bytes), 0)
    for name, lines in result.host_moments.items():
        device = found.get(name, (0, 0))[0]
        found[name] = (device, sum(line.host for line in lines))
    return found


def misfits(result: Estimate, gpu_bytes: int, host_bytes: int) -> list[str]:
    """The moments that do not fit the card or the host (empty: everything fits)."""
    card, ram = result.usable(gpu_bytes), host_usable(host_bytes)
    over = []
    for name, (device, host) in moments(result, gpu_bytes).items():
        if device > card:
            over.append(f"{name}: {device / GB:.1f} GB on the card (usable {card / GB:.1f})")
        if host > ram:
            over.append(f"{name}: {host / GB:.1f} GB of host memory (usable {ram / GB:.1f})")
    return over


def plan(config: TrainConfig, gpu_gb: float, host_gb: float | None = None, allow_smaller_batch: bool = False) -> Plan:
    """The cheapest candidate with which every moment fits a `gpu_gb` card and a `host_gb` host (default: this
    machine's RAM); PlanError when none does."""
    gpu_bytes = int(gpu_gb * GB)
    host_bytes = int(host_gb * GB) if host_gb else machine_ram()
    base = base_options(config)
    tried = []
    for candidate in candidates(config, allow_smaller_batch):
        result = evaluate(config, candidate)
        tried.append(result)
        if not misfits(result, gpu_bytes, host_bytes):
            sets, words, _ = _overrides(config, base, candidate.options)
            if candidate.batch_halvings:
                smaller = configured(config, candidate)
                sets += [f"batch_size={smaller.batch_size}",
                         f"gradient_accumulation_steps={smaller.gradient_accumulation_steps}"]
                words.append(f"batch {smaller.batch_size} × {smaller.gradient_accumulation_steps} accumulated")
            return Plan(candidate, cost(config, candidate), result, sets, words, gpu_bytes, host_bytes,
                        moments(result, gpu_bytes))
    raise PlanError(_refusal(tried, gpu_bytes, host_bytes, allow_smaller_batch))


def _refusal(tried: list[Estimate], gpu_bytes: int, host_bytes: int, allow_smaller_batch: bool) -> str:
    """The moments that fit with no option set (each at the least any set brings it to), and what to change."""
    card, ram = tried[0].usable(gpu_bytes), host_usable(host_bytes)
    least: dict[str, list[int]] = {}
    for result in tried:
        for name, (device, host) in moments(result, gpu_bytes).items():
            best = least.setdefault(name, [device, host])
            best[0], best[1] = min(best[0], device), min(best[1], host)
    over = [f"{name}: at least {device / GB:.1f} GB on the card (usable {card / GB:.1f})"
            for name, (device, _) in least.items() if device > card]
    over += [f"{name}: at least {host / GB:.1f} GB of host memory (usable {ram / GB:.1f})"
             for name, (_, host) in least.items() if host > ram]
    if not over:  # each moment fits with some set, but no one set fits them all
        over = ["no single option set fits every moment: " + "; ".join(misfits(tried[-1], gpu_bytes, host_bytes))]
    advice = []
    names = " ".join(over)
    if "training step" in names and "on the card" in names:
        advice.append("fewer frames (video_config.max_frames), a lower resolution"
                      + ("" if allow_smaller_batch else ", or a smaller batch (allow it: --allow-smaller-batch)"))
    if "sample" in names:
        advice.append("leave `samples` empty (a sample needs the transformer on the card) and render afterwards")
    if "encoding" in names or "captions" in names:
        advice.append("fill the cache first on a larger card (`motiontune cache`; the cache is kept per dtype) or "
                      "with text_encoder.weight_dtype FLOAT_8")
    if "host memory" in names:
        need = max(host for _, host in least.values())
        advice.append(f"a host with at least {need / (1 - HOST_HEADROOM) / GB:.0f} GB of RAM (--host-gb)")
    return (f"no memory options make every moment of this run fit a {gpu_bytes / GB:g} GB card and a "
            f"{host_bytes / GB:.0f} GB host ({len(tried)} option sets tried); these do not fit:\n  "
            + "\n  ".join(over) + "\nWhat to change: " + "; ".join(advice or ["a larger card or host"]))


def log_plan(chosen: Plan) -> None:
    log.info("memory plan for a %g GB card and a %.0f GB host: %s (cost %.1f)", chosen.gpu_bytes / GB,
             chosen.host_bytes / GB, chosen.describe(), chosen.cost)
    for name, (device, host) in chosen.moments.items():
        log.info("  %-22s %6.1f GB on the card, %6.1f GB of host memory", name, device / GB, host / GB)
    if chosen.overrides:
        log.info("  as overrides: %s", " ".join(f"--set {s}" for s in chosen.overrides))

