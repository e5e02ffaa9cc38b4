"""Federated fine-tuning glue: the paper's DP-FedAvg recipe assembled from dpfl's public API.

:func:`run_federated` builds a sampler, a clipper (per-layer or global), the server optimizer
(LAMB with exponential learning-rate decay in the paper) and an accountant from a
:class:`FederatedConfig` and runs :func:`dpfl.simulation.rounds.run_rounds` with the CTC loss of
:mod:`examples.asr.train`. :func:`resolve_noise` turns ``--noise-multiplier``, ``--sigma-dp`` or
``--target-epsilon`` into the noise multiplier z.

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv:2310.00098, algorithm 1 and
    section 5 (local SGD LR 0.2, 10 steps, clip 1.0; server LAMB 0.002 with exponential decay;
    per-layer clipping with dim allocation; z = sigma_DP * S).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from os import PathLike
from typing import Any, Literal

import torch
from torch import nn

from dpfl.accounting import PLDAccountant, RDPAccountant, calibrate_noise_multiplier
from dpfl.audit import CanaryAudit
from dpfl.clip import GlobalClip, PerLayerClip
from dpfl.optim import LAMB
from dpfl.simulation import (
    Checkpointing,
    DistContext,
    Evaluation,
    FederatedDataset,
    FixedCohortSampler,
    LocalTraining,
    Logging,
    PoissonSampler,
    Privacy,
    RunResult,
    run_rounds,
)
from examples.asr.checks import require_non_negative, require_positive
from examples.asr.train import Augment, Batch, BatchTensors, align_batches, batch_loss

__all__ = [
    "FederatedConfig",
    "checkpoint_every",
    "make_accountant",
    "make_clipper",
    "make_server_optimizer",
    "resolve_noise",
    "run_federated",
]

ServerOptimizerName = Literal["lamb", "adam", "sgd"]
ClipName = Literal["per-layer", "global"]


class _ExponentialDecay:
    """Mixin: multiply every group's ``lr`` by its ``lr_decay`` after each step.

    The decayed learning rate lives in ``param_groups``, so it is saved and restored with the
    optimizer's ``state_dict`` (checkpoints and ``--resume`` keep the schedule).
    """

    param_groups: list[dict[str, Any]]

    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)  # type: ignore[misc]
        for group in self.param_groups:
            group["lr"] *= group.get("lr_decay", 1.0)
        return loss


class DecayingLAMB(_ExponentialDecay, LAMB):
    """:class:`dpfl.optim.LAMB` with a per-step exponential learning-rate decay."""


class DecayingAdam(_ExponentialDecay, torch.optim.Adam):
    """``torch.optim.Adam`` with a per-step exponential learning-rate decay."""


class DecayingSGD(_ExponentialDecay, torch.optim.SGD):
    """``torch.optim.SGD`` with a per-step exponential learning-rate decay."""


def make_server_optimizer(
    model: nn.Module, name: ServerOptimizerName, *, lr: float, lr_decay: float = 1.0
) -> torch.optim.Optimizer:
    """The server optimizer of the paper's recipe, with exponential LR decay per round.

    Args:
        model: the server model.
        name: ``"lamb"`` (paper: LAMB, betas 0.9/0.999, eps 1e-6, no weight decay; the
            layer-wise normalization), ``"adam"`` (the same Adam without the trust ratio) or
            ``"sgd"`` (plain FedAvg-style server SGD).
        lr: initial server learning rate.
        lr_decay: factor applied to the learning rate after every round (1 = constant).

    Raises:
        ValueError: on an unknown name or invalid rates.
    """
    require_positive("lr", lr)
    require_positive("lr_decay", lr_decay)
    if lr_decay > 1:
        raise ValueError(f"lr_decay must be <= 1 (a decay), got {lr_decay}")
    # "initial_lr" keeps the configured rate beside the decayed "lr", as torch's schedulers do:
    # run_rounds compares it on resume, so the decay itself is not reported as a changed setting.
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr_decay": lr_decay,
               "initial_lr": lr}]
    if name == "lamb":
        return DecayingLAMB(groups, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    if name == "adam":
        return DecayingAdam(groups, lr, betas=(0.9, 0.999), eps=1e-6)
    if name == "sgd":
        return DecayingSGD(groups, lr)
    raise ValueError(f"server optimizer must be 'lamb', 'adam' or 'sgd', got {name!r}")


def make_clipper(
    kind: ClipName, bound: float, *, allocation: Literal["dim", "uniform"] = "dim"
) -> GlobalClip | PerLayerClip:
    """``GlobalClip(bound)`` or ``PerLayerClip(bound, allocation=...)`` (one layer per tensor).

    Raises:
        ValueError: on an unknown kind or allocation, or a bad bound.
    """
    if kind == "global":
        return GlobalClip(bound)
    if kind == "per-layer":
        return PerLayerClip(bound, allocation=allocation)
    raise ValueError(f"clip must be 'per-layer' or 'global', got {kind!r}")


def resolve_noise(
    *,
    noise_multiplier: float | None,
    sigma_dp: float | None,
    target_epsilon: float | None,
    cohort_size: float,
    population: int,
    rounds: int,
    delta: float,
    accountant: Literal["rdp", "pld"] = "rdp",
) -> tuple[float, float]:
    """Turn one of the three ways of asking for noise into ``(z, σ_DP)``.

    ``z`` is the noise multiplier on the sum (std ``z · C``) and ``σ_DP = z / S`` the std on the
    mean per unit of ``C`` (paper's parameterisation). ``target_epsilon`` is calibrated with
    :func:`dpfl.accounting.calibrate_noise_multiplier` for Poisson sampling at rate
    ``S / population`` over ``rounds`` rounds (the achieved ε is at most the target).

    Args:
        noise_multiplier: z directly.
        sigma_dp: σ_DP; z = σ_DP · S.
        target_epsilon: ε to reach after ``rounds`` rounds at ``delta``.
        cohort_size: expected cohort size S.
        population: number of users K.
        rounds: planned rounds T.
        delta: the δ of the guarantee.
        accountant: ``"rdp"`` or ``"pld"`` for calibration.

    Raises:
        ValueError: unless exactly one of the three options is given (all None means z = 0,
            i.e. no noise and no privacy: ``(0.0, 0.0)``).
    """
    given = [
        n
        for n, v in (
            ("noise_multiplier", noise_multiplier),
            ("sigma_dp", sigma_dp),
            ("target_epsilon", target_epsilon),
        )
        if v is not None
    ]
    if len(given) > 1:
        raise ValueError(
            f"give at most one of noise_multiplier, sigma_dp, target_epsilon; got {given}"
        )
    cohort_size = require_positive("cohort_size", cohort_size)
    if noise_multiplier is not None:
        z = require_non_negative("noise_multiplier", noise_multiplier)
        return z, z / cohort_size
    if sigma_dp is not None:
        s = require_non_negative("sigma_dp", sigma_dp)
        return s * cohort_size, s
    if target_epsilon is not None:
        require_positive("target_epsilon", target_epsilon)
        z = calibrate_noise_multiplier(
            target_epsilon, delta, min(1.0, cohort_size / population), rounds, accountant=accountant
        )
        return z, z / cohort_size
    return 0.0, 0.0


def make_accountant(
    name: Literal["rdp", "pld"], *, sampling: Literal["poisson", "fixed"] = "poisson"
) -> RDPAccountant | PLDAccountant:
    """A fresh accountant whose adjacency matches the sampling that is actually run.

    Poisson cohorts are accounted under add/remove-one-user adjacency (RDP or PLD); fixed-size
    cohorts drawn without replacement only under replace-one adjacency, which dp_accounting
    supports with RDP alone.

    Raises:
        ValueError: for an unknown name or sampling, or ``"pld"`` with ``"fixed"`` sampling.
    """
    if name not in ("rdp", "pld"):
        raise ValueError(f"accountant must be 'rdp' or 'pld', got {name!r}")
    if sampling == "poisson":
        return RDPAccountant() if name == "rdp" else PLDAccountant()
    if sampling == "fixed":
        if name == "pld":
            raise ValueError(
                "--sampling fixed needs --accountant rdp: fixed cohorts are accounted under "
                "replace-one adjacency, which the PLD accountant does not support"
            )
        return RDPAccountant(adjacency="replace_one")
    raise ValueError(f"sampling must be 'poisson' or 'fixed', got {sampling!r}")


@dataclass(frozen=True)
class FederatedConfig:
    """The federated fine-tuning recipe (paper, section 5), with the DP knobs.

    Attributes:
        rounds: server rounds T.
        cohort_size: expected users per round S (Poisson rate ``S / K``, or exact with
            ``sampling="fixed"``).
        local_steps: local SGD steps per user (paper: 10).
        local_lr: constant local SGD learning rate (fresh optimizer state per user).
        local_max_grad_norm: per-step gradient-norm clip of local SGD (paper: 1.0).
        server_optimizer: ``"lamb"`` (paper), ``"adam"`` or ``"sgd"``.
        server_lr: initial server learning rate.
        server_lr_decay: per-round exponential decay factor of the server learning rate.
        clip: ``"per-layer"`` (one layer per tensor) or ``"global"``.
        clip_allocation: per-layer bound allocation, ``"dim"`` (paper) or ``"uniform"``.
        clip_bound: C, the L2 bound of one user's clipped update.
        noise_multiplier: z; the noise std on the sum of updates is ``z * C``.
        accountant: ``"rdp"`` or ``"pld"``.
        delta: the δ at which ε is reported.
        sampling: ``"poisson"`` (what the accountant assumes) or ``"fixed"`` (the reference
            code's fixed-size cohorts, accounted for as such).
        seed: seed of sampling and local training (None: OS entropy). A simulation seed: a
            known sampler seed reveals the cohorts and voids amplification by sampling.
        noise_seed: seed of the DP noise, for reproducible simulations only (anyone who knows it
            can subtract the noise); ``None`` (default) draws the noise from OS entropy.
        secure_noise: draw the noise from a CSPRNG keystream rekeyed every release
            (:class:`dpfl.noise.GaussianMechanism` ``secure=True``); needs ``noise_seed=None``.
        vectorized: train each cohort at once with ``torch.func`` (dpfl's vectorized cohort
            training: the users' batches of a step padded to common shapes by
            :func:`~examples.asr.train.align_batches`); the same updates as the sequential loop
            up to float rounding, except that dropout draws other random streams. Needs a model
            without LayerDrop and no SpecAugment (else dpfl warns and falls back to the loop).
    """

    rounds: int
    cohort_size: int
    local_steps: int = 10
    local_lr: float = 0.2
    local_max_grad_norm: float | None = 1.0
    server_optimizer: ServerOptimizerName = "lamb"
    server_lr: float = 0.002
    server_lr_decay: float = 1.0
    clip: ClipName = "per-layer"
    clip_allocation: Literal["dim", "uniform"] = "dim"
    clip_bound: float = 0.01
    noise_multiplier: float = 0.0
    accountant: Literal["rdp", "pld"] = "rdp"
    delta: float = 1e-6
    sampling: Literal["poisson", "fixed"] = "poisson"
    seed: int | None = 0
    noise_seed: int | None = None
    secure_noise: bool = False
    vectorized: bool = False

    def noise_source(self) -> str:
        """Which noise the run adds, in words (printed with the results)."""
        if self.noise_multiplier == 0:
            return "none"
        if self.secure_noise:
            return "secure (CSPRNG keystream, rekeyed every release)"
        if self.noise_seed is not None:
            return f"seeded (--noise-seed {self.noise_seed}; simulation only, not private)"
        return "OS entropy (unseeded)"

    def sigma_dp(self) -> float:
        """σ_DP = z / S, the noise std on the mean update per unit of C."""
        return self.noise_multiplier / self.cohort_size

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for logs and result files."""
        return dict(asdict(self), sigma_dp=self.sigma_dp(), noise=self.noise_source())


class _TensorBatches:
    """A federated dataset whose users' :class:`Batch` es are handed out as ``BatchTensors``
    on ``device`` (tensor-only batches: what vectorized cohort training can stack)."""

    def __init__(self, dataset: FederatedDataset, device: torch.device) -> None:
        self.dataset, self.device = dataset, device

    def user_ids(self) -> Any:
        return self.dataset.user_ids()

    def user_data(self, user_id: Any) -> list[Any]:
        out: list[Any] = []
        for b in self.dataset.user_data(user_id):
            out.append(BatchTensors(*(t.to(self.device) for t in b.tensors()))
                       if isinstance(b, Batch) else b)
        return out


def checkpoint_every(config: FederatedConfig) -> int:
    """Checkpoint cadence of a stage: every round with noise, every 10 rounds without.

    A round is charged before its noise is drawn (dpfl's write-ahead journal) and stays charged;
    a run killed after round ``t`` resumes from its last checkpoint and releases the rounds after
    it again, charging them again. Checkpointing each DP round keeps that to the one round in
    flight (none when the kill falls between a checkpoint and the next charge), instead of up to
    a whole stage. Without noise nothing is charged, so fewer checkpoints cost nothing.
    """
    return 1 if config.noise_multiplier > 0 else max(1, min(10, config.rounds))


def run_federated(
    model: nn.Module,
    dataset: FederatedDataset,
    config: FederatedConfig,
    *,
    augment: Augment | None = None,
    log_path: str | PathLike[str] | None = None,
    checkpoint_dir: str | PathLike[str] | None = None,
    resume: bool = False,
    eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
    eval_every: int = 10,
    progress: bool | None = None,
    dist: DistContext | None = None,
    audit: CanaryAudit | None = None,
) -> RunResult:
    """Federated fine-tuning of ``model`` (in place) with DP-FedAvg through dpfl's round loop.

    Builds the sampler, clipper, server optimizer and accountant from ``config`` and calls
    :func:`dpfl.simulation.rounds.run_rounds` with :func:`batch_loss` as the local loss.

    Args:
        model: the seed model; fine-tuned in place.
        dataset: users -> list of :class:`Batch` (e.g. an ``InMemoryFederatedDataset``).
        config: the recipe.
        augment: optional SpecAugment for local training.
        log_path: JSON-lines round log.
        checkpoint_dir: checkpoint directory (``None``: no checkpoints), written every round
            with noise (see :func:`checkpoint_every`).
        resume: continue from ``checkpoint_dir`` if it holds a checkpoint.
        eval_fn: ``model -> metrics`` run every ``eval_every`` rounds (rank 0).
        eval_every: evaluation cadence.
        progress: progress display (see ``run_rounds``).
        dist: distributed context for ``torchrun`` runs.
        audit: optional :class:`dpfl.audit.CanaryAudit` (one-shot empirical ε in the result).

    Returns:
        The round loop's :class:`~dpfl.simulation.rounds.RunResult` (ε spent, records).

    Warning:
        Privacy: the noise is unseeded unless ``config.noise_seed`` is set (simulations only:
        anyone who knows it can remove the noise). ``config.seed`` seeds sampling and local
        training; use ``seed=None`` for a real deployment.

    References:
        arXiv:2310.00098, algorithm 1 and section 5.
    """
    population = list(dataset.user_ids())
    if config.sampling == "poisson":
        rate = min(1.0, config.cohort_size / len(population))
        sampler: PoissonSampler | FixedCohortSampler = PoissonSampler(
            population, rate, seed=config.seed
        )
    elif config.sampling == "fixed":
        sampler = FixedCohortSampler(population, config.cohort_size, seed=config.seed)
    else:
        raise ValueError(f"sampling must be 'poisson' or 'fixed', got {config.sampling!r}")
    optimizer = make_server_optimizer(
        model, config.server_optimizer, lr=config.server_lr, lr_decay=config.server_lr_decay
    )
    if config.vectorized:
        dataset = _TensorBatches(dataset, next(model.parameters()).device)
    return run_rounds(
        model,
        dataset,
        functools.partial(batch_loss, augment=augment),
        sampler=sampler,
        server_optimizer=optimizer,
        rounds=config.rounds,
        local=LocalTraining(
            lr=config.local_lr,
            steps=config.local_steps,
            max_grad_norm=config.local_max_grad_norm,
            vectorized=config.vectorized,
            align=align_batches if config.vectorized else None,
        ),
        privacy=Privacy(
            make_clipper(config.clip, config.clip_bound, allocation=config.clip_allocation),
            noise_multiplier=config.noise_multiplier,
            accountant=make_accountant(config.accountant, sampling=config.sampling),
            delta=config.delta,
            noise_seed=config.noise_seed,  # None (default): OS entropy
            secure_noise=config.secure_noise,
        ),
        seed=config.seed,
        checkpointing=None
        if checkpoint_dir is None
        else Checkpointing(checkpoint_dir, every=checkpoint_every(config), resume=resume),
        logging=Logging(log_path, progress=progress),
        evaluation=None if eval_fn is None else Evaluation(eval_fn, every=eval_every),
        dist=dist,
        audit=audit,
    )
