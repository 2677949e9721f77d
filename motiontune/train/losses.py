"""The training loss: flow matching, plus video_config's temporal consistency term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .flow import predicted_x0


def flow_matching_loss(prediction: torch.Tensor, target: torch.Tensor, kept_frames: torch.Tensor | None = None) -> torch.Tensor:
    """MSE over (B, C, F, H, W); with `kept_frames` (B, F) only those latent frames count, and the mean is
    taken over them, so dropping frames does not shrink the loss."""
    if kept_frames is None:
        return F.mse_loss(prediction.float(), target.float())
    per_frame = (prediction.float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # B, F
    weights = kept_frames.to(per_frame.dtype)
    return (per_frame * weights).sum() / weights.sum()


def frame_dropout_mask(batch: int, frames: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    """(B, F) booleans: each latent frame but the first is left out of the loss with `probability`."""
    kept = torch.rand(batch, frames, generator=generator) >= probability
    kept[:, 0] = True
    return kept


def temporal_consistency_loss(
    prediction: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor
) -> torch.Tensor:
    """MSE between frame-to-frame differences of the predicted clean latent and of the real one.

    Latents are (B, C, F, H, W); a single latent frame has no differences and adds nothing."""
    if x0.shape[2] < 2:
        return prediction.new_zeros((), dtype=torch.float32)
    estimate = predicted_x0(noisy.float(), prediction.float(), sigma)
    return F.mse_loss(estimate.diff(dim=2), x0.float().diff(dim=2))


def training_loss(prediction, target, noisy, sigma, x0, temporal_weight: float, kept_frames=None):
    """Returns (total, parts) where parts are detached for logging."""
    flow = flow_matching_loss(prediction, target, kept_frames)
    total = flow
    parts = {"loss/flow": flow.detach()}
    if temporal_weight > 0:
        temporal = temporal_consistency_loss(prediction, noisy, sigma, x0)
        total = total + temporal_weight * temporal
        parts["loss/temporal_consistency"] = temporal.detach()
    return total, parts
