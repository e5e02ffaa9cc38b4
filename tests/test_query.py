"""The DP query owns the release: the noise that leaves it is the noise its event charges.

Guarantees protected here:

* for every query type (global, per layer, adaptive global, adaptive per layer, secure, two
  ranks reduced before noise), the empirical per-coordinate std of the noised *sum* of zero
  updates equals ``event.noise_multiplier × sensitivity`` of the event the query stated before
  the release and returned with it;
* in ``run_rounds`` every release is charged (releases == journal charges == ledger rounds), and
  a release whose event differs from the charged one is refused before its mean is applied.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfl.accounting import RDPAccountant
from dpfl.adaptive_clip import AdaptiveClip
from dpfl.clip import GlobalClip, PerLayerClip
from dpfl.query import (
    AdaptiveClipQuery,
    DPQuery,
    GaussianSumQuery,
    Release,
    ReleaseEventError,
    gaussian_query,
)
from dpfl.simulation import (
    Checkpointing,
    FixedCohortSampler,
    LocalTraining,
    Logging,
    PoissonSampler,
    Privacy,
    run_rounds,
)
from tests._scripts.tiny_fl import loss_fn, make_dataset, make_model

KINDS = ("global", "per_layer", "adaptive_global", "adaptive_per_layer", "secure", "two_ranks")
SHAPES = {"a.weight": (40, 50), "a.bias": (50,), "b.weight": (30, 30)}
COORDS = sum(math.prod(s) for s in SHAPES.values())  # 2950 per release
RELEASES = 6
#: Two-sided bound on |s²/σ² − 1| for n = COORDS × RELEASES draws at a false-alarm rate of 1e-6
#: per check (normal approximation of χ²_n / n, z = 4.89 for 1e-6 two-sided).
TOLERANCE = 4.89 * math.sqrt(2.0 / (COORDS * RELEASES))


def _query(kind: str, z: float, bound: float, size: float, seed: int) -> GaussianSumQuery:
    base: Any = PerLayerClip(bound) if "per_layer" in kind else GlobalClip(bound)
    if kind.startswith("adaptive"):
        base = AdaptiveClip(base, count_noise_multiplier=3.0, learning_rate=1.0)  # moves fast
    secure = kind == "secure"
    return gaussian_query(
        base, z, expected_cohort_size=size, seed=None if secure else seed, secure=secure
    )


def _zeros() -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s) for k, s in SHAPES.items()}


def _release_two_ranks(queries: list[GaussianSumQuery], sampler: Any) -> list[Release]:
    """Two ranks, each one zero user, all-reduced (threads + barrier) before the noise."""
    barrier, slots = threading.Barrier(2), [None, None]
    out: list[Any] = [None, None]

    def reduce_for(rank: int) -> Any:
        def reduce(tensors: list[torch.Tensor]) -> None:
            slots[rank] = [t.clone() for t in tensors]  # type: ignore[call-overload]
            barrier.wait()
            for mine, theirs in zip(tensors, slots[1 - rank], strict=True):  # type: ignore[arg-type]
                mine.add_(theirs)
            barrier.wait()

        return reduce

    def work(rank: int) -> None:
        q = queries[rank]
        acc = q.start(template=_zeros())
        q.add(acc, _zeros())
        out[rank] = q.release(acc, reduce=reduce_for(rank))

    threads = [threading.Thread(target=work, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out


@settings(max_examples=12, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    z=st.floats(0.3, 4.0),
    bound=st.floats(0.01, 10.0),
    size=st.floats(1.0, 4.0),  # small S: an adaptive bound moves a lot per release
    fixed=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_release_noise_matches_the_event_it_states(
    kind: str, z: float, bound: float, size: float, fixed: bool, seed: int
) -> None:
    """Std per coordinate of the noised sum == stated multiplier × sensitivity (FA rate 1e-6)."""
    users = list(range(100))
    sampler: Any = FixedCohortSampler(users, 10) if fixed else PoissonSampler(users, 0.1)
    ranks = 2 if kind == "two_ranks" else 1
    queries = [_query(kind, z, bound, size, seed) for _ in range(ranks)]  # same seed per rank
    squares, count = 0.0, 0
    for _ in range(RELEASES):
        stated = [q.event(sampler) for q in queries]
        if ranks == 2:
            releases = _release_two_ranks(queries, sampler)
            for a, b in zip(releases[0].mean.values(), releases[1].mean.values(), strict=True):
                assert torch.equal(a, b)  # seeded ranks add the identical noise once
        else:
            acc = queries[0].start(template=_zeros())
            queries[0].add(acc, _zeros())
            releases = [queries[0].release(acc)]
        release = releases[0]
        assert release.event == stated[0]  # the event returned is the event stated
        if kind.startswith("adaptive"):
            assert release.event.count_noise_multiplier == 3.0
        std = release.event.noise_multiplier * release.sensitivity
        for mean in release.mean.values():
            noise = mean.double() * size / std  # the sum's noise in units of the charged std
            squares += float((noise * noise).sum())
            count += mean.numel()
    ratio = squares / count
    assert abs(ratio - 1.0) <= TOLERANCE, (kind, ratio)


class _CountingQuery(GaussianSumQuery):
    """A Gaussian query that counts its releases (the real noise and event, no mock)."""

    releases = 0

    def release(self, acc: Any, **kw: Any) -> Release:
        out = super().release(acc, **kw)
        type(self).releases += 1
        return out


class _CountingAdaptive(AdaptiveClipQuery):
    releases = 0

    def release(self, acc: Any, **kw: Any) -> Release:
        out = super().release(acc, **kw)
        type(self).releases += 1
        return out


class _LyingQuery(GaussianSumQuery):
    """States z but releases an event of 2z (as if it had noised with another multiplier)."""

    def _event(self, sampling: Any, noise_multiplier: float) -> Any:
        if self._stating:
            return sampling.round_spec(noise_multiplier)
        return sampling.round_spec(2 * noise_multiplier)

    _stating = True

    def event(self, sampling: Any) -> Any:
        self._stating = True
        spec = super().event(sampling)
        self._stating = False
        return spec


def _run(tmp_path: Path, query: DPQuery, rounds: int = 3) -> tuple[Any, Any, Any]:
    model, dataset = make_model(), make_dataset()
    sampler = PoissonSampler(dataset.user_ids(), 0.5, seed=3)
    accountant = RDPAccountant()
    result = run_rounds(
        model,
        dataset,
        loss_fn,
        sampler=sampler,
        server_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        rounds=rounds,
        local=LocalTraining(lr=0.1, steps=1),
        privacy=Privacy(query=query, accountant=accountant, delta=1e-5),
        seed=1,
        checkpointing=Checkpointing(tmp_path / "ckpt"),
        logging=Logging(progress=False),
    )
    return model, accountant, result


@pytest.mark.parametrize("cls", [_CountingQuery, _CountingAdaptive])
def test_every_release_of_a_run_is_charged(tmp_path: Path, cls: Any) -> None:
    """Releases == journal charges == ledger rounds, for a fixed and an adaptive query."""
    cls.releases = 0
    clipper: Any = GlobalClip(0.5)
    if cls is _CountingAdaptive:
        clipper = AdaptiveClip(clipper, count_noise_multiplier=5.0)
    query = cls(clipper, 1.0, expected_cohort_size=len(make_dataset().user_ids()) * 0.5)
    _, accountant, result = _run(tmp_path, query)
    journal = (tmp_path / "ckpt" / "ledger.jsonl").read_text().splitlines()
    assert cls.releases == len(journal) == accountant.rounds == result.rounds_completed == 3


def test_a_release_whose_event_differs_from_the_charge_is_refused(tmp_path: Path) -> None:
    """The round is charged (write-ahead) but its mean is never applied to the model."""
    size = len(make_dataset().user_ids()) * 0.5
    query = _LyingQuery(GlobalClip(0.5), 1.0, expected_cohort_size=size)
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ReleaseEventError, match="round 1: the query released .*noise_multiplier=2"):
        run_rounds(
            model,
            make_dataset(),
            loss_fn,
            sampler=PoissonSampler(make_dataset().user_ids(), 0.5, seed=3),
            server_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            rounds=2,
            local=LocalTraining(lr=0.1, steps=1),
            privacy=Privacy(query=query, accountant=RDPAccountant(), delta=1e-5),
            logging=Logging(progress=False),
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_privacy_builds_the_default_query_and_refuses_mixed_settings() -> None:
    """README code (clipper + noise_multiplier) still works; query= excludes noise settings."""
    q = GaussianSumQuery(GlobalClip(1.0), 1.0, expected_cohort_size=2)
    with pytest.raises(ValueError, match=r"query= owns .*\['noise_seed'\]"):
        Privacy(query=q, noise_seed=3, accountant=RDPAccountant(), delta=1e-5)
    with pytest.raises(TypeError, match="query must be a dpfl.query.DPQuery"):
        Privacy(query=object(), accountant=RDPAccountant(), delta=1e-5)
    Privacy(GlobalClip(1.0), noise_multiplier=1.0, accountant=RDPAccountant(), delta=1e-5)


def test_run_result_and_round_record_are_public_where_defined() -> None:
    """Issue 23 p3: the public result types live in a public module (not private _progress)."""
    import dpfl.simulation as sim
    from dpfl.simulation import records, rounds

    assert sim.RunResult is records.RunResult is rounds.RunResult
    assert sim.RoundRecord is records.RoundRecord and records.RunResult.__module__ == records.__name__
