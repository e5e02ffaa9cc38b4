"""The canary audit's hooks in a run: canaries into the sum, the estimate beside ε."""
from __future__ import annotations

from typing import Any

from dpfl.aggregate import DPAggregator
from dpfl.simulation._state import LoopState


class AuditPart(LoopState):
    """The audit's part of a run (no-ops without ``audit=``)."""

    def _add_canaries(self, agg: DPAggregator) -> None:
        """Add this round's canaries (inclusion probability of a user) on rank 0 only."""
        assert self.audit is not None
        rate = min(1.0, float(self.sampler.expected_cohort_size) / self.sampler.population_size)
        members = self.audit.sample(rate)  # every rank advances the audit identically
        if self.is_main:
            for i in members:
                self.query.add(agg, self.audit.update(i))

    def _audit_result(self, t: int, epsilon: float) -> dict[str, Any] | None:
        """The canary estimate, logged beside the accountant's ε (None without an audit)."""
        if self.audit is None or self.audit.rounds_observed == 0:
            return None
        estimate = self.audit.result(self.delta).to_dict()
        self.log.write({"event": "audit", "round": t, "epsilon": epsilon, **estimate})
        return estimate

