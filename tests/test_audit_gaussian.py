"""Tests for dpfl.audit.gaussian and dpfl.audit.bounds: the μ-GDP (ε, δ) curve, Clopper–Pearson
bounds, ε from test error rates and the streaming threshold test."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate, stats

from dpfl.audit import (
    ThresholdAudit,
    clopper_pearson_upper,
    epsilon_from_rates,
    gaussian_delta,
    gaussian_epsilon,
)


def _delta_by_integration(mu: float, eps: float) -> float:
    """δ(ε) = ∫ max(0, p(x) − e^ε q(x)) dx for p = N(μ, 1), q = N(0, 1), by quadrature."""

    def f(x: float) -> float:
        return max(0.0, stats.norm.pdf(x, mu) - math.exp(eps) * stats.norm.pdf(x))

    # the integrand is positive exactly for x > ε/μ + μ/2
    lo = eps / mu + mu / 2
    val, _ = integrate.quad(f, lo, lo + 40, epsabs=1e-14, epsrel=1e-10, limit=200)
    return val


@pytest.mark.parametrize("mu,eps", [(0.5, 0.1), (1.0, 1.0), (2.0, 3.0), (3.0, 8.0)])
def test_gaussian_delta_matches_integration(mu, eps):
    assert gaussian_delta(mu, eps) == pytest.approx(_delta_by_integration(mu, eps), rel=1e-7)


def test_gaussian_delta_at_zero_is_total_variation():
    # TV(N(0,1), N(μ,1)) = 2Φ(μ/2) − 1 (Dong, Roth & Su, GDP at ε = 0)
    for mu in (0.1, 1.0, 4.0):
        assert gaussian_delta(mu, 0.0) == pytest.approx(2 * stats.norm.cdf(mu / 2) - 1, rel=1e-12)


@pytest.mark.parametrize("z", [0.5, 0.8, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-9])
def test_gaussian_epsilon_matches_dp_accounting_pld(z, delta):
    """One Gaussian release with noise multiplier z is exactly (1/z)-GDP; dp_accounting's PLD
    (connect-the-dots, pessimistic) is an upper bound; for this event it is within ~1e-6."""
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dp_accounting.GaussianDpEvent(z))
    pld = acc.get_epsilon(delta)
    ours = gaussian_epsilon(1 / z, delta)
    assert ours <= pld + 1e-9
    assert ours == pytest.approx(pld, rel=1e-5)


@given(st.floats(0.05, 20.0), st.floats(1e-12, 0.5))
def test_gaussian_epsilon_round_trips_delta(mu, delta):
    eps = gaussian_epsilon(mu, delta)
    if eps == 0.0:
        assert gaussian_delta(mu, 0.0) <= delta
    else:
        assert gaussian_delta(mu, eps) == pytest.approx(delta, rel=1e-6)


@given(st.floats(0.05, 10.0), st.floats(0.05, 10.0), st.floats(1e-10, 0.1))
def test_gaussian_epsilon_is_monotone_in_mu(a, b, delta):
    lo, hi = sorted((a, b))
    assert gaussian_epsilon(lo, delta) <= gaussian_epsilon(hi, delta) + 1e-9


def test_gaussian_edges_and_errors():
    assert gaussian_epsilon(0.0, 1e-5) == 0.0
    assert gaussian_epsilon(math.inf, 1e-5) == math.inf
    assert gaussian_delta(math.inf, 3.0) == 1.0
    with pytest.raises(ValueError, match="mu"):
        gaussian_epsilon(-1.0, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        gaussian_epsilon(1.0, 0.0)
    with pytest.raises(ValueError, match="epsilon"):
        gaussian_delta(1.0, -0.5)


# --------------------------------------------------------------------------- Clopper–Pearson
@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (0, 1000), (50, 1000), (999, 1000)])
def test_clopper_pearson_upper_is_the_exact_binomial_bound(k, n):
    """At the upper bound p, P(Binomial(n, p) <= k) equals alpha (the defining property)."""
    alpha = 0.05
    p = clopper_pearson_upper(k, n, alpha)
    assert stats.binom.cdf(k, n, p) == pytest.approx(alpha, rel=1e-6)
    assert p > k / n


def test_clopper_pearson_coverage():
    """Empirical coverage over 4000 binomial draws is >= 1 − alpha (minus 3 binomial std)."""
    rng = np.random.default_rng(0)
    p, n, alpha = 0.03, 200, 0.1
    draws = rng.binomial(n, p, size=4000)
    covered = np.mean([clopper_pearson_upper(int(k), n, alpha) >= p for k in draws])
    assert covered >= 1 - alpha - 3 * math.sqrt(alpha * (1 - alpha) / 4000)


def test_clopper_pearson_errors():
    assert clopper_pearson_upper(5, 5, 0.05) == 1.0
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson_upper(6, 5, 0.05)
    with pytest.raises(ValueError, match="alpha"):
        clopper_pearson_upper(1, 5, 1.0)


# --------------------------------------------------------------------------- rates -> epsilon
def test_epsilon_from_rates_inverts_the_dp_constraint():
    """For rates on the boundary FPR + e^ε FNR = 1 − δ the bound returns ε exactly."""
    eps, delta, fnr = 2.0, 1e-5, 0.1
    fpr = 1 - delta - math.exp(eps) * fnr
    assert fpr > 0
    # the other direction: FNR + e^ε FPR = 1 − δ
    eps2 = math.log((1 - delta - fpr) / fnr)
    assert epsilon_from_rates(fpr, fnr, delta) == pytest.approx(max(eps2, 0.0))
    assert epsilon_from_rates(0.01, 0.5, delta) == pytest.approx(math.log((0.5 - delta) / 0.01))
    assert epsilon_from_rates(0.5, 0.5, delta) == 0.0
    assert epsilon_from_rates(0.0, 0.5, delta) == math.inf
    assert epsilon_from_rates(0.0, 1.0, delta) == 0.0


@given(st.floats(1e-6, 1.0), st.floats(1e-6, 1.0), st.floats(1e-12, 0.5))
def test_exact_gaussian_rates_never_exceed_gdp_epsilon(x, y, delta):
    """No threshold test on N(0,1) vs N(μ,1) beats the μ-GDP curve (the bound is sound)."""
    mu = 5 * x
    t = 10 * y - 3
    fpr, fnr = stats.norm.sf(t), stats.norm.cdf(t - mu)
    assert epsilon_from_rates(fpr, fnr, delta) <= gaussian_epsilon(mu, delta) + 1e-7


# --------------------------------------------------------------------------- ThresholdAudit
def test_threshold_audit_counts_match_a_direct_count():
    rng = np.random.default_rng(1)
    grid = [-1.0, 0.0, 0.5, 2.0, 3.5]
    audit = ThresholdAudit(grid)
    xs_in, xs_out = rng.normal(1, 1, 5000), rng.normal(0, 1, 7000)
    for part in np.array_split(xs_in, 3):
        audit.observe(torch.from_numpy(part).float(), canary=True)
    audit.observe(xs_out, canary=False)
    xs_in32 = xs_in.astype(np.float32).astype(np.float64)
    assert audit.counts_above(canary=True) == [int((xs_in32 > t).sum()) for t in grid]
    assert audit.counts_above(canary=False) == [int((xs_out > t).sum()) for t in grid]
    assert (audit.trials_in, audit.trials_out) == (5000, 7000)


def test_threshold_audit_scores_on_a_threshold_are_not_above_it():
    audit = ThresholdAudit([0.5, 1.0])
    audit.observe([0.5, 1.0, 1.0000001], canary=True)
    assert audit.counts_above(canary=True) == [2, 1]


def test_threshold_audit_bound_uses_bonferroni_over_the_grid():
    """The bound at one threshold equals the two-rate formula with alpha/(2m) per rate."""
    audit = ThresholdAudit([3.0])
    audit.observe(np.r_[np.full(600, 4.0), np.zeros(400)], canary=True)
    audit.observe(np.r_[np.full(2, 4.0), np.zeros(99_998)], canary=False)
    b = audit.bound(1e-5, confidence=0.9)
    fpr = clopper_pearson_upper(2, 100_000, 0.05)
    fnr = clopper_pearson_upper(400, 1000, 0.05)
    assert b.epsilon == pytest.approx(math.log((1 - 1e-5 - fnr) / fpr))
    assert (b.false_positives, b.false_negatives, b.threshold) == (2, 400, 3.0)
    assert b.to_dict()["epsilon"] == b.epsilon
    # more thresholds, same data: Bonferroni makes each rate bound looser, so ε can only fall
    wide = ThresholdAudit([3.0, 10.0, 11.0, 12.0])
    wide.observe(np.r_[np.full(600, 4.0), np.zeros(400)], canary=True)
    wide.observe(np.r_[np.full(2, 4.0), np.zeros(99_998)], canary=False)
    assert wide.bound(1e-5, confidence=0.9).epsilon < b.epsilon


def test_threshold_audit_errors_change_nothing():
    with pytest.raises(ValueError, match="at least one"):
        ThresholdAudit([])
    with pytest.raises(ValueError, match="finite"):
        ThresholdAudit([0.0, math.inf])
    audit = ThresholdAudit([0.0])
    with pytest.raises(ValueError, match="NaN"):
        audit.observe([1.0, math.nan], canary=True)
    assert audit.trials_in == 0 and audit.counts_above(canary=True) == [0]
    with pytest.raises(ValueError, match="in and"):
        audit.bound(1e-5)
