"""RDP and PLD accountants: cross-checks against dp_accounting, closed forms and properties.

Most properties use a compact set of RDP orders (integer orders are computed in closed form by
dp_accounting, fractional ones by slow series), passed identically to dpfl and to dp_accounting.
PLD runs use dpfl's default (automatic) grid unless stated.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant as DpaPLD
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant as DpaRDP
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfl.accounting.accountants import PLDAccountant, RDPAccountant
from dpfl.accounting.budget import BudgetExceededError, PrivacyBudget
from dpfl.accounting.events import NOISE_MULTIPLIER_CAP, FixedCohortRound, PoissonRound

FAST_ORDERS = [*range(2, 33), 40, 48, 64, 128, 256]  # integer orders: closed form, monotone
ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE = dp_accounting.NeighboringRelation.REPLACE_ONE

zs = st.floats(min_value=0.4, max_value=8.0)
qs = st.floats(min_value=1e-4, max_value=1.0)
ts = st.integers(min_value=1, max_value=5000)
deltas = st.sampled_from([1e-3, 1e-5, 1e-9])
pld_zs = st.floats(min_value=0.7, max_value=8.0)  # tiny z makes PLD supports (and time) large


def _gaussian_poisson(z: float, q: float) -> dp_accounting.DpEvent:
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))


# --------------------------------------------------------------------------- vs dp_accounting
@pytest.mark.parametrize(
    ("z", "q", "t"), [(0.6144, 0.002947, 2034), (2.048, 0.02947, 2006), (1.1, 0.01, 100)]
)
def test_rdp_matches_dp_accounting_on_grid(z: float, q: float, t: int) -> None:
    ours = RDPAccountant()
    ours.add_rounds(PoissonRound(z, q), t)
    ref = DpaRDP(neighboring_relation=ADD_REMOVE).compose(_gaussian_poisson(z, q), t)
    for delta in (1e-5, 1e-9):
        assert ours.epsilon(delta) == pytest.approx(ref.get_epsilon(delta), rel=1e-9)
    assert ours.delta(3.0) == pytest.approx(ref.get_delta(3.0), rel=1e-9)


@pytest.mark.parametrize(("z", "q", "t"), [(0.6144, 0.002947, 2034), (1.1, 0.05, 300)])
def test_pld_matches_dp_accounting_on_grid(z: float, q: float, t: int) -> None:
    ours = PLDAccountant(value_discretization_interval=1e-3)
    ours.add_rounds(PoissonRound(z, q), t)
    ref = DpaPLD(ADD_REMOVE, value_discretization_interval=1e-3).compose(_gaussian_poisson(z, q), t)
    assert ours.epsilon(1e-9) == pytest.approx(ref.get_epsilon(1e-9), rel=1e-9)
    assert ours.delta(2.0) == pytest.approx(ref.get_delta(2.0), rel=1e-9)


@settings(max_examples=15)
@given(st.lists(st.tuples(zs, qs, st.integers(1, 3000)), min_size=1, max_size=3), deltas)
def test_rdp_ledger_matches_dp_accounting_composition(
    entries: list[tuple[float, float, int]], delta: float
) -> None:
    ours = RDPAccountant(orders=FAST_ORDERS)
    ref = DpaRDP(orders=FAST_ORDERS, neighboring_relation=ADD_REMOVE)
    for z, q, t in entries:
        ours.add_rounds(PoissonRound(z, q), t)
        ref.compose(_gaussian_poisson(z, q), t)
    assert ours.rounds == sum(t for _, _, t in entries)
    np.testing.assert_allclose(ours.rdp(), ref.rdp, rtol=1e-12)
    assert ours.epsilon(delta) == pytest.approx(ref.get_epsilon(delta), rel=1e-9)
    # The exported ledger event reproduces the same numbers in dp_accounting.
    again = DpaRDP(orders=FAST_ORDERS, neighboring_relation=ADD_REMOVE).compose(ours.dp_event())
    assert again.get_epsilon(delta) == pytest.approx(ref.get_epsilon(delta), rel=1e-9)


@settings(max_examples=6)
@given(pld_zs, st.floats(min_value=1e-3, max_value=0.5), st.integers(1, 1000), deltas)
def test_pld_matches_dp_accounting(z: float, q: float, t: int, delta: float) -> None:
    # a 1e-2 grid keeps these compositions cheap; the grid tests above use the default 1e-3
    ours = PLDAccountant(value_discretization_interval=1e-2)
    ours.add_rounds(PoissonRound(z, q), t)
    ref = DpaPLD(ADD_REMOVE, value_discretization_interval=1e-2).compose(ours.dp_event())
    direct = DpaPLD(ADD_REMOVE, value_discretization_interval=1e-2).compose(
        _gaussian_poisson(z, q), t
    )
    assert ours.epsilon(delta) == pytest.approx(direct.get_epsilon(delta), rel=1e-9, abs=1e-12)
    assert ref.get_epsilon(delta) == pytest.approx(direct.get_epsilon(delta), rel=1e-9, abs=1e-12)


@settings(max_examples=6)
@given(zs, st.integers(1, 10**6), st.integers(1, 1000), deltas, st.data())
def test_fixed_cohort_rdp_matches_dp_accounting(
    z: float, population: int, t: int, delta: float, data: st.DataObject
) -> None:
    cohort = data.draw(st.integers(1, population))
    orders = [2, 4, 8, 16, 32, 64]  # sampling without replacement is slow at many orders
    ours = RDPAccountant(adjacency="replace_one", orders=orders)
    ours.add_rounds(FixedCohortRound(z, cohort, population), t)
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        population, cohort, dp_accounting.GaussianDpEvent(z / 2)
    )
    ref = DpaRDP(orders=orders, neighboring_relation=REPLACE).compose(event, t)
    assert ours.epsilon(delta) == pytest.approx(ref.get_epsilon(delta), rel=1e-9)


def test_full_fixed_cohort_is_gaussian_with_doubled_sensitivity() -> None:
    # cohort == population: every user is in every round; replace-one sensitivity 2C gives
    # RDP(alpha) = alpha * (2C)^2 / (2 (zC)^2) = 2 alpha / z^2 per round.
    z, t = 3.0, 7
    acc = RDPAccountant(adjacency="replace_one", orders=FAST_ORDERS)
    acc.add_rounds(FixedCohortRound(z, 50, 50), t)
    np.testing.assert_allclose(acc.rdp(), t * 2 * np.array(FAST_ORDERS) / z**2, rtol=1e-9)


# --------------------------------------------------------------------------- closed forms
@settings(max_examples=20)
@given(st.floats(min_value=0.0, max_value=10.0), st.integers(0, 10**5), deltas)
def test_zero_sample_rate_costs_nothing(z: float, t: int, delta: float) -> None:
    for acc in (RDPAccountant(orders=FAST_ORDERS), PLDAccountant()):
        acc.add_rounds(PoissonRound(z, 0.0), t)
        assert acc.epsilon(delta) == 0.0
        assert acc.rounds == t


@pytest.mark.parametrize("q", [1e-3, 0.5, 1.0])
def test_zero_noise_gives_infinite_epsilon(q: float) -> None:
    for acc in (RDPAccountant(orders=FAST_ORDERS), PLDAccountant()):
        acc.add_rounds(PoissonRound(0.0, q), 3)
        assert acc.epsilon(1e-5) == math.inf
        assert acc.delta(10.0) == 1.0


@settings(max_examples=30)
@given(st.floats(min_value=0.3, max_value=50.0), st.integers(1, 10**4), deltas)
def test_full_participation_is_plain_gaussian(z: float, t: int, delta: float) -> None:
    acc = RDPAccountant(orders=FAST_ORDERS)
    acc.add_rounds(PoissonRound(z, 1.0), t)
    alphas = np.array(FAST_ORDERS, dtype=float)
    rdp = t * alphas / (2 * z**2)  # Gaussian mechanism, sensitivity 1: alpha / (2 z^2)
    np.testing.assert_allclose(acc.rdp(), rdp, rtol=1e-12)
    # RDP -> (eps, delta) conversion of arXiv 2004.00010 Prop. 12 (the one dp_accounting uses),
    # for orders > 1.01: eps = rdp + log1p(-1/a) - log(delta * a) / (a - 1).
    expected = np.min(rdp + np.log1p(-1 / alphas) - np.log(delta * alphas) / (alphas - 1))
    assert acc.epsilon(delta) == pytest.approx(max(0.0, expected), rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------- properties
def _rdp_eps(z: float, q: float, t: int, delta: float) -> float:
    acc = RDPAccountant(orders=FAST_ORDERS)
    acc.add_rounds(PoissonRound(z, q), t)
    return acc.epsilon(delta)


@settings(max_examples=20)
@given(zs, qs, ts, ts, deltas)
def test_rdp_epsilon_non_decreasing_in_rounds(
    z: float, q: float, t1: int, t2: int, d: float
) -> None:
    lo, hi = sorted((t1, t2))
    assert _rdp_eps(z, q, lo, d) <= _rdp_eps(z, q, hi, d) * (1 + 1e-12)


@settings(max_examples=20)
@given(zs, qs, qs, ts, deltas)
def test_rdp_epsilon_non_decreasing_in_sample_rate(
    z: float, q1: float, q2: float, t: int, d: float
) -> None:
    lo, hi = sorted((q1, q2))
    assert _rdp_eps(z, lo, t, d) <= _rdp_eps(z, hi, t, d) * (1 + 1e-12)


@settings(max_examples=20)
@given(zs, zs, qs, ts, deltas)
def test_rdp_epsilon_non_increasing_in_noise(
    z1: float, z2: float, q: float, t: int, d: float
) -> None:
    lo, hi = sorted((z1, z2))
    assert _rdp_eps(hi, q, t, d) <= _rdp_eps(lo, q, t, d) * (1 + 1e-12)


@settings(max_examples=4)
@given(pld_zs, st.floats(min_value=1e-3, max_value=0.3), st.integers(1, 2000), st.integers(1, 2000))
def test_pld_epsilon_non_decreasing_in_rounds(z: float, q: float, t1: int, t2: int) -> None:
    lo, hi = sorted((t1, t2))
    small, large = PLDAccountant(), PLDAccountant()
    small.add_rounds(PoissonRound(z, q), lo)
    large.add_rounds(PoissonRound(z, q), hi)
    assert small.epsilon(1e-6) <= large.epsilon(1e-6) + 1e-9


# PLD discretisation tolerance: dp_accounting rounds every privacy loss *up* onto the grid, so PLD
# ε can exceed the exact value by a little (the automatic grid stops when halving moves ε <= 1%);
# we allow 1% of ε plus 0.01 absolute beyond the RDP bound.
PLD_TOLERANCE_REL, PLD_TOLERANCE_ABS = 0.01, 0.01


@settings(max_examples=6)
@given(pld_zs, st.floats(min_value=1e-3, max_value=0.5), st.integers(1, 3000), deltas)
def test_pld_not_looser_than_rdp(z: float, q: float, t: int, delta: float) -> None:
    rdp, pld = RDPAccountant(), PLDAccountant()
    for acc in (rdp, pld):
        acc.add_rounds(PoissonRound(z, q), t)
    e_rdp, e_pld = rdp.epsilon(delta), pld.epsilon(delta)
    assert e_pld <= e_rdp * (1 + PLD_TOLERANCE_REL) + PLD_TOLERANCE_ABS


@settings(max_examples=20)
@given(zs, qs, ts, deltas)
def test_rdp_epsilon_delta_round_trip(z: float, q: float, t: int, delta: float) -> None:
    acc = RDPAccountant(orders=FAST_ORDERS)
    acc.add_rounds(PoissonRound(z, q), t)
    eps = acc.epsilon(delta)
    if eps > 0:  # eps == 0 means delta(0) may be far below the requested delta
        assert acc.delta(eps) == pytest.approx(delta, rel=1e-6)


@settings(max_examples=5)
@given(pld_zs, st.floats(min_value=1e-3, max_value=0.3), st.integers(1, 1000), deltas)
def test_pld_epsilon_delta_round_trip(z: float, q: float, t: int, delta: float) -> None:
    acc = PLDAccountant()
    acc.add_rounds(PoissonRound(z, q), t)
    eps = acc.epsilon(delta)
    if eps > 0:
        # On the grid that ε was computed on, the round trip is exact (δ(ε) is monotone there).
        fixed = PLDAccountant(value_discretization_interval=acc.discretization_interval(delta))
        fixed.add_rounds(PoissonRound(z, q), t)
        assert fixed.epsilon(delta) == eps
        assert fixed.delta(eps) <= delta * (1 + 1e-9)
        # The automatic δ(ε) refines its own grid (to 10% in δ): another upper bound, close by.
        assert delta * 0.5 <= acc.delta(eps) <= delta * 1.1


# --------------------------------------------------------------------------- ledger and state
round_pool = st.sampled_from(
    [PoissonRound(1.0, 0.01), PoissonRound(0.8, 0.05), PoissonRound(2.0, 0.5)]
)


@settings(max_examples=15)
@given(st.lists(st.tuples(round_pool, st.integers(0, 500)), max_size=6), st.booleans())
def test_state_dict_round_trips_through_json(entries: list, with_budget: bool) -> None:
    budget = PrivacyBudget(1e6, 1e-5) if with_budget else None
    acc = RDPAccountant(orders=FAST_ORDERS, budget=budget)
    for rnd, count in entries:
        acc.add_rounds(rnd, count)
    state = json.loads(json.dumps(acc.state_dict()))
    restored = RDPAccountant(orders=FAST_ORDERS)
    restored.load_state_dict(state)
    assert restored.state_dict() == acc.state_dict()
    assert restored.rounds == acc.rounds == sum(c for _, c in entries)
    assert restored.budget == budget
    assert restored.epsilon(1e-5) == acc.epsilon(1e-5)
    # consecutive identical rounds are merged
    rounds = [r for r, _ in acc.ledger]
    assert all(a != b for a, b in itertools.pairwise(rounds))


def test_pld_state_dict_round_trip_is_exact() -> None:
    acc = PLDAccountant()
    acc.add_rounds(PoissonRound(1.0, 0.01), 300)
    acc.add_rounds(PoissonRound(1.5, 0.02), 200)
    acc.add_rounds(PoissonRound(1.5, 0.02), 100)
    restored = PLDAccountant()
    restored.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert restored.epsilon(1e-8) == acc.epsilon(1e-8)
    assert len(restored.ledger) == 2 and restored.rounds == 600


def test_identical_rounds_merge_and_cost_one_entry() -> None:
    step = RDPAccountant()
    rnd = PoissonRound(0.7, 0.003)
    for _ in range(20_000):
        step.add_rounds(rnd)
    bulk = RDPAccountant()
    bulk.add_rounds(rnd, 20_000)
    assert step.ledger == [(rnd, 20_000)] == bulk.ledger
    assert step.epsilon(1e-9) == bulk.epsilon(1e-9)
    event = step.dp_event()
    assert isinstance(event, dp_accounting.ComposedDpEvent)
    assert event.events == [dp_accounting.SelfComposedDpEvent(rnd.dp_event(), 20_000)]


def test_empty_accountant() -> None:
    for acc in (RDPAccountant(), PLDAccountant()):
        assert acc.rounds == 0 and acc.epsilon(1e-9) == 0.0
        assert acc.dp_event() == dp_accounting.ComposedDpEvent([])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.pop("ledger"),
        lambda s: s.update(format="other/1"),
        lambda s: s.update(accountant="pld"),
        lambda s: s.update(adjacency="replace_one"),
        lambda s: s.update(options={"orders": [2.0]}),
        lambda s: s.update(budget={"epsilon": -1.0, "delta": 1e-5}),
        lambda s: s["ledger"][0].update(count=0),
        lambda s: s["ledger"][0].update(count=1.5),
        lambda s: s["ledger"][0]["round"].update(sample_rate=1.5),
        lambda s: s["ledger"].append(
            {
                "round": {
                    "type": "fixed_cohort",
                    "noise_multiplier": 1.0,
                    "cohort_size": 2,
                    "population": 10,
                },
                "count": 1,
            }
        ),
        lambda s: s.update(ledger="nope"),
    ],
)
def test_load_state_dict_rejects_bad_state_and_keeps_ledger(mutate) -> None:  # type: ignore[no-untyped-def]
    source = RDPAccountant(orders=FAST_ORDERS)
    source.add_rounds(PoissonRound(1.0, 0.1), 5)
    state = source.state_dict()
    mutate(state)
    target = RDPAccountant(orders=FAST_ORDERS)
    target.add_rounds(PoissonRound(2.0, 0.2), 3)
    before = target.state_dict()
    with pytest.raises(ValueError):
        target.load_state_dict(state)
    assert target.state_dict() == before


# --------------------------------------------------------------------------- budget
@settings(max_examples=30)
@given(st.integers(0, 3000), st.integers(0, 3000))
def test_budget_stops_before_exceeding_and_keeps_ledger(first: int, second: int) -> None:
    budget = PrivacyBudget(epsilon=2.0, delta=1e-6)
    acc = RDPAccountant(orders=FAST_ORDERS, budget=budget)
    rnd = PoissonRound(1.0, 0.01)
    for count in (first, second):
        before = acc.state_dict()
        exceeds = acc.would_exceed(rnd, count)
        if exceeds:
            with pytest.raises(BudgetExceededError, match="budget"):
                acc.add_rounds(rnd, count)
            assert acc.state_dict() == before
        else:
            acc.add_rounds(rnd, count)
        assert acc.epsilon(budget.delta) <= budget.epsilon


def test_would_exceed_without_budget_is_false() -> None:
    acc = PLDAccountant()
    assert acc.would_exceed(PoissonRound(0.0, 1.0), 10) is False


# --------------------------------------------------------------------------- adjacency and validation
def test_fixed_cohort_rejected_by_add_remove_accountant() -> None:
    acc = RDPAccountant()
    acc.add_rounds(PoissonRound(1.0, 0.1))
    with pytest.raises(ValueError, match="replace_one"):
        acc.add_rounds(FixedCohortRound(1.0, 5, 100))
    assert acc.rounds == 1


def test_poisson_rejected_by_replace_one_accountant() -> None:
    acc = RDPAccountant(adjacency="replace_one")
    with pytest.raises(ValueError, match="add_or_remove_one"):
        acc.add_rounds(PoissonRound(1.0, 0.1))
    assert acc.rounds == 0


def test_pld_rejects_fixed_cohorts_and_replace_one() -> None:
    with pytest.raises(ValueError, match="RDPAccountant"):
        PLDAccountant().add_rounds(FixedCohortRound(1.0, 5, 100))
    with pytest.raises(ValueError, match="adjacency"):
        PLDAccountant(adjacency="replace_one")  # type: ignore[arg-type]


@pytest.mark.parametrize("acc_type", [RDPAccountant, PLDAccountant])
def test_arguments_are_validated(acc_type: type) -> None:
    acc = acc_type()
    for bad in (0.0, 1.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="delta"):
            acc.epsilon(bad)
    with pytest.raises(ValueError, match="epsilon"):
        acc.delta(-1.0)
    with pytest.raises(ValueError, match="count"):
        acc.add_rounds(PoissonRound(1.0, 0.1), -1)
    with pytest.raises(TypeError, match="count"):
        acc.add_rounds(PoissonRound(1.0, 0.1), 1.5)
    with pytest.raises(TypeError, match="round"):  # a dict is neither a round nor a DpEvent
        acc.add_rounds({"type": "poisson", "noise_multiplier": 1.0, "sample_rate": 0.1})
    with pytest.raises(ValueError, match="adjacency"):
        acc_type(adjacency="add_remove")
    with pytest.raises(TypeError, match="budget"):
        acc_type(budget=(1.0, 1e-5))
    assert acc.rounds == 0


def test_bad_orders_rejected() -> None:
    with pytest.raises(ValueError, match="orders"):
        RDPAccountant(orders=[0.5, 2.0])
    with pytest.raises(ValueError, match="orders"):
        RDPAccountant(orders=[])


# --------------------------------------------------------------------------- no torch
def test_accounting_package_does_not_import_torch() -> None:
    package = Path(__file__).resolve().parents[1] / "src" / "dpfl" / "accounting"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "torch" or n.startswith("torch.") for n in names), path
    code = "import sys, dpfl.accounting; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fixed_cohort_without_noise_is_infinite_epsilon() -> None:
    """z = 0 with a non-empty fixed cohort releases users exactly: ε must be ∞, not an error."""
    acc = RDPAccountant(adjacency="replace_one")
    acc.add_rounds(FixedCohortRound(noise_multiplier=0.0, cohort_size=10, population=100))
    assert acc.epsilon(1e-6) == math.inf


# --------------------------------------------------------------------------- RDP orders (issue 11)
def test_rdp_at_half_sample_rate_is_quiet_and_reports_orders(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # dp_accounting's fractional-order series does not converge at q = 0.5 and logs one absl
    # warning per excluded order; dpfl must keep stderr clean and say which orders it used.
    acc = RDPAccountant()
    acc.add_rounds(PoissonRound(1.0, 0.5), 10)
    eps = acc.epsilon(1e-6)
    out, err = capfd.readouterr()
    assert "failed to converge" not in err + out
    excluded = acc.excluded_orders
    assert len(excluded) > 0 and all(1 < a < 2 for a in excluded)
    assert np.isinf(acc.rdp()[np.isin(acc.orders, excluded)]).all()
    order = acc.epsilon_order(1e-6)
    assert order in acc.orders and order not in excluded
    # ε is the conversion at the reported order alone
    ref = DpaRDP(orders=[order], neighboring_relation=ADD_REMOVE)
    assert eps == pytest.approx(ref.compose(_gaussian_poisson(1.0, 0.5), 10).get_epsilon(1e-6))


def test_rdp_reports_no_excluded_orders_when_all_converge() -> None:
    acc = RDPAccountant(orders=FAST_ORDERS)
    acc.add_rounds(PoissonRound(1.1, 0.01), 100)
    assert acc.excluded_orders == ()
    assert acc.epsilon_order(1e-5) in FAST_ORDERS


@pytest.mark.parametrize("acc_type", [RDPAccountant, PLDAccountant])
@pytest.mark.parametrize("z", [1e160, float(np.finfo(float).max)])
def test_huge_noise_multiplier_is_accounted_at_the_cap(acc_type: type, z: float) -> None:
    # dp_accounting raises OverflowError (z**2) beyond ~1.3e154; dpfl accounts z as
    # min(z, NOISE_MULTIPLIER_CAP): conservative, as ε does not increase with z.
    huge, capped = acc_type(), acc_type()
    huge.add_rounds(PoissonRound(z, 0.01), 10)
    capped.add_rounds(PoissonRound(NOISE_MULTIPLIER_CAP, 0.01), 10)
    assert 0.0 <= huge.epsilon(1e-5) == capped.epsilon(1e-5) < 1e-3
