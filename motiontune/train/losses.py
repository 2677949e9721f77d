"""The training loss: flow matching, plus video_config's temporal consistency term, each sample weighted by its
concept's loss_weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .flow import predicted_x0


def flow_matching_loss(prediction: torch.Tensor, target: torch.Tensor, kept_frames: torch.Tensor | None = None,
                       sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE over (B, C, F, H, W); with `kept_frames` (B, F) only those latent frames count, and the mean is
    taken over them, so dropping frames does not shrink the loss. `sample_weights` (B,) scale each sample's
    part of that mean (a weight 2 counts the sample twice; the mean still divides by the plain count)."""
    if kept_frames is None and sample_weights is None:
        return F.mse_loss(prediction.float(), target.float())
    per_frame = (prediction.float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # B, F
    kept = torch.ones_like(per_frame) if kept_frames is None else kept_frames.to(per_frame.dtype)
    weights = kept if sample_weights is None else kept * sample_weights.to(per_frame.dtype)[:, None]
    return (per_frame * weights).sum() / kept.sum()


def frame_dropout_mask(batch: int, frames: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    """(B, F) booleans: each latent frame but the first is left out of the loss with `probability`."""
    kept = torch.rand(batch, frames, generator=generator) >= probability
    kept[:, 0] = True
    return kept


def temporal_consistency_loss(
    prediction: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between frame-to-frame differences of the predicted clean latent and of the real one (each sample's
    part scaled by `sample_weights`).

    Latents are (B, C, F, H, W); a single latent frame has no differences and adds nothing."""
    if x0.shape[2] < 2:
        return prediction.new_zeros((), dtype=torch.float32)
    estimate = predicted_x0(noisy.float(), prediction.float(), sigma)
    if sample_weights is None:
        return F.mse_loss(estimate.diff(dim=2), x0.float().diff(dim=2))
    per_sample = (estimate.diff(dim=2) - x0.float().diff(dim=2)).pow(2).mean(dim=(1, 2, 3, 4))
    return (per_sample * sample_weights.to(per_sample.dtype)).mean()


def training_loss(prediction, target, noisy, sigma, x0, temporal_weight: float, kept_frames=None, loss_weights=None):
    """Returns (total, parts) where parts are detached for logging. `loss_weights`: one number per sample (its
    concept's loss_weight); all ones (or None) is the plain mean."""
    weights = None
    if loss_weights is not None and any(float(w) != 1.0 for w in loss_weights):
        weights = torch.as_tensor([float(w) for w in loss_weights], dtype=torch.float32, device=prediction.device)
    flow = flow_matching_loss(prediction, target, kept_frames, weights)
    total = flow
    parts = {"loss/flow": flow.detach()}
    if temporal_weight > 0:
        temporal = temporal_consistency_loss(prediction, noisy, sigma, x0, weights)
        total = total + temporal_weight * temporal
        parts["loss/temporal_consistency"] = temporal.detach()
    return total, parts


def audio_loss(prediction: torch.Tensor, target: torch.Tensor, present: torch.Tensor, loss_weights) -> torch.Tensor:
    """The flow MSE of audio latents (B, ...) over the samples that have sound (`present`), each scaled by its loss
    weight; zero (with a gradient path) when none has."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    weights = present.to(per_sample.dtype) * torch.as_tensor([float(w) for w in loss_weights], dtype=per_sample.dtype,
                                                             device=per_sample.device)
    return (per_sample * weights).sum() / present.sum().clamp(min=1)
