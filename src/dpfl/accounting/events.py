"""Round specifications: what one DP-FedAvg round costs in privacy, as plain frozen data.

A round is one release of a noised sum of clipped user updates (sensitivity C per user, noise
N(0, (z·C)²)) over a sampled cohort. How the cohort is sampled decides both the amplification and the
neighbouring relation under which the guarantee holds:

* [`PoissonRound`][dpfl.accounting.PoissonRound] — every user joins independently with probability
  ``sample_rate`` (dp_accounting's ``PoissonSampledDpEvent``); valid under **add/remove-one-user**
  adjacency.
* [`FixedCohortRound`][dpfl.accounting.FixedCohortRound] — exactly ``cohort_size`` users drawn
  without replacement from a known ``population`` (dp_accounting's
  ``SampledWithoutReplacementDpEvent``); valid under **replace-one-user** adjacency only, the only
  relation dp_accounting accounts it under.

Either round may carry a second Gaussian release on the same cohort, the noised count of
adaptive clipping ([`dpfl.adaptive_clip.AdaptiveClip`][dpfl.adaptive_clip.AdaptiveClip]):
``count_noise_multiplier`` ``z_b`` is its noise std over its own sensitivity. Two Gaussian queries
on one sampled cohort compose exactly into one Gaussian of multiplier ``z_eff`` with ``z_eff⁻² = z⁻²
+ z_b⁻²`` ([`effective_noise_multiplier`][dpfl.accounting.effective_noise_multiplier]); the
accountants charge one round of ``z_eff`` and
[`PoissonRound.dp_event`][dpfl.accounting.PoissonRound.dp_event] states the round as the
``ComposedDpEvent`` of both Gaussians inside the sampling event, which dp_accounting's RDP
accountant reduces by the same identity.

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv 2310.00098, section 2.4.
    Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive
    Clipping", NeurIPS 2021 (the count query and its composition).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import dp_accounting

from dpfl._checks import require_int, require_non_negative, require_positive, require_probability

__all__ = [
    "ADD_OR_REMOVE_ONE",
    "NOISE_MULTIPLIER_CAP",
    "REPLACE_ONE",
    "Adjacency",
    "FixedCohortRound",
    "PoissonRound",
    "Round",
    "accounted_noise_multiplier",
    "effective_noise_multiplier",
    "round_from_dict",
    "split_noise_multiplier",
]

Adjacency = Literal["add_or_remove_one", "replace_one"]

ADD_OR_REMOVE_ONE: Adjacency = "add_or_remove_one"
"""Add/remove-one-user adjacency: neighbouring datasets differ by one user's presence.

The relation of Poisson sampling ([`PoissonRound`][dpfl.accounting.PoissonRound]) and of the
paper's ε; the accountants' default. The sum of updates clipped to ``C`` moves by at most ``C``.
"""

REPLACE_ONE: Adjacency = "replace_one"
"""Replace-one-user adjacency: neighbouring datasets differ in one user's data, same size.

The only relation under which a fixed-size cohort
([`FixedCohortRound`][dpfl.accounting.FixedCohortRound]) is accounted; the sum of updates clipped
to ``C`` moves by up to ``2C``. Its ε does not compare with an add/remove-one ε.
"""

NOISE_MULTIPLIER_CAP = 1e6
"""Noise multipliers above this are accounted as this value.

ε never increases with z, so the reported ε stays an upper bound (below ~1e-5 per round at the
cap); dp_accounting itself overflows (``z**2``) beyond ~1.3e154 and loses precision long before.
"""


@dataclass(frozen=True)
class PoissonRound:
    """One Poisson-subsampled Gaussian round: each user joins with probability ``sample_rate``.

    Valid under **add/remove-one-user** adjacency (sensitivity of the sum of clipped updates is C).
    ``sample_rate = 0`` is accepted as an edge case: nobody can be sampled, the round is a no-op and
    costs ε = 0. ``noise_multiplier = 0`` is accepted too and costs ε = ∞ (no privacy).

    Args:
        noise_multiplier: z, the noise std on the sum divided by the clipping bound C; >= 0.
        sample_rate: q, the per-user inclusion probability, in [0, 1] (q = S / K).
        count_noise_multiplier: z_b > 0 of the adaptive-clipping count released in the same
            round (its noise std over its sensitivity), or ``None`` (default) for no count.

    Raises:
        ValueError: if ``noise_multiplier`` < 0 or not finite, ``sample_rate`` is outside
            [0, 1], or ``count_noise_multiplier`` is not > 0 and finite.
        TypeError: if an argument is not a real number.

    Examples:
        >>> PoissonRound(noise_multiplier=1.1, sample_rate=0.01).to_dict()["type"]
        'poisson'

    References:
        arXiv 2310.00098, section 2.4 (Poisson sampling with rate q = S/K).
    """

    noise_multiplier: float
    sample_rate: float
    count_noise_multiplier: float | None = None
    adjacency: ClassVar[Adjacency] = ADD_OR_REMOVE_ONE
    """The relation this round is valid under: [`ADD_OR_REMOVE_ONE`][dpfl.accounting.ADD_OR_REMOVE_ONE]."""

    def __post_init__(self) -> None:
        z = require_non_negative("noise_multiplier", self.noise_multiplier)
        q = require_probability("sample_rate", self.sample_rate, low_open=False)
        object.__setattr__(self, "noise_multiplier", z)
        object.__setattr__(self, "sample_rate", q)
        _set_count(self)

    @property
    def effective_noise_multiplier(self) -> float:
        """The multiplier of the one Gaussian the round composes to (z without a count)."""
        return effective_noise_multiplier(self.noise_multiplier, self.count_noise_multiplier)

    def dp_event(self) -> dp_accounting.DpEvent:
        """Return ``PoissonSampledDpEvent(sample_rate, GaussianDpEvent(z))``.

        ``z`` is ``accounted_noise_multiplier``: the noise multiplier, capped at
        [`NOISE_MULTIPLIER_CAP`][dpfl.accounting.NOISE_MULTIPLIER_CAP] (conservative; dp_accounting
        overflows on huge values). With a count, the inner event is
        ``ComposedDpEvent([GaussianDpEvent(z), GaussianDpEvent(z_b)])`` (each capped), the two
        releases of the round.
        """
        return dp_accounting.PoissonSampledDpEvent(self.sample_rate, _inner_event(self, 1.0))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict that [`round_from_dict`][dpfl.accounting.round_from_dict] turns
        back into this round.

        ``"count_noise_multiplier"`` is present only for a round with a count.
        """
        data: dict[str, Any] = {
            "type": "poisson",
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
        }
        return _with_count(self, data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PoissonRound:
        """Rebuild a round from [`to_dict`][dpfl.accounting.PoissonRound.to_dict] output.

        Args:
            data: The dict from ``to_dict()``; every field is validated.

        Raises:
            ValueError: if a key is missing or unknown, or a field is out of range.
        """
        _check_keys(data, "poisson", ("noise_multiplier", "sample_rate"))
        return cls(
            noise_multiplier=data["noise_multiplier"],
            sample_rate=data["sample_rate"],
            count_noise_multiplier=data.get("count_noise_multiplier"),
        )


@dataclass(frozen=True)
class FixedCohortRound:
    """One round over a fixed-size cohort drawn uniformly without replacement from a population.

    Valid under **replace-one-user** adjacency only (the population size is public). Under that
    relation the sum of updates clipped to C changes by up to ``2C`` when one user's data is
    replaced, so [`dp_event`][dpfl.accounting.FixedCohortRound.dp_event] gives dp_accounting a
    Gaussian with noise multiplier ``z / 2`` (noise std over the replace-one sensitivity).

    Warning:
        The guarantee of this round is a replace-one guarantee; it is not comparable with the
        add/remove-one ε of [`PoissonRound`][dpfl.accounting.PoissonRound] and cannot be composed
        with it in one accountant.
        PLD accounting of fixed cohorts is not supported by dp_accounting: use ``RDPAccountant``.

    Args:
        noise_multiplier: z, the noise std on the sum divided by the clipping bound C; >= 0.
        cohort_size: number of users per round, 1 <= cohort_size <= population.
        population: number of users the cohort is drawn from, >= 1.
        count_noise_multiplier: z_b > 0 of the adaptive-clipping count released in the same
            round, relative to its add/remove sensitivity, or ``None`` (default). Replacing a
            user changes the count by at most twice that sensitivity (remove, then add), so it
            is halved like ``z`` (conservative for raw bits).

    Raises:
        ValueError: if an argument is out of range (the message names it).
        TypeError: if ``cohort_size`` or ``population`` is not an integer.

    Examples:
        >>> FixedCohortRound(noise_multiplier=2.0, cohort_size=10, population=1000).adjacency
        'replace_one'

    References:
        arXiv 2310.00098, section 2.1 (the reference code draws a fixed-size cohort).
    """

    noise_multiplier: float
    cohort_size: int
    population: int
    count_noise_multiplier: float | None = None
    adjacency: ClassVar[Adjacency] = REPLACE_ONE
    """The relation this round is valid under: [`REPLACE_ONE`][dpfl.accounting.REPLACE_ONE]."""

    def __post_init__(self) -> None:
        z = require_non_negative("noise_multiplier", self.noise_multiplier)
        population = require_int("population", self.population, minimum=1)
        cohort = require_int("cohort_size", self.cohort_size, minimum=1)
        if cohort > population:
            raise ValueError(
                f"cohort_size must be <= population ({population}), got {cohort}; "
                "a cohort is drawn without replacement"
            )
        object.__setattr__(self, "noise_multiplier", z)
        object.__setattr__(self, "cohort_size", cohort)
        object.__setattr__(self, "population", population)
        _set_count(self)

    @property
    def effective_noise_multiplier(self) -> float:
        """The multiplier of the one Gaussian the round composes to (z without a count)."""
        return effective_noise_multiplier(self.noise_multiplier, self.count_noise_multiplier)

    @property
    def sample_rate(self) -> float:
        """The sampling fraction ``cohort_size / population``."""
        return self.cohort_size / self.population

    def dp_event(self) -> dp_accounting.DpEvent:
        """Return ``SampledWithoutReplacementDpEvent(population, cohort_size, GaussianDpEvent(z/2))``.

        The halved noise multiplier accounts for the replace-one sensitivity ``2C`` of the sum;
        ``z`` is capped first (``accounted_noise_multiplier``). With a count, the inner event
        is the ``ComposedDpEvent`` of both halved Gaussians.
        """
        return dp_accounting.SampledWithoutReplacementDpEvent(
            source_dataset_size=self.population,
            sample_size=self.cohort_size,
            event=_inner_event(self, 0.5),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict that [`round_from_dict`][dpfl.accounting.round_from_dict] turns back into this round."""
        data: dict[str, Any] = {
            "type": "fixed_cohort",
            "noise_multiplier": self.noise_multiplier,
            "cohort_size": self.cohort_size,
            "population": self.population,
        }
        return _with_count(self, data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FixedCohortRound:
        """Rebuild a round from [`to_dict`][dpfl.accounting.FixedCohortRound.to_dict] output.

        Args:
            data: The dict from ``to_dict()``; every field is validated.

        Raises:
            ValueError: if a key is missing or unknown, or a field is out of range.
        """
        _check_keys(data, "fixed_cohort", ("noise_multiplier", "cohort_size", "population"))
        return cls(
            noise_multiplier=data["noise_multiplier"],
            cohort_size=data["cohort_size"],
            population=data["population"],
            count_noise_multiplier=data.get("count_noise_multiplier"),
        )


Round = PoissonRound | FixedCohortRound


def accounted_noise_multiplier(round: Round) -> float:
    """The noise multiplier the accountants use for ``round``: ``min(z, NOISE_MULTIPLIER_CAP)``.

    Capping is conservative (a round with more noise is at least as private as one at the cap)
    and keeps dp_accounting's arithmetic finite: it computes ``z**2``, which overflows beyond
    ~1.3e154, and its privacy-loss grids lose precision long before. With a count, both
    multipliers are capped and the result is their
    [`effective_noise_multiplier`][dpfl.accounting.effective_noise_multiplier].
    """
    return effective_noise_multiplier(*_capped(round))


def effective_noise_multiplier(
    noise_multiplier: float, count_noise_multiplier: float | None
) -> float:
    """The multiplier ``z_eff`` of two Gaussian releases on one cohort: ``z_eff⁻² = z⁻² + z_b⁻²``.

    Each multiplier is its release's noise std over that release's L2 sensitivity. The two
    releases together are a Gaussian mechanism on the concatenated query, whose sensitivity-
    normalised noise has multiplier ``z_eff``; composition is exact, not a bound.

    Args:
        noise_multiplier: z >= 0 of the update sum.
        count_noise_multiplier: z_b > 0 of the count, or ``None`` for no count (returns ``z``).

    Examples:
        >>> round(effective_noise_multiplier(1.0, 1.0), 6)
        0.707107

    References: Andrew et al., NeurIPS 2021, section 3.
    """
    z = require_non_negative("noise_multiplier", noise_multiplier)
    if count_noise_multiplier is None:
        return z
    zb = require_positive("count_noise_multiplier", count_noise_multiplier, allow_inf=True)
    if z == 0:
        return 0.0
    if math.isinf(z) or math.isinf(zb):
        return min(z, zb)
    # z⁻² + z_b⁻² written to avoid overflow: z_eff = z·z_b / hypot(z, z_b).
    return z / math.hypot(1.0, z / zb)


def split_noise_multiplier(noise_multiplier: float, *, count_noise_multiplier: float) -> float:
    """The update multiplier ``z`` that, with a count of multiplier ``z_b``, gives ``z_eff``.

    Solves ``z_eff⁻² = z⁻² + z_b⁻²`` for ``z``: ``z = (z_eff⁻² − z_b⁻²)^(-1/2)``. A user who
    calibrated one overall multiplier ``z_eff`` (e.g. with
    [`calibrate_noise_multiplier`][dpfl.accounting.calibrate_noise_multiplier]) and spends part of
    it on the count noises the update sum with this ``z`` (larger than ``z_eff``).

    Args:
        noise_multiplier: The overall (effective) multiplier ``z_eff > 0``.
        count_noise_multiplier: The count's multiplier ``z_b``; must exceed ``z_eff``.

    Raises:
        ValueError: if ``z_b <= z_eff``: the count alone would already cost at least the whole
            budget, so no update noise achieves ``z_eff``; raise ``count_noise_multiplier``.

    Examples:
        >>> round(split_noise_multiplier(0.707106781, count_noise_multiplier=1.0), 6)
        1.0
    """
    z = require_positive("noise_multiplier", noise_multiplier)
    zb = require_positive("count_noise_multiplier", count_noise_multiplier, allow_inf=True)
    if zb <= z:
        raise ValueError(
            f"count_noise_multiplier ({zb!r}) must exceed the overall noise_multiplier ({z!r}): "
            "the count release alone would cost at least the whole budget "
            "(z_eff^-2 = z^-2 + z_b^-2 needs z_b > z_eff); raise count_noise_multiplier"
        )
    if math.isinf(zb):
        return z
    ratio = z / zb
    return z / math.sqrt((1.0 - ratio) * (1.0 + ratio))


def _capped(round: Round) -> tuple[float, float | None]:
    z = min(round.noise_multiplier, NOISE_MULTIPLIER_CAP)
    zb = round.count_noise_multiplier
    return z, None if zb is None else min(zb, NOISE_MULTIPLIER_CAP)


def _inner_event(round: Round, factor: float) -> dp_accounting.DpEvent:
    """The round's Gaussian(s), multipliers capped and scaled by ``factor``."""
    z, zb = _capped(round)
    if zb is None:
        return dp_accounting.GaussianDpEvent(z * factor)
    return dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z * factor), dp_accounting.GaussianDpEvent(zb * factor)]
    )


def _set_count(round: Round) -> None:
    zb = round.count_noise_multiplier
    if zb is not None:
        zb = require_positive("count_noise_multiplier", zb)
        object.__setattr__(round, "count_noise_multiplier", zb)


def _with_count(round: Round, data: dict[str, Any]) -> dict[str, Any]:
    if round.count_noise_multiplier is not None:
        data["count_noise_multiplier"] = round.count_noise_multiplier
    return data


def round_from_dict(data: Mapping[str, Any]) -> Round:
    """Rebuild a [`PoissonRound`][dpfl.accounting.PoissonRound] or
    [`FixedCohortRound`][dpfl.accounting.FixedCohortRound] from its ``to_dict()``.

    Args:
        data: A round's ``to_dict()``; its ``"type"`` picks the class.

    Raises:
        ValueError: if ``data`` is not a mapping with a known ``"type"`` and valid fields.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"round must be a dict from Round.to_dict(), got {type(data).__name__}")
    kind = data.get("type")
    if kind == "poisson":
        return PoissonRound.from_dict(data)
    if kind == "fixed_cohort":
        return FixedCohortRound.from_dict(data)
    raise ValueError(f"round['type'] must be 'poisson' or 'fixed_cohort', got {kind!r}")


def _check_keys(data: Mapping[str, Any], kind: str, fields: tuple[str, ...]) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"round must be a dict, got {type(data).__name__}")
    if data.get("type") != kind:
        raise ValueError(f"round['type'] must be {kind!r}, got {data.get('type')!r}")
    expected = {"type", *fields}
    allowed = {*expected, "count_noise_multiplier"}
    if not expected <= set(data) <= allowed:
        raise ValueError(
            f"round of type {kind!r} must have exactly the keys {sorted(expected)} "
            f"(and optionally 'count_noise_multiplier'), got {sorted(map(str, data))}"
        )
