"""``add_rounds`` accepts dp_accounting ``DpEvent``s: interop goes both ways.

Guarantee protected: an event is charged exactly as the dpfl round it describes (same ledger, same
ε as dp_accounting's own accountant on that event), under the adjacency that event is valid for;
an event the accountant cannot account, or one of the other adjacency, is refused before the
ledger changes.
"""

from __future__ import annotations

from collections.abc import Callable

import dp_accounting
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given
from hypothesis import strategies as st

from dpfl.accounting import (
    REPLACE_ONE,
    FixedCohortRound,
    PLDAccountant,
    PoissonRound,
    PrivacyBudget,
    RDPAccountant,
)

G = dp_accounting.GaussianDpEvent


def _poisson(z: float, q: float) -> dp_accounting.DpEvent:
    return dp_accounting.PoissonSampledDpEvent(q, G(z))


@pytest.mark.parametrize("accountant_type", [RDPAccountant, PLDAccountant])
def test_a_poisson_event_is_charged_as_the_poisson_round(accountant_type: type) -> None:
    by_event, by_round = accountant_type(), accountant_type()
    by_event.add_rounds(_poisson(1.1, 0.01), 500)
    by_round.add_rounds(PoissonRound(noise_multiplier=1.1, sample_rate=0.01), 500)
    assert by_event.ledger == by_round.ledger
    assert by_event.epsilon(1e-6) == by_round.epsilon(1e-6)


@given(
    z=st.floats(0.3, 20.0),
    q=st.floats(1e-4, 1.0),
    rounds=st.integers(1, 5000),
)
def test_rdp_of_an_event_equals_dp_accountings_own_accountant(z: float, q: float, rounds: int) -> None:
    event = dp_accounting.SelfComposedDpEvent(_poisson(z, q), rounds)
    ours = RDPAccountant()
    ours.add_rounds(event)
    theirs = rdp_privacy_accountant.RdpAccountant(orders=list(ours.orders))
    theirs.compose(event)
    assert ours.rounds == rounds
    assert ours.epsilon(1e-6) == pytest.approx(theirs.get_epsilon(1e-6), rel=1e-9)


def test_the_ledger_event_round_trips_for_every_accountant() -> None:
    """``add_rounds(other.dp_event())`` rebuilds the same ledger (count rounds included)."""
    rounds = [
        (PoissonRound(noise_multiplier=1.0, sample_rate=0.02), 7),
        (PoissonRound(noise_multiplier=0.8, sample_rate=0.05, count_noise_multiplier=5.0), 3),
        (PoissonRound(noise_multiplier=1.0, sample_rate=0.02), 2),
    ]
    for accountant_type in (RDPAccountant, PLDAccountant):
        source, copy = accountant_type(), accountant_type()
        for rnd, count in rounds:
            source.add_rounds(rnd, count)
        copy.add_rounds(source.dp_event())
        assert copy.ledger == source.ledger
        assert copy.epsilon(1e-6) == source.epsilon(1e-6)
    fixed = RDPAccountant(adjacency=REPLACE_ONE)
    fixed.add_rounds(FixedCohortRound(noise_multiplier=2.0, cohort_size=10, population=1000), 4)
    again = RDPAccountant(adjacency=REPLACE_ONE)
    again.add_rounds(fixed.dp_event(), 2)
    assert again.ledger == [(FixedCohortRound(2.0, 10, 1000), 8)]


def test_an_unsampled_gaussian_is_a_round_with_everyone_in_it() -> None:
    acc = RDPAccountant()
    acc.add_rounds(G(3.0), 10)
    assert acc.ledger == [(PoissonRound(noise_multiplier=3.0, sample_rate=1.0), 10)]
    theirs = rdp_privacy_accountant.RdpAccountant(orders=list(acc.orders))
    theirs.compose(G(3.0), 10)
    assert acc.epsilon(1e-5) == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-12)


def test_no_op_events_cost_nothing() -> None:
    acc = RDPAccountant()
    acc.add_rounds(dp_accounting.NoOpDpEvent(), 3)
    acc.add_rounds(dp_accounting.ComposedDpEvent([]))
    assert acc.rounds == 0 and acc.epsilon(1e-5) == 0


@pytest.mark.parametrize(
    ("make", "event", "match"),
    [
        (RDPAccountant, dp_accounting.SampledWithoutReplacementDpEvent(1000, 10, G(1.0)),
         "replace_one"),
        (PLDAccountant, dp_accounting.SampledWithoutReplacementDpEvent(1000, 10, G(1.0)),
         "replace_one"),
        (lambda: RDPAccountant(adjacency=REPLACE_ONE), _poisson(1.0, 0.01), "add_or_remove_one"),
        (lambda: RDPAccountant(adjacency=REPLACE_ONE), G(1.0), "add_or_remove_one"),
        (RDPAccountant, dp_accounting.LaplaceDpEvent(1.0), "LaplaceDpEvent"),
        (RDPAccountant, dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.LaplaceDpEvent(1.0)),
         "LaplaceDpEvent"),
        (RDPAccountant, dp_accounting.PoissonSampledDpEvent(
            0.1, dp_accounting.SelfComposedDpEvent(G(1.0), 2)), "SelfComposedDpEvent"),
        (RDPAccountant, dp_accounting.PoissonSampledDpEvent(
            0.1, dp_accounting.ComposedDpEvent([G(1.0), G(2.0), G(3.0)])), "two Gaussians"),
        (RDPAccountant, dp_accounting.NonPrivateDpEvent(), "NonPrivateDpEvent"),
    ],
)
def test_events_the_accountant_cannot_charge_are_refused_and_the_ledger_is_kept(
    make: Callable[[], RDPAccountant | PLDAccountant], event: dp_accounting.DpEvent, match: str
) -> None:
    accountant = make()
    accountant.add_rounds(PoissonRound(noise_multiplier=1.0, sample_rate=0.01)
                          if accountant.adjacency != REPLACE_ONE
                          else FixedCohortRound(1.0, 10, 1000))
    before = accountant.ledger
    with pytest.raises(ValueError, match=match):
        accountant.add_rounds(event)
    with pytest.raises(ValueError, match=match):  # also inside a composition with valid events
        accountant.add_rounds(dp_accounting.ComposedDpEvent([accountant.dp_event(), event]))
    assert accountant.ledger == before


def test_the_budget_is_enforced_on_events() -> None:
    acc = RDPAccountant(budget=PrivacyBudget(epsilon=1.0, delta=1e-5))
    event = dp_accounting.SelfComposedDpEvent(_poisson(0.5, 0.5), 1000)
    assert acc.would_exceed(event)
    with pytest.raises(RuntimeError, match="budget"):
        acc.add_rounds(event)
    assert acc.rounds == 0


def test_a_non_event_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="DpEvent"):
        RDPAccountant().add_rounds("poisson")  # type: ignore[arg-type]
