"""The shared state of the round loop's parts (setup/resume, round, checkpoint, audit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpfl.audit.canary import CanaryAudit
from dpfl.query import DPQuery
from dpfl.simulation._progress import RunLog
from dpfl.simulation._shard import ShardTrainer
from dpfl.simulation.config import Evaluation, Logging, Privacy
from dpfl.simulation.distributed import DistContext
from dpfl.simulation.journal import LedgerJournal


class LoopState:
    """The attributes of a run that its parts share (set by ``_RoundLoop.__init__``)."""

    model: nn.Module
    dataset: Any
    loss_fn: Any
    sampler: Any
    accountant: Any
    query: DPQuery
    optimizer: torch.optim.Optimizer
    scheduler: Any
    privacy: Privacy
    logging: Logging
    evaluation: Evaluation | None
    rounds: int
    delta: float
    drop_nonfinite: bool
    user_seed: int | None
    noise_seed: int | None
    unsafe: bool
    dist: DistContext | None
    is_main: bool
    ckpt_every: int
    ckpt_path: Path | None
    resume: bool
    journal: LedgerJournal | None
    audit: CanaryAudit | None
    log: RunLog
    warnings: list[str]
    config: dict[str, Any]
    trainable: dict[str, torch.nn.Parameter]
    shard: ShardTrainer
    seed: int
    fresh: bool

    # Provided by the parts (declared here so that each part can call the others):
    def _parts(self) -> dict[str, Any]:
        """The stateful objects a checkpoint holds besides the model (``PersistPart``)."""
        raise NotImplementedError

    def _add_canaries(self, agg: Any) -> None:
        """Add this round's canaries to ``agg`` (``AuditPart``)."""
        raise NotImplementedError
