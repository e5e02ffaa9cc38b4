"""The DP release divides by the fixed denominator and tests the mean for finiteness right after,
in plain torch (no compiler), so the round loop's server step need not read the update again.

Guarantees: ``ReleaseStats.mean_finite`` is exactly "every released coordinate is finite" for
every dtype and device; the quotients are ``Tensor.div_``'s bit for bit; and the loop skips the
server step's own check only for a mean the release certified."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfl._finite import divide_, first_non_finite
from dpfl.aggregate import DPAggregator
from dpfl.clip import GlobalClip
from dpfl.noise import GaussianMechanism


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 50_000), d=st.floats(1e-3, 1e6), seed=st.integers(0, 2**31 - 1))
def test_release_division_is_torchs_bit_for_bit_and_reports_finiteness(dtype, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    x = (x * 10.0 ** torch.randint(-30, 30, (n,), generator=g)).to(dtype)
    want = x.clone().div_(d)
    assert divide_([x], d) is bool(torch.isfinite(want).all())
    torch.testing.assert_close(x, want, rtol=0, atol=0, equal_nan=True)  # the same quotients


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "overflow"])
def test_every_non_finite_position_is_reported(dtype, bad):
    n = 3 * 65536 + 7
    for pos in (0, 65535, n // 2, n - 1):
        x = torch.ones(n, dtype=dtype)
        x[pos] = torch.finfo(dtype).max if bad == "overflow" else bad
        d = 0.5 if bad == "overflow" else 3.0  # max / 0.5 overflows to inf
        assert divide_([torch.ones(3, dtype=dtype), x], d) is False, pos
        assert not torch.isfinite(x[pos])
    huge = torch.full((n,), torch.finfo(dtype).max, dtype=dtype)  # its norm overflows, not it
    assert first_non_finite([huge, torch.zeros(0, dtype=dtype)]) is None


def _aggregator(dtype=torch.float32):
    mech = GaussianMechanism(noise_multiplier=1.0, sensitivity=1.0, seed=0)
    return DPAggregator(GlobalClip(1.0), mech, expected_cohort_size=4, accumulate_dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_release_certifies_a_finite_mean(dtype):
    agg = _aggregator(dtype)
    agg.add({"w": torch.randn(1000, 3), "b": torch.randn(7)})
    mean, stats = agg.release()
    assert all(torch.isfinite(t).all() for t in mean.values())
    assert stats.mean_finite is True


def test_release_reports_a_non_finite_mean():
    agg = _aggregator(torch.float32)
    agg.add({"w": torch.randn(10)})
    agg._sum["w"][3] = math.inf  # e.g. a sum that overflowed
    _, stats = agg.release()
    assert stats.mean_finite is False


def test_the_round_loop_skips_the_second_finiteness_pass_only_for_a_certified_mean(monkeypatch):
    import dpfl.simulation._round as loop
    from tests.test_rounds import call, setup

    seen: list[bool] = []
    real = loop.server_step

    def spy(*args, check_finite=True, **kwargs):  # the real server step, recording the flag
        seen.append(check_finite)
        return real(*args, check_finite=check_finite, **kwargs)

    monkeypatch.setattr(loop, "server_step", spy)
    kw = setup()
    call(kw, rounds=2, noise_multiplier=1.0)
    assert seen == [False] * 2  # the release certified each mean
    assert all(torch.isfinite(p).all() for p in kw["model"].parameters())
