"""Cohort samplers that report the accounting event matching what they actually do.

Two samplers are offered:

* [`PoissonSampler`][dpfl.simulation.PoissonSampler] includes every user independently with
  probability ``q`` each round, so the realised cohort size is random (``Binomial(N, q)``). This is
  the sampling that the RDP/PLD analysis of DP-FedAvg assumes; its
  [`round_spec`][dpfl.simulation.PoissonSampler.round_spec] returns a
  [`dpfl.accounting.PoissonRound`][dpfl.accounting.PoissonRound] (add/remove-one-user adjacency).
* [`FixedCohortSampler`][dpfl.simulation.FixedCohortSampler] draws exactly ``S`` distinct users
  without replacement, as the reference code of arXiv 2310.00098 does; its
  [`round_spec`][dpfl.simulation.FixedCohortSampler.round_spec] returns a
  [`dpfl.accounting.FixedCohortRound`][dpfl.accounting.FixedCohortRound] (replace-one-user
  adjacency).

Because each sampler hands out the accounting event for its own sampling scheme, a round loop that
composes ``sampler.round_spec(z)`` into its accountant gets the ledger right by construction.

Randomness is counter-based: round ``t`` draws from a fresh ``numpy`` generator seeded by
``SeedSequence(entropy=seed, spawn_key=(t,))``. The whole sampler state is therefore the seed and
the round counter, ``state_dict()`` is a small dict of Python ints (JSON-able and loadable with
``torch.load(weights_only=True)``), and a resumed run samples exactly the cohorts it would have
sampled without the interruption. Without a seed the entropy comes from the OS; keep the state
dict (and so checkpoints) as secret as the cohorts themselves, which amplification by sampling
assumes nobody outside learns.

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv 2310.00098, section 2.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, TypeVar

import numpy as np

from dpfl._checks import require_int, require_probability
from dpfl.accounting import FixedCohortRound, PoissonRound

__all__ = ["FixedCohortSampler", "PoissonSampler", "shard"]

T = TypeVar("T")


def _check_population(population: Sequence[Hashable]) -> Sequence[Hashable]:
    if isinstance(population, (str, bytes)) or not isinstance(population, Sequence):
        raise TypeError(
            "population must be a sequence of user ids (e.g. a list or range), "
            f"got {type(population).__name__}"
        )
    if len(population) == 0:
        raise ValueError("population must contain at least one user id, got an empty sequence")
    if not isinstance(population, range) and len(set(population)) != len(population):
        raise ValueError(
            "population must not contain duplicate user ids: a duplicated user could be sampled "
            "twice in one round, which breaks the one-user sensitivity bound"
        )
    return population


def _resolve_entropy(seed: int | None) -> int:
    if seed is None:
        entropy = np.random.SeedSequence().entropy  # OS entropy
        assert isinstance(entropy, int)
        return entropy
    return require_int("seed", seed, minimum=0)


class _CounterSampler:
    """Shared machinery: population, counter-based generator, state dict."""

    _kind = ""

    def __init__(self, population: Sequence[Hashable], *, seed: int | None) -> None:
        self._population = _check_population(population)
        self._entropy = _resolve_entropy(seed)
        self._round = 0

    @property
    def population(self) -> Sequence[Hashable]:
        """The user ids this sampler draws from."""
        return self._population

    @property
    def population_size(self) -> int:
        """Number of users ``N`` in the population."""
        return len(self._population)

    @property
    def rounds_sampled(self) -> int:
        """Number of cohorts drawn so far (the index of the next round)."""
        return self._round

    @property
    def expected_cohort_size(self) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def _rng(self, round_index: int) -> np.random.Generator:
        seq = np.random.SeedSequence(entropy=self._entropy, spawn_key=(round_index,))
        return np.random.Generator(np.random.PCG64(seq))

    def _draw_indices(self, rng: np.random.Generator) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def sample(self) -> list[Hashable]:
        """Draw the next round's cohort and advance the round counter.

        Returns:
            The sampled user ids, in population order.
        """
        idx = self._draw_indices(self._rng(self._round))
        self._round += 1
        return [self._population[int(i)] for i in idx]

    def _settings(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Return the sampler state as a dict of plain Python ints and strings.

        The dict is JSON-able and safe for ``torch.save``/``torch.load(weights_only=True)``.
        """
        return {
            "kind": self._kind,
            "entropy": self._entropy,
            "rounds_sampled": self._round,
            "population_size": len(self._population),
            **self._settings(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by ``state_dict`` of an identically configured sampler.

        Args:
            state: The dict returned by ``state_dict``.

        Raises:
            ValueError: If ``state`` comes from a different kind of sampler, a different population
                size or different settings, or is malformed. The sampler is left unchanged.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        expected = {
            "kind": self._kind,
            "population_size": len(self._population),
            **self._settings(),
        }
        for key, value in expected.items():
            if key not in state:
                raise ValueError(f"state is missing key {key!r}; pass the dict from state_dict()")
            if state[key] != value:
                raise ValueError(
                    f"state[{key!r}] is {state[key]!r} but this sampler has {value!r}; "
                    "load the state into a sampler built with the same settings"
                )
        for key in ("entropy", "rounds_sampled"):
            if key not in state:
                raise ValueError(f"state is missing key {key!r}; pass the dict from state_dict()")
        entropy = require_int("state['entropy']", state["entropy"], minimum=0)
        rounds = require_int("state['rounds_sampled']", state["rounds_sampled"], minimum=0)
        self._entropy, self._round = entropy, rounds


class PoissonSampler(_CounterSampler):
    """Poisson sampling: every user joins each round independently with probability ``q``.

    The realised cohort size is ``Binomial(N, q)``; it is drawn first and the members are then a
    uniformly random subset of that size, which is the same distribution as ``N`` coin flips but
    costs ``O(cohort size)`` instead of ``O(N)`` per round.

    Warning:
        The privacy analysis of [`dpfl.accounting.PoissonRound`][dpfl.accounting.PoissonRound]
        requires the aggregate to be divided by
        [`expected_cohort_size`][dpfl.simulation.PoissonSampler.expected_cohort_size] (``q * N``),
        never by the realised cohort size, and requires the sampling randomness to stay hidden from
        the adversary.

    Args:
        population: The user ids (unique, hashable), e.g. ``dataset.user_ids()`` or a ``range``.
        sample_rate: Inclusion probability ``q`` in (0, 1].
        seed: Seed for the sampling generator; ``None`` (the default) draws one from OS entropy.
            Amplification by sampling assumes nobody outside learns who was sampled: a seed that
            anyone else knows (or a checkpoint holding the sampler state) reveals every cohort
            and voids the amplification. Use seeds for simulations only.

    Raises:
        ValueError: If ``population`` is empty or has duplicates, or ``sample_rate`` is outside
            (0, 1].

    Examples:
        >>> sampler = PoissonSampler(range(1000), 0.01, seed=0)
        >>> cohort = sampler.sample()
        >>> sampler.expected_cohort_size
        10.0

    References:
        arXiv 2310.00098, section 2 (Poisson sampling with rate q = S / K).
    """

    _kind = "poisson"

    def __init__(
        self, population: Sequence[Hashable], sample_rate: float, *, seed: int | None = None
    ) -> None:
        self.sample_rate = require_probability("sample_rate", sample_rate)
        super().__init__(population, seed=seed)

    @property
    def expected_cohort_size(self) -> float:
        """Expected cohort size ``q * N``: the fixed denominator of the DP mean."""
        return self.sample_rate * len(self._population)

    def _draw_indices(self, rng: np.random.Generator) -> np.ndarray:
        n = len(self._population)
        count = int(rng.binomial(n, self.sample_rate))
        return np.sort(rng.choice(n, size=count, replace=False))

    def _settings(self) -> dict[str, Any]:
        return {"sample_rate": self.sample_rate}

    def round_spec(
        self, noise_multiplier: float, *, count_noise_multiplier: float | None = None
    ) -> PoissonRound:
        """Return the accounting event for one round of this sampler.

        Args:
            noise_multiplier: Noise multiplier ``z`` of the Gaussian mechanism used in the round.
            count_noise_multiplier: ``z_b`` of an adaptive-clipping count released in the same
                round, or ``None``.

        Returns:
            ``PoissonRound(noise_multiplier, sample_rate, count_noise_multiplier)``.
        """
        return PoissonRound(
            noise_multiplier=noise_multiplier,
            sample_rate=self.sample_rate,
            count_noise_multiplier=count_noise_multiplier,
        )

    def __repr__(self) -> str:
        return f"PoissonSampler(population_size={len(self._population)}, sample_rate={self.sample_rate})"


class FixedCohortSampler(_CounterSampler):
    """Fixed-size cohorts drawn uniformly without replacement, as in the paper's reference code.

    Warning:
        Account these rounds with
        [`dpfl.accounting.FixedCohortRound`][dpfl.accounting.FixedCohortRound] (what
        [`round_spec`][dpfl.simulation.FixedCohortSampler.round_spec] returns), not with a Poisson
        event: the adjacency differs (replace-one user instead of add/remove-one).

    Args:
        population: The user ids (unique, hashable).
        cohort_size: Number of distinct users per round, ``1 <= cohort_size <= len(population)``.
        seed: Seed for the sampling generator; ``None`` (the default) draws one from OS entropy.
            The replace-one analysis of fixed cohorts also assumes the cohort stays secret: a
            known seed (or a checkpoint holding the sampler state) reveals every cohort.

    Raises:
        ValueError: If ``population`` is empty or has duplicates, or ``cohort_size`` is not in
            ``[1, len(population)]``.

    Examples:
        >>> sampler = FixedCohortSampler(["a", "b", "c", "d"], 2, seed=0)
        >>> len(sampler.sample())
        2

    References:
        arXiv 2310.00098, section 2 (fixed cohort of S users per round in the reference code).
    """

    _kind = "fixed_cohort"

    def __init__(
        self, population: Sequence[Hashable], cohort_size: int, *, seed: int | None = None
    ) -> None:
        size = require_int("cohort_size", cohort_size, minimum=1)
        super().__init__(population, seed=seed)
        if size > len(population):
            raise ValueError(
                f"cohort_size must be <= the population size {len(population)}, got {size}; "
                "sample fewer users or enlarge the population"
            )
        self.cohort_size = size

    @property
    def expected_cohort_size(self) -> float:
        """The cohort size ``S`` (every cohort has exactly this many users)."""
        return float(self.cohort_size)

    def _draw_indices(self, rng: np.random.Generator) -> np.ndarray:
        return np.sort(rng.choice(len(self._population), size=self.cohort_size, replace=False))

    def _settings(self) -> dict[str, Any]:
        return {"cohort_size": self.cohort_size}

    def round_spec(
        self, noise_multiplier: float, *, count_noise_multiplier: float | None = None
    ) -> FixedCohortRound:
        """Return the accounting event for one round of this sampler.

        Args:
            noise_multiplier: Noise multiplier ``z`` of the Gaussian mechanism used in the round.
            count_noise_multiplier: ``z_b`` of an adaptive-clipping count released in the same
                round, or ``None``.

        Returns:
            ``FixedCohortRound(noise_multiplier, cohort_size, population, count_noise_multiplier)``.
        """
        return FixedCohortRound(
            noise_multiplier=noise_multiplier,
            cohort_size=self.cohort_size,
            population=len(self._population),
            count_noise_multiplier=count_noise_multiplier,
        )

    def __repr__(self) -> str:
        return (
            f"FixedCohortSampler(population_size={len(self._population)}, "
            f"cohort_size={self.cohort_size})"
        )


def shard(cohort: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Return the part of ``cohort`` that worker ``rank`` of ``world_size`` trains.

    Users are dealt round-robin (``cohort[rank::world_size]``), so every user lands on exactly one
    rank, the shards differ in size by at most one, and the split depends only on the cohort order.

    Args:
        cohort: The round's cohort, identical on every rank (same sampler seed and state).
        rank: This worker's rank, ``0 <= rank < world_size``.
        world_size: Number of workers, ``>= 1``.

    Returns:
        This rank's users, in cohort order.

    Raises:
        ValueError: If ``world_size < 1`` or ``rank`` is outside ``[0, world_size)``.

    Examples:
        >>> shard(["a", "b", "c", "d", "e"], 1, 2)
        ['b', 'd']
    """
    world_size = require_int("world_size", world_size, minimum=1)
    rank = require_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
    return list(cohort[rank::world_size])
