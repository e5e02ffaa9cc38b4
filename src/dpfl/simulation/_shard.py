"""Local training of one rank's shard of a cohort, feeding each update into the aggregator.

Used by [`run_rounds`][dpfl.simulation.run_rounds]: user ``i`` of the cohort (by position) is
trained by rank ``i % world_size`` with a generator seeded from ``(seed, round, position)``, so the
result depends neither on which rank trains the user nor on restarts.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from dpfl.aggregate import DPAggregator
from dpfl.simulation.config import LocalTraining
from dpfl.simulation.local import NonFiniteLossError, train_local
from dpfl.simulation.vectorized import train_cohort_vectorized

__all__ = ["ShardTrainer", "derive_seed"]


def derive_seed(seed: int, *key: int) -> int:
    """A 63-bit seed derived from ``seed`` and ``key`` (independent streams per key)."""
    words = np.random.SeedSequence(entropy=seed, spawn_key=key).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class ShardTrainer:
    """Trains the users of a cohort that fall to this rank and adds their updates."""

    def __init__(
        self,
        model: nn.Module,
        dataset: Any,
        loss_fn: Any,
        *,
        local: LocalTraining,
        drop_nonfinite: bool,
    ) -> None:
        self.model, self.dataset, self.loss_fn = model, dataset, loss_fn
        self.steps, self.epochs, self.vectorized = local.steps, local.epochs, local.vectorized
        self.align = local.align
        self.local: dict[str, Any] = {
            "lr": local.lr,
            "steps": local.steps,
            "max_grad_norm": local.max_grad_norm,
        }
        self.drop_nonfinite = drop_nonfinite
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.scratch = copy.deepcopy(model)

    def train_and_add(
        self,
        t: int,
        cohort: list[Any],
        agg: DPAggregator,
        timings: dict[str, float],
        *,
        seed: int,
        world_size: int,
        rank: int,
    ) -> None:
        """Train this rank's shard of the cohort and add the updates to ``agg``."""
        mine = list(range(len(cohort)))[rank::world_size]
        users = [cohort[i] for i in mine]
        clock = time.perf_counter()
        datas = [self.dataset.user_data(uid) for uid in users]
        if self.vectorized and users:
            assert self.steps is not None
            try:
                gens = [_generator(seed, t, i) for i in mine]
                updates = train_cohort_vectorized(
                    self.model, datas, self.loss_fn, generator=gens, user_ids=users,
                    align=self.align, **self.local
                )
            except NonFiniteLossError:
                if not self.drop_nonfinite:
                    raise
                updates = None  # find and drop the offending users one by one below
            if updates is not None:
                timings["train"] += time.perf_counter() - clock
                clock = time.perf_counter()
                for uid, update in zip(users, updates, strict=True):
                    _add(agg, update, uid, t)
                timings["aggregate"] += time.perf_counter() - clock
                return
        for uid, data, i in zip(users, datas, mine, strict=True):
            user_kw = {"user_id": uid, "scratch": self.scratch, **self.local}
            try:
                gen = _generator(seed, t, i)
                update = train_local(
                    self.model, data, self.loss_fn, epochs=self.epochs, generator=gen, **user_kw
                )
            except NonFiniteLossError:
                if not self.drop_nonfinite:
                    raise
                # A non-finite update makes the aggregator drop the user and count it, on every
                # rank alike, so num_dropped stays correct after the all-reduce.
                update = {n: torch.full_like(p, math.nan) for n, p in self.trainable.items()}
            now = time.perf_counter()
            timings["train"] += now - clock
            _add(agg, update, uid, t)
            clock = time.perf_counter()
            timings["aggregate"] += clock - now


def _generator(seed: int, t: int, position: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, 1, t, position))


def _add(agg: DPAggregator, update: dict[str, torch.Tensor], uid: Any, t: int) -> None:
    try:
        agg.add(update)
    except ValueError as exc:
        raise ValueError(f"round {t}, user {uid!r}: update rejected: {exc}") from exc
