"""The noise sampler's ceiling in δ (issue 21, point 1; design.md §6 "noise distribution").

Guarantee protected: the (ε, δ) an accountant reports holds for dpfl's sampler, whose draws
never exceed NOISE_CEILING = sqrt(252 ln 2) σ, for every noise multiplier it accepts: the
probability that a release with the user lands where no release without the user can is
bounded by ``ceiling_delta`` per participation and paid out of δ.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from dpfl.accounting import (
    NOISE_CEILING,
    BudgetExceededError,
    FixedCohortRound,
    PLDAccountant,
    PoissonRound,
    PrivacyBudget,
    RDPAccountant,
    calibrate_noise_multiplier,
    ceiling_delta,
    epsilon_for,
    ledger_ceiling_delta,
)
from dpfl.accounting.ceiling import CEILING_SLACK

M = NOISE_CEILING
ORDERS = [*range(2, 65), 80, 96, 128, 256]


def escape_probability(shifts: np.ndarray) -> float:
    """P(some Box–Muller pair of the release with the user lies >= M from the user-free centre)
    summed over pairs (exact per pair: ‖a + Z‖² is noncentral χ² with 2 dof), plus the mass the
    sampler moves inside the ceiling (2^-126 per pair)."""
    return float(np.sum(sps.ncx2.sf(M * M, 2, shifts**2))) + shifts.size * 2.0**-126


@settings(max_examples=300, deadline=None)
@given(
    st.floats(min_value=1 / (M - 2), max_value=1e3),
    st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=64),
    st.integers(min_value=0, max_value=40),
)
def test_ceiling_delta_bounds_the_escape_probability_for_any_split_of_the_shift(
    z: float, weights: list[float], spread: int
) -> None:
    """However the user's shift (L2 norm C, i.e. 1/z in σ) is split over the release's pairs,
    the probability of landing beyond the ceiling is at most ceiling_delta(z): the one-pair
    worst case of the derivation, with ``spread`` extra pairs each carrying a tiny share."""
    w = np.array(weights + [1e-3] * spread)
    if not w.any():
        w[0] = 1.0
    shifts = np.sqrt(w / w.sum()) / z  # Σ b_k² = (1/z)²
    assert escape_probability(shifts) <= ceiling_delta(z)
    assert escape_probability(np.array([1.0 / z])) <= ceiling_delta(z)


@pytest.mark.parametrize("z", [0.09, 0.15, 0.2, 0.25, 0.3, 0.6144, 1.0, 5.0])
def test_ceiling_delta_is_the_stated_closed_form(z: float) -> None:
    """exp(-(M - 1/z)²/2) + 2^-70 per participation (1 once 1/z > M - 2); at the paper's z it is
    below 1e-20, and the one-pair value it bounds is within a factor ~30 of it."""
    expected = 1.0 if 1 / z > M - 2 else math.exp(-((M - 1 / z) ** 2) / 2) + CEILING_SLACK
    assert ceiling_delta(z) == pytest.approx(expected, rel=1e-12)
    if expected < 1:
        exact = escape_probability(np.array([1.0 / z]))
        assert exact <= ceiling_delta(z) <= max(40 * exact, 1e-21)
    assert ceiling_delta(0.6144) < 1e-20


def test_ceiling_delta_of_a_ledger_is_the_union_bound_over_participations() -> None:
    """q · count per participation, plus the slack per release; replace-one shifts by 2C."""
    poisson, fixed = PoissonRound(0.3, 0.01), FixedCohortRound(0.6, 10, 1000)
    assert ledger_ceiling_delta([(poisson, 100)]) == pytest.approx(
        100 * (0.01 * ceiling_delta(0.3) + CEILING_SLACK), rel=1e-12
    )
    assert ledger_ceiling_delta([(fixed, 7)]) == pytest.approx(
        7 * (0.01 * ceiling_delta(0.3) + CEILING_SLACK), rel=1e-12
    )
    counted = PoissonRound(0.3, 0.5, count_noise_multiplier=0.4)  # z_eff = 0.24
    assert ledger_ceiling_delta([(counted, 1)]) == pytest.approx(
        0.5 * ceiling_delta(0.24) + CEILING_SLACK, rel=1e-12
    )
    assert ledger_ceiling_delta([(PoissonRound(0.0, 0.5), 3)]) == 0.0  # ε is ∞ already
    assert ledger_ceiling_delta([(PoissonRound(0.05, 1.0), 5)]) == 1.0


def _gaussian_epsilon(z: float, q: float, t: int, delta: float) -> float:
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    acc = dp_accounting.rdp.RdpAccountant(ORDERS).compose(event, t)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize("share", [0.1, 0.5])
def test_accountants_pay_the_ceiling_out_of_delta(share: float) -> None:
    """At z = 0.15 the ceiling's δ is 4.8e-10 per participation: with δ = floor / share the
    reported ε is the Gaussian ε at δ − floor, δ(ε) is the Gaussian δ plus the floor, and once
    the floor reaches δ no finite ε holds."""
    z, q, t = 0.15, 1.0, 1
    floor = ceiling_delta(z) + CEILING_SLACK
    delta = floor / share
    acc = RDPAccountant(orders=ORDERS)
    acc.add_rounds(PoissonRound(z, q), t)
    assert acc.ceiling_delta == pytest.approx(floor, rel=1e-12)
    eps = acc.epsilon(delta)
    assert eps == pytest.approx(_gaussian_epsilon(z, q, t, delta - floor), rel=1e-9)
    assert eps > _gaussian_epsilon(z, q, t, delta)
    assert acc.delta(eps) == pytest.approx(
        float(dp_accounting.rdp.RdpAccountant(ORDERS)
              .compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
              .get_delta(eps)) + floor,
        rel=1e-6,
    )
    assert acc.epsilon(floor) == math.inf
    assert acc.epsilon(0.99 * floor) == math.inf
    assert epsilon_for(z, q, t, delta, orders=ORDERS) == pytest.approx(eps, rel=1e-12)
    assert epsilon_for(z, q, t, floor, orders=ORDERS) == math.inf


def test_pld_accountant_pays_the_ceiling_too() -> None:
    acc = PLDAccountant()
    acc.add_rounds(PoissonRound(0.2, 0.5), 10)
    assert acc.ceiling_delta == pytest.approx(10 * (0.5 * ceiling_delta(0.2) + CEILING_SLACK))
    assert acc.epsilon(acc.ceiling_delta) == math.inf
    assert math.isfinite(acc.epsilon(1e-5))


def test_a_budget_names_the_ceiling_when_it_alone_exhausts_delta() -> None:
    acc = RDPAccountant(budget=PrivacyBudget(1e6, 1e-9), orders=ORDERS)
    with pytest.raises(BudgetExceededError, match=r"13\.216-sigma ceiling .*noise_multiplier=0\.1"):
        acc.add_rounds(PoissonRound(0.1, 0.5))
    assert acc.rounds == 0


def test_calibration_never_returns_a_noise_multiplier_the_ceiling_rules_out() -> None:
    """A huge target ε would be met by a tiny z for a Gaussian; the ceiling's δ rules those out,
    so the calibrated z keeps the floor below δ and meets the target with it."""
    delta, q, t = 1e-9, 0.5, 100
    z = calibrate_noise_multiplier(1e4, delta, q, t, orders=ORDERS)
    assert ledger_ceiling_delta([(PoissonRound(z, q), t)]) < delta
    assert epsilon_for(z, q, t, delta, orders=ORDERS) <= 1e4
    assert epsilon_for(0.9 * z, q, t, delta, orders=ORDERS) > 1e4
