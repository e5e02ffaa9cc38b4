"""One round of the loop: sample, train, charge write-ahead, release, check the event, step."""
from __future__ import annotations

import time
from typing import Any

from dpfl.optim import server_step
from dpfl.query import Release, ReleaseEventError
from dpfl.simulation._progress import (
    RoundRecord,
)
from dpfl.simulation._state import LoopState


class RoundPart(LoopState):
    """One round: everything between the budget check and the round's record."""

    def _charge(self, t: int, spec: Any) -> None:
        """Write-ahead accounting: charge round ``t`` durably before its noise is drawn."""
        if self.journal is not None:
            self.journal.append(t, spec.to_dict())  # fsync-ed before anything is released
        self.accountant.add_rounds(spec)

    def _round(self, t: int, spec: Any) -> RoundRecord:
        timings = dict.fromkeys(("sample", "train", "aggregate", "server_step", "account"), 0.0)
        start = time.perf_counter()
        saved = (self.sampler.state_dict(), self.query.snapshot())
        audit_saved = None if self.audit is None else self.audit.state_dict()
        try:
            self.query.check_round()  # e.g. an adaptive bound that grew: its noise must still fit
            cohort = list(self.sampler.sample())
            timings["sample"] = time.perf_counter() - start
            agg = self.query.start(template=self.trainable, drop_nonfinite=self.drop_nonfinite)
            world, rank = (1, 0) if self.dist is None else (self.dist.world_size, self.dist.rank)
            self.shard.train_and_add(
                t, cohort, agg, timings, seed=self.seed, world_size=world, rank=rank
            )
            if self.audit is not None:
                self._add_canaries(agg)
            clock = time.perf_counter()
            self._charge(t, spec)  # from here on the round stays charged, even if it fails
            if self.journal is not None:
                # Noise keyed on the charge, not the round: a round re-run after a crash is
                # charged again and never repeats the noise of its first release.
                self.query.advance_to(self.journal.count - 1)
            timings["account"] = time.perf_counter() - clock
            clock = time.perf_counter()
            reduce = None if self.dist is None else self.dist.all_reduce_sum_
            release = self.query.release(agg, reduce=reduce, allow_empty=True)
            _check_release(release, spec, t)  # the noise added is the noise charged
            if self.dist is not None and self.query.broadcast:
                self.query.broadcast_(release, self.dist.broadcast_)  # rank 0's unseeded noise
            mean, stats = release.mean, release.stats
            timings["aggregate"] += time.perf_counter() - clock
            clock = time.perf_counter()
            # server_step validates before it changes anything, so when it raises the model and
            # optimizer are as they were; the sampler and generator are restored below.
            before = None
            if self.audit is not None:
                before = {n: p.detach().clone() for n, p in self.trainable.items()}
            # The release proved its mean finite while dividing it; re-checking is only needed
            # if rank 0's mean replaced this rank's, or a cast could overflow.
            certified = (stats.mean_finite is True and (self.dist is None or not self.query.broadcast)
                         and all(n in mean and mean[n].dtype == p.dtype for n, p in self.trainable.items()))
            server_step(self.optimizer, self.model, mean, check_finite=not certified)
        except BaseException:
            self.sampler.load_state_dict(saved[0])
            self.query.restore(saved[1])
            if self.audit is not None and audit_saved is not None:
                self.audit.load_state_dict(audit_saved)
            raise
        if self.audit is not None and before is not None:
            self.audit.observe(before, self.trainable)  # the released iterate
        if self.scheduler is not None:
            self.scheduler.step()
        timings["server_step"] = time.perf_counter() - clock
        clock = time.perf_counter()
        epsilon = float(self.accountant.epsilon(self.delta))
        timings["account"] += time.perf_counter() - clock
        used = release.record  # DP quantities of the release (adaptive: the bounds used)
        if not self.unsafe:  # cohort-dependent, not covered by the DP guarantee
            return RoundRecord(round=t, epsilon=epsilon, delta=self.delta, **used)
        return RoundRecord(
            round=t,
            epsilon=epsilon,
            delta=self.delta,
            **used,
            num_users=stats.num_users,
            num_dropped=stats.num_dropped,
            fraction_clipped=stats.fraction_clipped,
            mean_norm=stats.mean_norm,
            time_s=time.perf_counter() - start,
            timings=timings,
        )



def _check_release(release: Release, charged: Any, t: int) -> None:
    """Refuse a release whose event is not the charged one (its mean is never applied)."""
    if release.event != charged:
        raise ReleaseEventError(
            f"round {t}: the query released {release.event!r} but the round was charged as "
            f"{charged!r}; the mean is not applied (the noise added must be the noise charged)"
        )
