"""What a run returns and logs: a [`RoundRecord`][dpfl.simulation.RoundRecord] per round
and a [`RunResult`][dpfl.simulation.RunResult] per call.

Both are public (also exported by [`dpfl.simulation`][dpfl.simulation] and
``dpfl.simulation.rounds``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["RoundRecord", "RunResult", "StopReason"]

StopReason = Literal["completed", "budget"]
"""Why [`run_rounds`][dpfl.simulation.run_rounds] stopped (``RunResult.stop_reason``).

``"completed"``: every requested round ran. ``"budget"``: the next round would have taken ε past
the accountant's budget, so it was not run (nothing was released or charged for it).
"""


@dataclass(frozen=True)
class RoundRecord:
    """What happened in one completed round (one JSON line with ``"event": "round"`` in the log).

    By default a record holds only what is differentially private or public: the round index, ε
    and δ, and the evaluation metrics. The other fields are ``None`` unless the run was given
    ``Logging(unsafe_metrics=True)``.

    Attributes:
        round: 1-based index of the round (counted across resumes).
        epsilon: ε spent so far (after this round) at ``delta``, from the accountant.
        delta: the δ at which ``epsilon`` is reported.
        num_users: users whose clipped updates entered the sum (all ranks together). Unsafe.
        num_dropped: users dropped for a non-finite update (only with ``drop_nonfinite=True``).
            Unsafe.
        fraction_clipped: fraction of the users whose update was scaled down by the clipper.
            Unsafe.
        mean_norm: mean L2 norm of the users' updates before clipping. Unsafe.
        time_s: wall-clock seconds of the round (sampling to accounting; no eval/checkpoint).
            Unsafe: training time grows with the realised cohort.
        timings: seconds per phase: ``sample``, ``train``, ``aggregate`` (clip, sum, all-reduce,
            noise), ``server_step``, ``account``, and ``eval`` when evaluation ran. Unsafe.
        eval: the metrics returned by the evaluation hook after this round, or ``None``.
        clip_bound: with adaptive clipping, the total bound ``C`` used in this round (fixed
            before it by earlier noised counts: a DP release, logged by default).
        layer_bounds: with per-layer adaptive clipping, the bound of every layer in this round.

    Warning:
        Under Poisson sampling the realised cohort size is a non-private function of the data;
        so are the statistics of raw updates and the timings that grow with the cohort. The
        fields marked "Unsafe" are not covered by the DP guarantee: use them for monitoring,
        never publish them.
    """

    round: int
    epsilon: float
    delta: float
    num_users: int | None = None
    num_dropped: int | None = None
    fraction_clipped: float | None = None
    mean_norm: float | None = None
    time_s: float | None = None
    timings: dict[str, float] | None = None
    eval: dict[str, float] | None = None
    clip_bound: float | None = None
    layer_bounds: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a dict with ``"event": "round"`` first (what the log holds).

        Unsafe fields that are ``None`` (the default) are left out.
        """
        data = {k: v for k, v in asdict(self).items() if v is not None or k == "eval"}
        return {"event": "round", **data}


@dataclass(frozen=True)
class RunResult:
    """Outcome of [`run_rounds`][dpfl.simulation.run_rounds].

    Attributes:
        rounds_completed: rounds completed in total, including rounds restored from a checkpoint.
        records: the records of the rounds run by this call (not the restored ones).
        stop_reason: ``"completed"`` when ``rounds`` rounds are done; ``"budget"`` when the next
            round would have exceeded the accountant's (ε, δ) budget and was not run.
        stop_message: a human-readable explanation (also logged with ``"event": "stop"``).
        epsilon: ε spent at the end of the run, at ``delta``.
        delta: the δ at which ``epsilon`` is reported.
        resumed_from: the round index restored from a checkpoint, or ``None`` for a fresh start.
        audit: with ``run_rounds(audit=CanaryAudit(k))``, the one-shot empirical estimate
            (``empirical_epsilon`` at ``delta`` and its details, see
            [`dpfl.audit.CanaryEstimate.to_dict`][dpfl.audit.CanaryEstimate.to_dict]) to set beside
            ``epsilon``; else ``None``.
    """

    rounds_completed: int
    records: tuple[RoundRecord, ...]
    stop_reason: StopReason
    stop_message: str
    epsilon: float
    delta: float
    resumed_from: int | None = None
    audit: dict[str, Any] | None = None
