"""Round specifications: what one DP-FedAvg round costs in privacy, as plain frozen data.

A round is one release of a noised sum of clipped user updates (sensitivity C per user, noise
N(0, (z·C)²)) over a sampled cohort. How the cohort is sampled decides both the amplification and the
neighbouring relation under which the guarantee holds:

* :class:`PoissonRound` — every user joins independently with probability ``sample_rate``
  (dp_accounting's ``PoissonSampledDpEvent``); valid under **add/remove-one-user** adjacency.
* :class:`FixedCohortRound` — exactly ``cohort_size`` users drawn without replacement from a known
  ``population`` (dp_accounting's ``SampledWithoutReplacementDpEvent``); valid under
  **replace-one-user** adjacency only, the only relation dp_accounting accounts it under.

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv 2310.00098, section 2.4.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import dp_accounting

from dpfl._checks import require_int, require_non_negative, require_probability

__all__ = [
    "ADD_OR_REMOVE_ONE",
    "NOISE_MULTIPLIER_CAP",
    "REPLACE_ONE",
    "Adjacency",
    "FixedCohortRound",
    "PoissonRound",
    "Round",
    "accounted_noise_multiplier",
    "round_from_dict",
]

Adjacency = Literal["add_or_remove_one", "replace_one"]
ADD_OR_REMOVE_ONE: Adjacency = "add_or_remove_one"
REPLACE_ONE: Adjacency = "replace_one"

#: Noise multipliers above this are accounted as this value. ε never increases with z, so the
#: reported ε stays an upper bound (below ~1e-5 per round at the cap); dp_accounting itself
#: overflows (``z**2``) beyond ~1.3e154 and loses precision long before.
NOISE_MULTIPLIER_CAP = 1e6


@dataclass(frozen=True)
class PoissonRound:
    """One Poisson-subsampled Gaussian round: each user joins with probability ``sample_rate``.

    Valid under **add/remove-one-user** adjacency (sensitivity of the sum of clipped updates is C).
    ``sample_rate = 0`` is accepted as an edge case: nobody can be sampled, the round is a no-op and
    costs ε = 0. ``noise_multiplier = 0`` is accepted too and costs ε = ∞ (no privacy).

    Args:
        noise_multiplier: z, the noise std on the sum divided by the clipping bound C; >= 0.
        sample_rate: q, the per-user inclusion probability, in [0, 1] (q = S / K).

    Raises:
        ValueError: if ``noise_multiplier`` < 0 or not finite, or ``sample_rate`` is outside [0, 1].
        TypeError: if an argument is not a real number.

    Examples:
        >>> PoissonRound(noise_multiplier=1.1, sample_rate=0.01).to_dict()["type"]
        'poisson'

    References:
        arXiv 2310.00098, section 2.4 (Poisson sampling with rate q = S/K).
    """

    noise_multiplier: float
    sample_rate: float
    adjacency: ClassVar[Adjacency] = ADD_OR_REMOVE_ONE

    def __post_init__(self) -> None:
        z = require_non_negative("noise_multiplier", self.noise_multiplier)
        q = require_probability("sample_rate", self.sample_rate, low_open=False)
        object.__setattr__(self, "noise_multiplier", z)
        object.__setattr__(self, "sample_rate", q)

    def dp_event(self) -> dp_accounting.DpEvent:
        """Return ``PoissonSampledDpEvent(sample_rate, GaussianDpEvent(z))``.

        ``z`` is :func:`accounted_noise_multiplier`: the noise multiplier, capped at
        :data:`NOISE_MULTIPLIER_CAP` (conservative; dp_accounting overflows on huge values).
        """
        return dp_accounting.PoissonSampledDpEvent(
            self.sample_rate, dp_accounting.GaussianDpEvent(accounted_noise_multiplier(self))
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict that :func:`round_from_dict` turns back into this round."""
        return {
            "type": "poisson",
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PoissonRound:
        """Rebuild a round from :meth:`to_dict` output, validating every field."""
        _check_keys(data, "poisson", ("noise_multiplier", "sample_rate"))
        return cls(noise_multiplier=data["noise_multiplier"], sample_rate=data["sample_rate"])


@dataclass(frozen=True)
class FixedCohortRound:
    """One round over a fixed-size cohort drawn uniformly without replacement from a population.

    Valid under **replace-one-user** adjacency only (the population size is public). Under that
    relation the sum of updates clipped to C changes by up to ``2C`` when one user's data is
    replaced, so :meth:`dp_event` gives dp_accounting a Gaussian with noise multiplier ``z / 2``
    (noise std over the replace-one sensitivity).

    Warning:
        The guarantee of this round is a replace-one guarantee; it is not comparable with the
        add/remove-one ε of :class:`PoissonRound` and cannot be composed with it in one accountant.
        PLD accounting of fixed cohorts is not supported by dp_accounting: use ``RDPAccountant``.

    Args:
        noise_multiplier: z, the noise std on the sum divided by the clipping bound C; >= 0.
        cohort_size: number of users per round, 1 <= cohort_size <= population.
        population: number of users the cohort is drawn from, >= 1.

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
    adjacency: ClassVar[Adjacency] = REPLACE_ONE

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

    @property
    def sample_rate(self) -> float:
        """The sampling fraction ``cohort_size / population``."""
        return self.cohort_size / self.population

    def dp_event(self) -> dp_accounting.DpEvent:
        """Return ``SampledWithoutReplacementDpEvent(population, cohort_size, GaussianDpEvent(z/2))``.

        The halved noise multiplier accounts for the replace-one sensitivity ``2C`` of the sum;
        ``z`` is capped first (:func:`accounted_noise_multiplier`).
        """
        return dp_accounting.SampledWithoutReplacementDpEvent(
            source_dataset_size=self.population,
            sample_size=self.cohort_size,
            event=dp_accounting.GaussianDpEvent(accounted_noise_multiplier(self) / 2.0),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict that :func:`round_from_dict` turns back into this round."""
        return {
            "type": "fixed_cohort",
            "noise_multiplier": self.noise_multiplier,
            "cohort_size": self.cohort_size,
            "population": self.population,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FixedCohortRound:
        """Rebuild a round from :meth:`to_dict` output, validating every field."""
        _check_keys(data, "fixed_cohort", ("noise_multiplier", "cohort_size", "population"))
        return cls(
            noise_multiplier=data["noise_multiplier"],
            cohort_size=data["cohort_size"],
            population=data["population"],
        )


Round = PoissonRound | FixedCohortRound


def accounted_noise_multiplier(round: Round) -> float:
    """The noise multiplier the accountants use for ``round``: ``min(z, NOISE_MULTIPLIER_CAP)``.

    Capping is conservative (a round with more noise is at least as private as one at the cap)
    and keeps dp_accounting's arithmetic finite: it computes ``z**2``, which overflows beyond
    ~1.3e154, and its privacy-loss grids lose precision long before.
    """
    return min(round.noise_multiplier, NOISE_MULTIPLIER_CAP)


def round_from_dict(data: Mapping[str, Any]) -> Round:
    """Rebuild a :class:`PoissonRound` or :class:`FixedCohortRound` from its ``to_dict()``.

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
    if set(data) != expected:
        raise ValueError(
            f"round of type {kind!r} must have exactly the keys {sorted(expected)}, "
            f"got {sorted(map(str, data))}"
        )
