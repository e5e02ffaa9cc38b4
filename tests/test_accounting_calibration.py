"""Noise calibration and population extrapolation."""

from __future__ import annotations

import dataclasses
import math

import dp_accounting
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant as DpaRDP
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfl.accounting.calibration import calibrate_noise_multiplier, epsilon_for
from dpfl.accounting.extrapolation import Extrapolation, extrapolate

FAST_ORDERS = [*range(2, 33), 40, 48, 64, 128, 256]  # integer orders: closed form, monotone


def _eps(z: float, q: float, t: int, delta: float, accountant: str = "rdp") -> float:
    orders = FAST_ORDERS if accountant == "rdp" else None
    return epsilon_for(z, q, t, delta, accountant=accountant, orders=orders)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- calibration
@settings(max_examples=12)
@given(
    st.floats(min_value=0.2, max_value=20.0),
    st.floats(min_value=1e-4, max_value=1.0),
    st.integers(min_value=1, max_value=20_000),
    st.sampled_from([1e-5, 1e-9]),
)
def test_rdp_calibration_is_one_sided_and_tight(eps: float, q: float, t: int, delta: float) -> None:
    z = calibrate_noise_multiplier(eps, delta, q, t, orders=FAST_ORDERS)
    assert _eps(z, q, t, delta) <= eps  # never over the target
    assert _eps(z / 1.01, q, t, delta) > eps  # within 1% of the smallest feasible z
    assert _eps(z / (1 + 1e-3), q, t, delta) > eps  # and within the default rtol


@settings(max_examples=3)
@given(
    st.floats(min_value=1.0, max_value=10.0),
    st.floats(min_value=1e-3, max_value=0.05),
    st.integers(min_value=1, max_value=300),
)
def test_pld_calibration_is_one_sided_and_tight(eps: float, q: float, t: int) -> None:
    # PLD evaluations are costly: a 1e-2 grid keeps each composition cheap (same search code).
    grid = {"accountant": "pld", "value_discretization_interval": 1e-2}
    z = calibrate_noise_multiplier(eps, 1e-6, q, t, rtol=1e-2, **grid)  # type: ignore[arg-type]
    assert epsilon_for(z, q, t, 1e-6, **grid) <= eps  # type: ignore[arg-type]
    assert epsilon_for(z / 1.01, q, t, 1e-6, **grid) > eps  # type: ignore[arg-type]


def test_calibration_agrees_with_dp_accounting() -> None:
    target, delta, q, t = 7.2, 1e-9, 0.002947, 2034
    ours = calibrate_noise_multiplier(target, delta, q, t, rtol=1e-3)
    theirs = dp_accounting.calibrate_dp_mechanism(
        DpaRDP,
        lambda z: dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), t
        ),
        target,
        delta,
        tol=1e-5,
    )
    # both return a feasible z near the optimum z*: ours in [z*, (1 + 1e-3) z*], theirs within 1e-5
    assert ours == pytest.approx(theirs, rel=1.1e-3)
    assert ours >= theirs - 1e-6  # both are feasible upper ends; ours is not below the optimum


def test_pld_needs_less_noise_than_rdp() -> None:
    rdp = calibrate_noise_multiplier(2.0, 1e-6, 0.01, 100, orders=FAST_ORDERS, rtol=1e-2)
    pld = calibrate_noise_multiplier(2.0, 1e-6, 0.01, 100, accountant="pld", rtol=1e-2)
    assert pld < rdp


def test_zero_rounds_need_no_noise() -> None:
    assert calibrate_noise_multiplier(1.0, 1e-5, 0.5, 0) == 0.0


def test_unreachable_target_raises() -> None:
    with pytest.raises(ValueError, match="cannot be met"):
        calibrate_noise_multiplier(
            1e-6, 1e-9, 1.0, 2000, max_noise_multiplier=50.0, orders=FAST_ORDERS
        )


@pytest.mark.parametrize(
    ("args", "kwargs", "name"),
    [
        ((0.0, 1e-5, 0.1, 10), {}, "target_epsilon"),
        ((-1.0, 1e-5, 0.1, 10), {}, "target_epsilon"),
        ((1.0, 0.0, 0.1, 10), {}, "delta"),
        ((1.0, 1.0, 0.1, 10), {}, "delta"),
        ((1.0, 1e-5, 0.0, 10), {}, "sample_rate"),
        ((1.0, 1e-5, 1.01, 10), {}, "sample_rate"),
        ((1.0, 1e-5, 0.1, -1), {}, "rounds"),
        ((1.0, 1e-5, 0.1, 10), {"accountant": "moments"}, "accountant"),
        ((1.0, 1e-5, 0.1, 10), {"rtol": 0.1}, "rtol"),
        ((1.0, 1e-5, 0.1, 10), {"max_noise_multiplier": 0.0}, "max_noise_multiplier"),
    ],
)
def test_calibration_validates_arguments(args: tuple, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        calibrate_noise_multiplier(*args, **kwargs)


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((-0.5, 0.1, 10, 1e-5), "noise_multiplier"),
        ((1.0, -0.1, 10, 1e-5), "sample_rate"),
        ((1.0, 0.1, -3, 1e-5), "rounds"),
        ((1.0, 0.1, 10, 2.0), "delta"),
    ],
)
def test_epsilon_for_validates_arguments(args: tuple, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        epsilon_for(*args)


# --------------------------------------------------------------------------- extrapolation
PAPER_ROWS = [  # sigma_dp, S, K, T, epsilon reported (RDP, delta = 1e-9); arXiv 2310.00098 2.4
    (3e-6, 204_800, 69.5e6, 2034, 7.2),
    (1e-5, 204_800, 6.95e6, 2006, 4.5),
    (3e-6, 204_800, 695e6, 3390, 3.7),
]


@pytest.mark.parametrize(("sigma_dp", "cohort", "population", "rounds", "reported"), PAPER_ROWS)
def test_paper_extrapolation_values(
    sigma_dp: float, cohort: int, population: float, rounds: int, reported: float
) -> None:
    rdp = extrapolate(
        sigma_dp=sigma_dp, cohort_size=cohort, population=population, rounds=rounds, delta=1e-9
    )
    assert abs(rdp.epsilon - reported) <= 0.1
    assert rdp.noise_multiplier == pytest.approx(sigma_dp * cohort)
    assert rdp.sample_rate == pytest.approx(cohort / population)
    pld = extrapolate(
        sigma_dp=sigma_dp,
        cohort_size=cohort,
        population=population,
        rounds=rounds,
        delta=1e-9,
        accountant="pld",
    )
    assert 0 < pld.epsilon < rdp.epsilon  # PLD is tighter on these runs


@settings(max_examples=20)
@given(
    st.floats(min_value=1e-6, max_value=1e-3),
    st.integers(min_value=1, max_value=10**6),
    st.floats(min_value=1.0, max_value=1e4),
    st.integers(min_value=0, max_value=5000),
)
def test_extrapolation_scaling(sigma_dp: float, cohort: int, ratio: float, rounds: int) -> None:
    population = cohort * ratio
    r = extrapolate(
        sigma_dp=sigma_dp, cohort_size=cohort, population=population, rounds=rounds, delta=1e-9
    )
    assert isinstance(r, Extrapolation)
    assert r.noise_multiplier == pytest.approx(sigma_dp * cohort, rel=1e-12)
    assert r.sample_rate == pytest.approx(1 / ratio, rel=1e-12)
    if rounds == 0:
        assert r.epsilon == 0.0
    assert r.epsilon >= 0 and not math.isnan(r.epsilon)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.epsilon = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sigma_dp": 0.0}, "sigma_dp"),
        ({"cohort_size": -1}, "cohort_size"),
        ({"cohort_size": 2000, "population": 1000}, "cohort_size"),
        ({"population": float("inf")}, "population"),
        ({"rounds": -5}, "rounds"),
        ({"delta": 0.0}, "delta"),
        ({"accountant": "gdp"}, "accountant"),
    ],
)
def test_extrapolate_validates_arguments(kwargs: dict, name: str) -> None:
    base = {"sigma_dp": 1e-3, "cohort_size": 100, "population": 10_000, "rounds": 10, "delta": 1e-6}
    with pytest.raises(ValueError, match=name):
        extrapolate(**{**base, **kwargs})
