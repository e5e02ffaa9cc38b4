"""Simulation layer: cohort sampling, local and vectorized training, rounds and checkpoints.

References:
    Pelikan et al., arXiv 2310.00098 (DP-FedAvg with user-level DP).
"""

from dpfl.simulation.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dpfl.simulation.config import (
    Checkpointing,
    Evaluation,
    LocalTraining,
    Logging,
    Privacy,
    SeededNoiseWarning,
)
from dpfl.simulation.data import FederatedDataset, InMemoryFederatedDataset
from dpfl.simulation.distributed import (
    DistContext,
    DistributedError,
    init_distributed,
    shutdown_distributed,
)
from dpfl.simulation.local import NonFiniteLossError, train_local
from dpfl.simulation.rounds import RoundRecord, RunResult, StopReason, run_rounds
from dpfl.simulation.sampling import FixedCohortSampler, PoissonSampler, shard
from dpfl.simulation.vectorized import (
    FunctionalModel,
    VectorizationError,
    VectorizationFallbackWarning,
    train_cohort_vectorized,
)

__all__ = [
    "CheckpointError",
    "Checkpointing",
    "DistContext",
    "DistributedError",
    "Evaluation",
    "FederatedDataset",
    "FixedCohortSampler",
    "FunctionalModel",
    "InMemoryFederatedDataset",
    "LocalTraining",
    "Logging",
    "NonFiniteLossError",
    "PoissonSampler",
    "Privacy",
    "RoundRecord",
    "RunResult",
    "SeededNoiseWarning",
    "StopReason",
    "VectorizationError",
    "VectorizationFallbackWarning",
    "init_distributed",
    "load_checkpoint",
    "run_rounds",
    "save_checkpoint",
    "shard",
    "shutdown_distributed",
    "train_cohort_vectorized",
    "train_local",
]
