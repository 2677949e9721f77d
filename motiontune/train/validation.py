"""The validation loss: the flow-matching loss on the VALIDATION concepts' clips, which never train, at fixed
noise levels with fixed noise, so the same weights always give the same value and a falling curve means the
model generalises, not that the draws were kind. Logged under OneTrainer's names (loss/validation_step/...)."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch

from ..config import ConfigError, TrainConfig
from ..data.latents import batch_extras
from ..models import ModelFamily
from .flow import flow_target, noisy_latents
from .losses import flow_matching_loss

log = logging.getLogger("motiontune")

# where in each transformer's trained noise range the clips are noised: evenly spread, the ends left out
LEVELS = (0.125, 0.375, 0.625, 0.875)


class Validation:
    def __init__(self, family: ModelFamily, clips: list, text_side, step, seed: int):
        self.family, self.clips, self.text_side, self.step, self.seed = family, clips, text_side, step, seed

    @torch.no_grad()
    def losses(self) -> dict[str, float]:
        """The mean loss of each validation concept's clips, and `total_average` over every clip."""
        # a family may draw noise of its own in predict (LTX-2's audio tokens when no sound is given): seeded here,
        # and training's random state is left as it was
        devices = [self.family.device] if self.family.device.type == "cuda" else []
        modules = [training.expert.module for training in self.step.trainings]
        for module in modules:  # the model's own loss: no LoRA dropout
            module.eval()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                return self._losses()
        finally:
            for module in modules:
                module.train()

    def _losses(self) -> dict[str, float]:
        family, device = self.family, self.family.device
        # the levels each transformer trains on (its noise range, when one is set), not the ones it never sees
        spans = [self.step.spans[training.expert.name].target for training in self.step.trainings]
        sigmas = torch.tensor([low + (high - low) * level for low, high in spans for level in LEVELS], device=device)
        # the same draws every time: fresh generators with fixed seeds, one noise per clip in a fixed order
        noise_generator = torch.Generator(device=device).manual_seed(self.seed + 7919)
        condition_generator = torch.Generator().manual_seed(self.seed + 7920)
        per_concept = defaultdict(list)
        for clip in self.clips:
            images = None if clip.image_embeds is None else clip.image_embeds[None].to(device)
            extras = batch_extras(family, family.config, [clip], [0], device)
            x0, conditioning = family.split_conditioning(clip.latents[None].to(device), condition_generator, images, extras)
            noise = torch.randn(x0.shape, generator=noise_generator, device=device, dtype=x0.dtype)
            text = self.text_side.batch([clip.captions[0]], device)
            kept = None if conditioning is None or conditioning.loss_frames is None else conditioning.loss_frames.to(device)
            losses = []
            for sigma in sigmas:
                sigma = sigma[None]
                for expert, _ in family.route(sigma):  # the one expert serving this level
                    if not self.step.ranks.sharded:
                        family.activate(expert)
                    with self.step.autocast:
                        prediction = family.predict(noisy_latents(x0, noise, sigma), sigma, text, expert, conditioning)
                    losses.append(flow_matching_loss(prediction, flow_target(x0, noise), kept).item())
            per_concept[clip.concept].append(sum(losses) / len(losses))
        values = {concept: sum(v) / len(v) for concept, v in per_concept.items()}
        every = [value for v in per_concept.values() for value in v]
        values["total_average"] = sum(every) / len(every)
        return values


def trained_clips(clips: list) -> list:
    """The clips that train: all but the VALIDATION concepts'."""
    trained = [clip for clip in clips if clip.role != "VALIDATION"]
    if not trained:
        raise ConfigError("every clip belongs to a VALIDATION concept, so nothing trains; give at least one concept "
                          "type STANDARD (VALIDATION concepts are only measured)")
    return trained


def validation_clips(clips: list, config: TrainConfig) -> list:
    held_out = [clip for clip in clips if clip.role == "VALIDATION"]
    if held_out and not config.validation:
        log.warning("%d clips of VALIDATION concepts are left out of training and not measured; set `validation` "
                    "true to log their loss every `validate_after` %s", len(held_out), config.validate_after_unit.lower())
    elif config.validation and not held_out:
        raise ConfigError("`validation` is true but no concept is of type VALIDATION: add a concept of clips to measure "
                          "(\"type\": \"VALIDATION\"), or set validation false")
    elif held_out:
        log.info("validation: %d clips (%s), measured every %d %s", len(held_out),
                 ", ".join(sorted({c.concept for c in held_out})), config.validate_after, config.validate_after_unit.lower())
    return held_out
