"""Checkpoints of a run: what it holds and when it is written (the journal is written per charge)."""
from __future__ import annotations

from typing import Any

from dpfl.simulation._state import LoopState
from dpfl.simulation.checkpoint import (
    save_checkpoint,
)


class PersistPart(LoopState):
    """The run's checkpoint."""

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

