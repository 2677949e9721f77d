"""What to change so a step fits a card: the memory options tried in order of their cost, cheapest first."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainConfig
from .result import Estimate, Options, Shape
from .step import estimate, trained_parts

# (what changes, its cost in speed or quality, the order in which to reach for it)
COSTS = {
    "ON": (1.0, "recomputes each block in backward (about a third slower)"),
    "CPU_OFFLOADED": (1.5, "checkpointing ON, and block inputs copied to host memory and back"),
    "FLOAT_8": (2.0, "frozen weights rounded to 8 bits: a small quality cost"),
    "ADAMW_8BIT": (2.0, "optimizer moments in 8 bits"),
    "NFLOAT_4": (4.0, "frozen weights in 4 bits (QLoRA's NF4): a larger quality cost"),
}
OFFLOAD_STEPS = (0.25, 0.5, 0.75, 1.0)


def _offload_cost(fraction: float) -> float:
    """Offloaded blocks' weights cross PCIe twice a step (forward and recompute): slower the more are offloaded."""
    return 1.0 + 4.0 * fraction


@dataclass
class Change:
    options: Options
    estimate: Estimate
    cost: float
    changes: list[str]  # human-readable
    overrides: list[str]  # --set KEY=VALUE that make it

    def describe(self) -> str:
        return ", ".join(self.changes)


def _overrides(config: TrainConfig, base: Options, new: Options) -> tuple[list[str], list[str], float]:
    """The --set overrides (in the config's own OneTrainer form) that turn `base` into `new`, what they mean,
    and their cost."""
    parts = trained_parts(config)
    newer = config.memory_config_form.startswith("newer") or config.memory_config_form == "default"
    sets, words, cost = [], [], 0.0
    if new.checkpointing != base.checkpointing:
        cost += COSTS.get(new.checkpointing, (0.0,))[0] - COSTS.get(base.checkpointing, (0.0,))[0]
        words.append(f"gradient checkpointing {new.checkpointing}")
        for part in parts if newer else []:
            sets.append(f"{part}.gradient_checkpointing=true")
            sets.append(f"{part}.activation_offloading={'true' if new.checkpointing == 'CPU_OFFLOADED' else 'false'}")
        if not newer:
            sets.append(f"gradient_checkpointing={new.checkpointing}")
    if new.offload_fraction != base.offload_fraction:
        cost += _offload_cost(new.offload_fraction)
        words.append(f"layer offloading {new.offload_fraction:g}")
        sets += [f"{part}.offload_fraction={new.offload_fraction:g}" for part in parts] if newer else \
            [f"layer_offload_fraction={new.offload_fraction:g}"]
    if new.weight_dtype != base.weight_dtype:
        cost += COSTS[new.weight_dtype][0]
        words.append(f"{new.weight_dtype} weights")
        sets += [f"{part}.weight_dtype={new.weight_dtype}" for part in parts]
    if new.optimizer != base.optimizer:
        cost += COSTS[new.optimizer][0]
        words.append(f"{new.optimizer} optimizer")
        sets.append(f"optimizer.optimizer={new.optimizer}")
    return sets, words, cost


def _candidates(config: TrainConfig, base: Options) -> list[Options]:
    checkpointing = {"OFF": ["OFF", "ON", "CPU_OFFLOADED"], "ON": ["ON", "CPU_OFFLOADED"]}.get(base.checkpointing, [base.checkpointing])
    dtypes = [base.weight_dtype]
    # a fine-tune trains the weights quantization would freeze; FLOAT_8 / INT_8 compute reads the unquantized weight
    if config.training_method != "FINE_TUNE" and base.compute_dtype is None:
        dtypes += [d for d in ("FLOAT_8", "NFLOAT_4") if d != base.weight_dtype and not (base.weight_dtype == "NFLOAT_4")]
    fractions = [base.offload_fraction] + ([f for f in OFFLOAD_STEPS if f > base.offload_fraction]
                                           if config.training_method != "FINE_TUNE" else [])
    optimizers = [base.optimizer] + (["ADAMW_8BIT"] if base.optimizer == "ADAMW" and config.training_method == "FINE_TUNE" else [])
    return [Options(c, f, base.prefetch, d, o, base.compute_dtype) for c in checkpointing for d in dtypes for f in fractions for o in optimizers]


def cheapest_changes(config: TrainConfig, gpu_bytes: int, shape: Shape | None = None, limit: int = 3,
                     processes: int = 1) -> list[Change]:
    """Memory options that make a step fit in `gpu_bytes`, cheapest first (empty: nothing fits at this shape).
    Candidates are tried in order of cost, so a config that fits cheaply costs few simulations."""
    base = Options.of(config, trained_parts(config)[0])
    ranked = []
    for options in _candidates(config, base):
        if options != base:
            sets, words, cost = _overrides(config, base, options.effective() if options.offload_fraction else options)
            ranked.append((cost, options, sets, words))
    ranked.sort(key=lambda entry: entry[0])
    found: list[Change] = []
    for cost, options, sets, words in ranked:
        if any(set(change.changes) <= set(words) for change in found):
            continue  # adds to a cheaper change that already fits
        result = estimate(config, shape=shape, options=options, processes=processes)
        if result.fits(gpu_bytes):
            found.append(Change(options, result, cost, words, sets))
            if len(found) == limit:
                break
    return found


def smallest_floor(config: TrainConfig, shape: Shape | None = None, processes: int = 1) -> Estimate:
    """The estimate with every memory option at its strongest (how low this shape can go)."""
    base = Options.of(config, trained_parts(config)[0])
    strongest = Options("CPU_OFFLOADED", 1.0 if config.training_method != "FINE_TUNE" else base.offload_fraction, 1,
                        "NFLOAT_4" if config.training_method != "FINE_TUNE" and base.compute_dtype is None else base.weight_dtype,
                        "ADAMW_8BIT" if config.training_method == "FINE_TUNE" and base.optimizer == "ADAMW" else base.optimizer,
                        base.compute_dtype)
    return estimate(config, shape=shape, options=strongest, processes=processes)
