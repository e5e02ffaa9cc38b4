"""dpfl's array-evaluated PLD building blocks against dp_accounting's own (the reference).

``dpfl.accounting._pld`` rebuilds dp_accounting's connect-the-dots PLD of a Poisson-subsampled
Gaussian round and its FFT self-composition without Python loops; the results must be the same
objects: same grid offsets, same infinity mass, same probabilities (to 1e-12 relative).
"""

from __future__ import annotations

import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfl.accounting import _pld


def _dense(pmf):  # type: ignore[no-untyped-def]
    return pmf.to_dense_pmf()


def _assert_same(ours, ref) -> None:  # type: ignore[no-untyped-def]
    pairs = [(ours._pmf_remove, ref._pmf_remove), (ours._pmf_add, ref._pmf_add)]
    assert ours._symmetric == ref._symmetric
    for a, b in pairs:
        a, b = _dense(a), _dense(b)
        assert a._lower_loss == b._lower_loss and a.size == b.size
        assert a._infinity_mass == pytest.approx(b._infinity_mass, rel=1e-12, abs=1e-300)
        np.testing.assert_allclose(a._probs, b._probs, rtol=1e-12, atol=1e-300)


@settings(max_examples=12)
@given(
    st.floats(min_value=0.5, max_value=20.0),
    st.one_of(st.floats(min_value=1e-4, max_value=0.999), st.just(1.0)),
    st.sampled_from([1e-4, 1e-3, 1e-2, 3e-2]),
)
def test_round_pld_matches_dp_accounting(z: float, q: float, interval: float) -> None:
    if _pld.round_points(z, q, interval) > 20_000:  # keep dp_accounting's Python loop short
        interval *= 10
    ref = pld_lib.from_gaussian_mechanism(
        z, value_discretization_interval=interval, sampling_prob=q
    )
    _assert_same(_pld.gaussian_pld(z, q, interval), ref)


@settings(max_examples=12)
@given(
    st.floats(min_value=0.6, max_value=10.0),
    st.floats(min_value=1e-4, max_value=1.0),
    st.integers(min_value=1, max_value=5000),
    st.sampled_from([1e-3, 1e-2]),
)
def test_self_compose_matches_dp_accounting(
    z: float, q: float, count: int, interval: float
) -> None:
    single = _pld.gaussian_pld(z, q, interval)
    _assert_same(_pld.self_compose(single, count), single.self_compose(count))


def test_work_is_bounded_before_allocating() -> None:
    with pytest.raises(_pld.PLDTooLargeError, match="grid points"):
        _pld.gaussian_pld(1.0, 0.01, 1e-9)
    single = _pld.gaussian_pld(1.0, 0.01, 1e-2)
    with pytest.raises(_pld.PLDTooLargeError, match="composing"):
        _pld.self_compose(single, 10**12)
    assert _pld.round_points(1.0, 0.01, 1e-9) > _pld.MAX_POINTS
