"""The state and phases of one :func:`~dpfl.simulation.run_rounds` call (see its docstring)."""

from __future__ import annotations

import secrets
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpfl._checks import require_int
from dpfl.aggregate import DPAggregator
from dpfl.audit.canary import CanaryAudit
from dpfl.optim import server_step
from dpfl.query import DPQuery, Release, ReleaseEventError, gaussian_query
from dpfl.simulation._lock import DirectoryLock
from dpfl.simulation._progress import (
    UNSAFE_WARNING,
    Progress,
    RoundRecord,
    RunLog,
    RunResult,
    StopReason,
    evaluate,
)
from dpfl.simulation._shard import ShardTrainer
from dpfl.simulation._shard import derive_seed as _derive_seed
from dpfl.simulation._validate import check_arguments, check_query
from dpfl.simulation.checkpoint import (
    CheckpointError,
    load_checkpoint,
    restore_run,
    save_checkpoint,
)
from dpfl.simulation.config import (
    Checkpointing,
    Evaluation,
    LocalTraining,
    Logging,
    Privacy,
    SeededNoiseWarning,
)
from dpfl.simulation.distributed import DistContext
from dpfl.simulation.journal import (
    JOURNAL_FILE,
    LedgerJournal,
    charge_journal,
    check_charges,
    sweep_temporaries,
    verify_ledger,
)

#: Name of the checkpoint file inside ``Checkpointing.dir``.
CHECKPOINT_FILE = "checkpoint.pt"


class _RoundLoop:
    """State and phases of one :func:`run_rounds` call (validated in the constructor)."""

    def __init__(
        self,
        model: nn.Module,
        dataset: Any,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        *,
        sampler: Any,
        server_optimizer: torch.optim.Optimizer,
        rounds: int,
        local: LocalTraining,
        privacy: Privacy,
        seed: int | None,
        lr_scheduler: Any,
        checkpointing: Checkpointing | None,
        logging: Logging,
        evaluation: Evaluation | None,
        dist: DistContext | None,
        audit: CanaryAudit | None = None,
    ) -> None:
        check_arguments(
            model, dataset, loss_fn, sampler, server_optimizer, local, privacy, logging,
            checkpointing, evaluation, audit,
        )
        self.model, self.dataset, self.loss_fn = model, dataset, loss_fn
        self.sampler, self.accountant = sampler, privacy.accountant
        self.query: DPQuery = _build_query(privacy, sampler)
        check_query(self.query, audit)
        self.optimizer, self.scheduler = server_optimizer, lr_scheduler
        self.privacy, self.logging, self.evaluation = privacy, logging, evaluation
        self.rounds = require_int("rounds", rounds, minimum=1)
        assert privacy.delta is not None  # Privacy checks it
        self.delta: float = privacy.delta
        self.drop_nonfinite = privacy.drop_nonfinite
        self.user_seed = None if seed is None else require_int("seed", seed, minimum=0)
        if self.user_seed is not None and self.user_seed >= 2**63:
            raise ValueError(f"seed must be < 2**63, got {seed}")
        self.noise_seed = privacy.noise_seed if privacy.query is None else self.query_seed()
        budget = getattr(self.accountant, "budget", None)
        self.unsafe = logging.unsafe_metrics
        self.dist: DistContext | None = dist
        self.is_main = self.dist is None or self.dist.is_main
        self.ckpt_every = checkpointing.every if checkpointing is not None else 1
        self.ckpt_path = (
            None if checkpointing is None else Path(checkpointing.dir) / CHECKPOINT_FILE
        )
        self.resume = checkpointing is not None and checkpointing.resume
        self.journal = (
            None
            if checkpointing is None
            else LedgerJournal(Path(checkpointing.dir) / JOURNAL_FILE, writable=self.is_main)
        )
        self.audit = audit
        self.log = RunLog(logging.path if self.is_main else None)
        self.warnings: list[str] = []
        qc = self.query.config()
        self.config = {
            "config_version": 1,
            "query": qc.get("type"),
            "noise_multiplier": qc.get("noise_multiplier"),
            "sensitivity": qc.get("sensitivity"),
            "clipper": type(self.query.clipper).__name__,
            "sampler": type(sampler).__name__,
            "expected_cohort_size": float(sampler.expected_cohort_size),
            "accountant": type(self.accountant).__name__,
            "server_optimizer": type(self.optimizer).__name__,
            "local_lr": local.lr,
            "local_steps": local.steps,
            "local_epochs": local.epochs,
            "local_max_grad_norm": local.max_grad_norm,
            "vectorized": local.vectorized,
            "drop_nonfinite": self.drop_nonfinite,
            "secure_noise": self.query.secure,
            "lr_scheduler": None if self.scheduler is None else type(self.scheduler).__name__,
            # Everything the privacy guarantee of a resumed run depends on:
            "clipper_config": qc.get("clipper"),
            "round_spec": self._spec().to_dict(),
            "adjacency": getattr(self.accountant, "adjacency", None),
            "budget": None if budget is None else budget.to_dict(),
            "noise_seeded": self.query.seeded,
        }
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shard = ShardTrainer(
            model, dataset, loss_fn, local=local, drop_nonfinite=self.drop_nonfinite
        )

    # ------------------------------------------------------------------ set-up and resume
    def query_seed(self) -> int | None:
        """The seed of a user-given query (``None``: unseeded)."""
        seed = getattr(self.query, "seed", None)
        return seed if isinstance(seed, int) else (0 if self.query.seeded else None)

    def _spec(self) -> Any:
        """The event of the next release, as the query states it (charged before the round)."""
        return self.query.event(self.sampler)

    def _parts(self) -> dict[str, Any]:
        """The stateful objects a checkpoint holds besides the model, by checkpoint key."""
        parts = {
            "sampler": self.sampler,
            "accountant": self.accountant,
            "optimizer": self.optimizer,
        }
        # The query keeps what it must: seeded noise state, adaptive bounds (DP releases).
        parts["query"] = self.query
        if self.audit is not None:
            parts["audit"] = self.audit
        return parts if self.scheduler is None else {**parts, "scheduler": self.scheduler}

    def _setup(self) -> int:
        """Resolve the seed, build the mechanism, restore a checkpoint; return the start round."""
        self.accountant.would_exceed(self._spec())  # wrong adjacency raises now
        state = None
        charges = [] if self.journal is None else self.journal.load()
        if self.ckpt_path is not None and (self.ckpt_path.exists() or charges):
            if not self.resume:
                journal = self.ckpt_path.with_name(JOURNAL_FILE)
                held = self.ckpt_path if self.ckpt_path.exists() else journal
                raise ValueError(
                    f"Checkpointing.dir already holds {held} of an earlier run; pass "
                    "Checkpointing(..., resume=True) to continue that run, or choose an empty "
                    "directory (a checkpoint or privacy journal is never overwritten)"
                )
            if self.ckpt_path.exists():
                state = load_checkpoint(self.ckpt_path)
                if self.audit is None and state.get("audit") is not None:
                    raise CheckpointError(
                        f"{self.ckpt_path}: the checkpoint belongs to an audited run "
                        "(run_rounds(audit=CanaryAudit(...))) and this run has no audit=; resume "
                        "with the same audit= so that its canaries and estimate continue (the "
                        "audit is never dropped silently), or use a fresh checkpoint directory"
                    )
        seed = self.user_seed
        if seed is None:
            stored = None if state is None else state.get("seed")
            if state is not None and (not isinstance(stored, int) or stored < 0):
                raise CheckpointError(f"{self.ckpt_path}: invalid seed {stored!r}")
            seed = stored if isinstance(stored, int) else secrets.randbits(62)
            if self.dist is not None:
                seed = self.dist.broadcast_int(seed)
        self.seed = seed
        if state is not None and state.get("noise_seed") != self.noise_seed:
            raise CheckpointError(
                f"{self.ckpt_path}: checkpoint was written with noise_seed "
                f"{state.get('noise_seed')!r}, this run has noise_seed {self.noise_seed!r}; "
                "resume with the same Privacy settings"
            )
        self.fresh = state is None and not charges  # a new run, not a resumed one
        if self.audit is not None:
            self.audit.begin(self.trainable, self.query.clipper)  # before its state is restored
        start, charged = 0, 0
        if state is not None:
            assert self.ckpt_path is not None
            charged = verify_ledger(self.ckpt_path, state, len(charges))
            stored_round = state.get("round")
            if isinstance(stored_round, int) and stored_round > self.rounds:
                raise ValueError(
                    f"rounds={self.rounds} is below the round of {self.ckpt_path} "
                    f"({stored_round}); a resumed run cannot undo released rounds, pass "
                    f"rounds >= {stored_round}"
                )
            # A scheduler decays "lr" and keeps the configured rate as "initial_lr": compare that.
            key = "initial_lr" if "initial_lr" in self.optimizer.param_groups[0] else "lr"
            lrs = [group.get(key) for group in self.optimizer.param_groups]
            kw: dict[str, Any] = {"config": self.config, "seed": self.user_seed}
            start = restore_run(self.ckpt_path, state, model=self.model, parts=self._parts(), **kw)
            restored = [group.get(key) for group in self.optimizer.param_groups]
            if restored != lrs:
                self.warnings.append(
                    f"server_optimizer learning rate {lrs} differs from the checkpoint's "
                    f"{restored}; the resumed run continues with the checkpoint's (restored with "
                    "the optimizer state)"
                )
        if charges[charged:]:
            assert self.journal is not None
            check_charges(self.journal.path, charges[charged:], self.config["round_spec"])
            charge_journal(self.accountant, charges[charged:])
        if self.dist is not None:
            shapes = {k: list(v.shape) for k, v in self.model.state_dict().items()}
            self.dist.check_same("run configuration", (self.config, shapes, seed, start))
        return start

    # ------------------------------------------------------------------ one round
    def _charge(self, t: int, spec: Any) -> None:
        """Write-ahead accounting: charge round ``t`` durably before its noise is drawn."""
        if self.journal is not None:
            self.journal.append(t, spec.to_dict())  # fsync-ed before anything is released
        self.accountant.add_rounds(spec)

    def _add_canaries(self, agg: DPAggregator) -> None:
        """Add this round's canaries (inclusion probability of a user) on rank 0 only."""
        assert self.audit is not None
        rate = min(1.0, float(self.sampler.expected_cohort_size) / self.sampler.population_size)
        members = self.audit.sample(rate)  # every rank advances the audit identically
        if self.is_main:
            for i in members:
                self.query.add(agg, self.audit.update(i))

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

    # ------------------------------------------------------------------ the loop
    def _checkpoint(self, t: int) -> None:
        if self.ckpt_path is None or not self.is_main:
            return
        parts = {key: obj.state_dict() for key, obj in self._parts().items()}
        meta = {
            "round": t,
            "seed": self.seed,
            "noise_seed": self.noise_seed,
            "charges": 0 if self.journal is None else self.journal.count,
            "config": self.config,
        }
        save_checkpoint(self.ckpt_path, {**meta, "model": self.model.state_dict(), **parts})

    def _audit_result(self, t: int, epsilon: float) -> dict[str, Any] | None:
        """The canary estimate, logged beside the accountant's ε (None without an audit)."""
        if self.audit is None or self.audit.rounds_observed == 0:
            return None
        estimate = self.audit.result(self.delta).to_dict()
        self.log.write({"event": "audit", "round": t, "epsilon": epsilon, **estimate})
        return estimate

    def run(self) -> RunResult:
        """Run under the checkpoint directory's lock (rank 0 only; released on exit or death)."""
        lock = None
        if self.ckpt_path is not None and self.is_main:
            lock = DirectoryLock(self.ckpt_path.parent)
            lock.acquire()
            sweep_temporaries(self.ckpt_path)
        try:
            return self._run()
        finally:
            if lock is not None:
                lock.release()

    def _run(self) -> RunResult:
        start = self._setup()
        logged = self.log.last_round()
        has_log = self.log.path is not None and self.log.path.is_file()
        if start > 0 and has_log and (logged or 0) < start:
            held = "no round" if logged is None else f"rounds only up to {logged}"
            raise CheckpointError(
                f"{self.ckpt_path}: the checkpoint is at round {start} but the log "
                f"{self.log.path} records {held}; every round is logged "
                "before its checkpoint, so the log was truncated or replaced, or the round index "
                "moved; restore the run's own log or give another Logging.path"
            )
        world = 1 if self.dist is None else self.dist.world_size
        self.log.begin(start, world_size=world, config=self.config, unsafe=self.unsafe)
        if self.unsafe and self.is_main:
            print(f"dpfl: WARNING: {UNSAFE_WARNING}", file=sys.stderr, flush=True)
        for text in self.warnings:
            warnings.warn(text, RuntimeWarning, stacklevel=3)
            self.log.write({"event": "warning", "round": start, "message": text})
        if self.noise_seed is not None and self.fresh and self.is_main:
            # (the log's config records "noise_seeded"; the warning is for the caller)
            message = _seeded_noise_message(self.noise_seed)
            warnings.warn(message, SeededNoiseWarning, stacklevel=4)  # at run_rounds' caller
        bar = Progress(
            self.rounds,
            start,
            enabled=self.logging.progress if self.is_main else False,
            every=self.logging.every,
            unsafe=self.unsafe,
        )
        records: list[RoundRecord] = []
        reason: StopReason = "completed"
        message = f"completed {self.rounds} rounds"
        last_saved, t = start, start
        try:
            while t < self.rounds:
                spec = self._spec()
                if self.accountant.would_exceed(spec):
                    reason = "budget"
                    budget = self.accountant.budget
                    message = (
                        f"stopped before round {t + 1}: it would exceed the privacy budget "
                        f"epsilon={budget.epsilon:g} at delta={budget.delta:g} "
                        f"(spent so far: {self.accountant.epsilon(budget.delta):.6g} after {t} rounds)"
                    )
                    break
                t += 1
                record = self._round(t, spec)
                ev = self.evaluation
                if ev is not None and self.is_main and t % ev.every == 0:
                    record = evaluate(record, ev.fn, self.model)
                records.append(record)
                self.log.write(record.to_dict())
                bar.update(
                    t, epsilon=record.epsilon, num_users=record.num_users, time_s=record.time_s
                )
                if t % self.ckpt_every == 0 or t == self.rounds:
                    self._checkpoint(t)
                    last_saved = t
            epsilon = float(self.accountant.epsilon(self.delta))
            self.log.write(
                {"event": "stop", "round": t, "reason": reason, "message": message}
                | {"epsilon": epsilon, "delta": self.delta}
            )
            audit = self._audit_result(t, epsilon)
            if last_saved != t:
                self._checkpoint(t)
            bar.message(message)
        finally:
            bar.close()
        return RunResult(
            rounds_completed=t,
            records=tuple(records),
            stop_reason=reason,
            stop_message=message,
            epsilon=epsilon,
            delta=self.delta,
            resumed_from=start if start > 0 else None,
            audit=audit,
        )


def _seeded_noise_message(noise_seed: int) -> str:
    return (
        f"noise_seed={noise_seed}: seeded noise is for simulations only. Anyone who knows the "
        "seed (or holds a checkpoint) can reproduce and subtract the noise, and two runs with "
        "one noise_seed add identical noise, so the difference of their releases leaks with no "
        "noise at all, although the ledger charges them as independent runs; use "
        "noise_seed=None (OS entropy) for any run whose privacy matters"
    )


def _build_query(privacy: Privacy, sampler: Any) -> DPQuery:
    """The run's query: ``privacy.query``, or the Gaussian query of its clipper and noise."""
    size = float(sampler.expected_cohort_size)
    if privacy.query is not None:
        if privacy.query.expected_cohort_size != size:
            raise ValueError(
                f"Privacy.query.expected_cohort_size ({privacy.query.expected_cohort_size!r}) "
                f"must equal the sampler's ({size!r}): the mean is divided by it"
            )
        return privacy.query
    assert privacy.noise_multiplier is not None  # Privacy checks it
    seed = privacy.noise_seed
    return gaussian_query(
        privacy.clipper,
        privacy.noise_multiplier,
        expected_cohort_size=size,
        seed=None if seed is None else _derive_seed(seed, 0),
        secure=privacy.secure_noise,
    )


def _check_release(release: Release, charged: Any, t: int) -> None:
    """Refuse a release whose event is not the charged one (its mean is never applied)."""
    if release.event != charged:
        raise ReleaseEventError(
            f"round {t}: the query released {release.event!r} but the round was charged as "
            f"{charged!r}; the mean is not applied (the noise added must be the noise charged)"
        )
