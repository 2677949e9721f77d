"""The training run, top to bottom: data, model, adapters, steps, samples, saves and backups."""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..config import ConfigError, TrainConfig
from ..configure import config_notices
from ..data.buckets import batches_per_epoch, epoch_batches
from ..data.cache import Cache
from ..data.latents import Encoding
from ..data.survey import survey_dataset
from ..methods import METHODS
from ..methods.embedding import save_additional as save_additional_embeddings
from ..methods.lora import SaveError
from ..models import ModelFamily, family_for
from ..models.base import Expert
from ..sample import prepare_samples, render_samples, sample_prompts
from . import distributed
from .backup import WRITE_ERRORS, Position, check_resumable, find_backup, load_backup, write_backup, write_error_reason
from .flow import flow_target, noisy_latents, sample_sigmas
from .losses import frame_dropout_mask, training_loss
from .memory import MemoryPlan, prepare_memory
from .optim import make_optimizer, make_scheduler, optimizer_state_bytes
from .progress import ProgressFile
from .text_conditioning import TextConditioning

log = logging.getLogger("motiontune")


class TrainingDiverged(Exception):
    """Too many steps in a row with a non-finite loss or gradient; a backup of the last good state exists."""


@dataclass
class ExpertTraining:
    """One trained transformer's adapters, optimizer and schedule (WAN 2.2 A14B may train two)."""

    expert: Expert
    parameters: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    max_steps: int | None = None  # this expert's own step count (WAN 2.2 A14B: `transformer_2.max_steps`, ...)
    steps: int = 0  # optimizer steps in which this expert received samples (and its parameters, if any, stepped)
    samples: int = 0  # training samples routed to this expert

    @property
    def done(self) -> bool:
        return self.max_steps is not None and self.steps >= self.max_steps


@dataclass
class RunResult:
    lora_paths: list[Path]
    sample_paths: list[Path] = field(default_factory=list)
    tensorboard_dir: Path | None = None
    steps: int = 0
    final_loss: float = float("nan")
    encoder_calls: dict = field(default_factory=dict)  # what was encoded this run (the rest came from the cache)
    interrupted: bool = False
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    backup: Path | None = None  # the newest backup this run wrote
    method: str = "LORA"
    report: bool = True  # False on ranks other than 0, which leave reporting to it
    nothing_to_do: bool = False  # --resume of a run that had already finished
    sample_errors: list[str] = field(default_factory=list)  # samples that failed (the run went on)
    experts: dict = field(default_factory=dict)  # expert label → samples and optimizer steps it received


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train_device is 'cuda' but PyTorch sees no CUDA GPU; set train_device to 'auto' or 'cpu'")
    return torch.device(name)


def train(config: TrainConfig, resume: str | None = None) -> RunResult:
    """`resume`: a backup folder, or "latest" (also what `continue_last_backup` asks for). Under `torchrun`,
    every rank runs this (see distributed.py)."""
    ranks, device = distributed.start(pick_device(config.train_device), config.training_method)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    workspace = Path(config.workspace_dir)
    resume = resume or ("latest" if config.continue_last_backup else None)
    backup_to_load = find_backup(workspace, resume) if resume else None
    if backup_to_load:
        check_resumable(backup_to_load, config, ranks.world_size)  # before anything slow: a refused resume fails fast
        saved = json.loads((backup_to_load / "backup.json").read_text())
        if saved["epoch"] >= config.epochs:
            log.info("%s is the end of training (step %d, all %d epochs done): nothing left to train. The model that run "
                     "saved is at %s", backup_to_load, saved["step"], config.epochs,
                     config.output_model_destination)
            ranks.finish()
            return RunResult(lora_paths=[], steps=saved["step"], method=config.training_method, nothing_to_do=True,
                             report=ranks.main)
    if config.memory_config_form != "default":
        log.info("memory options read in OneTrainer's %s form", config.memory_config_form)
    for notice in config_notices(config):
        log.warning("%s", notice)

    # Data: the dataset is surveyed before any model loads (a bad dataset fails fast, before the workspace is
    # made); clips and texts come from the cache, and only what is missing is encoded, with encoders loaded just for that.
    family = family_for(config, device)
    survey = survey_dataset(config, family)
    if ranks.main:
        workspace.mkdir(parents=True, exist_ok=True)
        (workspace / "config.json").write_text(config.model_dump_json(indent=2, by_alias=True))
    encoding = Encoding(family, config, Cache(config.cache_dir, config.latent_caching), ranks)
    clips = encoding.clips(survey, encoding.window_variant(0))
    caption_dropout = config.text_encoder.dropout_probability
    texts = {c for clip in clips for c in clip.captions} | sample_prompts(config) | ({""} if caption_dropout > 0 else set())
    text_embeddings = encoding.texts(texts)
    sample_requests = prepare_samples(config, family, text_embeddings)
    moving_windows = encoding.window_variant(1) != 0
    video = config.video_config
    if moving_windows and (video.temporal_augmentation or video.frame_sample_strategy == "random"):
        why = "temporal_augmentation" if video.temporal_augmentation else "frame_sample_strategy random"
        log.info("%s: %s", why, "clips change every epoch, so every epoch decodes and VAE-encodes them again"
                 if video.window_variants == 0 else
                 f"{video.window_variants} cached variants per clip; epochs 1-{video.window_variants} encode, later ones read the cache")
    elif moving_windows:
        log.info("concept image variations (crop jitter, flip): each variant is encoded once, then read from the cache")
    text_side = TextConditioning(family, config, text_embeddings)  # cached, or live when the text side trains
    encoding.release(keep_vae=bool(sample_requests) or moving_windows, keep_text=text_side.live)

    # Model.
    log.info("loading %s from %s on %s", config.model_type, config.base_model_name, device)
    family.load_transformers()

    # Adapters and optimizers: one set per trained expert, so each steps while it is on the device.
    video = config.video_config
    shapes, repeats = [c.shape for c in clips], [c.repeats for c in clips]
    global_batch_size = config.batch_size * ranks.world_size  # N ranks train what one process with N× the batch would
    distributed.check_divisible(ranks, int(sum(repeats)), config.batch_size)
    steps_per_epoch = math.ceil(
        batches_per_epoch(shapes, repeats, global_batch_size, video.video_batch_size_multiplier)
        / config.gradient_accumulation_steps
    )
    total_steps = steps_per_epoch * config.epochs
    method = METHODS[config.training_method]
    trainings = []
    for expert in family.trained_experts():
        parameters = method.prepare(family, expert, config)
        if ranks.sharded and MemoryPlan.of(config, expert.name).offloads:
            raise ConfigError("layer offloading and CPU_OFFLOADED checkpointing do not combine with FSDP2 sharding "
                              "(torchrun fine-tune): sharding already splits the weights over the GPUs; use ON")
        prepare_memory(family, expert, config, device)  # before the expert moves to the device
        expert.module.train()
        if not video.use_temporal_attention:
            family.set_frame_local_attention(expert, True)
        if ranks.sharded:  # FSDP2 replaces the parameters with shards: collect them again
            expert.module.to(device)
            distributed.shard_transformer(expert.module, family.fsdp_units(expert.module))
            parameters = [p for p in expert.module.parameters() if p.requires_grad]
        else:
            family.activate(expert)  # the optimizer is made for parameters where they train
        optimizer = make_optimizer(parameters, config, getattr(config, expert.name).learning_rate)
        trainings.append(ExpertTraining(expert, parameters, optimizer, make_scheduler(optimizer, config, total_steps),
                                        getattr(config, expert.name).max_steps))
    text_trainings = [t for t in [text_side.prepare(total_steps)] if t]  # a trained text encoder or embeddings
    trained = sum(p.numel() for t in trainings for p in t.parameters)
    state_bytes = sum(optimizer_state_bytes(t.optimizer, config) for t in trainings)
    log.info("%s of %s for %d steps: %.2fM trained parameters, %s state %.1f MB", config.training_method,
             " and ".join(t.expert.label or t.expert.name for t in trainings), total_steps, trained / 1e6,
             config.optimizer.optimizer, state_bytes / 1e6)

    generators = {
        "noise": torch.Generator(device=device).manual_seed(config.seed),
        "sigma": torch.Generator().manual_seed(config.seed + 1),
        "frame_dropout": torch.Generator().manual_seed(config.seed + 2),
        "conditioning": torch.Generator().manual_seed(config.seed + 3),
    }
    # FLOAT_16's narrow range: the loss is scaled up so small gradients do not flush to zero
    scaler = torch.amp.GradScaler(device.type, enabled=config.train_dtype == "FLOAT_16")
    position = Position(step=0, epoch=0, next_batch=0)
    if backup_to_load:
        position = load_backup(backup_to_load, trainings + text_trainings, generators, ranks, scaler)
        log.info("continuing from %s at step %d, epoch %d, batch %d (each counted from 1)", backup_to_load,
                 position.step + 1, position.epoch + 1, position.next_batch + 1)
    writer = _Writer(workspace / "tensorboard", position.step + 1 if backup_to_load else None, ranks.main)
    progress_file = ProgressFile(workspace, total_steps, position.step, ranks.main)  # for watchers (motiontune ui)
    result = RunResult(lora_paths=[], tensorboard_dir=workspace / "tensorboard", skipped_steps=position.nonfinite_skipped,
                       method=config.training_method)
    half = {"BFLOAT_16": torch.bfloat16, "FLOAT_16": torch.float16}.get(config.train_dtype)
    autocast = torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None)
    stop = StopRequest()
    last_backup_time = time.monotonic()

    def backup(where: Position) -> None:
        nonlocal last_backup_time
        keep = config.rolling_backup_count if config.rolling_backup else None
        try:
            result.backup = write_backup(workspace / "backup", config, where, trainings + text_trainings, generators, keep, ranks,
                                         scaler)
            log.info("backup written: %s", result.backup)
        except WRITE_ERRORS as error:  # the previous backup is untouched; training goes on
            log.error("backup failed (%s); the previous backup is kept", write_error_reason(error))
        last_backup_time = time.monotonic()

    def sample(tag: str) -> None:
        """Render the samples; one that fails is logged with its reason and the run goes on."""
        text_side.refresh_samples(sample_requests, config.samples)
        paths, errors = _sample(family, sample_requests, config.samples, workspace, tag, not video.use_temporal_attention, ranks)
        result.sample_paths = paths or result.sample_paths
        result.sample_errors += errors

    def after(unit: str, count: int, where: Position) -> None:
        """Samples, saves and backups that are due after `count` units (steps or epochs)."""
        if _due(config.sample_after_unit, config.sample_after, unit, count) and sample_requests:
            sample(f"{unit.lower()}{count}")
        saving = _due(config.save_every_unit, config.save_every, unit, count)
        minutes = (time.monotonic() - last_backup_time) / 60
        if (saving and config.backup_before_save) or _due(config.backup_after_unit, config.backup_after, unit, count) or (
            unit == "STEP" and config.backup_after_unit == "MINUTE" and config.backup_after and minutes >= config.backup_after
        ):
            backup(where)
        if saving:
            try:
                for path in save_model(workspace / "save" / f"{unit.lower()}{count}{_suffix(config)}"):
                    log.info("saved %s", path)
            except SaveError as error:
                log.error("%s", error)

    def save_model(destination: Path) -> list[Path]:
        """Rank 0 saves; a sharded fine-tune first gathers its weights whole (every rank takes part)."""
        states = {t.expert.name: distributed.full_state_dict(t.expert.module) for t in trainings} if ranks.sharded else None
        if not ranks.main:
            return []
        paths = method.save(family, config, destination, **({"states": states} if states else {}))
        # additional_embeddings beside a LoRA or fine-tune (an EMBEDDING run's save writes them itself)
        return paths + (save_additional_embeddings(family, config, destination) if config.training_method != "EMBEDDING" else [])

    part_names = ["loss/flow"] + (["loss/temporal_consistency"] if video.temporal_consistency_weight > 0 else [])
    nonfinite_in_a_row = 0
    finished = False
    trained_here = Counter()  # samples each expert received on this rank since the last optimizer step
    text_side_name = text_trainings[0].expert.name if text_trainings else ""
    progress = tqdm(total=total_steps, initial=position.step, desc="training", unit="step", dynamic_ncols=True,
                    disable=not ranks.main)
    with stop.listening():
        for epoch in range(position.epoch, config.epochs):
            if moving_windows and epoch > 0:
                clips = encoding.clips(survey, encoding.window_variant(epoch))
                family.park_vae()
                shapes, repeats = [c.shape for c in clips], [c.repeats for c in clips]
            batches = epoch_batches(shapes, repeats, global_batch_size, video.video_batch_size_multiplier, config.seed, epoch)
            first = position.next_batch if epoch == position.epoch else 0
            for index in range(first, len(batches)):
                # Random draws cover the global batch on every rank (the same numbers one process would draw);
                # each rank then trains its own rows of it.
                batch = batches[index]
                if all(t.done for t in trainings):  # every expert reached its own max_steps
                    finished = True
                    break
                # noise levels only where an expert still trains: one that reached max_steps hands its share to the other
                sigma_range = _noise_range([t for t in trainings if not t.done])
                mine = list(ranks.rows(len(batch), math.ceil(len(batch) / ranks.world_size)))
                stored = torch.stack([clips[i].latents for i in batch]).to(device, non_blocking=True)
                images = [clips[i].image_embeds for i in batch]
                images = torch.stack(images).to(device) if images[0] is not None else None
                x0, conditioning = family.split_conditioning(stored, generators["conditioning"], images)  # image-to-video
                captions = ["" if random.random() < caption_dropout else random.choice(clips[i].captions) for i in batch]
                sigma = sample_sigmas(
                    len(batch), config.timestep_distribution, config.timestep_shift, sigma_range, generators["sigma"],
                    normal_mean=config.noising_bias, normal_scale=1.0 + config.noising_weight,
                ).to(device)
                noise = torch.randn(x0.shape, generator=generators["noise"], device=device, dtype=x0.dtype)
                noisy = noisy_latents(x0, noise, sigma)
                target = flow_target(x0, noise)
                kept = None
                if video.frame_dropout_probability > 0:
                    kept = frame_dropout_mask(len(batch), x0.shape[2], video.frame_dropout_probability, generators["frame_dropout"])
                    kept = kept.to(device)
                if conditioning is not None and conditioning.loss_frames is not None:  # given frames are not predicted
                    given = conditioning.loss_frames.to(device)
                    kept = given if kept is None else kept * given
                loss, parts = torch.zeros((), device=device), {}
                for expert, all_rows in family.route(sigma):  # each sample goes to the expert serving its noise level
                    rows = all_rows[torch.isin(all_rows, torch.tensor(mine, device=all_rows.device, dtype=all_rows.dtype))]
                    share = len(rows) / len(batch)  # weights summed over ranks: exact however the batch splits
                    trained_here[expert.name] += len(rows)
                    trained_here[text_side_name] += len(rows)  # a trained text side learns from every sample
                    if not len(rows):
                        if not ranks.sharded:
                            continue
                        rows = all_rows[:1]  # FSDP needs every rank in every expert's forward: a row weighted 0
                    if not ranks.sharded:
                        family.activate(expert)
                    # encoded per expert: a trained text side's graph is freed by each expert's backward
                    text = text_side.batch([captions[r] for r in rows.tolist()], device)
                    with autocast:
                        prediction = family.predict(noisy[rows], sigma[rows], text, expert,
                                                    None if conditioning is None else conditioning.select(rows))
                    part_loss, part_parts = training_loss(
                        prediction, target[rows], noisy[rows], sigma[rows], x0[rows], video.temporal_consistency_weight,
                        None if kept is None else kept[rows], [clips[batch[r]].loss_weight for r in rows.tolist()],
                    )
                    # FSDP averages gradients over ranks; the weights above need their sum
                    scale = share * (ranks.world_size if ranks.sharded else 1) / config.gradient_accumulation_steps
                    scaler.scale(part_loss * scale).backward()
                    loss = loss + part_loss.detach() * share
                    for name, value in part_parts.items():
                        parts[name] = parts.get(name, 0.0) + value * share
                # the global batch's loss and its parts, in one reduction (a rank without rows adds zeros)
                totals = ranks.sum(torch.stack([loss, *(torch.as_tensor(parts.get(n, 0.0), device=device).float() for n in part_names)]))
                loss, parts = totals[0], dict(zip(part_names, totals[1:]))

                if (index + 1) % config.gradient_accumulation_steps and index + 1 < len(batches):
                    continue
                position = Position(position.step, epoch, index + 1, result.skipped_steps)
                outcome = _optimizer_step(family, trainings + text_trainings, config, ranks, scaler,
                                          finite_loss=bool(torch.isfinite(loss)), samples=trained_here)
                trained_here = Counter()
                if outcome == "overflow":  # FLOAT_16: the scaler lowered its scale; not a sign of divergence
                    log.debug("float16 gradients overflowed: step skipped, loss scale now %g", scaler.get_scale())
                    continue
                if outcome == "nonfinite":
                    result.skipped_steps += 1
                    nonfinite_in_a_row += 1
                    position.nonfinite_skipped = result.skipped_steps
                    log.warning("step skipped: the loss or a gradient is not finite (%d in a row)", nonfinite_in_a_row)
                    if nonfinite_in_a_row >= config.max_nonfinite_steps:
                        backup(position)  # the weights are still the last good ones: no bad step was applied
                        raise TrainingDiverged(
                            f"{nonfinite_in_a_row} steps in a row had a NaN or infinite loss or gradient, so the run "
                            f"stopped; the last good state is in {result.backup}. Lower learning_rate, or train in "
                            "FLOAT_32 / BFLOAT_16 rather than FLOAT_16, then continue with --resume."
                        )
                    continue
                nonfinite_in_a_row = 0
                position.step += 1

                result.final_loss = loss.item()
                writer.add_scalar("loss", result.final_loss, position.step)
                for training in trainings + text_trainings:
                    writer.add_scalar(f"lr/{training.expert.label}" if training.expert.label else "lr",
                                      training.scheduler.get_last_lr()[0], position.step)
                for name, value in parts.items():
                    writer.add_scalar(name, value.item(), position.step)
                progress.set_postfix(loss=f"{result.final_loss:.4f}", epoch=epoch + 1, refresh=False)
                progress.update()
                progress_file.update(position.step, epoch + 1, result.final_loss)
                after("STEP", position.step, position)
                if stop.agreed(ranks):
                    break
            if stop.stopping or finished:
                break
            position = Position(position.step, epoch + 1, 0, result.skipped_steps)
            after("EPOCH", epoch + 1, position)
    progress.close()

    if stop.stopping:
        log.info("stopping on %s: writing a backup and the LoRA as they are now", stop.requested or "another rank's signal")
        backup(position)
        result.interrupted = True
    # the model is saved before the final sample, so nothing a sample does can cost the trained weights
    result.lora_paths = save_model(Path(config.output_model_destination))
    if not stop.stopping and sample_requests and config.sample_after_unit != "NEVER" and not _sampled_at_end(config, position.step, config.epochs):
        sample("final")
    result.steps = position.step
    result.experts = {t.expert.label or t.expert.name: {"samples": t.samples, "steps": t.steps} for t in trainings + text_trainings}
    if len(trainings) > 1 or text_trainings:
        log.info("samples and steps per part: %s", ", ".join(f"{name} {v['samples']} samples in {v['steps']} steps"
                                                             for name, v in result.experts.items()))
    result.encoder_calls = dict(encoding.calls)
    writer.close()
    progress_file.finish("stopped" if result.interrupted else "done")
    ranks.finish()
    if not ranks.main:
        result.report = False
        return result
    (workspace / "result.json").write_text(json.dumps(
        {"lora": str(result.lora_paths[0]), "loras": [str(p) for p in result.lora_paths], "samples": [str(p) for p in result.sample_paths],
         "tensorboard": str(result.tensorboard_dir), "steps": result.steps, "final_loss": result.final_loss,
         "encoder_calls": result.encoder_calls, "interrupted": result.interrupted, "skipped_steps": result.skipped_steps,
         "backup": str(result.backup) if result.backup else None, "experts": result.experts,
         "sample_errors": result.sample_errors}, indent=2))
    return result


def _optimizer_step(family: ModelFamily, trainings: list[ExpertTraining], config: TrainConfig, ranks: distributed.Ranks,
                    scaler: torch.amp.GradScaler, finite_loss: bool, samples: Counter) -> str:
    """Clip and apply each expert's accumulated gradients: "stepped"; or nothing applied when the loss or a
    gradient is not finite: "overflow" when a float16 loss scale caused it (the scaler lowers its scale),
    else "nonfinite". `finite_loss` is the global batch's, so every rank decides alike. `samples`: how many
    samples each expert (by name) received on this rank since the last step."""
    norms, stepping = [], []
    counts = ranks.sum(torch.tensor([float(samples[t.expert.name]) for t in trainings], device=family.device))
    for training, count in zip(trainings, counts.tolist()):
        # an expert steps when any rank gave it a sample (an untouched one must not decay or gain momentum)
        had_samples = count > 0
        stepping.append(had_samples)
        if had_samples and not distributed.is_sharded(training.parameters):
            # replicated (a LoRA, a text encoder beside a sharded fine-tune): the loss was scaled ×N for FSDP's mean
            ranks.sum_gradients(training.parameters, divide_by=ranks.world_size if ranks.sharded else 1)
        if had_samples and scaler.is_enabled():
            scaler.unscale_(training.optimizer)  # clipping and the finite check see the true gradients
        if finite_loss and had_samples:
            # the norm is needed anyway to spot a non-finite gradient; an infinite limit clips nothing
            norm = torch.nn.utils.clip_grad_norm_(training.parameters, config.clip_grad_norm or math.inf)
            norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
    healthy = finite_loss and all(bool(torch.isfinite(n)) for n in norms)
    for training, had_samples, count in zip(trainings, stepping, counts.tolist()):
        if healthy and had_samples:
            training.steps += 1
            training.samples += int(count)
            if training.expert.name != "text_encoder":  # the text side stays on the device
                family.activate(training.expert)
            scaler.step(training.optimizer) if scaler.is_enabled() else training.optimizer.step()
        training.optimizer.zero_grad(set_to_none=True)
        if healthy:
            with warnings.catch_warnings():  # an expert that had no samples yet still follows the global schedule
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                training.scheduler.step()
    if scaler.is_enabled() and any(stepping):
        scaler.update()
        if not healthy and finite_loss:
            return "overflow"
    return "stepped" if healthy else "nonfinite"


class StopRequest:
    """Ctrl-C or SIGTERM during training: the current step finishes, then the run backs up, saves and ends."""

    def __init__(self):
        self.requested: str | None = None  # the signal this process received
        self.stopping = False  # what all ranks agreed on

    def _handle(self, number, frame):
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name
        log.info("%s received: finishing this step, then backing up and saving (Ctrl-C again to stop at once)", self.requested)

    def agreed(self, ranks: distributed.Ranks) -> bool:
        """Whether to stop now; with several ranks, all stop at the same step when any was asked to."""
        self.stopping = not ranks.all_agree(not self.requested) if ranks.several else bool(self.requested)
        return self.stopping

    def listening(self):
        import contextlib

        @contextlib.contextmanager
        def scope():
            if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
                yield self
                return
            previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield self
            finally:
                for number, handler in previous.items():
                    signal.signal(number, handler)

        return scope()


def _noise_range(trainings: list[ExpertTraining]) -> tuple[float, float]:
    return min(t.expert.sigma_range[0] for t in trainings), max(t.expert.sigma_range[1] for t in trainings)


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
            ranks: distributed.Ranks) -> tuple[list[Path], list[str]]:
    """Samples with the stock pipeline and the stock (full) attention, as users will run the LoRA. Rank 0
    writes them; with a sharded model the other ranks render along (each forward needs all of them).
    Returns the written paths and, for each sample that failed, why."""
    if not ranks.main and not ranks.sharded:
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
