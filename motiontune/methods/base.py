"""What a training method is: one module (lora.py, finetune.py, embedding.py) with the names below.
Nothing outside methods/ asks which method runs; it asks the method.

The output formats each method saves as are the config's (config/schema.py: OUTPUT_FORMATS), since the
schema defaults `output_model_format` by method and config loading checks it before any method loads."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Protocol

import torch

from ..config import TrainConfig
from ..config.schema import EmbeddingConfig
from ..models import ModelFamily
from ..models.base import Expert
from ..util.files import WRITE_ERRORS, replacing, write_error_reason


class TrainingMethod(Protocol):
    SHARDED: bool
    """Whether `torchrun` shards the trained transformer with FSDP2 (its own weights train) rather than
    replicating small trained parameters and summing their gradients."""

    def prepare(self, family: ModelFamily, expert: Expert, config: TrainConfig) -> list[torch.nn.Parameter]:
        """Make what trains of `expert` (before it moves to the device); return those parameters."""

    def trained_embeddings(self, config: TrainConfig) -> list[EmbeddingConfig]:
        """The embeddings the method itself trains on the text side (`additional_embeddings` train beside any method)."""

    def untrained(self, expert: Expert) -> contextlib.AbstractContextManager:
        """Inside it, `expert` predicts as it did before training (PRIOR_PREDICTION concepts' target); only
        a method that can do this cheaply (LoRA: the adapters switched off) allows those concepts."""

    def save(self, family: ModelFamily, config: TrainConfig, destination: Path, output_format: str | None = None,
             states: dict[str, dict] | None = None) -> list[Path]:
        """Write what trained at `destination` (one file or folder per trained expert, beside it when there
        are two) and return the paths. `states`: each expert's whole state dict when FSDP sharded it."""


class SaveError(Exception):
    """A model could not be written (disk full, no permission); the previous file is untouched."""


@contextlib.contextmanager
def saving(destination: Path, what: str, earlier: str = "file") -> Iterator[Path]:
    """Write at the yielded path; it replaces `destination` once whole. A full disk or a missing permission
    becomes a SaveError that says what to do."""
    try:
        with replacing(Path(destination)) as written:
            yield written
    except WRITE_ERRORS as error:
        raise SaveError(
            f"could not save the {what} to {destination}: {write_error_reason(error)}. "
            f"Any earlier {earlier} there is unchanged; free some space or pick another output_model_destination."
        ) from None


def output_paths(family: ModelFamily, destination: Path, folder: bool = False) -> dict[str, Path]:
    """One output per expert: the destination itself for one transformer, `<name>_high_noise` and
    `<name>_low_noise` beside it for WAN 2.2 A14B's two experts."""
    experts = family.trained_experts()
    destination = Path(destination)
    if len(experts) == 1:
        return {experts[0].name: destination}
    suffix = "" if folder else destination.suffix
    stem = destination.name if folder else destination.stem
    return {e.name: destination.with_name(f"{stem}_{e.label}{suffix}") for e in experts}
