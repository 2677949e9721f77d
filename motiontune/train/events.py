"""What happens around the steps: after each step or epoch, the samples, saves and backups that are due;
Ctrl-C / SIGTERM; and at the end, the model saved, the final sample and `result.json`."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..config import TrainConfig
from ..methods import METHODS
from ..methods.base import SaveError
from ..methods.embedding import save_additional as save_additional_embeddings
from ..models import ModelFamily
from ..sample import render_samples
from ..util.files import WRITE_ERRORS, write_error_reason
from ..util.ranks import Ranks
from . import distributed
from .backup import Position, write_backup
from .progress import ProgressFile
from .requests import Requests

log = logging.getLogger("motiontune")


class Events:
    """Samples, saves and backups, decided from the config's units (STEP, EPOCH, MINUTE) and counts."""

    def __init__(self, config: TrainConfig, family: ModelFamily, ranks: Ranks, step, text_side, sample_requests,
                 result, start_step: int, resumed: bool, total_steps: int, validation=None):
        self.config, self.family, self.ranks, self.step = config, family, ranks, step
        self.validation = validation  # None unless `validation` is on
        self.text_side, self.sample_requests, self.result = text_side, sample_requests, result
        self.workspace = Path(config.workspace_dir)
        self.writer = _Writer(self.workspace / "tensorboard", start_step + 1 if resumed else None, ranks.main)
        self.progress_file = ProgressFile(self.workspace, total_steps, start_step, ranks.main, resumed)  # for watchers (motiontune ui)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True,
                        disable=not ranks.main)
        self.last_backup_time = time.monotonic()
        # Sample / Backup / Save now, asked from outside (motiontune ui): rank 0 takes them, every rank runs them
        self.requests = Requests(self.workspace, ranks.main)

    def stepped(self, position: Position, epoch: int, loss, parts: dict) -> None:
        """An optimizer step was applied: record it, then what is due after it."""
        self.result.final_loss = loss.item()
        self.writer.add_scalar("loss", self.result.final_loss, position.step)
        for training in self.step.everything:
            self.writer.add_scalar(f"lr/{training.expert.label}" if training.expert.label else "lr",
                                   training.scheduler.get_last_lr()[0], position.step)
        for name, value in parts.items():
            self.writer.add_scalar(name, value.item(), position.step)
        # a family's sound has its own loss in the line (it is added into `loss`, times audio_loss_weight)
        audio = {"audio": f"{parts['loss/audio'].item():.4f}"} if "loss/audio" in parts else {}
        self.bar.set_postfix(loss=f"{self.result.final_loss:.4f}", **audio, epoch=epoch + 1, refresh=False)
        self.bar.update()
        self.progress_file.update(position.step, epoch + 1, self.result.final_loss)
        self.after("STEP", position.step, position)

    def between_steps(self, position: Position, stop: StopRequest) -> bool:
        """After a step, what came from outside, decided in one exchange between ranks: Ctrl-C or SIGTERM on any
        rank stops every rank at this step; requests (taken by rank 0) run on every rank, as a backup or a save
        gathers from all of them. True: stop now."""
        stop.stopping, asked = self.ranks.any_of(stop.requested is not None, self.requests.waiting())
        if asked:
            for action in self.ranks.from_main(self.requests.take()):
                self.requested(action, position)
        return stop.stopping

    def requested(self, action: str, where: Position) -> None:
        """A request taken between steps: what is due anyway (after()) has run already."""
        log.info("requested from outside: %s now, at step %d", action, where.step)
        result = "done"
        if action == "sample":
            if self.sample_requests:
                self.sample(f"step{where.step}-now")
            else:
                result = "the config has no samples"
        elif action == "backup":
            written = self.backup(where)
            result = str(written) if written else "failed (see the log)"
        elif action == "save":
            try:
                result = ", ".join(str(p) for p in self.save_model(self.workspace / "save" / f"step{where.step}-now{_suffix(self.config)}"))
            except SaveError as error:
                log.error("%s", error)
                result = f"failed: {error}"
        self.requests.answer(action, where.step, result)

    def after(self, unit: str, count: int, where: Position) -> None:
        """Samples, saves and backups that are due after `count` units (steps or epochs)."""
        config = self.config
        if self.validation and _due(config.validate_after_unit, config.validate_after, unit, count):
            self.validate(where.step)
        if _due(config.sample_after_unit, config.sample_after, unit, count) and self.sample_requests:
            self.sample(f"{unit.lower()}{count}")
        saving = _due(config.save_every_unit, config.save_every, unit, count)
        minutes = (time.monotonic() - self.last_backup_time) / 60
        if (saving and config.backup_before_save) or _due(config.backup_after_unit, config.backup_after, unit, count) or (
            unit == "STEP" and config.backup_after_unit == "MINUTE" and config.backup_after and minutes >= config.backup_after
        ):
            self.backup(where)
        if saving:
            try:
                for path in self.save_model(self.workspace / "save" / f"{unit.lower()}{count}{_suffix(config)}"):
                    log.info("saved %s", path)
            except SaveError as error:
                log.error("%s", error)

    def backup(self, where: Position) -> Path | None:
        """Write a backup; one that fails is logged and training goes on. → the newest backup."""
        keep = self.config.rolling_backup_count if self.config.rolling_backup else None
        try:
            self.result.backup = write_backup(self.workspace / "backup", self.config, where, self.step.everything,
                                              self.step.generators, keep, self.ranks, self.step.scaler)
            log.info("backup written: %s", self.result.backup)
        except WRITE_ERRORS as error:  # the previous backup is untouched; training goes on
            log.error("backup failed (%s); the previous backup is kept", write_error_reason(error))
        self.last_backup_time = time.monotonic()
        return self.result.backup

    def validate(self, step: int) -> None:
        losses = self.validation.losses()
        for name, value in losses.items():
            self.writer.add_scalar(f"loss/validation_step/{name}", value, step)
        log.info("validation loss at step %d: %s", step, ", ".join(f"{name} {value:.5f}" for name, value in losses.items()))

    def sample(self, tag: str) -> None:
        """Render the samples; one that fails is logged with its reason and the run goes on."""
        self.text_side.refresh_samples(self.sample_requests, self.config.samples)
        paths, errors = _sample(self.family, self.sample_requests, self.config.samples, self.workspace, tag,
                                not self.config.video_config.use_temporal_attention, self.ranks)
        self.result.sample_paths = paths or self.result.sample_paths
        self.result.sample_errors += errors

    def save_model(self, destination: Path) -> list[Path]:
        """Rank 0 saves; a sharded fine-tune first gathers its weights whole (every rank takes part)."""
        trainings = self.step.trainings
        states = {t.expert.name: distributed.full_state_dict(t.expert.module) for t in trainings} if self.ranks.sharded else None
        method = METHODS[self.config.training_method]
        if self.ranks.group:  # experts_on split: each group's first rank saves its expert; rank 0 lists them all
            paths = method.save(self.family, self.config, destination) if self.ranks.group_lead else []
            gathered = [p for written in self.ranks.gather(paths) for p in written]
            return gathered if self.ranks.main else []
        if not self.ranks.main:
            return []
        # additional_embeddings beside whatever the method saves
        return (method.save(self.family, self.config, destination, states=states)
                + save_additional_embeddings(self.family, self.config, destination))

    def finish(self, position: Position, stop: StopRequest) -> None:
        """A stopped run backs up; every run saves the model, then samples it if no sample was due just now."""
        config, result = self.config, self.result
        self.bar.close()
        if stop.stopping:
            log.info("stopping on %s: writing a backup and the LoRA as they are now", stop.requested or "another rank's signal")
            self.backup(position)
            result.interrupted = True
        # the model is saved before the final sample, so nothing a sample does can cost the trained weights
        result.lora_paths = self.save_model(Path(config.output_model_destination))
        if not stop.stopping and self.sample_requests and config.sample_after_unit != "NEVER" and not _sampled_at_end(config, position.step, config.epochs):
            self.sample("final")
        result.steps = position.step
        result.skipped_steps = self.step.skipped
        result.experts = {t.expert.label or t.expert.name: {"samples": t.samples, "steps": t.steps} for t in self.step.everything}
        distributed.log_shares(self.ranks, self.step.trainings)
        if len(self.step.everything) > 1:
            log.info("samples and steps per part: %s", ", ".join(f"{name} {v['samples']} samples in {v['steps']} steps"
                                                                 for name, v in result.experts.items()))
        self.writer.close()
        self.progress_file.finish("stopped" if result.interrupted else "done")


def write_result(workspace: Path, result) -> None:
    """`result.json`: what the run wrote and how it went, for scripts and the UI."""
    (workspace / "result.json").write_text(json.dumps(
        {"lora": str(result.lora_paths[0]), "loras": [str(p) for p in result.lora_paths], "samples": [str(p) for p in result.sample_paths],
         "tensorboard": str(result.tensorboard_dir), "steps": result.steps, "final_loss": result.final_loss,
         "encoder_calls": result.encoder_calls, "interrupted": result.interrupted, "skipped_steps": result.skipped_steps,
         "backup": str(result.backup) if result.backup else None, "experts": result.experts,
         "sample_errors": result.sample_errors,
         "peak_rss": {"training_process": result.peak_rss, "encoding_process": result.encoder_peak_rss}}, indent=2))


class StopRequest:
    """Ctrl-C or SIGTERM during training: the current step finishes, then the run backs up, saves and ends."""

    def __init__(self):
        self.requested: str | None = None  # the signal this process received
        self.stopping = False  # what all ranks agreed on (Events.between_steps)

    def _handle(self, number, frame):
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name
        log.info("%s received: finishing this step, then backing up and saving (Ctrl-C again to stop at once)", self.requested)

    @contextlib.contextmanager
    def listening(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def _suffix(config: TrainConfig) -> str:
    return "" if config.output_model_format == "DIFFUSERS" else ".safetensors"


def _due(unit: str, every: int, now_unit: str, count: int) -> bool:
    return unit == now_unit and every > 0 and count % every == 0


def _sampled_at_end(config: TrainConfig, steps: int, epochs: int) -> bool:
    return _due(config.sample_after_unit, config.sample_after, "STEP", steps) or _due(
        config.sample_after_unit, config.sample_after, "EPOCH", epochs
    )


class _Writer:
    """TensorBoard scalars, written by rank 0 only."""

    def __init__(self, directory: Path, purge_step: int | None, enabled: bool):
        # purge_step: TensorBoard drops what an interrupted run logged after the backup we continue from
        self.writer = SummaryWriter(str(directory), purge_step=purge_step) if enabled else None

    def add_scalar(self, name: str, value: float, step: int) -> None:
        if self.writer:
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _sample(family: ModelFamily, requests, samples, workspace: Path, tag: str, frame_local: bool,
            ranks: Ranks) -> tuple[list[Path], list[str]]:
    """Samples with the stock pipeline and the stock (full) attention, as users will run the LoRA. Rank 0
    writes them; with a sharded model the other ranks render along (each forward needs all of them).
    Returns the written paths and, for each sample that failed, why."""
    if not ranks.main and not ranks.sharded and ranks.context == 1:  # sharded or context parallel: all render along
        return [], []
    experts = family.trained_experts()
    for expert in experts:
        expert.module.eval()
        if frame_local:
            family.set_frame_local_attention(expert, False)
    try:
        paths, failures = render_samples(family, requests, workspace / "samples", tag, write=ranks.main)
    finally:
        for expert in experts:
            expert.module.train()
            if frame_local:
                family.set_frame_local_attention(expert, True)
    for path in paths:
        log.info("sample written: %s", path)
    errors = []
    for index, error in failures:
        errors.append(f"sample {tag}-{index} ({samples[index].prompt!r}): {type(error).__name__}: {error}")
        log.error("%s; training goes on (run with -v for the traceback)", errors[-1])
        log.debug("sample failure", exc_info=error)
    return paths, errors
