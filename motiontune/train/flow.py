"""Rectified flow as diffusers' FlowMatchEulerDiscreteScheduler and the stock pipelines use it.

x_t = (1 - σ)·x0 + σ·ε, the target is v = ε - x0, the transformer sees t = 1000·σ, and a shift
maps σ → shift·σ / (1 + (shift - 1)·σ).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _cdf(x: torch.Tensor, distribution: str, shift: float, normal_mean: float, normal_scale: float) -> torch.Tensor:
    """The share of noise levels below x (shifted σ) that `distribution` draws."""
    unshifted = unshift_sigma(x, shift)
    if distribution == "UNIFORM":
        return unshifted
    normal = torch.distributions.Normal(torch.tensor(normal_mean, dtype=torch.float64), normal_scale)
    return normal.cdf(torch.logit(unshifted, eps=1e-12))


@dataclass(frozen=True)
class NoiseSpan:
    """Where one transformer's noise levels come from: the part `source` of the (shifted) distribution, placed
    affinely onto `target` (the same interval when a range cuts the distribution; another when it rescales)."""

    source: tuple[float, float]
    target: tuple[float, float]

    def mass(self, distribution: str, shift: float, normal_mean: float = 0.0, normal_scale: float = 1.0) -> float:
        low, high = (_cdf(torch.tensor(s, dtype=torch.float64), distribution, shift, normal_mean, normal_scale) for s in self.source)
        return float(high - low)


def noise_spans(shares: list[tuple[float, float]], own: list[tuple[float | None, float | None]],
                whole: tuple[float, float] = (0.0, 1.0), mode: str = "RESCALE") -> list[NoiseSpan]:
    """Each transformer's span, from its share of the noise levels (WAN 2.2 A14B's experts split [0, 1] at the
    boundary), its own range (None: all of its share) and the run's range `whole`, which `mode` applies as CUT (the
    part of the distribution inside the range, its shape there unchanged) or RESCALE (the whole distribution squeezed
    affinely into the range). A transformer's own range then cuts, or rescales into itself, the part of the
    distribution its share receives. Raises ValueError for an own range outside the share or an empty span."""
    spans = []
    for (low, high), (own_low, own_high) in zip(shares, own):
        if (own_low is not None and not low <= own_low < high) or (own_high is not None and not low < own_high <= high):
            raise ValueError(f"[{own_low}, {own_high}] reaches outside the noise levels this transformer serves, [{low}, {high}]")
        own_range = (low if own_low is None else own_low, high if own_high is None else own_high)
        if mode == "CUT":
            span = (max(own_range[0], whole[0]), min(own_range[1], whole[1]))
            spans.append(NoiseSpan(span, span))
            continue
        # RESCALE: the run's range maps σ ∈ [0, 1] onto `whole`; the part landing in the share is drawn from there
        width = whole[1] - whole[0]
        landed = (max(low, whole[0]), min(high, whole[1]))
        source = tuple(min(max((s - whole[0]) / width, 0.0), 1.0) for s in landed)
        target = (max(own_range[0], whole[0]), min(own_range[1], whole[1])) if (own_low, own_high) != (None, None) else landed
        spans.append(NoiseSpan(source, target))
    for span in spans:
        if span.source[0] >= span.source[1] or span.target[0] >= span.target[1]:
            raise ValueError(f"no noise level is left: the ranges meet in [{span.target[0]}, {span.target[1]}]")
    return spans


def sample_spans(count: int, spans: list[NoiseSpan], distribution: str, shift: float,
                 generator: torch.Generator | None = None, normal_mean: float = 0.0, normal_scale: float = 1.0) -> torch.Tensor:
    """Noise levels for a batch from the spans of the transformers still training, each span taking its share of the
    distribution's mass. Spans that are plain adjacent pieces of the distribution are drawn as one piece."""
    spans = sorted(spans, key=lambda s: s.target)
    plain = all(s.source == s.target for s in spans) and all(a.source[1] == b.source[0] for a, b in zip(spans, spans[1:]))
    if plain:
        return sample_sigmas(count, distribution, shift, (spans[0].source[0], spans[-1].source[1]), generator,
                             normal_mean, normal_scale)
    masses = torch.tensor([s.mass(distribution, shift, normal_mean, normal_scale) for s in spans], dtype=torch.float64)
    choice = torch.multinomial(masses / masses.sum(), count, replacement=True, generator=generator) if len(spans) > 1 \
        else torch.zeros(count, dtype=torch.long)
    sigma = torch.empty(count)
    for index, span in enumerate(spans):
        rows = (choice == index).nonzero().flatten()
        if not len(rows):
            continue
        drawn = sample_sigmas(len(rows), distribution, shift, span.source, generator, normal_mean, normal_scale).double()
        (s_low, s_high), (t_low, t_high) = span.source, span.target
        placed = t_low + (drawn - s_low) * (t_high - t_low) / (s_high - s_low)
        top = t_high if t_high >= 1.0 else torch.nextafter(torch.tensor(t_high), torch.tensor(0.0)).item()
        sigma[rows] = placed.float().clamp(t_low, top)
    return sigma


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def predicted_x0(noisy: torch.Tensor, prediction: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x̂0 = x_t - σ·v̂ (exact for a perfect v̂)."""
    return noisy - sigma.view(-1, *([1] * (noisy.dim() - 1))) * prediction
