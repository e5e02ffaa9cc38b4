"""The DP-FedAvg round loop: sample, train locally, clip+sum+noise, server step, account.

Public API:

* :func:`run_rounds` runs DP federated averaging on a model, in place, with a JSON-lines log,
  evaluation hooks, atomic checkpoints and resume, stop-before-budget and ``torch.distributed``
  sharding of the cohort.
* :class:`RoundRecord` is the per-round record (also one JSON line per round in the log).
* :class:`RunResult` is what :func:`run_rounds` returns.

References: Pelikan et al., *Enabling Differentially Private Federated Learning for Speech
Recognition*, arXiv 2310.00098 (DP-FedAvg with user-level DP and a server optimizer).
"""

from __future__ import annotations

import secrets
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpfl._checks import require_int
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
from dpfl.simulation.checkpoint import (
    CheckpointError,
    load_checkpoint,
    restore_run,
    save_checkpoint,
)
from dpfl.simulation.config import Checkpointing, Evaluation, LocalTraining, Logging, Privacy
from dpfl.simulation.distributed import DistContext
from dpfl.simulation.journal import (
    JOURNAL_FILE,
    LedgerJournal,
    charge_journal,
    sweep_temporaries,
    verify_ledger,
)

__all__ = ["CHECKPOINT_FILE", "RoundRecord", "RunResult", "StopReason", "run_rounds"]

#: Name of the checkpoint file inside ``Checkpointing.dir``.
CHECKPOINT_FILE = "checkpoint.pt"


def _require_methods(name: str, obj: Any, methods: tuple[str, ...], what: str) -> None:
    missing = [m for m in methods if not callable(getattr(obj, m, None))]
    if missing:
        raise TypeError(f"{name} must be {what}; it lacks the method(s) {missing}")


def run_rounds(
    model: nn.Module,
    dataset: Any,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    sampler: Any,
    server_optimizer: torch.optim.Optimizer,
    rounds: int,
    local: LocalTraining,
    privacy: Privacy,
    seed: int | None = None,
    lr_scheduler: Any = None,
    checkpointing: Checkpointing | None = None,
    logging: Logging | None = None,
    evaluation: Evaluation | None = None,
    dist: DistContext | None = None,
    audit: CanaryAudit | None = None,
) -> RunResult:
    """Run DP-FedAvg rounds on ``model`` in place, with logging, checkpoints and budget stop.

    One round t (1-based):

    1. Stop-before-budget: if ``accountant.would_exceed(sampler.round_spec(noise_multiplier))``
       the round is **not** run (nothing is sampled, trained, released or accounted); the reason
       is logged (``"event": "stop"``) and returned with ``stop_reason="budget"``.
    2. ``sampler.sample()`` draws the cohort. With ``dist`` every rank draws the same cohort from
       the same sampler state and trains the shard ``cohort[rank::world_size]``.
    3. Each user trains a copy of the server model with :func:`~dpfl.simulation.train_local`
       (or :func:`~dpfl.simulation.train_cohort_vectorized` if ``local.vectorized``); its local
       generator is seeded from ``(seed, t, position of the user in the cohort)``, so the result
       depends neither on which rank trains the user nor on restarts.
    4. A :class:`~dpfl.aggregate.DPAggregator` clips each update with ``privacy.clipper`` and sums
       it.
    5. **Write-ahead accounting**: ``accountant.add_rounds(sampler.round_spec(noise_multiplier))``
       charges the round, and with ``checkpointing`` a line ``{"charge": i, "round": t, "spec":
       ...}`` is appended to ``ledger.jsonl`` in the checkpoint directory and ``fsync``-ed, all
       *before* the noise is drawn. A round that fails after this point stays charged.
    6. ``release`` all-reduces the sums across ranks (``reduce=`` hook), adds Gaussian noise of
       std ``noise_multiplier * clipper.sensitivity`` **once** to the global sum and divides by
       ``sampler.expected_cohort_size``. With ``privacy.noise_seed`` every rank holds the same
       seeded generator and adds the identical noise after the all-reduce; otherwise (OS entropy,
       or ``secure_noise``) rank 0's noised mean is broadcast.
    7. :func:`~dpfl.optim.server_step` applies the noised mean with ``server_optimizer`` (then
       ``lr_scheduler.step()`` if given).
    8. The record is logged; ``evaluation.fn`` runs when ``t % evaluation.every == 0``; a
       checkpoint is written when ``t % checkpointing.every == 0``, after the last round and on a
       budget stop.

    A checkpoint holds the state *after* round t (model, optimizer, scheduler, ledger including
    round t and the number of journal charges it holds, sampler, seeds, round index, and the noise
    generator only when ``privacy.noise_seed`` is given); the log line of round t is written
    before it. Resuming restores it, adds the journal's charges beyond the checkpoint to the
    ledger, and continues with round t + 1. Rounds released after the checkpoint by a process that
    died are re-run and charged again: after any crash and resume the ledger holds at least as
    many rounds as noised releases left the process (conservative: a re-run seeded round repeats
    identical noise and is still charged). Resume refuses a checkpoint written with other privacy
    settings (noise multiplier, sensitivity, clipper configuration, sampling, adjacency,
    accountant, budget, noise mode) and a ledger with fewer rounds than the round index.

    Adaptive clipping: with ``privacy.clipper`` an :class:`~dpfl.adaptive_clip.AdaptiveClip`,
    round t clips with the bounds fixed after round t − 1, the aggregator also releases the
    noised count (its own noise stream) and moves the bounds, and each round is charged as
    ``sampler.round_spec(noise_multiplier, count_noise_multiplier=z_b)``, one Gaussian of the
    effective multiplier. The bound(s) used in each round are DP releases and are logged in its
    record (``clip_bound``; per layer also ``layer_bounds``); the clipper's state (bounds, step)
    is checkpointed and restored on resume.

        Args:
        model: the server model; trained **in place**.
        dataset: a :class:`~dpfl.simulation.FederatedDataset` (``user_ids()``, ``user_data(uid)``).
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` for local training.
        sampler: a :class:`~dpfl.simulation.PoissonSampler` or
            :class:`~dpfl.simulation.FixedCohortSampler` over ``dataset``'s user ids; advanced in
            place and checkpointed.
        server_optimizer: a ``torch.optim.Optimizer`` over ``model``'s parameters.
        rounds: total number of rounds, counted across resumes.
        local: :class:`~dpfl.simulation.LocalTraining` (learning rate, steps or epochs, ...).
        privacy: :class:`~dpfl.simulation.Privacy` (clipper, noise multiplier, accountant, δ,
            noise seed and mode).
        seed: the *simulation* seed: local-training generators only (not the noise, see
            ``privacy.noise_seed``); ``None`` draws one from OS entropy (broadcast from rank 0
            under ``dist``; stored in checkpoints).
        lr_scheduler: optional ``torch.optim.lr_scheduler`` of ``server_optimizer``, stepped once
            per round and checkpointed.
        checkpointing: :class:`~dpfl.simulation.Checkpointing` (directory, cadence, resume), or
            ``None`` for no checkpoints.
        logging: :class:`~dpfl.simulation.Logging` (JSON-lines log, progress display), or
            ``None`` for the defaults (no log, automatic progress display).
        evaluation: :class:`~dpfl.simulation.Evaluation` (hook and cadence), or ``None``.
        dist: a :class:`~dpfl.simulation.distributed.DistContext` (from ``init_distributed``) or
            ``None`` for one process. Only rank 0 writes logs and checkpoints; all ranks must get
            the same arguments and read the same checkpoint directory.
        audit: a :class:`~dpfl.audit.CanaryAudit` to estimate the run's privacy empirically in
            one shot (Andrew et al., arXiv 2302.03098): its canary clients take part in each round
            with the users' inclusion probability (added to the sum on rank 0 after the real
            users, clipped and noised like them), every released iterate is observed, and the
            estimate lands in ``RunResult.audit`` and in the log (``"event": "audit"``) beside
            the accountant's ε. Canaries are not users of the population and are charged
            nothing; their updates are synthetic, so no user's data is touched. Checkpointed.

    Returns:
        A :class:`RunResult` (rounds completed, records, stop reason, final ε).

    Raises:
        TypeError: an argument of the wrong type (named).
        ValueError: invalid arguments, an empty population, a user without data or with a
            non-finite loss (the message names the user), a non-finite update (unless
            ``privacy.drop_nonfinite``), or an existing checkpoint without ``resume``. A failed
            round leaves model, optimizer, sampler and noise generator as they were (an
            optimizer that raises half-way through its own ``step`` excepted); the ledger keeps
            the round's charge if the round failed after it (from the release on).
        CheckpointError: a corrupt, truncated or mismatched checkpoint (names the file).
        DistributedError: a peer rank died or did not answer within the timeout.

    Warning:
        Privacy: seeded noise (``privacy.noise_seed``) is for simulations only: it is
        reproducible from the seed and from the generator state inside checkpoints, and two runs
        with the same noise seed add identical noise, so their releases are not independent.
        With ``noise_seed=None`` (the default) the noise comes from OS entropy and a resumed run
        draws fresh noise. A known *sampler* seed reveals the cohorts and voids amplification by
        sampling. By default nothing that depends on the realised cohort (its size, dropped
        users, clipping statistics, cohort-dependent timings) is logged, printed or returned;
        ``Logging(unsafe_metrics=True)`` turns that on, with a warning. The mean is always
        divided by the *expected* cohort size.

    Examples:
        >>> result = run_rounds(model, dataset, loss_fn, sampler=sampler,   # doctest: +SKIP
        ...     server_optimizer=opt, rounds=100,
        ...     local=LocalTraining(lr=0.1, steps=10),
        ...     privacy=Privacy(GlobalClip(0.1), noise_multiplier=1.0,
        ...                     accountant=RDPAccountant(), delta=1e-6),
        ...     checkpointing=Checkpointing("ckpt", resume=True),
        ...     logging=Logging("run.jsonl"))
        >>> result.stop_reason, result.epsilon                              # doctest: +SKIP

    References:
        Pelikan et al., arXiv 2310.00098, algorithm 1 (DP-FedAvg with a server optimizer).
    """
    loop = _RoundLoop(
        model,
        dataset,
        loss_fn,
        sampler=sampler,
        server_optimizer=server_optimizer,
        rounds=rounds,
        local=local,
        privacy=privacy,
        seed=seed,
        lr_scheduler=lr_scheduler,
        checkpointing=checkpointing,
        logging=logging if logging is not None else Logging(),
        evaluation=evaluation,
        dist=dist,
        audit=audit,
    )
    return loop.run()


def _require_instance(name: str, value: Any, cls: type, hint: str) -> None:
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__} ({hint}), got {type(value).__name__}")


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
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _require_methods("dataset", dataset, ("user_ids", "user_data"), "a FederatedDataset")
        if len(dataset.user_ids()) == 0:
            raise ValueError("dataset has no users (empty population); give it at least one user")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> scalar tensor")
        methods = ("sample", "round_spec", "state_dict", "load_state_dict")
        _require_methods("sampler", sampler, methods, "a PoissonSampler or FixedCohortSampler")
        if not isinstance(server_optimizer, torch.optim.Optimizer):
            raise TypeError(
                "server_optimizer must be a torch.optim.Optimizer over model's parameters"
            )
        _require_instance("local", local, LocalTraining, "LocalTraining(lr=..., steps=...)")
        _require_instance("privacy", privacy, Privacy, "Privacy(clipper, noise_multiplier, ...)")
        _require_instance("logging", logging, Logging, "Logging(path=...)")
        if checkpointing is not None:
            _require_instance("checkpointing", checkpointing, Checkpointing, "Checkpointing(dir)")
        if evaluation is not None:
            _require_instance("evaluation", evaluation, Evaluation, "Evaluation(fn, every=...)")
        self.model, self.dataset, self.loss_fn = model, dataset, loss_fn
        self.sampler, self.clipper, self.accountant = sampler, privacy.clipper, privacy.accountant
        self.adaptive = isinstance(self.clipper, AdaptiveClip)
        if self.adaptive and audit is not None:
            raise ValueError(
                "audit= with an AdaptiveClip is not supported: the canaries are sized to a fixed "
                "bound; audit a run with a fixed clipper"
            )
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
        if checkpointing is not None and Path(checkpointing.dir).exists():
            if not Path(checkpointing.dir).is_dir():
                raise ValueError(
                    f"Checkpointing.dir {checkpointing.dir} exists and is not a directory"
                )
        if logging.path is not None and Path(logging.path).is_dir():
            raise ValueError(f"Logging.path {logging.path} is a directory; give a file path")
        population = getattr(sampler, "population", None)
        if population is not None:
            known = set(dataset.user_ids())
            unknown = [uid for uid in population if uid not in known]
            if unknown:
                raise ValueError(
                    f"sampler has {len(unknown)} user id(s) that dataset does not hold, e.g. "
                    f"{unknown[:3]!r}; build the sampler from dataset.user_ids()"
                )
        if audit is not None and not isinstance(audit, CanaryAudit):
            raise TypeError(f"audit must be a dpfl.audit.CanaryAudit or None, got {audit!r}")
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
            server_step(self.optimizer, self.model, mean)
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
        if start > 0 and logged is not None and logged < start:
            raise CheckpointError(
                f"{self.ckpt_path}: the checkpoint is at round {start} but the log "
                f"{self.log.path} records rounds only up to {logged}; every round is logged "
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


def _bounds_used(clipper: AdaptiveClip, template: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The bound(s) of this round, for its record (DP: fixed by earlier noised counts)."""
    bounds = clipper.layer_bounds(template)
    used: dict[str, Any] = {"clip_bound": clipper.bound}
    if clipper.per_layer:
        used["layer_bounds"] = bounds
    return used
