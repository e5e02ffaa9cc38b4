"""Fast, bounded building blocks for PLD accounting of Poisson-subsampled Gaussian rounds.

dp_accounting's ``from_gaussian_mechanism(...).self_compose(n)`` spends most of its time in two
places that do not depend on the maths: a Python loop that inverts the privacy loss at every grid
point (tens of microseconds a point), and the Chernoff truncation bounds of the self-convolution
(80 ``scipy.special.logsumexp`` calls, ~50 ms whatever the size). This module computes the *same*
objects with numpy array operations:

* ``gaussian_pld`` — the connect-the-dots PLD of one round, built from dp_accounting's own
  ``GaussianPrivacyLoss`` (CDFs, truncation, connect-dots bounds) and
  ``create_pmf_pessimistic_connect_dots_fixed_gap``; only the inverse privacy loss is evaluated as
  an array expression (the closed form dp_accounting evaluates point by point).
* ``self_compose`` — the same Chernoff bounds, FFT length and truncation as dp_accounting's
  ``DensePLDPmf.self_compose``.

Both are checked against dp_accounting in ``tests/test_accounting_pld_internals.py`` (identical
probabilities to 1e-12). Both check the size of the arrays they would allocate first and raise
[`PLDTooLargeError`][dpfl.accounting.PLDTooLargeError] instead of exhausting memory.

References:
    Doroshenko, Ghazi, Kamath, Kumar, Manurangsi, "Connect the Dots: Tighter Discrete
    Approximations of Privacy Loss Distributions", PETS 2022 (the discretisation);
    Koskela, Jälkö, Honkela, "Computing Tight Differential Privacy Guarantees Using FFT",
    AISTATS 2020 (FFT composition with truncation).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.pld import privacy_loss_mechanism as mechanism
from scipy import fft, special

from dpfl._errors import DPFLError

__all__ = ["MAX_POINTS", "PLDTooLargeError", "gaussian_pld", "round_points", "self_compose"]

#: Most grid points one privacy-loss array may have (per direction). 2**24 float64 values are
#: 128 MiB; the FFT of a composition needs a few complex arrays of that length (~1 GiB at most).
MAX_POINTS = 2**24

#: dp_accounting's defaults, which the fast paths reproduce.
_LOG_MASS_TRUNCATION = -50.0
_TAIL_MASS_TRUNCATION = 1e-15
_ORDERS = np.concatenate((np.arange(-20, 0), np.arange(1, 21))).astype(np.float64)


class PLDTooLargeError(ValueError, DPFLError):
    """A PLD computation would need more than 2²⁴ grid points (a ``ValueError``).

    Raised before any memory is allocated; the message says how many points and how much memory
    the computation would need. Use a coarser ``value_discretization_interval``, fewer rounds or
    the RDP accountant.

    Args:
        message: What would be too large, with the estimated size.
        points: The estimated number of grid points.

    Attributes:
        points: The estimated number of grid points.
    """

    def __init__(self, message: str, points: float) -> None:
        self.points = points
        super().__init__(message)


def _too_large(what: str, points: float) -> PLDTooLargeError:
    return PLDTooLargeError(
        f"{what} would need about {points:.3g} grid points (limit {MAX_POINTS:.3g}, "
        f"~{48 * points / 2**30:.3g} GiB of FFT buffers)",
        points,
    )


class _Normal:
    """The CDFs of N(0, σ²) that dp_accounting reads from ``scipy.stats.norm(scale=σ)``.

    The same special functions (``ndtr``, ``log_ndtr`` of x/σ) without the per-call argument
    checking of frozen ``scipy.stats`` distributions, which dominates the cost on arrays.
    """

    def __init__(self, frozen: Any, scale: float) -> None:
        self._frozen = frozen
        self._scale = scale

    def cdf(self, x: Any) -> Any:
        return special.ndtr(np.asarray(x, dtype=np.float64) / self._scale)

    def logcdf(self, x: Any) -> Any:
        return special.log_ndtr(np.asarray(x, dtype=np.float64) / self._scale)

    def __getattr__(self, name: str) -> Any:  # ppf etc.: the real distribution
        return getattr(self._frozen, name)


def _losses(z: float, q: float) -> list[mechanism.GaussianPrivacyLoss]:
    """dp_accounting's privacy-loss objects of one round: REMOVE, then ADD unless q == 1."""
    kinds = [mechanism.AdjacencyType.REMOVE]
    if q < 1.0:
        kinds.append(mechanism.AdjacencyType.ADD)
    losses = []
    for kind in kinds:
        loss = mechanism.GaussianPrivacyLoss(
            z,
            sensitivity=1,
            pessimistic_estimate=True,
            log_mass_truncation_bound=_LOG_MASS_TRUNCATION,
            sampling_prob=q,
            adjacency_type=kind,
        )
        frozen = getattr(loss, "_gaussian_random_variable", None)
        if frozen is not None:
            loss._gaussian_random_variable = _Normal(frozen, z)  # noqa: SLF001
        losses.append(loss)
    return losses


def round_points(z: float, q: float, interval: float) -> float:
    """Grid points (largest direction) of one round's PLD at ``interval``, without building it."""
    points = 0.0
    for loss in _losses(z, q):
        bounds = loss.connect_dots_bounds()
        span = float(bounds.epsilon_upper) - float(bounds.epsilon_lower)
        points = max(points, span / interval + 2)
    return points


def gaussian_pld(z: float, q: float, interval: float) -> pld_lib.PrivacyLossDistribution:
    """``from_gaussian_mechanism(z, sampling_prob=q, value_discretization_interval=interval)``.

    Same defaults as dp_accounting (sensitivity 1, pessimistic connect-the-dots, log mass
    truncation -50, add/remove adjacency), same result, array-evaluated.

    Raises:
        PLDTooLargeError: if a direction would need more than ``MAX_POINTS`` points.
    """
    pmfs = []
    for loss in _losses(z, q):
        bounds = loss.connect_dots_bounds()
        upper = float(bounds.epsilon_upper) / interval
        lower = float(bounds.epsilon_lower) / interval
        if not (math.isfinite(upper) and math.isfinite(lower)) or upper - lower + 2 > MAX_POINTS:
            raise _too_large("the privacy-loss distribution of one round", upper - lower + 2)
        lo, hi = math.floor(lower), math.ceil(upper)
        epsilons = np.arange(lo, hi + 1) * interval
        deltas = _hockey_stick(loss, epsilons)
        pmfs.append(_connect_dots(interval, lo, hi, deltas))
    return pld_lib.PrivacyLossDistribution(*pmfs)


def _connect_dots(interval: float, lo: int, hi: int, deltas: np.ndarray) -> pld_pmf.PLDPmf:
    """``create_pmf_pessimistic_connect_dots_fixed_gap``, without a dict for dense results.

    The pessimistic connect-the-dots masses (Doroshenko et al. 2022, Algorithm 1) on the grid
    points lo..hi from the hockey-stick curve δ(ε) there: the mass at each point is the second
    difference of δ scaled by the grid's exponential, the end points take the boundary terms and
    δ at the last point goes to +∞. Small supports go through dp_accounting unchanged.
    """
    small = getattr(pld_pmf, "_MAX_PMF_SPARSE_SIZE", None)
    if small is None or hi - lo + 1 <= small or np.any(np.diff(deltas) > 1e-12):
        return pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap(interval, lo, hi, deltas)
    deltas = np.minimum.accumulate(np.asarray(deltas, dtype=np.float64))
    steps = np.diff(deltas)
    probs = np.zeros_like(deltas)
    probs[0] = 1 - deltas[0] + steps[0] / math.expm1(interval)
    probs[1:-1] = (steps[1:] - steps[:-1] * math.exp(interval)) / math.expm1(interval)
    probs[-1] = steps[-1] / math.expm1(-interval)
    probs = np.maximum(0.0, probs)
    return pld_pmf.DensePLDPmf(interval, lo, probs, float(deltas[-1]), True)


def _hockey_stick(loss: mechanism.GaussianPrivacyLoss, epsilons: np.ndarray) -> np.ndarray:
    """``loss.get_delta_for_epsilon(epsilons)`` with the inverse privacy loss as array maths."""
    q, var = loss.sampling_prob, loss._standard_deviation**2  # noqa: SLF001
    deltas = np.zeros_like(epsilons)
    if q == 1.0:
        use = np.ones(len(epsilons), dtype=bool)
        unsampled = epsilons
    elif loss.adjacency_type == mechanism.AdjacencyType.ADD:
        edge = -math.log1p(-q)
        use = epsilons < edge
        unsampled = -_log_a_exp_b_plus_c(1 / q, -epsilons[use], 1 - 1 / q)
        unsampled[_isclose(epsilons[use], -math.log(1 - q))] = math.inf
    else:
        edge = math.log1p(-q)
        use = epsilons > edge
        deltas[~use] = -np.expm1(epsilons[~use])
        unsampled = _log_a_exp_b_plus_c(1 / q, epsilons[use], 1 - 1 / q)
        unsampled[_isclose(epsilons[use], math.log(1 - q))] = -math.inf
    if q == 1.0:
        unsampled = epsilons[use]
    # Gaussian without subsampling, sensitivity 1: x = -1/2 - loss * sigma^2 (REMOVE), +1 (ADD).
    with np.errstate(invalid="ignore"):
        x = -0.5 - unsampled * var
    if loss.adjacency_type == mechanism.AdjacencyType.ADD:
        x = x + 1.0
    bad = np.isnan(x)
    if bad.any():  # numerically at an edge: dp_accounting's own scalar inverse decides
        x[bad] = [loss.inverse_privacy_loss(float(e)) for e in epsilons[use][bad]]
    deltas[use] = loss.mu_upper_cdf(x) - np.exp(epsilons[use] + loss.mu_lower_log_cdf(x))
    return np.clip(deltas, 0, 1)


def _log_a_exp_b_plus_c(a: float, b: np.ndarray, c: float) -> np.ndarray:
    """log(a·e^b + c) for a > 0 > c, as dp_accounting's ``log_a_times_exp_b_plus_c``."""
    d = b + np.log(a)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = d + np.log1p(-np.exp(np.log(-c) - d))
    out[b == 0] = np.log(a + c)
    return out


def _isclose(a: np.ndarray, b: float) -> np.ndarray:
    """``math.isclose(a, b)`` elementwise (relative tolerance 1e-9)."""
    return np.abs(a - b) <= 1e-9 * np.maximum(np.abs(a), abs(b))


def self_compose(
    pld: pld_lib.PrivacyLossDistribution, count: int
) -> pld_lib.PrivacyLossDistribution:
    """``pld.self_compose(count)`` (tail mass truncation 1e-15), with array-evaluated bounds.

    Raises:
        PLDTooLargeError: if the composed distribution would need more than ``MAX_POINTS``.
    """
    remove = _self_compose_pmf(pld._pmf_remove, count)  # noqa: SLF001
    if pld._symmetric:  # noqa: SLF001
        return pld_lib.PrivacyLossDistribution(remove)
    return pld_lib.PrivacyLossDistribution(remove, _self_compose_pmf(pld._pmf_add, count))  # noqa: SLF001


def _self_compose_pmf(pmf: pld_pmf.PLDPmf, count: int) -> pld_pmf.PLDPmf:
    if count == 1 or not isinstance(pmf, pld_pmf.DensePLDPmf):
        small = getattr(pld_pmf, "_MAX_PMF_SPARSE_SIZE", 0)
        if count == 1 or count * math.log(max(pmf.size, 1)) <= math.log(max(small, 1)):
            return pmf.self_compose(count, _TAIL_MASS_TRUNCATION)  # sparse: cheap and exact
        pmf = pmf.to_dense_pmf()
    assert isinstance(pmf, pld_pmf.DensePLDPmf)
    probs = pmf._probs  # noqa: SLF001
    lower, upper = _chernoff_bounds(probs, count)
    length = upper - lower + 1
    if length > MAX_POINTS:
        raise _too_large(f"composing {count} rounds", length)
    fast = fft.next_fast_len(max(length, len(probs)))
    composed = np.real(fft.ifft(fft.fft(probs, fast) ** count))
    composed = np.roll(composed, -lower)[:length]
    infinity = _TAIL_MASS_TRUNCATION - math.expm1(count * math.log1p(-pmf._infinity_mass))  # noqa: SLF001
    return pld_pmf.DensePLDPmf(
        pmf._discretization,  # noqa: SLF001
        pmf._lower_loss * count + lower,  # noqa: SLF001
        composed,
        infinity,
        pmf._pessimistic_estimate,  # noqa: SLF001
    )


def _chernoff_bounds(probs: np.ndarray, count: int) -> tuple[int, int]:
    """dp_accounting's ``compute_self_convolve_bounds`` (same orders, same bound)."""
    n = len(probs)
    upper, lower = (n - 1) * count, 0
    support = probs > 0
    index = np.arange(n, dtype=np.float64)[support]
    log_probs = np.log(probs[support])
    log_two_over_tail = math.log(2 / _TAIL_MASS_TRUNCATION)
    orders = _ORDERS / n
    log_mgfs = np.empty(len(orders))
    chunk = max(1, 2**22 // max(len(index), 1))  # at most ~32 MiB of terms at a time
    for start in range(0, len(orders), chunk):
        terms = orders[start : start + chunk, None] * index[None, :] + log_probs[None, :]
        peak = terms.max(axis=1)
        log_mgfs[start : start + chunk] = peak + np.log(np.exp(terms - peak[:, None]).sum(axis=1))
    for order, log_mgf in zip(orders.tolist(), log_mgfs.tolist(), strict=True):
        bound = (count * log_mgf + log_two_over_tail) / order
        if not math.isfinite(bound):
            continue
        if order > 0:
            upper = min(upper, math.ceil(bound))
        else:
            lower = max(lower, math.floor(bound))
    return lower, upper
