"""Adaptive clipping (Andrew et al., NeurIPS 2021): bounds, count release, accounting, state."""

from __future__ import annotations

import math
from statistics import NormalDist

import dp_accounting
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfl.accounting import (
    FixedCohortRound,
    PLDAccountant,
    PoissonRound,
    RDPAccountant,
    calibrate_noise_multiplier,
    effective_noise_multiplier,
    epsilon_for,
    round_from_dict,
    split_noise_multiplier,
)
from dpfl.adaptive_clip import COUNT_STREAM, AdaptiveClip
from dpfl.aggregate import DPAggregator
from dpfl.clip import GlobalClip, PerLayerClip
from dpfl.noise import GaussianMechanism
from tests.test_clip import layer_norms64, norm64, updates

ORDERS = tuple(range(2, 129))


def adaptive(per_layer: bool, bound: float = 1.0, **kw) -> AdaptiveClip:
    base = PerLayerClip(bound, allocation="dim") if per_layer else GlobalClip(bound)
    kw.setdefault("count_noise_multiplier", 10.0)
    return AdaptiveClip(base, **kw)


# ------------------------------------------------------------------ the bound invariant
@settings(max_examples=60, deadline=None)
@given(
    update=updates(min_size=1),
    per_layer=st.booleans(),
    bound=st.floats(1e-6, 1e3),
    counts=st.lists(st.floats(-3.0, 3.0), min_size=1, max_size=4),
)
def test_property_released_update_never_exceeds_the_rounds_bound(
    update, per_layer, bound, counts
) -> None:
    """After any sequence of adaptations, a user's clipped contribution (measured exactly in
    float64) is within the round's total bound and, per layer, within each layer's bound."""
    if all(t.numel() == 0 for t in update.values()):
        return
    ada = adaptive(per_layer, bound, learning_rate=1.0)
    h = len(ada.layer_bounds(update))
    for c in counts:  # move the bounds by arbitrary noised counts first
        ada.update_([c * h] * h, expected_cohort_size=1.0)
    bounds = ada.layer_bounds(update)
    clipped, _ = ada.clip(update)
    assert norm64(clipped.values()) <= ada.bound
    if per_layer:
        for layer, n in layer_norms64(clipped).items():
            assert n <= bounds[layer]
    acc = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in update.items()}
    ada.clip_and_accumulate_(update, acc)
    assert norm64(acc.values()) <= ada.bound


@pytest.mark.parametrize("per_layer", [False, True])
def test_aggregator_releases_the_sum_clipped_to_the_bound_fixed_before_the_round(
    per_layer: bool,
) -> None:
    """Without update noise the release times S is the clipped sum under the round's bound."""
    ada = adaptive(per_layer, 1.0, count_noise_multiplier=1e-9)
    mech = GaussianMechanism(0.0, 1.0, seed=0)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        agg = DPAggregator(ada, mech, expected_cohort_size=1)
        update = {"a": 50 * torch.randn(1000, generator=g), "b": torch.randn(10, generator=g)}
        before = ada.layer_bounds(update)
        agg.add(update)
        mean, _ = agg.release()
        assert norm64(mean.values()) <= math.sqrt(sum(b * b for b in before.values()))
        if per_layer:
            for layer, n in layer_norms64(mean).items():
                assert n <= before[layer]
        assert ada.layer_bounds(update) != before  # the bound moved after the release


# ------------------------------------------------------------------ the count release
def _recovered_sums(before: dict, after: dict, ada: AdaptiveClip, size: float) -> list[float]:
    """Invert C' = C exp(-η(½ + s/S − γ)) for the noised count s of every layer."""
    return [
        (-math.log(after[k] / before[k]) / ada.learning_rate - 0.5 + ada.target_quantile) * size
        for k in before
    ]


def test_count_is_centred_bits_over_the_expected_cohort_and_drops_nonfinite_users() -> None:
    ada = adaptive(True, 2.0, count_noise_multiplier=1e-12)
    mech = GaussianMechanism(1.0, 2.0, seed=3)
    agg = DPAggregator(ada, mech, expected_cohort_size=10, drop_nonfinite=True)
    small = {"a": torch.full((4,), 0.01), "b": torch.full((1,), 0.01)}
    big = {"a": torch.full((4,), 100.0), "b": torch.full((1,), 0.01)}
    bad = {"a": torch.full((4,), math.nan), "b": torch.zeros(1)}
    before = ada.layer_bounds(small)
    for u in (small, big, bad):
        agg.add(u)
    agg.release()
    sums = _recovered_sums(before, ada.bounds, ada, 10)
    # layer a: one under (+½), one over (−½); layer b: both under; the dropped user counts nothing
    assert sums == pytest.approx([0.0, 1.0], abs=1e-6)


def test_count_noise_comes_from_its_own_stream_with_std_zb_sqrt_h_over_2() -> None:
    """The count release equals the side stream of a twin mechanism: multiplier z_b, sensitivity
    √H/2, never the update's own words."""
    ada = adaptive(True, 1.0, count_noise_multiplier=3.0, learning_rate=1e-3)
    mech = GaussianMechanism(1.0, 1.0, seed=5)
    twin = GaussianMechanism(1.0, 1.0, seed=5)
    update = {"a": torch.zeros(3), "b": torch.zeros(2), "c": torch.zeros(5)}
    agg = DPAggregator(ada, mech, expected_cohort_size=1000, template=update)
    before = ada.layer_bounds(update)
    agg.release(allow_empty=True)
    noise = {"count": torch.zeros(3, dtype=torch.float64)}
    twin.add_side_noise_(
        noise, stream=COUNT_STREAM, noise_multiplier=3.0, sensitivity=math.sqrt(3) / 2
    )
    sums = _recovered_sums(before, ada.bounds, ada, 1000)
    assert sums == pytest.approx(noise["count"].tolist(), rel=1e-6, abs=1e-6)
    main = {"count": torch.zeros(3, dtype=torch.float64)}
    twin.add_noise_(main, sensitivity=3.0 * math.sqrt(3) / 2)
    assert not torch.allclose(main["count"], noise["count"])


def test_count_noise_is_fresh_every_round_even_without_update_noise() -> None:
    """Failed before the fix: with z = 0 the release counter stood still, so every round's count
    got the same noise (a constant bias of the quantile estimate)."""
    ada = adaptive(False, 1.0, count_noise_multiplier=1.0, learning_rate=1e-3)
    mech = GaussianMechanism(0.0, 1.0, seed=9)
    update = {"w": torch.zeros(2)}
    seen = []
    for _ in range(3):
        agg = DPAggregator(ada, mech, expected_cohort_size=1000, template=update)
        before = ada.layer_bounds(update)
        agg.release(allow_empty=True)
        seen.append(_recovered_sums(before, ada.bounds, ada, 1000)[0])
    assert len({round(s, 6) for s in seen}) == 3


def test_side_stream_has_the_requested_std_and_true_tails() -> None:
    mech = GaussianMechanism(1.0, 1.0, seed=2)
    x = {"x": torch.zeros(400_000, dtype=torch.float64)}
    mech.add_side_noise_(x, stream="s", noise_multiplier=2.0, sensitivity=1.5)
    # std 3: the sample std of 4e5 draws is within 0.5% with probability > 1 - 1e-9
    assert float(x["x"].std()) == pytest.approx(3.0, rel=5e-3)
    assert (
        mech.state_dict()["generator"].tolist()
        == GaussianMechanism(1.0, 1.0, seed=2).state_dict()["generator"].tolist()
    )  # a side release changes no state


def test_sensitivity_override_scales_the_same_stream() -> None:
    a, b = GaussianMechanism(1.5, 1.0, seed=4), GaussianMechanism(1.5, 2.0, seed=4)
    x, y = {"x": torch.zeros(50)}, {"x": torch.zeros(50)}
    a.add_noise_(x, sensitivity=2.0)
    b.add_noise_(y)
    assert torch.equal(x["x"], y["x"])


# ------------------------------------------------------------------ convergence
def _converge(seed: int, gamma: float, per_layer: bool) -> list[float]:
    """Fraction of the norm distribution under the tail-mean bound, per layer."""
    size, rounds, tail = 50, 45, 25
    g = torch.Generator().manual_seed(seed)
    base = PerLayerClip.from_layer_bounds({"a": 0.3, "b": 1.2}) if per_layer else GlobalClip(0.3)
    ada = AdaptiveClip(
        base, count_noise_multiplier=size / 10, target_quantile=gamma, learning_rate=0.3
    )
    mech = GaussianMechanism(0.0, ada.initial_bound, seed=seed)
    logs = []
    for t in range(rounds):
        agg = DPAggregator(ada, mech, expected_cohort_size=size)
        norms = torch.exp(0.5 * torch.randn(size, 2, generator=g))  # lognormal, median 1
        norms[:, 1] *= 4  # layer b: median 4
        for u in range(size):
            if per_layer:
                agg.add({"a": norms[u, :1].clone(), "b": norms[u, 1:].clone()})
            else:
                agg.add({"a": norms[u, :1].clone()})
        agg.release()
        if t >= rounds - tail:
            logs.append([math.log(b) for b in ada.bounds.values()])
    means = [sum(col) / len(col) for col in zip(*logs, strict=True)]
    scales = [1.0, 4.0] if per_layer else [1.0]
    return [NormalDist(0, 0.5).cdf(m - math.log(s)) for m, s in zip(means, scales, strict=True)]


@pytest.mark.parametrize("gamma", [0.5, 0.8])
@pytest.mark.parametrize("per_layer", [False, True])
def test_bound_converges_to_the_target_quantile(gamma: float, per_layer: bool) -> None:
    """Norms ~ lognormal(0, 0.5) (layer b: ×4), S = 50, z_b = S/10, η = 0.3, 45 rounds from
    below. The CDF at the mean log-bound of the last 25 rounds must be within 0.08 of γ. Over 64
    seeded runs its deviation had std ≈ 0.018 (max 0.03): 0.08 is > 4 std, a false-alarm rate
    below 1e-4 per check (the seed is fixed, so the test is deterministic)."""
    for frac in _converge(0, gamma, per_layer):
        assert abs(frac - gamma) < 0.08


def test_fixed_total_keeps_the_sum_of_squares() -> None:
    ada = adaptive(True, 2.0, fix_total=True, learning_rate=1.0)
    update = {"a": torch.ones(9), "b": torch.ones(1)}
    ada.layer_bounds(update)
    for sums in ([0.5, -0.5], [-3.0, 2.0], [0.0, 0.0]):
        ada.update_(sums, expected_cohort_size=1.0)
        assert math.fsum(b * b for b in ada.bounds.values()) == pytest.approx(4.0, rel=1e-12)
    assert ada.bounds["a"] / ada.bounds["b"] != pytest.approx(3.0)  # the allocation moved


# ------------------------------------------------------------------ accounting
@settings(max_examples=25, deadline=None)
@given(
    z=st.floats(0.3, 20.0), zb=st.floats(0.3, 50.0), q=st.floats(1e-3, 0.5), t=st.integers(1, 500)
)
def test_property_round_equals_dp_accountings_composed_event_and_one_effective_gaussian(
    z: float, zb: float, q: float, t: int
) -> None:
    rnd = PoissonRound(noise_multiplier=z, sample_rate=q, count_noise_multiplier=zb)
    z_eff = effective_noise_multiplier(z, zb)
    assert z_eff**-2 == pytest.approx(z**-2 + zb**-2, rel=1e-12)
    ours = RDPAccountant(orders=ORDERS)
    ours.add_rounds(rnd, t)
    direct = rdp_privacy_accountant.RdpAccountant(orders=list(ORDERS))
    composed = dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z), dp_accounting.GaussianDpEvent(zb)]
    )
    direct.compose(dp_accounting.PoissonSampledDpEvent(q, composed), t)
    single = RDPAccountant(orders=ORDERS)
    single.add_rounds(PoissonRound(noise_multiplier=z_eff, sample_rate=q), t)
    assert ours.epsilon(1e-6) == pytest.approx(direct.get_epsilon(1e-6), rel=1e-9)
    assert ours.epsilon(1e-6) == pytest.approx(single.epsilon(1e-6), rel=1e-9)


@pytest.mark.parametrize(("z", "zb", "q", "t"), [(1.0, 2.0, 0.01, 200), (0.8, 5.0, 0.1, 50)])
def test_pld_of_the_round_equals_dp_accounting(z: float, zb: float, q: float, t: int) -> None:
    """dp_accounting's PLD takes no composed subevent under Poisson sampling, so the direct
    computation uses the single effective Gaussian; without sampling it composes both
    Gaussians itself, which must agree with the effective one."""
    grid = 1e-3
    z_eff = effective_noise_multiplier(z, zb)
    ours = PLDAccountant(value_discretization_interval=grid)
    ours.add_rounds(PoissonRound(noise_multiplier=z, sample_rate=q, count_noise_multiplier=zb), t)
    direct = pld_privacy_accountant.PLDAccountant(value_discretization_interval=grid)
    direct.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z_eff)), t)
    assert ours.epsilon(1e-6) == pytest.approx(direct.get_epsilon(1e-6), rel=1e-9)
    both = pld_privacy_accountant.PLDAccountant(value_discretization_interval=grid)
    both.compose(
        dp_accounting.ComposedDpEvent(
            [dp_accounting.GaussianDpEvent(z), dp_accounting.GaussianDpEvent(zb)]
        ),
        3,
    )
    one = pld_privacy_accountant.PLDAccountant(value_discretization_interval=grid)
    one.compose(dp_accounting.GaussianDpEvent(z_eff), 3)
    assert both.get_epsilon(1e-6) == pytest.approx(one.get_epsilon(1e-6), rel=2e-2)


def test_infinite_count_noise_reduces_to_the_plain_mechanism() -> None:
    plain = epsilon_for(1.0, 0.01, 300, 1e-6, orders=ORDERS)
    eps = [
        epsilon_for(1.0, 0.01, 300, 1e-6, orders=ORDERS, count_noise_multiplier=zb)
        for zb in (2.0, 10.0, 100.0, 1e4, 1e8)
    ]
    assert eps == sorted(eps, reverse=True) and eps[0] > plain * 1.1
    assert eps[-1] == pytest.approx(plain, rel=1e-9)
    assert effective_noise_multiplier(1.0, math.inf) == 1.0


def test_split_inverts_the_identity_and_refuses_an_impossible_split() -> None:
    for z_eff, zb in [(0.7, 1.0), (2.0, 100.0), (1e-3, 1e-2)]:
        z = split_noise_multiplier(z_eff, count_noise_multiplier=zb)
        assert effective_noise_multiplier(z, zb) == pytest.approx(z_eff, rel=1e-12)
    with pytest.raises(ValueError, match="count_noise_multiplier"):
        split_noise_multiplier(1.0, count_noise_multiplier=1.0)


def test_calibration_with_a_count_is_one_sided() -> None:
    z = calibrate_noise_multiplier(2.0, 1e-6, 0.01, 300, orders=ORDERS, count_noise_multiplier=5.0)
    z_plain = calibrate_noise_multiplier(2.0, 1e-6, 0.01, 300, orders=ORDERS)
    assert z > z_plain
    eps = epsilon_for(z, 0.01, 300, 1e-6, orders=ORDERS, count_noise_multiplier=5.0)
    assert eps <= 2.0
    with pytest.raises(ValueError, match="count_noise_multiplier"):
        calibrate_noise_multiplier(2.0, 1e-6, 0.01, 300, orders=ORDERS, count_noise_multiplier=0.5)


def test_round_dicts_round_trip_and_stay_backward_compatible() -> None:
    for rnd in (
        PoissonRound(noise_multiplier=1.0, sample_rate=0.1, count_noise_multiplier=4.0),
        FixedCohortRound(
            noise_multiplier=1.0, cohort_size=3, population=9, count_noise_multiplier=2.0
        ),
    ):
        assert round_from_dict(rnd.to_dict()) == rnd
    plain = PoissonRound(noise_multiplier=1.0, sample_rate=0.1)
    assert "count_noise_multiplier" not in plain.to_dict()
    with pytest.raises(ValueError, match="count_noise_multiplier"):
        PoissonRound(noise_multiplier=1.0, sample_rate=0.1, count_noise_multiplier=0.0)
    fixed = FixedCohortRound(
        noise_multiplier=2.0, cohort_size=3, population=9, count_noise_multiplier=4.0
    )
    acc = RDPAccountant(adjacency="replace_one", orders=ORDERS)
    acc.add_rounds(fixed)
    ref = RDPAccountant(adjacency="replace_one", orders=ORDERS)
    ref.add_rounds(
        FixedCohortRound(
            noise_multiplier=effective_noise_multiplier(2.0, 4.0), cohort_size=3, population=9
        )
    )
    assert acc.epsilon(1e-6) == pytest.approx(ref.epsilon(1e-6), rel=1e-9)


# ------------------------------------------------------------------ state and validation
def test_state_dict_round_trip_continues_identically() -> None:
    update = {"a": torch.arange(6.0), "b": torch.ones(2)}
    ada = adaptive(True, 1.0)
    ada.layer_bounds(update)
    ada.update_([1.0, -2.0], expected_cohort_size=4)
    state = ada.state_dict()
    other = adaptive(True, 1.0)
    other.load_state_dict(state)
    assert other.bounds == ada.bounds and other.step == ada.step == 1
    assert torch.equal(other.clip(update)[0]["a"], ada.clip(update)[0]["a"])
    with pytest.raises(ValueError, match="same settings"):
        adaptive(True, 1.0, target_quantile=0.6).load_state_dict(state)
    with pytest.raises(ValueError, match="bounds"):
        adaptive(True, 1.0).load_state_dict({**state, "bounds": {"a": -1.0}})


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="count_noise_multiplier"):
        adaptive(False, count_noise_multiplier=0.0)
    with pytest.raises(ValueError, match="target_quantile"):
        adaptive(False, target_quantile=1.0)
    with pytest.raises(ValueError, match="fix_total"):
        adaptive(False, fix_total=True)
    with pytest.raises(ValueError, match="normalize"):
        AdaptiveClip(PerLayerClip(1.0, normalize=True), count_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="initial_bound"):
        DPAggregator(adaptive(False, 1.0), GaussianMechanism(1.0, 2.0), expected_cohort_size=1)
    ada = adaptive(False, 1.0)
    with pytest.raises(ValueError, match="finite"):
        ada.update_([math.nan], expected_cohort_size=1)
    assert ada.step == 0 and ada.bound == 1.0


# ------------------------------------------------------------------ CLI
def test_cli_count_noise_multiplier(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from dpfl.cli import main

    run = ["--sample-rate", "0.01", "--rounds", "300", "--delta", "1e-6", "--json"]
    assert (
        main(
            [
                "privacy",
                "epsilon",
                "--noise-multiplier",
                "1.0",
                "--count-noise-multiplier",
                "2",
                *run,
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["effective_noise_multiplier"] == pytest.approx(effective_noise_multiplier(1.0, 2.0))
    assert out["epsilon"] == pytest.approx(
        epsilon_for(1.0, 0.01, 300, 1e-6, count_noise_multiplier=2.0), rel=1e-12
    )
    assert (
        main(["privacy", "calibrate", "--epsilon", "2", "--count-noise-multiplier", "5", *run]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"] <= 2.0 and out["count_noise_multiplier"] == 5.0
    assert out["noise_multiplier"] > out["effective_noise_multiplier"]
    code = main(["privacy", "calibrate", "--epsilon", "2", "--count-noise-multiplier", "0.5", *run])
    assert code == 2
    assert "argument --count-noise-multiplier" in capsys.readouterr().err


def test_extreme_counts_keep_the_bound_finite_and_positive() -> None:
    for per_layer in (False, True):
        ada = adaptive(per_layer, 1.0, learning_rate=1e3)
        h = len(ada.layer_bounds({"a": torch.ones(3), "b": torch.ones(2)}))
        for sums in ([-1e6] * h, [1e6] * h):
            for _ in range(3):
                ada.update_(sums, expected_cohort_size=1.0)
                assert 0.0 < ada.bound < math.inf and ada.count_sensitivity > 0
                GaussianMechanism(1.0, 1.0).add_noise_(
                    {"x": torch.zeros(2, dtype=torch.float64)}, sensitivity=ada.bound
                )
