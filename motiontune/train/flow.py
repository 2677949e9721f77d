"""Rectified flow as diffusers' FlowMatchEulerDiscreteScheduler and the stock pipelines use it.

x_t = (1 - σ)·x0 + σ·ε, the target is v = ε - x0, the transformer sees t = 1000·σ, and a shift
maps σ → shift·σ / (1 + (shift - 1)·σ).
"""

from __future__ import annotations

import torch


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def unshift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return sigma / (shift - (shift - 1) * sigma)


def sample_sigmas(
    count: int,
    distribution: str,
    shift: float,
    sigma_range: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
    normal_mean: float = 0.0,
    normal_scale: float = 1.0,
) -> torch.Tensor:
    """Noise levels for a batch, drawn from `distribution`, shifted, and confined to `sigma_range`
    (a WAN 2.2 expert's share) by sampling only that part of the distribution, not by clamping."""
    low, high = (unshift_sigma(torch.tensor(s, dtype=torch.float64), shift) for s in sigma_range)
    if distribution == "UNIFORM":
        u = torch.rand(count, generator=generator, dtype=torch.float64)
        sigma = low + (high - low) * u
    elif distribution in ("LOGIT_NORMAL", "SIGMOID"):
        # σ = sigmoid(z), z ~ N(mean, scale): sample z by inverse CDF between the range's limits.
        normal = torch.distributions.Normal(torch.tensor(normal_mean, dtype=torch.float64), normal_scale)
        lo_cdf, hi_cdf = (normal.cdf(torch.logit(s, eps=1e-12)) for s in (low, high))
        u = lo_cdf + (hi_cdf - lo_cdf) * torch.rand(count, generator=generator, dtype=torch.float64)
        sigma = torch.sigmoid(normal.icdf(u.clamp(1e-12, 1 - 1e-12)))
    else:
        raise ValueError(f"unknown timestep_distribution {distribution!r}")
    sigma = shift_sigma(sigma, shift).float()
    # the range is half-open, [low, high), except that 1.0 belongs to the top one
    top = sigma_range[1] if sigma_range[1] >= 1.0 else torch.nextafter(torch.tensor(sigma_range[1]), torch.tensor(0.0)).item()
    return sigma.clamp(sigma_range[0], top)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def predicted_x0(noisy: torch.Tensor, prediction: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x̂0 = x_t - σ·v̂ (exact for a perfect v̂)."""
    return noisy - sigma.view(-1, *([1] * (noisy.dim() - 1))) * prediction
