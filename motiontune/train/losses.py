"""The training loss: flow matching, plus video_config's temporal consistency term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .flow import predicted_x0


def flow_matching_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction.float(), target.float())


def temporal_consistency_loss(
    prediction: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor
) -> torch.Tensor:
    """MSE between frame-to-frame differences of the predicted clean latent and of the real one.

    Latents are (B, C, F, H, W); a single latent frame has no differences and adds nothing."""
    if x0.shape[2] < 2:
        return prediction.new_zeros((), dtype=torch.float32)
    estimate = predicted_x0(noisy.float(), prediction.float(), sigma)
    return F.mse_loss(estimate.diff(dim=2), x0.float().diff(dim=2))


def training_loss(prediction, target, noisy, sigma, x0, temporal_weight: float):
    """Returns (total, parts) where parts are detached for logging."""
    flow = flow_matching_loss(prediction, target)
    total = flow
    parts = {"loss/flow": flow.detach()}
    if temporal_weight > 0:
        temporal = temporal_consistency_loss(prediction, noisy, sigma, x0)
        total = total + temporal_weight * temporal
        parts["loss/temporal_consistency"] = temporal.detach()
    return total, parts
