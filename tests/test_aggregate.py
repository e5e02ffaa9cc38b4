"""Tests for dpfl.aggregate.DPAggregator: sensitivity, fixed denominator, reduce hook, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpfl.aggregate import DPAggregator, ReleaseStats
from dpfl.clip import GlobalClip, PerLayerClip
from dpfl.noise import GaussianMechanism

SHAPES = {"enc.w": (3, 4), "enc.b": (4,), "head.w": (2,)}


@st.composite
def user_updates(draw, dtype=torch.float32):
    """An update with the fixed SHAPES schema and magnitudes from 1e-30 to 1e30."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
    lo, hi = (-7, 4) if dtype == torch.float16 else (-30, 30)
    out = {}
    for name, shape in SHAPES.items():
        scale = (
            0.0
            if draw(st.booleans()) and draw(st.booleans())
            else 10.0 ** draw(st.integers(lo, hi))
        )
        out[name] = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return out


def make_clipper(kind: str, bound: float):
    if kind == "global":
        return GlobalClip(bound)
    if kind == "normalize":
        return PerLayerClip(bound, normalize=True)
    return PerLayerClip(bound, allocation=kind, layers=lambda n: n.split(".")[0])


def norm64(tensors) -> float:
    return math.sqrt(math.fsum(float(t.double().pow(2).sum()) for t in tensors))


def pre_noise_sum(agg: DPAggregator, updates) -> dict[str, torch.Tensor]:
    """Sum seen by the reduce hook (before noise) after adding ``updates``."""
    seen: list[torch.Tensor] = []
    for u in updates:
        agg.add(u)
    agg.release(reduce=lambda ts: seen.extend(t.clone() for t in ts), allow_empty=True)
    return dict(zip(SHAPES, seen[:-1], strict=True))


@given(
    st.sampled_from(["global", "uniform", "dim", "normalize"]),
    st.integers(-30, 30).map(lambda e: 10.0**e),
    st.sampled_from([torch.float32, torch.float64]),
    st.sampled_from([torch.float16, torch.float32, torch.float64]),
    st.data(),
)
def test_adding_one_user_changes_the_sum_by_at_most_the_bound(kind, bound, acc, dtype, data):
    others = data.draw(st.lists(user_updates(dtype), min_size=0, max_size=4))
    extra = data.draw(user_updates(dtype))
    template = {k: torch.zeros(s, dtype=dtype) for k, s in SHAPES.items()}

    def agg():
        clipper = make_clipper(kind, bound)
        mech = GaussianMechanism(0.0, bound)
        return DPAggregator(
            clipper, mech, expected_cohort_size=3, accumulate_dtype=acc, template=template
        )

    without = pre_noise_sum(agg(), others)
    with_user = pre_noise_sum(agg(), [*others, extra])
    assert norm64([with_user[k] - without[k] for k in SHAPES]) <= bound


@given(st.lists(user_updates(), min_size=1, max_size=5), st.sampled_from(["global", "dim"]))
def test_zero_noise_and_infinite_bound_give_the_plain_mean(updates, kind):
    agg = DPAggregator(
        make_clipper(kind, math.inf),
        GaussianMechanism(0.0, math.inf),
        expected_cohort_size=len(updates),
        accumulate_dtype=torch.float64,
    )
    for u in updates:
        agg.add(u)
    mean, stats = agg.release()
    for k in SHAPES:
        expected = sum(u[k].double() for u in updates) / len(updates)
        assert torch.allclose(mean[k], expected, rtol=1e-12, atol=0)
    assert stats.num_users == len(updates) and stats.fraction_clipped == 0.0


def test_release_divides_by_expected_cohort_size_and_reports_stats():
    agg = DPAggregator(GlobalClip(1.0), GaussianMechanism(0.0, 1.0), expected_cohort_size=10)
    agg.add({"w": torch.tensor([3.0, 4.0])})  # norm 5, clipped
    agg.add({"w": torch.tensor([0.0, 0.5])})  # norm 0.5
    agg.add({"w": torch.tensor([0.0, 0.5])})
    assert agg.num_users == 3
    mean, stats = agg.release()
    expected = (torch.tensor([0.6, 0.8]) + torch.tensor([0.0, 1.0])) / 10
    assert torch.allclose(mean["w"], expected, rtol=1e-4)
    assert mean["w"].dtype == torch.float32
    assert stats == ReleaseStats(
        num_users=3, num_dropped=0, fraction_clipped=1 / 3, mean_norm=pytest.approx(2.0),
        mean_finite=True,
    )
    assert agg.num_users == 0  # reset
    with pytest.raises(ValueError, match="num_users == 0"):
        agg.release()


def test_noise_is_added_once_after_reduce_with_std_z_c():
    """Noise std check: normal CI on the sample std at false-alarm rate ~1e-6 (|z| < 4.9)."""
    z, c, n, size = 2.0, 0.5, 100_000, 4.0
    agg = DPAggregator(GlobalClip(c), GaussianMechanism(z, c, seed=1), expected_cohort_size=size)
    agg.add({"w": torch.full((n,), 1e-3)})
    seen: list[torch.Tensor] = []
    mean, _ = agg.release(reduce=lambda ts: seen.extend(t.clone() for t in ts))
    noise = (mean["w"].double() * size - seen[0].double()).flatten()
    assert torch.allclose(seen[0], torch.full((n,), 1e-3 * min(1.0, c / (1e-3 * math.sqrt(n)))))
    std_se = z * c / math.sqrt(2 * n)  # standard error of the sample std
    assert abs(float(noise.std()) - z * c) < 4.9 * std_se
    assert abs(float(noise.mean())) < 4.9 * z * c / math.sqrt(n)


def test_reduce_hook_sums_workers_before_noise():
    users = [{"w": torch.tensor([float(i), 1.0])} for i in range(5)]

    def agg():
        return DPAggregator(GlobalClip(2.0), GaussianMechanism(0.0, 2.0), expected_cohort_size=5)

    single = agg()
    for u in users:
        single.add(u)
    expected, expected_stats = single.release()
    a, b = agg(), agg()
    for u in users[:2]:
        a.add(u)
    for u in users[2:]:
        b.add(u)
    b_seen: list[torch.Tensor] = []
    b.release(reduce=lambda ts: b_seen.extend(t.clone() for t in ts))

    def all_reduce(ts):
        for t, other in zip(ts, b_seen, strict=True):
            t.add_(other)

    got, stats = a.release(reduce=all_reduce)
    assert torch.allclose(got["w"], expected["w"])
    assert stats == expected_stats


def test_allow_empty_releases_noise_only_with_a_template():
    template = {"w": torch.zeros(50_000)}
    agg = DPAggregator(
        GlobalClip(1.0),
        GaussianMechanism(1.0, 1.0, seed=0),
        expected_cohort_size=2,
        template=template,
    )
    with pytest.raises(ValueError, match="allow_empty"):
        agg.release()
    mean, stats = agg.release(allow_empty=True)
    assert stats.num_users == 0 and stats.mean_norm == 0.0
    assert abs(float(mean["w"].std()) - 0.5) < 0.02
    no_schema = DPAggregator(GlobalClip(1.0), GaussianMechanism(1.0, 1.0), expected_cohort_size=2)
    with pytest.raises(ValueError, match="template"):
        no_schema.release(allow_empty=True)


def test_drop_nonfinite_counts_dropped_users():
    agg = DPAggregator(
        GlobalClip(1.0), GaussianMechanism(0.0, 1.0), expected_cohort_size=1, drop_nonfinite=True
    )
    assert agg.add({"w": torch.tensor([math.nan, 1.0])}) is None
    assert agg.add({"w": torch.tensor([0.5, 0.0])}) is not None
    assert agg.add({"w": torch.tensor([math.inf, 1.0])}) is None
    mean, stats = agg.release()
    assert stats.num_users == 1 and stats.num_dropped == 2
    assert torch.equal(mean["w"], torch.tensor([0.5, 0.0]))


GOOD = {"a": torch.ones(2, 3), "b": torch.ones(4)}


@pytest.mark.parametrize(
    ("bad", "culprit"),
    [
        ({"a": torch.ones(2, 3)}, "missing \\['b'\\]"),
        ({**GOOD, "c": torch.ones(1)}, "unexpected \\['c'\\]"),
        ({"a": torch.ones(3, 2), "b": torch.ones(4)}, "'a' has shape"),
        ({"a": torch.ones(2, 3), "b": torch.ones(4, dtype=torch.float64)}, "'b' has dtype"),
        ({"a": torch.ones(2, 3), "b": torch.tensor([1.0, math.nan, 1.0, 1.0])}, "'b'"),
        ({"a": torch.full((2, 3), math.inf), "b": torch.ones(4)}, "'a'"),
    ],
)
def test_bad_update_raises_naming_culprit_and_leaves_state_unchanged(bad, culprit):
    agg = DPAggregator(PerLayerClip(1.0), GaussianMechanism(0.0, 1.0), expected_cohort_size=2)
    agg.add(GOOD)
    with pytest.raises(ValueError, match=culprit):
        agg.add(bad)
    assert agg.num_users == 1
    mean, stats = agg.release()
    ref = DPAggregator(PerLayerClip(1.0), GaussianMechanism(0.0, 1.0), expected_cohort_size=2)
    ref.add(GOOD)
    ref_mean, ref_stats = ref.release()
    assert stats == ref_stats and all(torch.equal(mean[k], ref_mean[k]) for k in GOOD)


def test_first_bad_update_leaves_no_schema():
    agg = DPAggregator(GlobalClip(1.0), GaussianMechanism(0.0, 1.0), expected_cohort_size=1)
    with pytest.raises(ValueError, match="'w'"):
        agg.add({"w": torch.tensor([math.nan])})
    agg.add({"v": torch.ones(2)})  # the failed update fixed no schema
    assert agg.num_users == 1


def test_template_fixes_schema():
    agg = DPAggregator(
        GlobalClip(1.0),
        GaussianMechanism(0.0, 1.0),
        expected_cohort_size=1,
        template={"w": torch.zeros(2)},
    )
    with pytest.raises(ValueError, match="missing \\['w'\\]"):
        agg.add({"v": torch.ones(2)})


def test_accumulate_dtype_float64():
    agg = DPAggregator(
        GlobalClip(1.0),
        GaussianMechanism(0.0, 1.0),
        expected_cohort_size=1,
        accumulate_dtype=torch.float64,
    )
    agg.add({"w": torch.tensor([0.25], dtype=torch.float16)})
    mean, _ = agg.release()
    assert mean["w"].dtype == torch.float64 and float(mean["w"]) == 0.25


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"expected_cohort_size": 0.5}, "expected_cohort_size"),
        ({"expected_cohort_size": 0}, "expected_cohort_size"),
        ({"expected_cohort_size": math.nan}, "expected_cohort_size"),
        ({"expected_cohort_size": 2, "accumulate_dtype": torch.float16}, "accumulate_dtype"),
    ],
)
def test_invalid_hyperparameters(kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        DPAggregator(GlobalClip(1.0), GaussianMechanism(1.0, 1.0), **kwargs)


def test_sensitivity_mismatch_is_an_error():
    with pytest.raises(ValueError, match="sensitivity"):
        DPAggregator(GlobalClip(1.0), GaussianMechanism(1.0, 2.0), expected_cohort_size=2)
    with pytest.raises(ValueError, match="bound"):
        DPAggregator(GlobalClip(0.0), GaussianMechanism(1.0, 1.0), expected_cohort_size=2)
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPAggregator(GlobalClip(1.0), GaussianMechanism(-1.0, 1.0), expected_cohort_size=2)


# --- degenerate inputs (issue 11): a clear error naming the problem, no state change -----------


def _fresh(**kwargs) -> DPAggregator:
    return DPAggregator(
        PerLayerClip(1.0), GaussianMechanism(0.0, 1.0), expected_cohort_size=2, **kwargs
    )


@pytest.mark.parametrize(
    ("bad", "error", "culprit"),
    [
        ({}, ValueError, "update is empty"),
        ({"w": torch.zeros(0), "v": torch.zeros(0, 3)}, ValueError, "no elements"),
        ({"w": torch.ones(3).to_sparse()}, TypeError, "'w' must be a dense"),
        ({"w": torch.ones(3, device="meta")}, TypeError, "'w' .*meta"),
        ({1: torch.ones(3)}, TypeError, "keys must be str.*1"),
    ],
)
def test_degenerate_first_update_is_rejected_and_fixes_no_schema(bad, error, culprit):
    agg = _fresh()
    with pytest.raises(error, match=culprit):
        agg.add(bad)
    assert agg.num_users == 0
    with pytest.raises(ValueError, match="no schema"):
        agg.release(allow_empty=True)  # the bad update fixed no schema
    agg.add({"w": torch.ones(3)})
    assert agg.num_users == 1


@pytest.mark.parametrize(
    ("bad", "error", "culprit"),
    [
        ({}, ValueError, "update is empty"),
        ({"w": torch.ones(3).to_sparse()}, TypeError, "'w' must be a dense"),
    ],
)
def test_degenerate_later_update_is_rejected_and_leaves_the_sum_unchanged(bad, error, culprit):
    agg = _fresh()
    agg.add({"w": torch.full((3,), 0.25)})
    with pytest.raises(error, match=culprit):
        agg.add(bad)
    mean, stats = agg.release()
    assert stats.num_users == 1 and torch.equal(mean["w"], torch.full((3,), 0.125))


@pytest.mark.parametrize(
    ("template", "culprit"),
    [
        ({}, "template is empty"),
        ({"w": torch.zeros(0)}, "template .*no elements"),
        ({"w": torch.zeros(2).to_sparse()}, "template tensor 'w' must be a dense"),
    ],
)
def test_degenerate_template_is_rejected(template, culprit):
    with pytest.raises((ValueError, TypeError), match=culprit):
        _fresh(template=template)
