"""Backups a run can continue from exactly: adapters, optimizer and schedule state, where the data
order stands, every random generator, and the config they came from.

A backup is a folder written under a temporary name, every file flushed to disk, then renamed into
place, so the previous backup stays valid until the new one is complete. State is loaded with
`torch.load(weights_only=True)`: a backup cannot run code.

With several ranks, rank 0 writes the backup: every rank's random state, and, for a sharded fine-tune,
the weights and optimizer state gathered whole; with split experts, each expert's state sent by its group. It continues only on the same number of ranks (another
count would change the global batch). Every rank must reach a shared folder to continue.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config import ConfigError, TrainConfig
from ..util.files import WRITE_ERRORS, replacing, write_error_reason
from ..util.ranks import Ranks
from . import distributed

log = logging.getLogger("motiontune")

# Settings a run may change when it continues from a backup: they do not touch the training math.
RESUME_SAFE_KEYS = {
    "samples", "sample_after", "sample_after_unit", "save_every", "save_every_unit", "backup_after",
    "backup_after_unit", "rolling_backup", "rolling_backup_count", "backup_before_save", "continue_last_backup",
    "output_model_destination", "output_model_format", "dataloader_threads", "max_nonfinite_steps", "cache_dir",
    "workspace_dir",
}


@dataclass
class Position:
    """Where a run stands: `next_batch` of `epoch` is the first batch not yet trained."""

    step: int
    epoch: int
    next_batch: int
    nonfinite_skipped: int = 0


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": [int(x) for x in np.random.get_state()[1]] + list(np.random.get_state()[2:4]),
        "numpy_gauss": float(np.random.get_state()[4]),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    random.setstate(_as_tuple(state["python"]))
    numbers = state["numpy"]
    np.random.set_state(("MT19937", np.array(numbers[:624], dtype=np.uint32), numbers[624], numbers[625], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    for name, generator in generators.items():
        if name in state["generators"]:  # a generator newer than the backup keeps its seed
            generator.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def write_backup(directory: Path, config: TrainConfig, position: Position, trainings, generators, keep: int | None,
                 ranks: Ranks | None = None, scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write a backup folder atomically; with `keep`, only the newest `keep` backups stay. Every rank calls
    this; rank 0 writes, and all return its path or raise its error."""
    ranks = ranks or Ranks()
    rngs = ranks.gather(rng_state(generators))
    weights, optimizers = [], []
    for t in trainings:
        if not t.held:  # experts_on split: the first rank of its group sends it below
            weights.append(None)
            optimizers.append(None)
        elif distributed.is_sharded(t.parameters):  # collectives: every rank takes part, rank 0 receives the whole
            weights.append({n: v for n, v in distributed.full_state_dict(t.expert.module).items() if n in _trained_names(t)})
            optimizers.append(distributed.full_optimizer_state(t.expert.module, t.optimizer))
        else:  # replicated: every rank holds the same
            weights.append({n: p.detach() for n, p in t.expert.module.named_parameters() if p.requires_grad})
            optimizers.append(_in_host_memory(t.optimizer.state_dict()))
    if ranks.group:  # split experts: rank 0 receives each expert's state from its group's first rank
        sent = {t.expert.name: (_in_host_memory(w), o) for t, w, o in zip(trainings, weights, optimizers)
                if t.held and not t.text_side} if ranks.group_lead else {}
        received = {name: state for part in ranks.to_main(sent) for name, state in part.items()}
        if ranks.main:
            weights = [received[t.expert.name][0] if not t.held else w for t, w in zip(trainings, weights)]
            optimizers = [received[t.expert.name][1] if not t.held else o for t, o in zip(trainings, optimizers)]
    outcome: Path | Exception | None = None
    if ranks.main:
        try:
            scaler_state = scaler.state_dict() if scaler is not None and scaler.is_enabled() else None
            outcome = _write(directory, config, position, trainings, weights, optimizers, rngs, ranks.world_size, keep, scaler_state)
        except WRITE_ERRORS as error:
            outcome = error
    outcome = ranks.from_main(outcome if not isinstance(outcome, Exception) else OSError(write_error_reason(outcome)))
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _in_host_memory(state):
    """An optimizer's state with its tensors copied to host memory: a backup holds no GPU tensors (those load back
    onto a GPU, or not at all on a machine without one); `load_state_dict` puts them beside their parameters again."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu")
    if isinstance(state, dict):
        return {key: _in_host_memory(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_in_host_memory(value) for value in state)
    return state


def _trained_names(training) -> set[str]:
    return {n for n, p in training.expert.module.named_parameters() if p.requires_grad}


def _write(directory: Path, config: TrainConfig, position: Position, trainings, weights, optimizers, rngs, world_size: int,
           keep: int | None, scaler_state: dict | None = None) -> Path:
    name = f"step-{position.step:07d}-epoch-{position.epoch:04d}-batch-{position.next_batch:05d}"
    final = directory / name
    with replacing(final, prefix=".partial-") as partial:  # the previous backup stays valid until this one is whole
        partial.mkdir()
        for training, trained in zip(trainings, weights):
            # what trains: the adapters of a LoRA, the weights of a fine-tune
            adapters = {n: v.to("cpu").contiguous() for n, v in trained.items()}
            save_file(adapters, str(partial / f"adapters-{training.expert.name}.safetensors"))
        state = {
            "position": position.__dict__,
            "optimizers": optimizers,
            "schedulers": [t.scheduler.state_dict() for t in trainings],
            "rng": rngs[0],
            "rng_by_rank": rngs,
            "world_size": world_size,
            "expert_steps": [t.steps for t in trainings],
            "expert_samples": [t.samples for t in trainings],
            "grad_scaler": scaler_state,  # FLOAT_16's loss scale and its growth counter
        }
        with open(partial / "state.pt", "wb") as handle:  # through a Python file: a full disk raises a plain OSError
            torch.save(state, handle)
        (partial / "config.json").write_text(config.model_dump_json(indent=2, by_alias=True))
        (partial / "backup.json").write_text(json.dumps(
            {**position.__dict__, "world_size": world_size, "written": time.strftime("%Y-%m-%d %H:%M:%S")}))
    if keep:
        for old in list_backups(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_backups(directory: Path) -> list[Path]:
    """Complete backups, oldest first (a partial one is never listed)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.pt").is_file())


def find_backup(workspace: Path, path: str | None) -> Path:
    if path and path != "latest":
        backup = Path(path)
        if not (backup / "state.pt").is_file():
            raise ConfigError(f"--resume {path!r}: not a backup folder (no state.pt in it)")
        return backup
    backups = list_backups(workspace / "backup")
    if not backups:
        raise ConfigError(f"no backup to continue from in {workspace / 'backup'}; start the run without --resume")
    return backups[-1]


def check_resumable(backup: Path, config: TrainConfig, world_size: int = 1) -> None:
    """Refuse a config that changes the training math; allow ones that only change samples, saves or paths."""
    written_by = json.loads((backup / "backup.json").read_text()).get("world_size", 1)
    if written_by != world_size:
        raise ConfigError(
            f"cannot continue from {backup}: it was written by {written_by} process(es) and this run has {world_size}; "
            f"the global batch would change. Continue with the same count (torchrun --nproc-per-node {written_by}, "
            "times the nodes), or start a new run."
        )
    saved = json.loads((backup / "config.json").read_text())
    current = json.loads(config.model_dump_json(by_alias=True))
    changed = sorted(key for key in set(saved) | set(current) if key not in RESUME_SAFE_KEYS and saved.get(key) != current.get(key))
    if changed:
        details = "; ".join(f"{k}: {json.dumps(saved.get(k))} → {json.dumps(current.get(k))}" for k in changed)
        raise ConfigError(
            f"cannot continue from {backup}: the config changed in ways that alter training ({details}). "
            "Put those keys back, or start a new run without --resume."
        )


def load_backup(backup: Path, trainings, generators, ranks: Ranks | None = None,
                scaler: torch.amp.GradScaler | None = None) -> Position:
    ranks = ranks or Ranks()
    state = torch.load(backup / "state.pt", weights_only=True)
    for training, optimizer_state, scheduler_state in zip(trainings, state["optimizers"], state["schedulers"]):
        if not training.held:  # experts_on split: its group loads it; here only its schedule and counts
            training.scheduler.load_state_dict(scheduler_state)
            continue
        adapters = load_file(str(backup / f"adapters-{training.expert.name}.safetensors"))
        if distributed.is_sharded(training.parameters):
            distributed.load_full_state(training.expert.module, training.optimizer, adapters, optimizer_state)
        else:
            parameters = dict(training.expert.module.named_parameters())
            with torch.no_grad():
                for name, value in adapters.items():
                    parameters[name].copy_(value)
            training.optimizer.load_state_dict(optimizer_state)
        training.scheduler.load_state_dict(scheduler_state)
    for training, steps in zip(trainings, state.get("expert_steps", [])):
        training.steps = steps
    for training, samples in zip(trainings, state.get("expert_samples", [])):
        training.samples = samples
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    restore_rng_state(state.get("rng_by_rank", [state["rng"]])[ranks.rank], generators)
    return Position(**state["position"])
