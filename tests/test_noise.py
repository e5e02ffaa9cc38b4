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


# ----------------------------------------------------------------- sampler, threads, dtypes (#9)
def test_noise_is_the_documented_sampler_on_the_state_key():
    """The released noise equals Box–Muller (float64 reference) on the AES-256-CTR keystream
    whose key and release counter state_dict() exposes: no other sampler is on the path."""
    from test_sampler import reference_normals, reference_words

    mech = GaussianMechanism(1.0, 2.0, seed=4)
    mech.add_noise({"w": torch.zeros(3)})  # advance to release 1
    raw = bytes(mech.state_dict()["generator"].tolist())
    key, release = raw[16:48], int.from_bytes(raw[48:], "little")
    assert release == 1
    noised = mech.add_noise({"a": torch.zeros(40), "b": torch.zeros(6, dtype=torch.float64)})
    # 40 float32 coordinates: 20 pairs, 20 int64 radius + 20 int64 fine + 20 int32 angle words
    # = 50 words; then 6 float64 coordinates: 4 pairs (a multiple of 4), 3 × 4 int64 words.
    z_a = reference_normals(reference_words(key, 1, 0, 50), 20, float64=False)
    z_b = reference_normals(reference_words(key, 1, 50, 12), 4, float64=True)
    torch.testing.assert_close(
        noised["a"].double(), 2.0 * torch.from_numpy(z_a[:40]), rtol=2e-5, atol=2e-5
    )
    torch.testing.assert_close(noised["b"], 2.0 * torch.from_numpy(z_b[:6]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_sums_get_noise_of_std_z_c(secure, dtype):
    """float16/bfloat16 sums: std check as above (rounding adds < 1e-6 relative variance)."""
    mech = GaussianMechanism(1.0, 0.5, secure=secure)
    noised = mech.add_noise({"h": torch.zeros(N, dtype=dtype)})
    assert noised["h"].dtype == dtype
    assert_gaussian(noised["h"], 0.5)


@given(st.integers(0, 2**64 - 1))
def test_same_seed_same_noise_for_any_num_threads(seed):
    x = {"w": torch.zeros(70_001), "b": torch.zeros(5, dtype=torch.float64)}
    runs = [GaussianMechanism(1.0, 1.0, seed=seed, num_threads=k).add_noise(x) for k in (1, 2, 3)]
    assert all(torch.equal(r[k], runs[0][k]) for r in runs[1:] for k in x)


def test_non_contiguous_tensors_are_noised_in_place():
    base = torch.zeros(400, 500)
    view = base.t()
    GaussianMechanism(1.0, 1.0, seed=2).add_noise_({"w": view})
    assert base.abs().min() > 0  # every coordinate of the underlying storage got noise
    assert_gaussian(base, 1.0)


def test_std_not_representable_in_the_dtype_is_rejected_before_any_change():
    """GaussianMechanism(1, 1e300) on float32 used to release inf noise silently (issue 11)."""
    mech = GaussianMechanism(1.0, 1e300, seed=0)
    ok, bad = torch.zeros(4, dtype=torch.float64), torch.zeros(4)
    with pytest.raises(ValueError, match=r"std.*'w'.*float32"):
        mech.add_noise_({"ok": ok, "w": bad})
    assert not ok.any() and not bad.any()
    with pytest.raises(ValueError, match="'h'.*float16"):
        GaussianMechanism(1.0, 1e4).add_noise_({"h": torch.zeros(2, dtype=torch.float16)})
    out = mech.add_noise({"ok": ok})["ok"]  # float64 can hold it, and the failed call drew nothing
    again = GaussianMechanism(1.0, 1e300, seed=0).add_noise({"ok": ok})["ok"]
    assert torch.isfinite(out).all() and torch.equal(out, again)


@pytest.mark.parametrize(
    "generator",
    [
        torch.zeros(5056, dtype=torch.uint8),  # a torch mt19937 state (older dpfl)
        torch.zeros(56, dtype=torch.uint8),  # right size, wrong format tag
        torch.zeros(56, dtype=torch.int64),
        torch.zeros(2, 28, dtype=torch.uint8),
        "not a tensor",
    ],
)
def test_malformed_generator_state_raises_value_error_and_keeps_state(generator):
    mech = GaussianMechanism(1.0, 1.0, seed=5)
    bad = {**mech.state_dict(), "generator": generator}
    with pytest.raises(ValueError, match="generator"):
        mech.load_state_dict(bad)
    x = {"w": torch.zeros(8)}
    assert torch.equal(
        mech.add_noise(x)["w"], GaussianMechanism(1.0, 1.0, seed=5).add_noise(x)["w"]
    )


def test_secure_mode_rekeys_every_release_and_saves_no_key():
    mech = GaussianMechanism(1.0, 1.0, secure=True)
    keys = []
    for _ in range(3):
        mech.add_noise({"w": torch.zeros(4)})
        keys.append(mech._key)
    assert len(set(keys)) == 3
    assert "generator" not in mech.state_dict()


def test_num_threads_is_validated():
    with pytest.raises(ValueError, match="num_threads"):
        GaussianMechanism(1.0, 1.0, num_threads=0)


# ----------------------------------------------------------------- the ceiling in δ (issue 21)
def test_a_release_with_the_user_never_lands_where_none_without_can():
    """The audit probe of issue 21 at z = 0.2, q = 1, T = 1, with the printed δ = 1e-9.

    Without the user, no coordinate of a release exceeds ``σ · MAX_ABS_NORMAL`` (the sampler's
    hard bound, ``tests/test_sampler.py``). With the user (shift C), the fraction of releases
    beyond it is therefore a lower bound on the true δ at every ε; its Clopper–Pearson lower
    bound (confidence 1 − ALPHA) must not exceed the printed δ. Before the fix (one 64-bit word
    per radius, ceiling 9.419σ) about 83 of 2^24 such releases landed beyond it: δ ≥ 3e-6 for a
    printed ε of 43 at δ = 1e-9. With the 13.216σ ceiling the chance is ~1e-16 per release.
    """
    from dpfl.accounting import PoissonRound, RDPAccountant
    from dpfl.noise import MAX_ABS_NORMAL

    z, sensitivity, delta, n = 0.2, 1.0, 1e-9, 1 << 24
    accountant = RDPAccountant()
    accountant.add_rounds(PoissonRound(z, 1.0))
    assert math.isfinite(accountant.epsilon(delta))  # the printed (ε, δ)
    mech = GaussianMechanism(z, sensitivity, seed=21)
    with_user = mech.add_noise({"canary": torch.full((n,), sensitivity)})["canary"].double()
    beyond = int((with_user > mech.std * MAX_ABS_NORMAL).sum())
    lower = float(sps.beta.ppf(ALPHA, beyond, n - beyond + 1)) if beyond else 0.0
    assert lower <= delta, f"{beyond} of {n} releases beyond the ceiling: delta >= {lower:.3g}"


def test_advance_to_skips_releases_and_never_reuses_one():
    """The round loop keys each release on its journal charge (advance_to); an index already
    drawn cannot come back, since the same noise twice leaks the difference of two releases."""
    a, b = GaussianMechanism(1.0, 1.0, seed=3), GaussianMechanism(1.0, 1.0, seed=3)
    b.advance_to(2)
    assert b.release_index == 2
    skipped = b.add_noise({"w": torch.zeros(8)})["w"]
    drawn = [a.add_noise({"w": torch.zeros(8)})["w"] for _ in range(3)]
    assert torch.equal(skipped, drawn[2]) and not torch.equal(skipped, drawn[0])
    b.advance_to(3)  # the next index: a no-op
    with pytest.raises(ValueError, match="never reused"):
        b.advance_to(2)
    with pytest.raises(ValueError, match="< 2\\*\\*64"):
        b.advance_to(2**64)
    assert b.release_index == 3
