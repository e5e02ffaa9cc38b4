"""Set-up and resume of a run: the query, the seed, the checkpoint and the journal's charges."""
from __future__ import annotations

import secrets
from typing import Any

from dpfl.query import DPQuery, gaussian_query
from dpfl.simulation._shard import derive_seed as _derive_seed
from dpfl.simulation._state import LoopState
from dpfl.simulation.checkpoint import (
    CheckpointError,
    load_checkpoint,
    restore_run,
)
from dpfl.simulation.config import (
    Privacy,
)
from dpfl.simulation.journal import (
    JOURNAL_FILE,
    charge_journal,
    check_charges,
    verify_ledger,
)


class SetupPart(LoopState):
    """Set-up and resume (run once, before the first round)."""

    def query_seed(self) -> int | None:
        """The seed of a user-given query (``None``: unseeded)."""
        seed = getattr(self.query, "seed", None)
        return seed if isinstance(seed, int) else (0 if self.query.seeded else None)

    def _spec(self) -> Any:
        """The event of the next release, as the query states it (charged before the round)."""
        return self.query.event(self.sampler)

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



def build_query(privacy: Privacy, sampler: Any) -> DPQuery:
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


