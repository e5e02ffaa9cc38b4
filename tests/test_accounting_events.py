"""Round specifications: validation, dp_event mapping and (de)serialisation."""

from __future__ import annotations

import json

import dp_accounting
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpfl.accounting.events import (
    ADD_OR_REMOVE_ONE,
    REPLACE_ONE,
    FixedCohortRound,
    PoissonRound,
    round_from_dict,
)

z_values = st.floats(min_value=0.0, max_value=1e3, allow_nan=False)
q_values = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def fixed_cohort_rounds(draw: st.DrawFn) -> FixedCohortRound:
    population = draw(st.integers(min_value=1, max_value=10**9))
    cohort = draw(st.integers(min_value=1, max_value=population))
    return FixedCohortRound(draw(z_values), cohort, population)


rounds_strategy = st.one_of(st.builds(PoissonRound, z_values, q_values), fixed_cohort_rounds())


@given(rounds_strategy)
def test_round_dict_round_trips_through_json(rnd: PoissonRound | FixedCohortRound) -> None:
    data = json.loads(json.dumps(rnd.to_dict()))
    assert round_from_dict(data) == rnd
    assert type(rnd).from_dict(data) == rnd


def test_poisson_round_event_is_poisson_sampled_gaussian() -> None:
    event = PoissonRound(noise_multiplier=1.3, sample_rate=0.02).dp_event()
    assert event == dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.3))
    assert PoissonRound.adjacency == ADD_OR_REMOVE_ONE


def test_fixed_cohort_event_uses_replace_one_sensitivity() -> None:
    # Replacing one user moves the sum of updates clipped to C by up to 2C, so the Gaussian
    # event handed to dp_accounting has noise multiplier z / 2 relative to that sensitivity.
    rnd = FixedCohortRound(noise_multiplier=3.0, cohort_size=10, population=1000)
    assert rnd.dp_event() == dp_accounting.SampledWithoutReplacementDpEvent(
        source_dataset_size=1000, sample_size=10, event=dp_accounting.GaussianDpEvent(1.5)
    )
    assert rnd.adjacency == REPLACE_ONE
    assert rnd.sample_rate == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"noise_multiplier": -0.1, "sample_rate": 0.1}, "noise_multiplier"),
        ({"noise_multiplier": float("inf"), "sample_rate": 0.1}, "noise_multiplier"),
        ({"noise_multiplier": float("nan"), "sample_rate": 0.1}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "sample_rate": 1.5}, "sample_rate"),
        ({"noise_multiplier": 1.0, "sample_rate": -0.01}, "sample_rate"),
    ],
)
def test_poisson_round_rejects_bad_values(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        PoissonRound(**kwargs)


def test_rounds_reject_wrong_types() -> None:
    with pytest.raises(TypeError, match="sample_rate"):
        PoissonRound(noise_multiplier=1.0, sample_rate="0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cohort_size"):
        FixedCohortRound(noise_multiplier=1.0, cohort_size=2.5, population=10)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"noise_multiplier": -1.0, "cohort_size": 1, "population": 10}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "cohort_size": 0, "population": 10}, "cohort_size"),
        ({"noise_multiplier": 1.0, "cohort_size": 11, "population": 10}, "cohort_size"),
        ({"noise_multiplier": 1.0, "cohort_size": 1, "population": 0}, "population"),
    ],
)
def test_fixed_cohort_round_rejects_bad_values(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        FixedCohortRound(**kwargs)


@pytest.mark.parametrize(
    "data",
    [
        {"type": "gaussian", "noise_multiplier": 1.0},
        {"type": "poisson", "noise_multiplier": 1.0},
        {"type": "poisson", "noise_multiplier": 1.0, "sample_rate": 0.1, "extra": 1},
        {"type": "poisson", "noise_multiplier": 1.0, "sample_rate": 2.0},
        {"type": "fixed_cohort", "noise_multiplier": 1.0, "cohort_size": 5, "population": 4},
        [1, 2],
    ],
)
def test_round_from_dict_rejects_malformed_data(data: object) -> None:
    with pytest.raises(ValueError):
        round_from_dict(data)  # type: ignore[arg-type]


def test_rounds_are_frozen_and_hashable() -> None:
    rnd = PoissonRound(noise_multiplier=1.0, sample_rate=0.5)
    assert {rnd: 1}[PoissonRound(1.0, 0.5)] == 1
    with pytest.raises(AttributeError):
        rnd.sample_rate = 0.1  # type: ignore[misc]
