"""The state and phases of one [`run_rounds`][dpfl.simulation.run_rounds] call (see its docstring)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dpfl._checks import require_int, warn_at_caller
from dpfl.query import DPQuery
from dpfl.simulation._audit_hooks import AuditPart
from dpfl.simulation._lock import DirectoryLock
from dpfl.simulation._persist import PersistPart
from dpfl.simulation._progress import (
    UNSAFE_WARNING,
    Progress,
    RoundRecord,
    RunLog,
    RunResult,
    StopReason,
    evaluate,
)
from dpfl.simulation._resume import SetupPart, build_query
from dpfl.simulation._round import RoundPart
from dpfl.simulation._shard import ShardTrainer
from dpfl.simulation._validate import check_arguments, check_query
from dpfl.simulation.checkpoint import (
    CheckpointError,
)
from dpfl.simulation.config import (
    Logging,
    SeededNoiseWarning,
)
from dpfl.simulation.distributed import DistContext
from dpfl.simulation.journal import (
    JOURNAL_FILE,
    LedgerJournal,
    sweep_temporaries,
)

#: Name of the checkpoint file inside ``Checkpointing.dir``.
CHECKPOINT_FILE = "checkpoint.pt"


class _RoundLoop(SetupPart, RoundPart, PersistPart, AuditPart):
    """One ``run_rounds`` call: its state and phases, checked when built."""

    def __init__(self, args: Mapping[str, Any]) -> None:
        """``args``: the arguments of ``run_rounds`` by name (its signature is the one list)."""
        check_arguments(args)
        model, dataset, loss_fn = args["model"], args["dataset"], args["loss_fn"]
        sampler, privacy, audit = args["sampler"], args["privacy"], args["audit"]
        server_optimizer, lr_scheduler = args["server_optimizer"], args["lr_scheduler"]
        local, rounds, seed, dist = args["local"], args["rounds"], args["seed"], args["dist"]
        checkpointing, evaluation = args["checkpointing"], args["evaluation"]
        logging: Logging = args["logging"] if args["logging"] is not None else Logging()
        self.model, self.dataset, self.loss_fn = model, dataset, loss_fn
        self.sampler, self.accountant = sampler, privacy.accountant
        self.query: DPQuery = build_query(privacy, sampler)
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
