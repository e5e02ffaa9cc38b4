"""Population extrapolation: keep the utility (σ_DP) fixed, scale cohort and population, report ε.

The paper measures utility at a small cohort and reports the privacy the same model quality would
have at production scale. The noise on the *mean* update, σ_DP·C, is what determines utility; with
an expected cohort of S users the noise on the sum is z·C with z = σ_DP·S, and Poisson sampling
from K users has rate q = S/K. ε then follows from T rounds of that Poisson-subsampled Gaussian.

References:
    Pelikan et al., arXiv 2310.00098, section 2.4 (table of σ_DP, S, K, T and ε).
"""

from __future__ import annotations

from dataclasses import dataclass

from dpfl._checks import require_int, require_positive, require_probability
from dpfl.accounting.calibration import AccountantName, epsilon_for

__all__ = ["Extrapolation", "extrapolate"]


@dataclass(frozen=True)
class Extrapolation:
    """The result of [`extrapolate`][dpfl.accounting.extrapolate]: inputs, derived z and q, and ε.

    Attributes:
        sigma_dp: noise std on the mean update per unit of clipping bound.
        cohort_size: expected cohort size S.
        population: population size K.
        rounds: number of rounds T.
        delta: the δ of the guarantee.
        accountant: ``"rdp"`` or ``"pld"``.
        noise_multiplier: z = σ_DP · S.
        sample_rate: q = S / K.
        epsilon: ε at ``delta`` after ``rounds`` rounds (add/remove-one-user adjacency).
    """

    sigma_dp: float
    cohort_size: float
    population: float
    rounds: int
    delta: float
    accountant: AccountantName
    noise_multiplier: float
    sample_rate: float
    epsilon: float


def extrapolate(
    *,
    sigma_dp: float,
    cohort_size: float,
    population: float,
    rounds: int,
    delta: float,
    accountant: AccountantName = "rdp",
) -> Extrapolation:
    """ε of a run scaled to cohort ``cohort_size`` and population ``population`` at fixed σ_DP.

    Args:
        sigma_dp: σ_DP > 0, the noise std on the mean per unit of C (kept fixed).
        cohort_size: expected cohort size S > 0 (may be fractional: Poisson sampling).
        population: population size K >= S.
        rounds: T >= 0.
        delta: δ in (0, 1).
        accountant: ``"rdp"`` (as the paper reports) or ``"pld"`` (tighter).

    Returns:
        An [`Extrapolation`][dpfl.accounting.Extrapolation] with z = σ_DP·S, q = S/K and ε.

    Raises:
        ValueError: if an argument is out of range (the message names it).

    Warning:
        The ε assumes Poisson sampling with rate S/K and a fixed denominator S for the mean;
        dividing by the realised cohort size or sampling a fixed-size cohort changes the guarantee.

    Examples:
        >>> r = extrapolate(sigma_dp=3e-6, cohort_size=204_800, population=69.5e6,
        ...                 rounds=2034, delta=1e-9)
        >>> round(r.noise_multiplier, 4), round(r.epsilon, 1)
        (0.6144, 7.2)

    References:
        arXiv 2310.00098, section 2.4.
    """
    sigma_dp = require_positive("sigma_dp", sigma_dp)
    cohort_size = require_positive("cohort_size", cohort_size)
    population = require_positive("population", population)
    if cohort_size > population:
        raise ValueError(f"cohort_size must be <= population ({population:g}), got {cohort_size:g}")
    rounds = require_int("rounds", rounds, minimum=0)
    delta = require_probability("delta", delta, high_open=True)
    z = sigma_dp * cohort_size
    q = cohort_size / population
    eps = epsilon_for(z, q, rounds, delta, accountant=accountant)
    return Extrapolation(
        sigma_dp=sigma_dp,
        cohort_size=cohort_size,
        population=population,
        rounds=rounds,
        delta=delta,
        accountant=accountant,
        noise_multiplier=z,
        sample_rate=q,
        epsilon=eps,
    )
