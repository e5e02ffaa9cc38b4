"""The DP release divides by the fixed denominator and proves the mean finite in the same pass,
so the round loop's server step need not read the update again (issue 12)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfl.aggregate import DPAggregator
from dpfl.clip import GlobalClip
from dpfl.noise import GaussianMechanism
from dpfl.optim import _kernel

needs_kernel = pytest.mark.skipif(
    _kernel.load() is None, reason=f"fused kernel unavailable: {_kernel.unavailable_reason()}"
)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 200_000), d=st.floats(1e-3, 1e6), seed=st.integers(0, 2**31 - 1))
def test_kernel_division_is_torchs_bit_for_bit(dtype, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-30, 30, (n,), generator=g)).to(dtype)
    want = x.clone().div_(d)
    assert _kernel.load().div_finite_(x, d) is bool(torch.isfinite(want).all())
    torch.testing.assert_close(x, want, rtol=0, atol=0, equal_nan=True)  # the same quotients


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "overflow"])
def test_kernel_reports_every_non_finite_position(dtype, bad):
    n = 3 * 65536 + 7  # several threads' parts and a tail
    for pos in (0, 65535, 65536, n // 2, n - 8, n - 1):
        x = torch.ones(n, dtype=dtype)
        x[pos] = torch.finfo(dtype).max if bad == "overflow" else bad
        d = 0.5 if bad == "overflow" else 3.0  # max / 0.5 overflows to inf
        assert _kernel.load().div_finite_(x, d) is False, pos
        assert not torch.isfinite(x[pos])


def _aggregator(dtype=torch.float32):
    mech = GaussianMechanism(noise_multiplier=1.0, sensitivity=1.0, seed=0)
    return DPAggregator(GlobalClip(1.0), mech, expected_cohort_size=4, accumulate_dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_release_certifies_a_finite_mean(dtype):
    agg = _aggregator(dtype)
    agg.add({"w": torch.randn(1000, 3), "b": torch.randn(7)})
    mean, stats = agg.release()
    assert all(torch.isfinite(t).all() for t in mean.values())
    assert stats.mean_finite is (True if _kernel.load() is not None else None)


def test_release_reports_a_non_finite_mean():
    agg = _aggregator(torch.float32)
    agg.add({"w": torch.randn(10)})
    agg._sum["w"][3] = math.inf  # e.g. a sum that overflowed
    _, stats = agg.release()
    assert stats.mean_finite is (False if _kernel.load() is not None else None)


@pytest.mark.parametrize("compiled", [True, False])
def test_the_round_loop_skips_the_second_finiteness_pass_only_for_a_certified_mean(monkeypatch, compiled):
    import dpfl.simulation._loop as loop
    from tests.test_rounds import call, setup

    if not compiled:  # a machine without a C compiler: the release cannot certify its mean
        monkeypatch.setattr(_kernel, "_load", lambda: "no C compiler (simulated)")
    seen: list[bool] = []
    real = loop.server_step

    def spy(*args, check_finite=True, **kwargs):  # the real server step, recording the flag
        seen.append(check_finite)
        return real(*args, check_finite=check_finite, **kwargs)

    monkeypatch.setattr(loop, "server_step", spy)
    kw = setup()
    call(kw, rounds=2, noise_multiplier=1.0)
    certified = compiled and _kernel.load() is not None
    assert seen == [not certified] * 2
    assert all(torch.isfinite(p).all() for p in kw["model"].parameters())
