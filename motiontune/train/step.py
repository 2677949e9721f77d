"""One training step: a batch's noise levels, noise and targets, each sample routed to the expert serving its
noise level, forward and backward, the losses summed over ranks, then the optimizer step, or none when the
loss or a gradient is not finite."""

from __future__ import annotations

import logging
import math
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from peft.helpers import disable_input_dtype_casting

from ..config import ConfigError, TrainConfig
from ..methods import METHODS
from ..models import ModelFamily
from ..data.latents import batch_extras
from ..data.survey import sampling_grid
from ..models.base import Expert, Sound
from ..util.dtypes import HALF_DTYPES
from ..util.ranks import Ranks, is_sharded
from .backup import Position
from .flow import NoiseSpan, flow_target, noise_spans, noisy_latents, predicted_x0, sample_spans
from .losses import audio_loss, frame_dropout_mask, loss_mask, training_loss

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
    text_side: bool = False  # the text encoder or embeddings: stays on the device, learns from every sample

    @property
    def held(self) -> bool:
        """False for an expert another group of ranks holds (`experts_on: split`): only its counts and schedule are here."""
        return self.expert.module is not None

    @property
    def done(self) -> bool:
        return self.max_steps is not None and self.steps >= self.max_steps


def trains_audio(family: ModelFamily, config: TrainConfig) -> bool:
    """Whether the run denoises and learns the clips' sound: a family that generates it, unless `train_audio` is off."""
    return bool(family.AUDIO_SAMPLE_RATE) and config.train_audio


def noise_plan(config: TrainConfig, experts: list[Expert]) -> dict[str, NoiseSpan]:
    """Each trained transformer's noise levels: its share (routing), its own range (`transformer.min_noising_strength`
    ...) and the run's (`min_noising_strength` ...), cut or rescaled as `noising_strength_mode` says. Raises
    ValueError naming the keys when a range leaves a transformer nothing or reaches outside its share."""
    spans = {}
    for expert in experts:
        part = getattr(config, expert.name)
        try:
            [spans[expert.name]] = noise_spans(
                [expert.sigma_range], [(part.min_noising_strength, part.max_noising_strength)],
                (config.min_noising_strength, config.max_noising_strength), config.noising_strength_mode)
        except ValueError as error:
            served = f"the {expert.label.replace('_', '-')} expert" if expert.label else "the transformer"
            raise ValueError(
                f"{expert.name}.min_noising_strength / max_noising_strength with min_noising_strength = "
                f"{config.min_noising_strength}, max_noising_strength = {config.max_noising_strength}: {error} "
                f"({served}). Give each trained transformer a range inside the noise levels it serves, which overlaps "
                "the run's range; move WAN 2.2's split between its experts with boundary_ratio") from None
    return spans


def expected_shares(config: TrainConfig, spans: dict[str, NoiseSpan]) -> dict[str, float]:
    """The fraction of samples each transformer gets (their spans' shares of the distribution's mass)."""
    masses = {name: span.mass(config.timestep_distribution, config.timestep_shift, config.noising_bias,
                              1.0 + config.noising_weight) for name, span in spans.items()}
    total = sum(masses.values())
    return {name: mass / total for name, mass in masses.items()}


def log_noise_levels(config: TrainConfig, trainings: list[ExpertTraining], spans: dict) -> None:
    """Each transformer's noise levels and, with several, the fraction of samples each gets."""
    shares = expected_shares(config, spans)
    for training in trainings:
        span = spans[training.expert.name]
        how = "" if span.source == span.target else f" (the distribution's [{span.source[0]:.3f}, {span.source[1]:.3f}] rescaled)"
        share = f": {100 * shares[training.expert.name]:.1f}% of the samples" if len(trainings) > 1 else ""
        log.info("%s trains on noise levels [%.3f, %.3f]%s%s", training.expert.label or training.expert.name,
                 span.target[0], span.target[1], how, share)


class Step:
    """What a step needs across the run: the random generators (backed up), the float16 loss scaler, the
    samples each expert received since the last optimizer step, and the non-finite streak."""

    def __init__(self, family: ModelFamily, config: TrainConfig, ranks: Ranks, trainings: list[ExpertTraining],
                 text_trainings: list[ExpertTraining], text_side):
        self.family, self.config, self.ranks, self.device = family, config, ranks, family.device
        self.trainings, self.everything = trainings, trainings + text_trainings
        self.text_side = text_side
        seed = config.seed
        self.generators = {
            "noise": torch.Generator(device=self.device).manual_seed(seed),
            "sigma": torch.Generator().manual_seed(seed + 1),
            "frame_dropout": torch.Generator().manual_seed(seed + 2),
            "conditioning": torch.Generator().manual_seed(seed + 3),
            "mask": torch.Generator().manual_seed(seed + 4),  # masked training: which samples train unmasked
            "audio_sigma": torch.Generator().manual_seed(seed + 5),  # the audio's own noise levels (INDEPENDENT)
        }
        # FLOAT_16's narrow range: the loss is scaled up so small gradients do not flush to zero
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.train_dtype == "FLOAT_16")
        half = HALF_DTYPES.get(config.train_dtype)
        self.autocast = torch.autocast(self.device.type, dtype=half or torch.float32, enabled=half is not None)
        self.half = half is not None
        weight = config.video_config.temporal_consistency_weight
        self.part_names = (["loss/flow"] + (["loss/temporal_consistency"] if weight > 0 else [])
                           + (["loss/audio"] if trains_audio(family, config) else []))
        self.trained_here = Counter()  # samples each expert received on this rank since the last optimizer step
        self.text_side_name = text_trainings[0].expert.name if text_trainings else ""
        self.nonfinite_in_a_row = 0
        self.skipped = 0  # optimizer steps skipped for a non-finite loss or gradient, over the whole run
        try:  # where each expert's noise levels come from
            self.spans = noise_plan(config, [t.expert for t in trainings])
        except ValueError as error:  # a noise range that leaves a transformer nothing
            raise ConfigError(str(error)) from None
        log_noise_levels(config, trainings, self.spans)

    def accumulate(self, clips: list, batch: list[int]) -> tuple[torch.Tensor, dict]:
        """Forward and backward of one batch (gradients add up until the optimizer step); → the global batch's
        loss and its parts. Random draws cover the global batch on every rank (the same numbers one process
        would draw); each rank then trains its own rows of it."""
        config, video, ranks, device, generators = self.config, self.config.video_config, self.ranks, self.device, self.generators
        # noise levels only where an expert still trains: one that reached max_steps hands its share to the other
        live = [t for t in self.trainings if not t.done]
        mine = list(ranks.rows(len(batch), math.ceil(len(batch) / ranks.data_size)))  # a context group shares its rows
        stored = torch.stack([clips[i].latents for i in batch]).to(device, non_blocking=True)
        images = [clips[i].image_embeds for i in batch]
        images = torch.stack(images).to(device) if images[0] is not None else None
        extras = batch_extras(self.family, config, clips, batch, device)  # first and last frame, control...
        x0, conditioning = self.family.split_conditioning(stored, generators["conditioning"], images, extras)  # image-to-video
        dropout = config.text_encoder.dropout_probability
        captions = ["" if random.random() < dropout else random.choice(clips[i].captions) for i in batch]
        sigma = sample_spans(
            len(batch), [self.spans[t.expert.name] for t in live], config.timestep_distribution, config.timestep_shift,
            generators["sigma"], normal_mean=config.noising_bias, normal_scale=1.0 + config.noising_weight,
        ).to(device)
        noise = torch.randn(x0.shape, generator=generators["noise"], device=device, dtype=x0.dtype)
        noisy = noisy_latents(x0, noise, sigma)
        target = flow_target(x0, noise)
        sound = self._sound(clips, batch, sigma)  # a family that generates sound denoises the clips' audio too
        kept = None
        if video.frame_dropout_probability > 0:
            kept = frame_dropout_mask(len(batch), x0.shape[2], video.frame_dropout_probability, generators["frame_dropout"])
            kept = kept.to(device)
        if conditioning is not None and conditioning.loss_frames is not None:  # given frames are not predicted
            given = conditioning.loss_frames.to(device)
            kept = given if kept is None else kept * given
        mask = None
        if config.masked_training:  # each latent weighted by its clip's mask (data/masks.py)
            mask = loss_mask([clips[i].mask for i in batch], x0.shape, config.unmasked_probability,
                             config.unmasked_weight, generators["mask"]).to(device)
        loss, parts = torch.zeros((), device=device), {}
        for expert, all_rows in self.family.route(sigma):  # each sample goes to the expert serving its noise level
            if expert.module is None:  # experts_on split: another group of ranks trains these rows
                continue
            if ranks.group:  # split: the group's ranks share the rows routed to its expert
                per_rank = math.ceil(len(all_rows) / ranks.group_size)
                rows = all_rows[ranks.group_rank * per_rank:(ranks.group_rank + 1) * per_rank]
            else:
                rows = all_rows[torch.isin(all_rows, torch.tensor(mine, device=all_rows.device, dtype=all_rows.dtype))]
            share = len(rows) / len(batch)  # weights summed over ranks: exact however the batch splits
            self.trained_here[expert.name] += len(rows)
            self.trained_here[self.text_side_name] += len(rows)  # a trained text side learns from every sample
            if not len(rows):
                if not ranks.sharded:
                    continue
                rows = all_rows[:1]  # FSDP needs every rank in every expert's forward: a row weighted 0
            if not ranks.sharded:
                self.family.activate(expert)
            # encoded per expert: a trained text side's graph is freed by each expert's backward
            text = self.text_side.batch([captions[r] for r in rows.tolist()], device)
            weights = [clips[batch[r]].loss_weight for r in rows.tolist()]
            sound_rows = {} if sound is None else {"sound": sound[0].select(rows)}
            # under autocast peft's cast of each adapter's input to float32 is a round trip (autocast casts it back
            # for the matmul): without it a step makes two copies fewer per adapted layer, same numbers; the
            # backward is inside, as checkpointed blocks run their forward again there
            with disable_input_dtype_casting(expert.module, active=self.half):
                with self.autocast:
                    prediction = self.family.predict(noisy[rows], sigma[rows], text, expert,
                                                     None if conditioning is None else conditioning.select(rows), **sound_rows)
                if sound is not None:
                    prediction, audio_prediction = prediction
                row_target, row_x0 = target[rows], x0[rows]
                audio_target = None if sound is None else sound[1][rows]
                prior = torch.tensor([clips[batch[r]].role == "PRIOR_PREDICTION" for r in rows.tolist()])
                if prior.any():
                    row_target, row_x0, audio_target = self._prior_targets(
                        expert, noisy[rows], sigma[rows], text, conditioning, rows, sound_rows, prior.to(device),
                        row_target, row_x0, audio_target)
                part_loss, part_parts = training_loss(
                    prediction, row_target, noisy[rows], sigma[rows], row_x0, video.temporal_consistency_weight,
                    None if kept is None else kept[rows], weights,
                    None if mask is None else mask[rows], config.normalize_masked_area_loss,
                )
                if sound is not None:  # the audio's flow loss beside the video's, over the clips that have sound
                    audio = audio_loss(audio_prediction, audio_target, sound[2][rows], weights)
                    part_loss = part_loss + config.audio_loss_weight * audio
                    part_parts["loss/audio"] = audio.detach()
                # FSDP averages gradients over ranks; the weights above need their sum
                scale = share * (ranks.world_size if ranks.sharded else 1) / config.gradient_accumulation_steps
                self.scaler.scale(part_loss * scale).backward()
            loss = loss + part_loss.detach() * share
            for name, value in part_parts.items():
                parts[name] = parts.get(name, 0.0) + value * share
        # the global batch's loss and its parts, in one reduction (a rank without rows adds zeros)
        totals = ranks.sum(torch.stack([loss, *(torch.as_tensor(parts.get(n, 0.0), device=device).float() for n in self.part_names)]))
        totals = totals / ranks.context  # every rank of a context group computed its rows' whole loss
        return totals[0], dict(zip(self.part_names, totals[1:]))

    def _prior_targets(self, expert: Expert, noisy, sigma, text, conditioning, rows, sound_rows, prior, target, x0,
                       audio_target):
        """PRIOR_PREDICTION rows learn the expert's own prediction as it was before training (same input, same
        text) instead of the clip: regularisation without a dataset of generated videos. The temporal term
        compares with the clean latent that prediction implies; a family that generates sound has its audio
        target replaced alike. → (target, x0, audio target) for the rows."""
        with torch.no_grad(), METHODS[self.config.training_method].untrained(expert), self.autocast:
            frozen = self.family.predict(noisy, sigma, text, expert,
                                         None if conditioning is None else conditioning.select(rows), **sound_rows)
        if audio_target is not None:
            frozen, frozen_audio = frozen
            audio_target = torch.where(prior.view(-1, *[1] * (audio_target.dim() - 1)), frozen_audio.to(audio_target.dtype),
                                       audio_target)
        where = prior.view(-1, *[1] * (target.dim() - 1))
        return (torch.where(where, frozen.to(target.dtype), target),
                torch.where(where, predicted_x0(noisy.float(), frozen.float(), sigma).to(x0.dtype), x0), audio_target)

    def _sound(self, clips: list, batch: list[int], sigma: torch.Tensor):
        """(Sound, audio target, (B,) which clips have sound) for a family that generates sound and a run that trains
        it (`train_audio`), else None. The clips that have sound are noised at a level of their own (`audio_noise_level`
        INDEPENDENT: drawn from the run's distribution apart from the video's, as LTX-2's trainer draws each modality)
        or at the video's (SHARED). One without sound is given pure noise at level 1 (what the pipeline's first step
        shows the transformer), and the loss leaves its audio out, so it trains the video alone."""
        if not trains_audio(self.family, self.config):
            return None
        config = self.config
        audio = [clips[i].audio for i in batch]
        present = torch.tensor([a is not None for a in audio], device=self.device)
        frames = len(clips[batch[0]].timestamps)
        shape = next((a.shape for a in audio if a is not None), None) or self.family.audio_latent_shape(
            frames, sampling_grid(config, self.family)[0])
        x0 = torch.stack([torch.zeros(shape) if a is None else a for a in audio]).to(self.device)
        noise = torch.randn(x0.shape, generator=self.generators["noise"], device=self.device, dtype=x0.dtype)
        if config.audio_noise_level == "INDEPENDENT":
            # drawn for every row, sound or not, so the numbers drawn do not depend on which clips have sound
            sigma = sample_spans(len(batch), list(self.spans.values()), config.timestep_distribution,
                                 config.timestep_shift, self.generators["audio_sigma"], normal_mean=config.noising_bias,
                                 normal_scale=1.0 + config.noising_weight).to(self.device)
        level = torch.where(present, sigma, torch.ones_like(sigma))
        return Sound(noisy_latents(x0, noise, level), level), flow_target(x0, noise), present

    def apply(self, loss: torch.Tensor, position: Position, backup: Callable[[Position], object]) -> bool:
        """The optimizer step of the gradients accumulated since the last one; False when none was applied.
        Too many non-finite steps in a row: a backup of the last good state, then TrainingDiverged."""
        outcome = optimizer_step(self.family, self.everything, self.config, self.ranks, self.scaler,
                                 finite_loss=bool(torch.isfinite(loss)), samples=self.trained_here)
        self.trained_here = Counter()
        if outcome == "overflow":  # FLOAT_16: the scaler lowered its scale; not a sign of divergence
            log.debug("float16 gradients overflowed: step skipped, loss scale now %g", self.scaler.get_scale())
            return False
        if outcome == "nonfinite":
            self.skipped += 1
            self.nonfinite_in_a_row += 1
            position.nonfinite_skipped = self.skipped
            log.warning("step skipped: the loss or a gradient is not finite (%d in a row)", self.nonfinite_in_a_row)
            if self.nonfinite_in_a_row >= self.config.max_nonfinite_steps:
                written = backup(position)  # the weights are still the last good ones: no bad step was applied
                raise TrainingDiverged(
                    f"{self.nonfinite_in_a_row} steps in a row had a NaN or infinite loss or gradient, so the run "
                    f"stopped; the last good state is in {written}. Lower learning_rate, or train in "
                    "FLOAT_32 / BFLOAT_16 rather than FLOAT_16, then continue with --resume."
                )
            return False
        self.nonfinite_in_a_row = 0
        return True


def optimizer_step(family: ModelFamily, trainings: list[ExpertTraining], config: TrainConfig, ranks: Ranks,
                   scaler: torch.amp.GradScaler, finite_loss: bool, samples: Counter) -> str:
    """Clip and apply each expert's accumulated gradients: "stepped"; or nothing applied when the loss or a
    gradient is not finite: "overflow" when a float16 loss scale caused it (the scaler lowers its scale),
    else "nonfinite". `finite_loss` is the global batch's, so every rank decides alike. `samples`: how many
    samples each expert (by name) received on this rank since the last step."""
    norms, stepping = [], []
    # a context group's ranks all count the rows they share
    counts = ranks.sum(torch.tensor([float(samples[t.expert.name]) for t in trainings], device=family.device)) / ranks.context
    for training, count in zip(trainings, counts.tolist()):
        # an expert steps when any rank gave it a sample (an untouched one must not decay or gain momentum)
        had_samples = count > 0
        stepping.append(had_samples)
        if not training.held:  # experts_on split: its group sums, clips and steps it
            continue
        if had_samples and not is_sharded(training.parameters):
            # replicated (a LoRA, a text encoder beside a sharded fine-tune): the loss was scaled ×N for FSDP's mean;
            # split experts: an expert's gradients live on its group alone
            ranks.sum_gradients(training.parameters, divide_by=ranks.world_size if ranks.sharded else 1,
                                within_group=not training.text_side)
        if had_samples and scaler.is_enabled():
            scaler.unscale_(training.optimizer)  # clipping and the finite check see the true gradients
        if finite_loss and had_samples:
            # the norm is needed anyway to spot a non-finite gradient; an infinite limit clips nothing
            norm = torch.nn.utils.clip_grad_norm_(training.parameters, config.clip_grad_norm or math.inf)
            norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
    healthy = finite_loss and all(bool(torch.isfinite(n)) for n in norms)
    if ranks.group:  # split experts: each group saw only its expert's gradients; all skip a step, or none
        healthy = ranks.all_agree(healthy)
    for training, had_samples, count in zip(trainings, stepping, counts.tolist()):
        if healthy and had_samples:
            training.steps += 1
            training.samples += int(count)
            if training.held:
                if not training.text_side:  # the text side stays on the device
                    family.activate(training.expert)
                scaler.step(training.optimizer) if scaler.is_enabled() else training.optimizer.step()
        training.optimizer.zero_grad(set_to_none=True)
        if healthy:
            with warnings.catch_warnings():  # an expert that had no samples yet still follows the global schedule
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                training.scheduler.step()
    if scaler.is_enabled() and any(stepping):
        if any(s and t.held for s, t in zip(stepping, trainings)):  # split experts: this group unscaled something
            scaler.update()
        if not healthy and finite_loss:
            return "overflow"
    return "stepped" if healthy else "nonfinite"
