"""Canary in/out audits of the Gaussian mechanism and the DP aggregator (issue 9).

Each audit returns an ε lower bound at δ = 1e-5 holding with confidence 95% (Clopper–Pearson,
Bonferroni over a far-tail threshold grid). On an honest implementation it must stay below the
accountant's ε; the power checks show it *fails* for a deliberately broken mechanism (noise
smaller than accounted, or a noise sampler whose tail is truncated). All seeds are fixed, so each
test is deterministic; for a fresh seed an honest check would falsely alarm with probability
<= 5%.

Slow variants (``pytest -m slow``) audit the real float32 sampler of ``GaussianMechanism`` with
billions of trials, far enough into the tail (5.5-6.5σ) to see a cut at the Box–Muller limit of
24-bit uniforms, sqrt(2·24·ln 2)σ = 5.77σ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from scipy import stats

from dpfl.accounting import PLDAccountant, PoissonRound, RDPAccountant
from dpfl.aggregate import DPAggregator
from dpfl.audit import (
    audit_aggregator,
    audit_gaussian_mechanism,
    gaussian_mechanism_trials,
    tail_thresholds,
)
from dpfl.clip import GlobalClip, PerLayerClip
from dpfl.noise import GaussianMechanism

DELTA = 1e-5


def accountant_epsilon(z: float, kind: str = "pld") -> float:
    """ε of one unsampled Gaussian release with noise multiplier z, as the accountant charges."""
    acc = PLDAccountant() if kind == "pld" else RDPAccountant()
    acc.add_rounds(PoissonRound(noise_multiplier=z, sample_rate=1.0))
    return acc.epsilon(DELTA)


class ClampedMechanism:
    """A deliberately broken sampler: Gaussian noise clamped to ±cut·σ (a truncated tail)."""

    def __init__(self, noise_multiplier: float, sensitivity: float, cut: float, seed: int):
        self.inner = GaussianMechanism(noise_multiplier, sensitivity, seed=seed)
        self.noise_multiplier = noise_multiplier
        self.sensitivity = sensitivity
        self.cut = cut

    def add_noise(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        limit = self.cut * self.inner.std
        noise = self.inner.add_noise({k: torch.zeros_like(v) for k, v in tensors.items()})
        return {k: v + noise[k].clamp(-limit, limit) for k, v in tensors.items()}


# --------------------------------------------------------------------------- Gaussian mechanism
@pytest.mark.parametrize("z", [0.5, 1.0, 2.0])
def test_honest_gaussian_mechanism_stays_below_the_accountant(z):
    bound = audit_gaussian_mechanism(
        GaussianMechanism(z, 0.3, seed=11), trials=400_000, delta=DELTA
    )
    eps = accountant_epsilon(z)
    assert bound.epsilon < eps
    # ... and the audit is not vacuous: it recovers a good part of the true ε
    assert bound.epsilon > 0.5 * eps, (bound, eps)


def test_audit_grows_as_noise_falls():
    eps = [
        audit_gaussian_mechanism(GaussianMechanism(z, 1.0, seed=5), trials=200_000, delta=DELTA)
        for z in (4.0, 2.0, 1.0)
    ]
    assert eps[0].epsilon < eps[1].epsilon < eps[2].epsilon


def test_halved_noise_is_flagged():
    """Noise halved relative to what is accounted: the lower bound exceeds the accountant's ε
    (RDP, the larger of the two accountants), so the audit fails."""
    z = 1.0
    bound = audit_gaussian_mechanism(
        GaussianMechanism(z / 2, 0.3, seed=12),
        trials=400_000,
        delta=DELTA,
        thresholds=tail_thresholds(z),  # the grid is fixed from the accounted z, not the real one
    )
    assert bound.epsilon > accountant_epsilon(z, "rdp") > accountant_epsilon(z)


def test_truncated_tail_is_flagged_by_the_far_tail_thresholds():
    """A sampler clamped at 3.5σ: past the cut no out-trial scores, in-trials still do; the
    far-tail grid turns that into ε above the accountant's. A grid that stops short of the cut
    does not see it: the tail is what the statistic needs."""
    z = 1.0
    broken = ClampedMechanism(z, 0.3, cut=3.5, seed=13)
    bound = audit_gaussian_mechanism(broken, trials=400_000, delta=DELTA)
    assert bound.false_positives == 0 and bound.threshold >= 3.5 * z
    assert bound.epsilon > accountant_epsilon(z, "rdp")
    short = audit_gaussian_mechanism(
        ClampedMechanism(z, 0.3, cut=3.5, seed=13),
        trials=400_000,
        delta=DELTA,
        thresholds=tail_thresholds(z, max_sigmas=3.0),
    )
    assert short.epsilon < accountant_epsilon(z)


def test_trials_count_every_coordinate_and_score_in_sensitivity_units():
    audit = gaussian_mechanism_trials(
        GaussianMechanism(0.5, 2.0, seed=3), trials=50_000, trials_in=20_000, batch_size=7_000
    )
    assert (audit.trials_out, audit.trials_in) == (50_000, 20_000)
    # scores above the 0.5 midpoint: out ~ N(0, 0.25) -> P = Φ(−1); in ~ N(1, 0.25) -> Φ(1)
    j = list(audit.thresholds).index(0.5)
    for canary, n, p in ((False, 50_000, stats.norm.sf(1)), (True, 20_000, stats.norm.cdf(1))):
        k = audit.counts_above(canary=canary)[j]
        assert abs(k - n * p) < 5 * math.sqrt(n * p * (1 - p))  # false alarm ~6e-7


def test_mechanism_without_noise_multiplier_needs_thresholds():
    class Bare:
        sensitivity = 1.0

        def add_noise(self, tensors):
            return dict(tensors)

    with pytest.raises(ValueError, match="thresholds"):
        gaussian_mechanism_trials(Bare(), trials=10)
    bound = audit_gaussian_mechanism(Bare(), trials=1000, delta=DELTA, thresholds=[0.5])
    assert bound.epsilon > 5  # no noise at all: a perfect test


# --------------------------------------------------------------------------- DP aggregator
TEMPLATE = {"w": torch.zeros(6, 5), "b": torch.zeros(5), "g": torch.zeros(3)}


def _background(seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {k: 3 * torch.randn(v.shape, generator=g) for k, v in TEMPLATE.items()} for _ in range(2)
    ]


@pytest.mark.parametrize(
    "clipper",
    [GlobalClip(0.5), PerLayerClip(0.5, allocation="uniform"), PerLayerClip(0.5, normalize=True)],
    ids=["global", "per-layer-uniform", "per-layer-normalize"],
)
def test_honest_aggregator_release_stays_below_the_accountant(clipper):
    z = 1.0
    agg = DPAggregator(
        clipper, GaussianMechanism(z, 0.5, seed=21), expected_cohort_size=3, template=TEMPLATE
    )
    bound = audit_aggregator(
        agg, TEMPLATE, trials=1500, delta=DELTA, background=_background(1), seed=2
    )
    assert 0.5 < bound.epsilon < accountant_epsilon(z)


def test_aggregator_with_too_little_noise_is_flagged():
    """An aggregator whose mechanism adds a quarter of the accounted noise: flagged with 3000
    releases (expected bound ~1.2 vs 1.01); the halved case needs ~100x more releases (slow
    variant)."""
    z = 4.0
    agg = DPAggregator(
        GlobalClip(0.5), GaussianMechanism(z / 4, 0.5, seed=22), expected_cohort_size=3
    )
    bound = audit_aggregator(
        agg, TEMPLATE, trials=3000, delta=DELTA, thresholds=tail_thresholds(z), seed=3
    )
    assert bound.epsilon > accountant_epsilon(z, "rdp")


def test_audit_aggregator_refuses_pending_users():
    agg = DPAggregator(GlobalClip(0.5), GaussianMechanism(1.0, 0.5, seed=0), expected_cohort_size=2)
    agg.add({k: torch.ones_like(v) for k, v in TEMPLATE.items()})
    with pytest.raises(ValueError, match="pending"):
        audit_aggregator(agg, TEMPLATE, trials=10, delta=DELTA)
    assert agg.num_users == 1


# --------------------------------------------------------------------------- slow variants
@pytest.mark.slow
def test_slow_aggregator_with_halved_noise_is_flagged():
    """200,000 releases (minutes): expected bound ~2.5 against the accountant's 2.17 (RDP);
    with 40,000 the expected bound (~2.1) would not clear it."""
    z = 2.0
    agg = DPAggregator(
        PerLayerClip(0.5), GaussianMechanism(z / 2, 0.5, seed=23), expected_cohort_size=3
    )
    bound = audit_aggregator(
        agg, TEMPLATE, trials=200_000, delta=DELTA, thresholds=tail_thresholds(z), seed=4
    )
    assert bound.epsilon > accountant_epsilon(z, "rdp")


#: Far-tail audit of the real sampler: z = 0.55 puts the in-trials 1.82σ closer to a tail cut;
#: 4e9 out-trials resolve false-positive rates of ~2e-9, enough for a cut at 5.77σ to push the
#: bound above the accountant's ε (expected ~9.5 vs 8.9), while an honest sampler gives ~8.3.
TAIL_Z, TAIL_OUT, TAIL_IN = 0.55, 4_000_000_000, 400_000_000
TAIL_SIGMAS = np.round(np.arange(5.5, 6.5001, 0.05), 2)


@pytest.fixture(scope="module")
def far_tail_trials():
    torch.set_num_threads(2)
    try:
        return gaussian_mechanism_trials(
            GaussianMechanism(TAIL_Z, 1.0, seed=2024),
            trials=TAIL_OUT,
            trials_in=TAIL_IN,
            thresholds=TAIL_Z * TAIL_SIGMAS,
            batch_size=2**24,
        )
    finally:
        torch.set_num_threads(1)


@pytest.mark.slow
def test_slow_far_tail_audit_of_the_real_sampler_stays_below_the_accountant(far_tail_trials):
    bound = far_tail_trials.bound(DELTA, confidence=0.95)
    assert bound.epsilon < accountant_epsilon(TAIL_Z), bound


@pytest.mark.slow
def test_slow_sampler_tail_counts_are_gaussian(far_tail_trials):
    """Out-trials are the sampler's own draws (in σ units): the count beyond each tail point t
    must be Binomial(n, P(N > t)). Checked at each of the 21 points between the 1e-5 lower and
    the 1e-6 upper binomial quantiles (false alarm <= 21 · 1.1e-5 ≈ 2.3e-4 for a fresh seed).
    A sampler cut at 5.77σ has no draw past it, where ~13 (at least 1) are expected beyond 5.8σ."""
    counts = far_tail_trials.counts_above(canary=False)
    for k, sigmas in zip(counts, TAIL_SIGMAS, strict=True):
        p = stats.norm.sf(sigmas)
        lo, hi = stats.binom.ppf(1e-5, TAIL_OUT, p), stats.binom.isf(1e-6, TAIL_OUT, p)
        assert lo <= k <= hi, (sigmas, k, TAIL_OUT * p)
