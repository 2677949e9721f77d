"""Noise ranges: `min_noising_strength` / `max_noising_strength` for the run and per transformer (WAN 2.2 A14B's
experts), applied as `noising_strength_mode` CUT or RESCALE. 10 000 draws from the trainer's own sampler are compared
with the distributions written out independently here: the shifted logit-normal (σ = shift·s / (1 + (shift-1)·s),
s = sigmoid(z), z ~ N(0, 1)) cut to a range, or squeezed into it, by Kolmogorov-Smirnov; each expert's share of the
samples by its binomial error. Each check is also run against the other mode's distribution, which it must reject."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from motiontune.config import TrainConfig
from motiontune.models.base import Expert
from motiontune.train.flow import sample_spans
from motiontune.train.step import expected_shares, noise_plan

N = 10_000
KS_LIMIT = 1.63 / math.sqrt(N)  # the 1% critical value of the one-sample KS statistic
BOUNDARY = 0.875  # WAN 2.2 A14B text-to-video
HIGH = Expert("transformer", "high_noise", None, (BOUNDARY, 1.0))
LOW = Expert("transformer_2", "low_noise", None, (0.0, BOUNDARY))
SINGLE = Expert("transformer", "", None, (0.0, 1.0))


def shifted_cdf(x: torch.Tensor, shift: float) -> torch.Tensor:
    """P(σ <= x) for the shifted logit-normal: invert the shift, then the logistic, then Φ."""
    x = torch.as_tensor(x, dtype=torch.float64)
    s = x / (shift - (shift - 1) * x)
    z = torch.log(s / (1 - s))
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def cut_cdf(low: float, high: float, shift: float):
    return lambda x: ((shifted_cdf(x.clamp(low, high), shift) - shifted_cdf(low, shift))
                      / (shifted_cdf(high, shift) - shifted_cdf(low, shift)))


def rescaled_cdf(source: tuple[float, float], target: tuple[float, float], shift: float):
    """The part `source` of the distribution, cut there and placed affinely onto `target`."""
    inner = cut_cdf(*source, shift)
    return lambda x: inner(source[0] + (x.clamp(*target) - target[0]) * (source[1] - source[0]) / (target[1] - target[0]))


def ks(samples: torch.Tensor, cdf) -> float:
    x = samples.double().sort().values
    model = cdf(x.clamp(1e-9, 1 - 1e-9))
    n = len(x)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - model
    below = model - torch.arange(n, dtype=torch.float64) / n
    return max(above.max().item(), below.max().item())


def draw(experts: list[Expert], shift: float, **keys) -> tuple[torch.Tensor, TrainConfig]:
    config = TrainConfig.model_validate({"timestep_distribution": "LOGIT_NORMAL", "timestep_shift": shift, **keys})
    spans = noise_plan(config, experts)
    sigma = sample_spans(N, list(spans.values()), "LOGIT_NORMAL", shift, torch.Generator().manual_seed(0))
    return sigma, config


@pytest.mark.parametrize("mode", ["CUT", "RESCALE"])
def test_run_wide_range_cuts_or_rescales_the_shifted_distribution(mode):
    shift, low, high = 3.0, 0.3, 0.8
    sigma, _ = draw([SINGLE], shift, min_noising_strength=low, max_noising_strength=high, noising_strength_mode=mode)
    assert sigma.min() >= low and sigma.max() <= high
    cut, rescaled = ks(sigma, cut_cdf(low, high, shift)), ks(sigma, rescaled_cdf((0.0, 1.0), (low, high), shift))
    print(f"{mode} [{low}, {high}], shift {shift}: KS to the cut distribution {cut:.4f}, to the rescaled one "
          f"{rescaled:.4f} (1% limit {KS_LIMIT:.4f})")
    assert (cut if mode == "CUT" else rescaled) < KS_LIMIT
    assert (rescaled if mode == "CUT" else cut) > 3 * KS_LIMIT


@pytest.mark.parametrize("mode", ["CUT", "RESCALE"])
def test_expert_ranges_give_the_expected_shares_and_shapes(mode):
    """WAN 2.2 A14B: the high-noise expert on [0.9, 1], the low-noise one on [0.2, 0.7]. CUT: each expert gets the
    distribution's mass inside its range; RESCALE: the mass of its whole share, squeezed into its range."""
    shift, high_range, low_range = 5.0, (0.9, 1.0), (0.2, 0.7)
    sigma, config = draw([HIGH, LOW], shift, noising_strength_mode=mode,
                         transformer={"min_noising_strength": high_range[0]},
                         transformer_2={"min_noising_strength": low_range[0], "max_noising_strength": low_range[1]})
    high_rows, low_rows = sigma[sigma >= BOUNDARY], sigma[sigma < BOUNDARY]  # routed as the trainer routes
    mass = lambda a, b: (shifted_cdf(b, shift) - shifted_cdf(a, shift)).item()  # noqa: E731
    if mode == "CUT":
        expected = mass(*high_range) / (mass(*high_range) + mass(*low_range))
        high_cdf, low_cdf = cut_cdf(*high_range, shift), cut_cdf(*low_range, shift)
        other_low = rescaled_cdf((0.0, BOUNDARY), low_range, shift)
    else:
        expected = mass(BOUNDARY, 1.0)
        high_cdf = rescaled_cdf((BOUNDARY, 1.0), high_range, shift)
        low_cdf = rescaled_cdf((0.0, BOUNDARY), low_range, shift)
        other_low = cut_cdf(*low_range, shift)
    measured = len(high_rows) / N
    error = math.sqrt(expected * (1 - expected) / N)
    shares = expected_shares(config, noise_plan(config, [HIGH, LOW]))
    print(f"{mode}: high-noise expert's share {measured:.4f}, expected {expected:.4f} ± {error:.4f}; KS high "
          f"{ks(high_rows, high_cdf):.4f}, low {ks(low_rows, low_cdf):.4f}, low against the other mode "
          f"{ks(low_rows, other_low):.4f}")
    assert abs(measured - expected) < 4 * error
    assert shares["transformer"] == pytest.approx(expected, rel=1e-6)
    assert high_rows.min() >= high_range[0] and low_rows.min() >= low_range[0] and low_rows.max() <= low_range[1]
    assert ks(high_rows, high_cdf) < 1.63 / math.sqrt(len(high_rows))
    assert ks(low_rows, low_cdf) < 1.63 / math.sqrt(len(low_rows))
    assert ks(low_rows, other_low) > 3 * 1.63 / math.sqrt(len(low_rows))


def test_no_range_keeps_the_expert_split_of_the_whole_distribution():
    sigma, _ = draw([HIGH, LOW], 5.0)
    expected = 1 - shifted_cdf(BOUNDARY, 5.0).item()
    assert abs((sigma >= BOUNDARY).float().mean().item() - expected) < 4 * math.sqrt(expected * (1 - expected) / N)
    assert ks(sigma, cut_cdf(0.0, 1.0, 5.0)) < KS_LIMIT


def test_bad_ranges_are_refused_by_name():
    with pytest.raises(ValueError, match="transformer.min_noising_strength / max_noising_strength.*high-noise expert"):
        noise_plan(TrainConfig.model_validate({"transformer": {"max_noising_strength": 0.8}}), [HIGH, LOW])
    with pytest.raises(ValueError, match="no noise level is left"):  # the run's range misses the high-noise share
        noise_plan(TrainConfig.model_validate({"max_noising_strength": 0.5, "noising_strength_mode": "CUT"}), [HIGH, LOW])
    for keys, named in (({"min_noising_strength": 0.6, "max_noising_strength": 0.4}, "must be below"),
                        ({"max_noising_strength": 1.5}, "max_noising_strength"),
                        ({"noising_strength_mode": "CLIP"}, "noising_strength_mode"),
                        ({"transformer_2": {"min_noising_strength": 0.5, "max_noising_strength": 0.5}}, "must be below")):
        with pytest.raises(ValueError, match=named):
            TrainConfig.model_validate(keys)


def test_the_log_states_each_experts_noise_levels_and_share(caplog):
    """What a run logs once its step is set up (train/step.py), for the ranges of the test above (CUT)."""
    from motiontune.train.step import ExpertTraining, log_noise_levels

    config = TrainConfig.model_validate({"timestep_shift": 5.0, "noising_strength_mode": "CUT",
                                         "transformer": {"min_noising_strength": 0.9},
                                         "transformer_2": {"min_noising_strength": 0.2, "max_noising_strength": 0.7}})
    trainings = [ExpertTraining(expert, [], None, None) for expert in (HIGH, LOW)]
    with caplog.at_level(logging.INFO, logger="motiontune"):
        log_noise_levels(config, trainings, noise_plan(config, [HIGH, LOW]))
    assert caplog.messages == ["high_noise trains on noise levels [0.900, 1.000]: 55.7% of the samples",
                               "low_noise trains on noise levels [0.200, 0.700]: 44.3% of the samples"]
