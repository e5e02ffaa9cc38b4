"""Tests for dpfl.noise.GaussianMechanism: noise statistics, seeding, resume, secure mode, errors."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as sps

from dpfl.noise import GaussianMechanism

N = 200_000
ALPHA = 1e-6  # false-alarm rate of each two-sided statistical check below


def assert_gaussian(sample: torch.Tensor, std: float) -> None:
    """Check mean 0 and standard deviation ``std`` of an i.i.d. sample.

    Mean: the sample mean is N(0, std²/n); reject if |z| exceeds the two-sided normal quantile at
    ALPHA = 1e-6. Variance: (n-1)·s²/std² ~ χ²(n-1); reject outside the two-sided χ² interval at
    ALPHA. Each check raises a false alarm with probability 1e-6 on correct code.
    """
    x = sample.double().flatten()
    n = x.numel()
    z = float(x.mean()) / (std / math.sqrt(n))
    assert abs(z) < sps.norm.ppf(1 - ALPHA / 2), z
    chi2 = (n - 1) * float(x.var()) / std**2
    lo, hi = sps.chi2.ppf(ALPHA / 2, n - 1), sps.chi2.ppf(1 - ALPHA / 2, n - 1)
    assert lo < chi2 < hi, (chi2, lo, hi)


@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_mean_and_std(secure, dtype):
    mech = GaussianMechanism(1.7, 0.3, secure=secure)
    assert math.isclose(mech.std, 0.51)
    x = {"a": torch.zeros(N // 2, dtype=dtype), "b": torch.zeros(N // 4, 2, dtype=dtype)}
    noised = mech.add_noise(x)
    assert all(noised[k].dtype == dtype for k in x)
    assert_gaussian(torch.cat([noised["a"], noised["b"].flatten()]), 0.51)
    assert not any(v.any() for v in x.values())  # inputs untouched


def test_noise_is_independent_across_coordinates_and_tensors():
    """Lag-1 correlation of the noise is ~N(0, 1/n); two-sided check at ALPHA = 1e-6."""
    noised = GaussianMechanism(1.0, 1.0, seed=3).add_noise(
        {"a": torch.zeros(N), "b": torch.zeros(N)}
    )
    for x, y in ((noised["a"][:-1], noised["a"][1:]), (noised["a"], noised["b"])):
        r = float(torch.corrcoef(torch.stack([x, y]).double())[0, 1])
        assert abs(r) * math.sqrt(x.numel()) < sps.norm.ppf(1 - ALPHA / 2)


@given(st.integers(0, 2**64 - 1), st.floats(0.01, 10), st.floats(1e-3, 1e3))
def test_same_seed_same_noise(seed, z, c):
    x = {"w": torch.zeros(5), "b": torch.zeros(2, 3, dtype=torch.float64)}
    a = GaussianMechanism(z, c, seed=seed).add_noise(x)
    b = GaussianMechanism(z, c, seed=seed).add_noise(x)
    assert all(torch.equal(a[k], b[k]) for k in x)


def test_different_or_missing_seed_gives_different_noise():
    x = {"w": torch.zeros(64)}
    draws = [
        GaussianMechanism(1.0, 1.0, seed=0).add_noise(x)["w"],
        GaussianMechanism(1.0, 1.0, seed=1).add_noise(x)["w"],
        GaussianMechanism(1.0, 1.0).add_noise(x)["w"],
        GaussianMechanism(1.0, 1.0).add_noise(x)["w"],
        GaussianMechanism(1.0, 1.0, secure=True).add_noise(x)["w"],
        GaussianMechanism(1.0, 1.0, secure=True).add_noise(x)["w"],
    ]
    for i in range(len(draws)):
        for j in range(i):
            assert not torch.equal(draws[i], draws[j]), (i, j)


def test_successive_calls_give_fresh_noise_and_global_rng_untouched():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    mech = GaussianMechanism(1.0, 1.0, seed=0)
    a = mech.add_noise({"w": torch.zeros(16)})["w"]
    b = mech.add_noise({"w": torch.zeros(16)})["w"]
    assert not torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)


def test_state_dict_resume_continues_the_same_noise():
    x = {"w": torch.zeros(32)}
    mech = GaussianMechanism(0.8, 2.0, seed=11)
    mech.add_noise(x)
    saved = mech.state_dict()
    expected = [mech.add_noise(x)["w"] for _ in range(2)]
    resumed = GaussianMechanism(0.8, 2.0, seed=99)
    resumed.load_state_dict(saved)
    assert all(torch.equal(resumed.add_noise(x)["w"], e) for e in expected)


def test_load_state_dict_rejects_mismatch_and_keeps_state():
    mech = GaussianMechanism(1.0, 1.0, seed=5)
    reference = GaussianMechanism(1.0, 1.0, seed=5)
    for bad, key in (
        (GaussianMechanism(2.0, 1.0, seed=5).state_dict(), "noise_multiplier"),
        (GaussianMechanism(1.0, 3.0, seed=5).state_dict(), "sensitivity"),
        (GaussianMechanism(1.0, 1.0, secure=True).state_dict(), "secure"),
        ({"noise_multiplier": 1.0, "sensitivity": 1.0, "secure": False}, "generator"),
    ):
        with pytest.raises(ValueError, match=key):
            mech.load_state_dict(bad)
    x = {"w": torch.zeros(8)}
    assert torch.equal(mech.add_noise(x)["w"], reference.add_noise(x)["w"])


def test_secure_state_dict_has_no_generator_state():
    mech = GaussianMechanism(1.0, 1.0, secure=True)
    state = mech.state_dict()
    assert "generator" not in state and state["secure"] is True
    mech.load_state_dict(state)


def test_zero_noise_returns_values_unchanged():
    x = {"w": torch.randn(7), "h": torch.randn(3, dtype=torch.float16)}
    mech = GaussianMechanism(0.0, math.inf)
    out = mech.add_noise(x)
    assert mech.std == 0.0
    assert all(torch.equal(out[k], x[k]) and out[k] is not x[k] for k in x)
    y = {k: v.clone() for k, v in x.items()}
    mech.add_noise_(y)
    assert all(torch.equal(y[k], x[k]) for k in x)


def test_add_noise_in_place_and_low_precision():
    x = {"h": torch.zeros(1000, dtype=torch.float16), "e": torch.zeros(0)}
    GaussianMechanism(1.0, 1.0, seed=0).add_noise_(x)
    assert x["h"].dtype == torch.float16 and x["h"].std() > 0.5 and x["e"].numel() == 0


def test_dp_event():
    event = GaussianMechanism(1.3, 0.01, seed=0).dp_event()
    assert event == dp_accounting.GaussianDpEvent(1.3)


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"noise_multiplier": -0.1, "sensitivity": 1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.nan, "sensitivity": 1.0}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "sensitivity": 0.0}, "sensitivity"),
        ({"noise_multiplier": 1.0, "sensitivity": -2.0}, "sensitivity"),
        ({"noise_multiplier": 1.0, "sensitivity": math.inf}, "sensitivity"),
        ({"noise_multiplier": 1.0, "sensitivity": 1.0, "seed": -1}, "seed"),
        ({"noise_multiplier": 1.0, "sensitivity": 1.0, "seed": 2**64}, "seed"),
        ({"noise_multiplier": 1.0, "sensitivity": 1.0, "seed": 0, "secure": True}, "seed"),
    ],
)
def test_invalid_arguments_name_the_culprit(kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        GaussianMechanism(**kwargs)


def test_non_tensor_input_is_rejected_before_noise():
    mech = GaussianMechanism(1.0, 1.0, seed=0)
    good = torch.zeros(3)
    with pytest.raises(TypeError, match="'bad'"):
        mech.add_noise_({"good": good, "bad": [1.0, 2.0]})  # type: ignore[dict-item]
    assert not good.any()
