"""The noise sampler's ceiling, accounted in δ.

dpfl's sampler never draws a standard normal beyond
[`NOISE_CEILING`][dpfl.accounting.NOISE_CEILING] ``M = sqrt(252 ln 2) ≈ 13.216``: every Box–Muller pair has radius
``r <= M`` (its radius uniform is at least ``2^-126``). Without the user, a release therefore
never lies further than ``M·σ`` (per pair) from the neighbour's noiseless sum; with the user it
can, and such a release reveals the user with certainty. No Gaussian accountant sees this, so
the accountants add the probability of it to δ (``ledger_ceiling_delta``): the ε they report
at δ is the Gaussian ε at ``δ - ceiling δ``, and ``∞`` when the ceiling δ reaches δ.

**Model.** Inside radius ``M`` the sampler is taken to be the Gaussian (its radius uniform is
the exact uniform rounded up to the grid ``2^-126``; the rounding is the floating-point limit
that ``docs/privacy.md`` lists apart); the Gaussian mass beyond ``M``, ``e^{-M²/2} = 2^-126``
per pair, is moved inside.

**One release** (``d`` coordinates, noise std ``σ = z·C``, the user's L2 shift ``‖s‖ <= C``;
``B = C/σ = 1/z`` in units of σ; ``n`` Box–Muller pairs, ``n <= 2^52``, i.e. releases below
``2^51`` coordinates in secure mode and ``2^53`` in plain mode). Pair ``k`` of the noise carries
the 2-D shift ``a_k`` with ``Σ_k ‖a_k‖² <= B²`` (secure mode sums four normals per coordinate
with weights ½: the release is a fixed linear map, with orthonormal rows, of a vector of
pairs that carries the shift ``Aᵀs/σ`` of the same norm, so the same bound holds). With
``P, Q`` the Gaussian laws with and without the user, ``P', Q'`` the sampler's, ``R`` the
outputs whose every pair lies within ``M`` of the user-free centre, and ``m`` the mass the
sampler moved (at most ``n·2^-126``), for every set ``S``:

``P'(S) <= P(S ∩ R) + P(R^c) + m <= e^ε Q'(S) + δ_G(ε) + P(R^c) + m``,

since ``Q' = Q`` on ``R``. ``P(R^c) <= Σ_k P(‖a_k + Z_k‖ >= M) <= Σ_k exp(-(M - b_k)²/2)`` with
``b_k = ‖a_k‖`` (``‖Z_k‖`` is Rayleigh: ``P(‖Z_k‖ >= t) = e^{-t²/2}``). As a function of
``c = b²``, ``exp(-(M - √c)²/2)`` is at most ``e²·2^-126`` for ``b <= 2/M`` and convex on
``[4/M², B²]`` when ``B <= M - 2``; a sum of convex functions under ``Σ c_k <= B²`` is largest at
a vertex, where one pair takes the whole shift. So, per release in which the user takes part,

``δ_ceiling <= exp(-(M - B)²/2) + (e² + 1)·n·2^-126 <= exp(-(M - B)²/2) + κ``,  ``κ = 2^-70``

(the same holds the other way round, with the roles of the two laws swapped), and ``1`` when
``B > M - 2``. The argument is the same for the sampler's mass ``m`` of releases the user takes
no part in, at most ``κ`` each.

**A run.** Over ``T`` releases with sampling rate ``q`` (the other users' membership may be
revealed without changing the Gaussian accounting; the user's own participations ``J`` are
what amplification hides), the events above compose by a union bound over the releases, in
expectation over ``J``: ``δ_ceiling <= Σ_rounds (q·(exp(-(M - B)²/2) + κ) + κ)``. Replace-one
rounds ([`FixedCohortRound`][dpfl.accounting.FixedCohortRound]) shift by ``2C``: ``B = 2/z``; a round with a count
(adaptive clipping) is one Gaussian query of ``z_eff`` on the concatenated query: ``B = 1/z_eff``.

Negligible for every practical ``z``: at the paper's ``z = 0.6144`` the per-participation term
is ``2e-21``; it reaches ``1e-15`` only at ``z ≈ 0.2`` (ε there is already in the tens).

References: design.md §6 ("noise distribution"); Box & Muller (1958); Balle & Wang, ICML 2018
(the Gaussian mechanism's privacy profile ``δ_G``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from dpfl._checks import require_non_negative
from dpfl.accounting.events import (
    FixedCohortRound,
    Round,
    accounted_noise_multiplier,
)

__all__ = ["CEILING_SLACK", "NOISE_CEILING", "ceiling_delta", "ledger_ceiling_delta"]

NOISE_CEILING = math.sqrt(252.0 * math.log(2.0))
"""The largest ``|draw|`` (in standard deviations) of dpfl's noise sampler on every path:
``sqrt(-2 ln 2^-126) = sqrt(252 ln 2) ≈ 13.216`` (the same number as
[`MAX_ABS_NORMAL`][dpfl.noise.MAX_ABS_NORMAL]; secure mode sums four such draws, but its δ is
bounded through the pairs, see the module docstring)."""
CEILING_SLACK = 2.0**-70
"""``κ``: the sampler's moved mass per release plus the small-shift pairs' share, for releases of
at most ``2^52`` Box–Muller pairs: ``(e² + 2)·2^52·2^-126 < 2^-70``."""


def ceiling_delta(noise_multiplier: float) -> float:
    """δ that the sampler's ceiling adds per participation in a Gaussian release.

    ``exp(-(M - 1/z)²/2) + κ`` (``M`` = [`NOISE_CEILING`][dpfl.accounting.NOISE_CEILING], ``κ`` = ``CEILING_SLACK``),
    and ``1`` where ``1/z > M - 2`` (the bound needs the shift 2σ short of the ceiling).

    Args:
        noise_multiplier: ``z``, the noise std over the release's L2 sensitivity (for a
            replace-one round, over ``2C``).

    Returns:
        The bound, in ``[0, 1]``; ``1.0`` for ``z = 0`` (no noise).

    Examples:
        >>> ceiling_delta(0.6144) < 1e-20
        True
        >>> round(ceiling_delta(0.25) * 1e19, 1)  # exp(-(13.216 - 4)²/2)
        3.6
    """
    z = require_non_negative("noise_multiplier", noise_multiplier, allow_inf=True)
    if z == 0.0:
        return 1.0
    shift = 1.0 / z
    if shift > NOISE_CEILING - 2.0:
        return 1.0
    return min(1.0, math.exp(-0.5 * (NOISE_CEILING - shift) ** 2) + CEILING_SLACK)


def ledger_ceiling_delta(ledger: Iterable[tuple[Round, int]]) -> float:
    """δ the sampler's ceiling adds to a ledger of ``(round, count)`` entries (see module).

    ``Σ count · (q · ceiling_delta(z) + κ)``, with ``z`` the round's accounted multiplier (halved
    for a replace-one round: its shift is ``2C``) and ``q`` its sampling rate; capped at ``1``.
    Rounds without noise (``z = 0``) are left out: their ε is already infinite.

    Args:
        ledger: ``(round, count)`` pairs, e.g. an accountant's charged rounds.

    Returns:
        The δ floor of the whole ledger (a union bound over its participations), at most 1.
    """
    total = 0.0
    for rnd, count in ledger:
        z = accounted_noise_multiplier(rnd)
        if z == 0.0:
            continue
        if isinstance(rnd, FixedCohortRound):
            z /= 2.0
        total += count * (rnd.sample_rate * ceiling_delta(z) + CEILING_SLACK)
    return min(1.0, total)
