"""The state and phases of one [`run_rounds`][dpfl.simulation.run_rounds] call (see its docstring)."""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpfl._checks import require_int, warn_at_caller
from dpfl.adaptive_clip import AdaptiveClip
from dpfl.aggregate import DPAggregator
from dpfl.audit.canary import CanaryAudit
from dpfl.noise import GaussianMechanism
from dpfl.optim import server_step
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
from dpfl.simulation._validate import check_arguments, check_noise_representable
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
    """State and phases of one [`run_rounds`][dpfl.simulation.run_rounds] call (validated in the constructor)."""

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
        self.sampler, self.clipper, self.accountant = sampler, privacy.clipper, privacy.accountant
        self.adaptive = isinstance(self.clipper, AdaptiveClip)
        self.optimizer, self.scheduler = server_optimizer, lr_scheduler
        self.privacy, self.logging, self.evaluation = privacy, logging, evaluation
        self.z = privacy.noise_multiplier
        self.rounds = require_int("rounds", rounds, minimum=1)
        self.delta = privacy.delta
        self.drop_nonfinite, self.secure = privacy.drop_nonfinite, privacy.secure_noise
        self.user_seed = None if seed is None else require_int("seed", seed, minimum=0)
        if self.user_seed is not None and self.user_seed >= 2**63:
            raise ValueError(f"seed must be < 2**63, got {seed}")
        self.noise_seed = privacy.noise_seed
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
        self.config = {
            "noise_multiplier": self.z,
            "sensitivity": self._initial_bound(),
            "clipper": type(self.clipper).__name__,
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
            "secure_noise": self.secure,
            "lr_scheduler": None if self.scheduler is None else type(self.scheduler).__name__,
            # Everything the privacy guarantee of a resumed run depends on:
            "clipper_config": repr(self.clipper),
            "round_spec": self._spec().to_dict(),
            "adjacency": getattr(self.accountant, "adjacency", None),
            "budget": None if budget is None else budget.to_dict(),
            "noise_seeded": self.noise_seed is not None,
        }
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shard = ShardTrainer(
            model, dataset, loss_fn, local=local, drop_nonfinite=self.drop_nonfinite
        )

    # ------------------------------------------------------------------ set-up and resume
    def _initial_bound(self) -> float:
        if isinstance(self.clipper, AdaptiveClip):
            return self.clipper.initial_bound
        return float(self.clipper.sensitivity)

    def _spec(self) -> Any:
        """The round spec to charge: with adaptive clipping, the count's multiplier too."""
        if isinstance(self.clipper, AdaptiveClip):
            zb = self.clipper.count_noise_multiplier
            return self.sampler.round_spec(self.z, count_noise_multiplier=zb)
        return self.sampler.round_spec(self.z)

    def _parts(self) -> dict[str, Any]:
        """The stateful objects a checkpoint holds besides the model, by checkpoint key."""
        parts = {
            "sampler": self.sampler,
            "accountant": self.accountant,
            "optimizer": self.optimizer,
        }
        if self.noise_seed is not None:  # simulation only: unseeded noise is never stored
            parts["mechanism"] = self.mechanism
        if self.audit is not None:
            parts["audit"] = self.audit
        if self.adaptive:  # the bounds are DP releases: always stored
            parts["clipper"] = self.clipper
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
        self.mechanism = GaussianMechanism(
            self.z,
            self._initial_bound(),
            seed=None if self.noise_seed is None else _derive_seed(self.noise_seed, 0),
            secure=self.secure,
        )
        self.fresh = state is None and not charges  # a new run, not a resumed one
        if self.audit is not None:
            self.audit.begin(self.trainable, self.clipper)  # before its state is restored
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
                agg.add(self.audit.update(i))

    def _round(self, t: int, spec: Any) -> RoundRecord:
        timings = dict.fromkeys(("sample", "train", "aggregate", "server_step", "account"), 0.0)
        start = time.perf_counter()
        saved = (self.sampler.state_dict(), self.mechanism.state_dict())
        clip_saved = self.clipper.state_dict() if self.adaptive else None
        used: dict[str, Any] = {}
        audit_saved = None if self.audit is None else self.audit.state_dict()
        try:
            if self.adaptive:  # this round's bound may have grown: its noise must still fit
                check_noise_representable(self.z, self.clipper.sensitivity, secure=self.secure)
            cohort = list(self.sampler.sample())
            timings["sample"] = time.perf_counter() - start
            agg = DPAggregator(
                self.clipper,
                self.mechanism,
                expected_cohort_size=self.sampler.expected_cohort_size,
                drop_nonfinite=self.drop_nonfinite,
                template=self.trainable,
            )
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
                self.mechanism.advance_to(self.journal.count - 1)
            timings["account"] = time.perf_counter() - clock
            clock = time.perf_counter()
            reduce = None if self.dist is None else self.dist.all_reduce_sum_
            if isinstance(self.clipper, AdaptiveClip):
                used = _bounds_used(self.clipper, self.trainable)
            mean, stats = agg.release(reduce=reduce, allow_empty=True)
            if self.dist is not None and self.noise_seed is None:
                self.dist.broadcast_(list(mean.values()))  # rank 0's unseeded noise
                if isinstance(self.clipper, AdaptiveClip):
                    self._broadcast_bounds(self.clipper)  # moved by rank 0's noised count
            timings["aggregate"] += time.perf_counter() - clock
            clock = time.perf_counter()
            # server_step validates before it changes anything, so when it raises the model and
            # optimizer are as they were; the sampler and generator are restored below.
            before = None
            if self.audit is not None:
                before = {n: p.detach().clone() for n, p in self.trainable.items()}
            # The release proved its mean finite while dividing it; re-checking is only needed
            # if rank 0's mean replaced this rank's, or a cast could overflow.
            certified = (stats.mean_finite is True and (self.dist is None or self.noise_seed is not None)
                         and all(n in mean and mean[n].dtype == p.dtype for n, p in self.trainable.items()))
            server_step(self.optimizer, self.model, mean, check_finite=not certified)
        except BaseException:
            self.sampler.load_state_dict(saved[0])
            self.mechanism.load_state_dict(saved[1])
            if clip_saved is not None:
                self.clipper.load_state_dict(clip_saved)
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

    def _broadcast_bounds(self, clipper: AdaptiveClip) -> None:
        assert self.dist is not None and clipper.bounds is not None
        vec = torch.tensor(list(clipper.bounds.values()), dtype=torch.float64)
        self.dist.broadcast_([vec])
        clipper.set_bounds_(vec.tolist())

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
            warn_at_caller(text, RuntimeWarning)
            self.log.write({"event": "warning", "round": start, "message": text})
        if self.noise_seed is not None and self.fresh and self.is_main:
            # (the log's config records "noise_seeded"; the warning is for the caller)
            message = _seeded_noise_message(self.noise_seed)
            warn_at_caller(message, SeededNoiseWarning)
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


def _bounds_used(clipper: AdaptiveClip, template: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The bound(s) of this round, for its record (DP: fixed by earlier noised counts)."""
    bounds = clipper.layer_bounds(template)
    used: dict[str, Any] = {"clip_bound": clipper.bound}
    if clipper.per_layer:
        used["layer_bounds"] = bounds
    return used
