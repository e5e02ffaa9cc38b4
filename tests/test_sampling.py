"""Tests for dpfl.simulation.sampling and dpfl.simulation.data."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from dpfl.accounting import FixedCohortRound, PoissonRound
from dpfl.simulation.data import FederatedDataset, InMemoryFederatedDataset
from dpfl.simulation.sampling import FixedCohortSampler, PoissonSampler, shard

# Statistical tests below reject at a two-sided false-alarm rate of ALPHA each (for a correct
# sampler with a fresh random seed); the seeds are fixed so the suite itself is deterministic.
ALPHA = 1e-6


def _z_crit() -> float:
    return float(stats.norm.isf(ALPHA / 2))


# --------------------------------------------------------------------------- Poisson statistics


def test_poisson_cohort_size_mean_and_variance() -> None:
    n, q, rounds = 2000, 0.05, 1500
    sampler = PoissonSampler(range(n), q, seed=1234)
    sizes = np.array([len(sampler.sample()) for _ in range(rounds)], dtype=float)
    mean, var = q * n, q * (1 - q) * n
    # mean: z-test on the average of `rounds` Binomial(n, q) draws
    assert abs(sizes.mean() - mean) <= _z_crit() * math.sqrt(var / rounds)
    # variance: s^2 / var ~ chi2(R-1) (normal approximation of the binomial, np ~ 100)
    stat = (rounds - 1) * sizes.var(ddof=1) / var
    lo, hi = stats.chi2.ppf(ALPHA / 2, rounds - 1), stats.chi2.isf(ALPHA / 2, rounds - 1)
    assert lo <= stat <= hi
    assert sampler.expected_cohort_size == pytest.approx(mean)
    assert sampler.rounds_sampled == rounds


def test_poisson_inclusion_is_uniform_over_users() -> None:
    n, q, rounds = 200, 0.1, 1000
    population = [f"u{i}" for i in range(n)]
    sampler = PoissonSampler(population, q, seed=7)
    counts = dict.fromkeys(population, 0)
    for _ in range(rounds):
        for uid in sampler.sample():
            counts[uid] += 1
    # each count ~ Binomial(rounds, q); sum of standardised squares ~ chi2(n) approximately
    c = np.array(list(counts.values()), dtype=float)
    stat = float((((c - rounds * q) ** 2) / (rounds * q * (1 - q))).sum())
    assert stat <= stats.chi2.isf(ALPHA, n)


def test_poisson_rate_one_samples_everyone() -> None:
    sampler = PoissonSampler(["a", "b", "c"], 1.0, seed=0)
    assert sampler.sample() == ["a", "b", "c"]


@given(
    n=st.integers(1, 300),
    q=st.floats(1e-3, 1.0),
    seed=st.integers(0, 2**32),
)
def test_poisson_cohort_is_distinct_subset_in_population_order(n: int, q: float, seed: int) -> None:
    population = list(range(100, 100 + n))
    cohort = PoissonSampler(population, q, seed=seed).sample()
    # privacy invariant: no user is sampled twice in one round (sensitivity stays one user)
    assert len(set(cohort)) == len(cohort)
    assert set(cohort) <= set(population)
    assert cohort == sorted(cohort)


# --------------------------------------------------------------------------- fixed cohorts


@given(n=st.integers(1, 300), data=st.data(), seed=st.integers(0, 2**32))
def test_fixed_cohort_has_exactly_s_distinct_users(n: int, data: st.DataObject, seed: int) -> None:
    s = data.draw(st.integers(1, n))
    sampler = FixedCohortSampler(range(n), s, seed=seed)
    for _ in range(3):
        cohort = sampler.sample()
        assert len(cohort) == s
        assert len(set(cohort)) == s  # no repeats within a round
        assert all(0 <= u < n for u in cohort)


def test_fixed_cohort_inclusion_is_uniform() -> None:
    n, s, rounds = 100, 10, 2000
    sampler = FixedCohortSampler(range(n), s, seed=99)
    counts = np.zeros(n)
    for _ in range(rounds):
        counts[sampler.sample()] += 1
    # chi-square goodness of fit of the total counts against uniform (n - 1 degrees of freedom);
    # the without-replacement dependence only makes the statistic smaller (multiply by n/(n-s)).
    expected = rounds * s / n
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat <= stats.chi2.isf(ALPHA, n - 1) * n / (n - s)
    assert sampler.expected_cohort_size == s


# --------------------------------------------------------------------------- seeds and state


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: PoissonSampler(range(500), 0.05, seed=seed),
        lambda seed: FixedCohortSampler(range(500), 20, seed=seed),
    ],
)
def test_seed_reproduces_and_different_seeds_differ(make) -> None:  # type: ignore[no-untyped-def]
    a, b, c = make(3), make(3), make(4)
    ca = [a.sample() for _ in range(5)]
    assert ca == [b.sample() for _ in range(5)]
    assert ca != [c.sample() for _ in range(5)]
    # consecutive rounds differ
    assert ca[0] != ca[1]


def test_no_seed_uses_os_entropy() -> None:
    a = PoissonSampler(range(10_000), 0.5)
    b = PoissonSampler(range(10_000), 0.5)
    assert a.state_dict()["entropy"] != b.state_dict()["entropy"]
    assert a.sample() != b.sample()


@pytest.mark.parametrize("via", ["json", "torch"])
@pytest.mark.parametrize(
    "make",
    [lambda: PoissonSampler(range(300), 0.1), lambda: FixedCohortSampler(range(300), 12)],
)
def test_state_dict_round_trip_continues_identically(via: str, make) -> None:  # type: ignore[no-untyped-def]
    original = make()  # OS-entropy seed: the state must carry it
    for _ in range(3):
        original.sample()
    state = original.state_dict()
    if via == "json":
        state = json.loads(json.dumps(state))
    else:
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.rounds_sampled == 3
    assert [resumed.sample() for _ in range(5)] == [original.sample() for _ in range(5)]


def test_load_state_dict_rejects_mismatch_and_leaves_state_unchanged() -> None:
    sampler = FixedCohortSampler(range(50), 5, seed=1)
    sampler.sample()
    before = sampler.state_dict()
    bad_states = [
        FixedCohortSampler(range(60), 5, seed=1).state_dict(),  # other population size
        FixedCohortSampler(range(50), 6, seed=1).state_dict(),  # other cohort size
        PoissonSampler(range(50), 0.1, seed=1).state_dict(),  # other kind
        {k: v for k, v in before.items() if k != "entropy"},  # missing key
        {**before, "rounds_sampled": -1},  # malformed
    ]
    for bad in bad_states:
        with pytest.raises(ValueError):
            sampler.load_state_dict(bad)
        assert sampler.state_dict() == before


def test_round_spec_matches_sampling_scheme() -> None:
    poisson = PoissonSampler(range(1000), 0.02, seed=0)
    assert poisson.round_spec(1.5) == PoissonRound(noise_multiplier=1.5, sample_rate=0.02)
    fixed = FixedCohortSampler(range(1000), 20, seed=0)
    assert fixed.round_spec(0.7) == FixedCohortRound(
        noise_multiplier=0.7, cohort_size=20, population=1000
    )


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("factory", "name"),
    [
        (lambda: PoissonSampler([], 0.1), "population"),
        (lambda: FixedCohortSampler([], 1), "population"),
        (lambda: PoissonSampler(range(10), 0.0), "sample_rate"),
        (lambda: PoissonSampler(range(10), 1.5), "sample_rate"),
        (lambda: PoissonSampler(range(10), float("nan")), "sample_rate"),
        (lambda: FixedCohortSampler(range(10), 11), "cohort_size"),
        (lambda: FixedCohortSampler(range(10), 0), "cohort_size"),
        (lambda: PoissonSampler(["a", "b", "a"], 0.5), "population"),
        (lambda: PoissonSampler(range(10), 0.5, seed=-1), "seed"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(factory, name: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=name):
        factory()


def test_population_must_be_a_sequence() -> None:
    with pytest.raises(TypeError, match="population"):
        PoissonSampler({1, 2, 3}, 0.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- sharding


@given(
    n=st.integers(0, 50),
    world_size=st.integers(1, 8),
)
def test_shard_partitions_the_cohort(n: int, world_size: int) -> None:
    cohort = [f"user{i}" for i in range(n)]
    shards = [shard(cohort, r, world_size) for r in range(world_size)]
    flat = [u for s in shards for u in s]
    assert sorted(flat) == sorted(cohort)  # every user on exactly one rank
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_shard_rejects_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank"):
        shard([1, 2, 3], 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        shard([1, 2, 3], 0, 0)


# --------------------------------------------------------------------------- dataset protocol


def test_in_memory_dataset_follows_protocol() -> None:
    data = {"alice": [torch.zeros(2)], 7: [torch.ones(2), torch.ones(2)]}
    ds = InMemoryFederatedDataset(data)
    assert isinstance(ds, FederatedDataset)
    assert list(ds.user_ids()) == ["alice", 7]
    assert len(ds.user_data(7)) == 2
    assert len(ds) == 2 and "alice" in ds
    sampler = FixedCohortSampler(ds.user_ids(), 2, seed=0)
    assert sorted(map(str, sampler.sample())) == ["7", "alice"]


def test_in_memory_dataset_errors_name_the_user() -> None:
    ds = InMemoryFederatedDataset({"alice": [torch.zeros(1)]})
    with pytest.raises(KeyError, match="bob"):
        ds.user_data("bob")
    with pytest.raises(ValueError, match="data"):
        InMemoryFederatedDataset({})
    with pytest.raises(TypeError, match="data"):
        InMemoryFederatedDataset([1, 2])  # type: ignore[arg-type]


@given(
    n=st.integers(1, 10_000),
    q=st.floats(1e-6, 1.0),
    z=st.floats(0.0, 100.0),
    data=st.data(),
)
def test_round_spec_always_describes_the_sampler(
    n: int, q: float, z: float, data: st.DataObject
) -> None:
    poisson = PoissonSampler(range(n), q, seed=0)
    assert poisson.round_spec(z) == PoissonRound(noise_multiplier=z, sample_rate=q)
    assert poisson.expected_cohort_size == pytest.approx(q * n)
    s = data.draw(st.integers(1, n))
    fixed = FixedCohortSampler(range(n), s, seed=0)
    assert fixed.round_spec(z) == FixedCohortRound(noise_multiplier=z, cohort_size=s, population=n)
    assert fixed.expected_cohort_size == s


@given(seed=st.integers(0, 2**64), before=st.integers(0, 5), poisson=st.booleans())
def test_resume_from_any_round_samples_identically(seed: int, before: int, poisson: bool) -> None:
    def make() -> PoissonSampler | FixedCohortSampler:
        if poisson:
            return PoissonSampler(range(100), 0.1, seed=seed)
        return FixedCohortSampler(range(100), 10, seed=seed)

    uninterrupted = make()
    expected = [uninterrupted.sample() for _ in range(before + 3)]
    first = make()
    for _ in range(before):
        first.sample()
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.sample() for _ in range(3)] == expected[before:]
