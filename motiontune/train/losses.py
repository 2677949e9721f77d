"""The training loss: flow matching, plus video_config's temporal consistency term, each sample weighted by its
concept's loss_weight, and with masked training each latent weighted by the clip's mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .flow import predicted_x0


def flow_matching_loss(prediction: torch.Tensor, target: torch.Tensor, kept_frames: torch.Tensor | None = None,
                       sample_weights: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE over (B, C, F, H, W); with `kept_frames` (B, F) only those latent frames count, and the mean is
    taken over them, so dropping frames does not shrink the loss. `sample_weights` (B,) scale each sample's
    part of that mean (a weight 2 counts the sample twice; the mean still divides by the plain count).
    `mask` (B, 1, F, H, W) weighs each latent (masked training)."""
    if kept_frames is None and sample_weights is None and mask is None:
        return F.mse_loss(prediction.float(), target.float())
    squared = (prediction.float() - target.float()).pow(2)
    per_frame = (squared if mask is None else squared * mask).mean(dim=(1, 3, 4))  # B, F
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
    sample_weights: torch.Tensor | None = None, mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between frame-to-frame differences of the predicted clean latent and of the real one (each sample's
    part scaled by `sample_weights`; with `mask` (B, 1, F - 1, H, W), each difference weighted).

    Latents are (B, C, F, H, W); a single latent frame has no differences and adds nothing."""
    if x0.shape[2] < 2:
        return prediction.new_zeros((), dtype=torch.float32)
    estimate = predicted_x0(noisy.float(), prediction.float(), sigma)
    if sample_weights is None and mask is None:
        return F.mse_loss(estimate.diff(dim=2), x0.float().diff(dim=2))
    squared = (estimate.diff(dim=2) - x0.float().diff(dim=2)).pow(2)
    per_sample = (squared if mask is None else squared * mask).mean(dim=(1, 2, 3, 4))
    return (per_sample if sample_weights is None else per_sample * sample_weights.to(per_sample.dtype)).mean()


def loss_mask(masks: list, shape: tuple[int, ...], unmasked_probability: float, unmasked_weight: float,
              generator: torch.Generator) -> torch.Tensor:
    """Masked training's weights (B, 1, F, H, W) for latents of `shape`, as OneTrainer makes them: each sample's
    mask (F, H, W), all ones for a clip without one and for a sample drawn (`unmasked_probability`) to train
    unmasked, then clamped to [unmasked_weight, 1], so outside the mask still weighs `unmasked_weight`. Latent frames
    the family puts before the clip's own (VACE: a reference picture's) are not the clip's: they weigh fully."""
    unmasked = (torch.rand(len(masks), generator=generator) < unmasked_probability).tolist()
    weights = torch.ones(shape[0], 1, *shape[2:])
    for row, (mask, off) in enumerate(zip(masks, unmasked)):
        if mask is not None and not off:
            weights[row, 0, shape[2] - mask.shape[0]:] = mask
    return weights.clamp(min=unmasked_weight)


def normalized_mask(weights: torch.Tensor, kept_frames: torch.Tensor | None = None) -> torch.Tensor:
    """normalize_masked_area_loss: each sample's weights divided by their mean over its kept frames, so a small
    subject teaches as much per step as a large one (a sample weighing nothing stays at nothing)."""
    per_frame = weights.mean(dim=(1, 3, 4))  # B, F
    kept = torch.ones_like(per_frame) if kept_frames is None else kept_frames.to(per_frame.dtype)
    mean = (per_frame * kept).sum(dim=1) / kept.sum(dim=1).clamp(min=1)
    return weights / mean.clamp(min=1e-12).view(-1, 1, 1, 1, 1)


def training_loss(prediction, target, noisy, sigma, x0, temporal_weight: float, kept_frames=None, loss_weights=None,
                  mask=None, normalize_mask: bool = False):
    """Returns (total, parts) where parts are detached for logging. `loss_weights`: one number per sample (its
    concept's loss_weight); all ones (or None) is the plain mean. `mask`: loss_mask's weights (masked training);
    the temporal term weighs each frame-to-frame difference by the mean of its two frames' weights, so motion
    inside the mask counts fully, and motion into or out of it half."""
    weights = None
    if loss_weights is not None and any(float(w) != 1.0 for w in loss_weights):
        weights = torch.as_tensor([float(w) for w in loss_weights], dtype=torch.float32, device=prediction.device)
    flow_mask = temporal_mask = None
    if mask is not None:
        mask = mask.float()
        flow_mask = normalized_mask(mask, kept_frames) if normalize_mask else mask
        temporal_mask = (mask[:, :, 1:] + mask[:, :, :-1]) / 2
        temporal_mask = normalized_mask(temporal_mask) if normalize_mask and mask.shape[2] > 1 else temporal_mask
    flow = flow_matching_loss(prediction, target, kept_frames, weights, flow_mask)
    total = flow
    parts = {"loss/flow": flow.detach()}
    if temporal_weight > 0:
        temporal = temporal_consistency_loss(prediction, noisy, sigma, x0, weights, temporal_mask)
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
