"""Privacy of a pair of Gaussians: the (ε, δ) curve of μ-Gaussian differential privacy.

Distinguishing ``N(0, 1)`` from ``N(μ, 1)`` is the hardest test of the Gaussian mechanism with
sensitivity ``Δ`` and noise std ``σ`` (``μ = Δ/σ``). Its privacy curve is exact (Dong, Roth & Su,
Corollary 2.13; Balle & Wang, Theorem 8):

    δ(ε) = Φ(−ε/μ + μ/2) − e^ε · Φ(−ε/μ − μ/2),

and the ε of the pair at a given δ is the root of ``δ(ε) = δ`` (δ(ε) is strictly decreasing in ε).
The same formula gives the ε of two fitted Gaussians with a common standard deviation ``s``:
``μ = |m₁ − m₀| / s``. This module needs only scipy (no torch).

References:
    Dong, Roth & Su, "Gaussian Differential Privacy", JRSS-B 2022, arXiv 1905.02383.
    Balle & Wang, "Improving the Gaussian Mechanism for Differential Privacy", ICML 2018.
    Andrew et al., "One-shot Empirical Privacy Estimation for Federated Learning",
    ICLR 2024, arXiv 2302.03098.
"""

from __future__ import annotations

import math

from scipy import optimize, special

from dpfl._checks import require_non_negative, require_probability

__all__ = ["gaussian_delta", "gaussian_epsilon"]


def _log_ndtr(x: float) -> float:
    return float(special.log_ndtr(x))


def gaussian_delta(mu: float, epsilon: float) -> float:
    """δ at which a μ-GDP mechanism is (ε, δ)-DP (exact; ``0 <= δ <= 1``).

    Computed in log space, so it stays accurate down to δ ~ 1e-300 and for large ``ε``.

    Args:
        mu: ``μ >= 0``; ``inf`` (no noise) gives δ = 1 for every finite ε.
        epsilon: ``ε >= 0``.

    Raises:
        ValueError: if ``mu`` or ``epsilon`` is negative or NaN.

    Examples:
        >>> round(gaussian_delta(1.0, 0.0), 6)  # total variation of N(0,1) vs N(1,1)
        0.382925
    """
    mu = require_non_negative("mu", mu, allow_inf=True)
    epsilon = require_non_negative("epsilon", epsilon, allow_inf=True)
    if mu == 0.0:
        return 0.0
    if math.isinf(mu):
        return 0.0 if math.isinf(epsilon) else 1.0
    if math.isinf(epsilon):
        return 0.0
    a = _log_ndtr(-epsilon / mu + mu / 2)
    b = epsilon + _log_ndtr(-epsilon / mu - mu / 2)
    if b >= a:  # rounding only: the exact difference is positive
        return 0.0
    return float(math.exp(a) * -math.expm1(b - a))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Smallest ε with which a μ-GDP mechanism is (ε, δ)-DP (0 if δ already covers ε = 0).

    Args:
        mu: ``μ >= 0`` (``|mean difference| / std`` of two Gaussians of equal std); ``inf``
            gives ε = inf.
        delta: ``δ`` in (0, 1].

    Returns:
        ε >= 0, accurate to about 1e-9 relative.

    Raises:
        ValueError: if ``mu`` is negative or NaN, or ``delta`` is outside (0, 1].

    Examples:
        >>> round(gaussian_epsilon(1.0, 1e-5), 3)
        4.377
    """
    mu = require_non_negative("mu", mu, allow_inf=True)
    delta = require_probability("delta", delta)
    if math.isinf(mu):
        return math.inf
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(mu, hi) > delta:
        hi *= 2.0
    return float(
        optimize.brentq(lambda e: gaussian_delta(mu, e) - delta, 0.0, hi, xtol=1e-12, rtol=1e-10)
    )
