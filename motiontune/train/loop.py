"""The training run, top to bottom: data, model, what trains, then epochs of steps; samples, saves and
backups happen around them (events.py), one step is step.py."""

from __future__ import annotations

import functools
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, TrainConfig
from ..configure import config_notices
from ..config.schema import MemoryPlan
from ..data.buckets import batches_per_epoch, epoch_batches
from ..data.cache import Cache
from ..data.encoder_process import encode_in_child
from ..data.latents import Encoding
from ..data.survey import survey_dataset
from ..methods import METHODS
from ..models import ModelFamily, family_for
from ..sample import prepare_samples, sample_prompts
from ..util.peak_rss import mb, own_peak_rss
from ..util.ranks import Ranks
from . import distributed
from .backup import Position, check_resumable, find_backup, load_backup
from .events import Events, StopRequest, write_result
from .memory import compile_blocks, prepare_memory
from .optim import make_optimizer, make_scheduler, optimizer_state_bytes
from .step import ExpertTraining, Step, expected_shares
from .text_conditioning import TextConditioning
from .validation import Validation, trained_clips, validation_clips

log = logging.getLogger("motiontune")


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
    peak_rss: int | None = None  # bytes: this training process's own resident peak (util/peak_rss.py)
    encoder_peak_rss: int | None = None  # bytes: the encoding child's own peak, when one encoded for this run


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train_device is 'cuda' but PyTorch sees no CUDA GPU; set train_device to 'auto' or 'cpu'")
    return torch.device(name)


def train(config: TrainConfig, resume: str | None = None) -> RunResult:
    """`resume`: a backup folder, or "latest" (also what `continue_last_backup` asks for). Under `torchrun`,
    every rank runs this (see distributed.py)."""
    split = config.experts_on == "split"
    ranks, device = distributed.start(pick_device(config.train_device), METHODS[config.training_method].SHARDED, split,
                                      config.context_parallel)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    workspace = Path(config.workspace_dir)
    backup_to_load = _backup_to_continue(config, resume, ranks)
    ended_at = _end_of_training(backup_to_load, config) if backup_to_load else None
    if ended_at is not None:
        ranks.finish()
        return RunResult(lora_paths=[], steps=ended_at, method=config.training_method, nothing_to_do=True, report=ranks.main)
    if config.memory_config_form != "default":
        log.info("memory options read in OneTrainer's %s form", config.memory_config_form)
    for notice in config_notices(config):
        log.warning("%s", notice)

    family = family_for(config, device)
    if split:  # each process loads only the expert of its group
        distributed.place_experts(ranks, list(getattr(family, "expert_names", ["transformer"])),
                                  METHODS[config.training_method].SHARDED)
        family.held_expert = ranks.expert
    data = _setup_data(config, family, ranks)
    if split and data.sample_requests:
        log.warning("experts_on split: no samples during training (the stock pipeline needs both experts in one "
                    "process); sample the saved LoRAs or models afterwards with motiontune sample")
        data.sample_requests = []
    log.info("loading %s from %s on %s", config.model_type,
             config.base_model_name + (f" ({ranks.expert} only)" if split else ""), device)
    family.load_transformers()
    if config.frozen_loras:  # merged into the base before anything trains over it or quantizes it
        from ..lora_tools.frozen import apply_frozen_loras

        apply_frozen_loras(config, family)
    # N data-parallel ranks train what one process with N× the batch would (a context group is one of them)
    global_batch_size = config.batch_size * ranks.data_size
    distributed.check_divisible(ranks, int(sum(c.repeats for c in data.clips)), config.batch_size)
    batches = batches_per_epoch([c.batch_shape for c in data.clips], [c.repeats for c in data.clips], global_batch_size,
                                config.video_config.video_batch_size_multiplier)
    total_steps = math.ceil(batches / config.gradient_accumulation_steps) * config.epochs
    trainings = _setup_experts(config, family, ranks, device, total_steps)
    text_trainings = [t for t in [data.text_side.prepare(total_steps)] if t]  # a trained text encoder or embeddings
    _log_what_trains(config, trainings, total_steps)
    step = Step(family, config, ranks, trainings, text_trainings, data.text_side)
    distributed.log_placement(ranks, trainings, expected_shares(config, step.spans))

    position = Position(step=0, epoch=0, next_batch=0)
    if backup_to_load:
        position = load_backup(backup_to_load, step.everything, step.generators, ranks, step.scaler)
        step.skipped = position.nonfinite_skipped
        log.info("continuing from %s at step %d, epoch %d, batch %d (each counted from 1)", backup_to_load,
                 position.step + 1, position.epoch + 1, position.next_batch + 1)
    result = RunResult(lora_paths=[], tensorboard_dir=workspace / "tensorboard", method=config.training_method)
    validation = Validation(family, data.validation_clips, data.text_side, step, config.seed) if config.validation else None
    events = Events(config, family, ranks, step, data.text_side, data.sample_requests, result, position.step,
                    bool(backup_to_load), total_steps, validation)
    stop = StopRequest()

    with stop.listening():
        clips, finished = data.clips, False
        for epoch in range(position.epoch, config.epochs):
            if data.moving_windows and epoch > 0:  # new clip windows or image variants: encoded, or read from the cache
                clips = trained_clips(data.encoding.clips(data.survey, data.encoding.window_variant(epoch)))
                family.park_vae()
            batches = epoch_batches([c.batch_shape for c in clips], [c.repeats for c in clips], global_batch_size,
                                    config.video_config.video_batch_size_multiplier, config.seed, epoch)
            first = position.next_batch if epoch == position.epoch else 0
            for index in range(first, len(batches)):
                if all(t.done for t in trainings):  # every expert reached its own max_steps
                    finished = True
                    break
                loss, parts = step.accumulate(clips, batches[index])
                if (index + 1) % config.gradient_accumulation_steps and index + 1 < len(batches):
                    continue
                position = Position(position.step, epoch, index + 1, step.skipped)
                if not step.apply(loss, position, events.backup):  # skipped: the loss or a gradient was not finite
                    continue
                position.step += 1
                events.stepped(position, epoch, loss, parts)
                if events.between_steps(position, stop):
                    break
            if stop.stopping or finished:
                break
            position = Position(position.step, epoch + 1, 0, step.skipped)
            events.after("EPOCH", epoch + 1, position)

    events.finish(position, stop)
    result.encoder_calls = dict(data.encoding.calls)
    # this process's own peak, apart from the encoding child's (a parent's wait4 / ru_maxrss would give the larger)
    result.peak_rss, result.encoder_peak_rss = own_peak_rss(), data.encoding.child_peak_rss
    log.info("peak resident memory of the training process: %s%s", mb(result.peak_rss),
             f" (the encoding process, apart: {mb(result.encoder_peak_rss)})" if data.encoding.filled_elsewhere else "")
    ranks.finish()
    if not ranks.main:
        result.report = False
        return result
    write_result(workspace, result)
    return result


def _backup_to_continue(config: TrainConfig, resume: str | None, ranks: Ranks) -> Path | None:
    resume = resume or ("latest" if config.continue_last_backup else None)
    backup = find_backup(Path(config.workspace_dir), resume) if resume else None
    if backup:
        check_resumable(backup, config, ranks.world_size)  # before anything slow: a refused resume fails fast
    return backup


def _end_of_training(backup: Path, config: TrainConfig) -> int | None:
    """The step of a backup written at the end of training (None for one to continue from)."""
    saved = json.loads((backup / "backup.json").read_text())
    if saved["epoch"] < config.epochs:
        return None
    log.info("%s is the end of training (step %d, all %d epochs done): nothing left to train. The model that run "
             "saved is at %s", backup, saved["step"], config.epochs, config.output_model_destination)
    return saved["step"]


@dataclass
class _Data:
    survey: object
    encoding: Encoding
    clips: list
    text_side: TextConditioning
    sample_requests: list
    validation_clips: list  # the VALIDATION concepts' clips: never in a batch, their loss is logged
    moving_windows: bool  # clips change between epochs (random windows, temporal augmentation, image variations)


def _setup_data(config: TrainConfig, family: ModelFamily, ranks: Ranks) -> _Data:
    """The dataset is surveyed before any model loads (a bad dataset fails fast, before the workspace is made);
    clips and texts come from the cache, and only what is missing is encoded, with encoders loaded just for that."""
    survey = survey_dataset(config, family)
    workspace = Path(config.workspace_dir)
    if ranks.main:
        workspace.mkdir(parents=True, exist_ok=True)
        (workspace / "config.json").write_text(config.model_dump_json(indent=2, by_alias=True))
    elsewhere = None
    if config.latent_caching and config.encode_in_child:  # what the cache lacks is encoded by a process of its own
        elsewhere = functools.partial(encode_in_child, config, family.device)
    encoding = Encoding(family, config, Cache(config.cache_dir, config.latent_caching), ranks, elsewhere=elsewhere)
    encoded = encoding.clips(survey, encoding.window_variant(0))
    clips, held_out = trained_clips(encoded), validation_clips(encoded, config)
    caption_dropout = config.text_encoder.dropout_probability
    texts = {c for clip in encoded for c in clip.captions} | sample_prompts(config) | ({""} if caption_dropout > 0 else set())
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
    return _Data(survey, encoding, clips, text_side, sample_requests, held_out, moving_windows)



def _setup_experts(config: TrainConfig, family: ModelFamily, ranks: Ranks, device: torch.device,
                   total_steps: int) -> list[ExpertTraining]:
    """What trains of each trained expert, its memory options, and its own optimizer, so each steps while it
    is on the device."""
    method = METHODS[config.training_method]
    trainings = []
    for index, expert in enumerate(family.trained_experts()):
        if expert.module is None:  # experts_on split: another group holds and trains it; here its step count and
            # schedule follow along (an optimizer of nothing), so every rank decides alike which experts still train
            optimizer = make_optimizer([], config, getattr(config, expert.name).learning_rate)
            trainings.append(ExpertTraining(expert, [], optimizer, make_scheduler(optimizer, config, total_steps),
                                            getattr(config, expert.name).max_steps))
            continue
        with torch.random.fork_rng(devices=[]):  # each expert's adapters start alike wherever it is placed (split experts)
            torch.manual_seed(config.seed + index)
            parameters = method.prepare(family, expert, config)
        if ranks.sharded and MemoryPlan.of(config, expert.name).offloads:
            raise ConfigError("layer offloading and CPU_OFFLOADED checkpointing do not combine with FSDP2 sharding "
                              "(torchrun fine-tune): sharding already splits the weights over the GPUs; use ON")
        prepare_memory(family, expert, config, device)  # before the expert moves to the device
        if ranks.context > 1:  # after the adapters: the plan's hooks sit on the modules as they will run
            distributed.enable_context_parallel(expert.module, ranks, config.context_parallel.attention,
                                                family.context_parallel_plan(expert.module))
            family.prepare_context_parallel(expert.module, ranks.context)
        expert.module.train()
        if not config.video_config.use_temporal_attention:
            family.set_frame_local_attention(expert, True)
        if ranks.sharded:  # FSDP2 replaces the parameters with shards: collect them again
            expert.module.to(device)
            distributed.shard_transformer(expert.module, family.fsdp_units(expert.module))
            parameters = [p for p in expert.module.parameters() if p.requires_grad]
        else:
            family.activate(expert)  # the optimizer is made for parameters where they train
        if config.compile:
            compile_blocks(family, expert)
        optimizer = make_optimizer(parameters, config, getattr(config, expert.name).learning_rate)
        trainings.append(ExpertTraining(expert, parameters, optimizer, make_scheduler(optimizer, config, total_steps),
                                        getattr(config, expert.name).max_steps))
    return trainings


def _log_what_trains(config: TrainConfig, trainings: list[ExpertTraining], total_steps: int) -> None:
    trained = sum(p.numel() for t in trainings for p in t.parameters)
    state_bytes = sum(optimizer_state_bytes(t.optimizer, config) for t in trainings)
    log.info("%s of %s for %d steps: %.2fM trained parameters, %s state %.1f MB", config.training_method,
             " and ".join(t.expert.label or t.expert.name for t in trainings if t.held), total_steps, trained / 1e6,
             config.optimizer.optimizer, state_bytes / 1e6)

