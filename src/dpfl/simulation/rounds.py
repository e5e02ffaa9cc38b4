"""The DP-FedAvg round loop: sample, train locally, clip+sum+noise, server step, account.

Public API:

* [`run_rounds`][dpfl.simulation.run_rounds] runs DP federated averaging on a model, in place, with
  a JSON-lines log, evaluation hooks, atomic checkpoints and resume, stop-before-budget and
  ``torch.distributed`` sharding of the cohort.
* [`RoundRecord`][dpfl.simulation.RoundRecord] is the per-round record (also one JSON line per round
  in the log).
* [`RunResult`][dpfl.simulation.RunResult] is what [`run_rounds`][dpfl.simulation.run_rounds]
  returns.

References: Pelikan et al., *Enabling Differentially Private Federated Learning for Speech
Recognition*, arXiv 2310.00098 (DP-FedAvg with user-level DP and a server optimizer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dpfl.audit.canary import CanaryAudit
from dpfl.simulation._loop import CHECKPOINT_FILE, _RoundLoop
from dpfl.simulation.config import Checkpointing, Evaluation, LocalTraining, Logging, Privacy
from dpfl.simulation.distributed import DistContext
from dpfl.simulation.records import RoundRecord, RunResult, StopReason

__all__ = ["CHECKPOINT_FILE", "RoundRecord", "RunResult", "StopReason", "run_rounds"]


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
    3. Each user trains a copy of the server model with [`train_local`][dpfl.simulation.train_local]
       (or [`train_cohort_vectorized`][dpfl.simulation.train_cohort_vectorized] if
       ``local.vectorized``); its local generator is seeded from ``(seed, t, position of the user in
       the cohort)``, so the result depends neither on which rank trains the user nor on restarts.
    4. A [`DPAggregator`][dpfl.aggregate.DPAggregator] clips each update with ``privacy.clipper``
       and sums it.
    5. **Write-ahead accounting**: ``accountant.add_rounds(sampler.round_spec(noise_multiplier))``
       charges the round, and with ``checkpointing`` a line ``{"charge": i, "round": t, "spec":
       ...}`` is appended to ``ledger.jsonl`` in the checkpoint directory and ``fsync``-ed, all
       *before* the noise is drawn. A round that fails after this point stays charged.
    6. ``release`` all-reduces the sums across ranks (``reduce=`` hook), adds Gaussian noise of
       std ``noise_multiplier * clipper.sensitivity`` **once** to the global sum and divides by
       ``sampler.expected_cohort_size``. With ``privacy.noise_seed`` every rank holds the same
       seeded generator and adds the identical noise after the all-reduce; otherwise (OS entropy,
       or ``secure_noise``) rank 0's noised mean is broadcast.
    7. [`server_step`][dpfl.optim.server_step] applies the noised mean with ``server_optimizer``
       (then ``lr_scheduler.step()`` if given).
    8. The record is logged; ``evaluation.fn`` runs when ``t % evaluation.every == 0``; a
       checkpoint is written when ``t % checkpointing.every == 0``, after the last round and on a
       budget stop.

    A checkpoint holds the state *after* round t (model, optimizer, scheduler, ledger including
    round t and the number of journal charges it holds, sampler, seeds, round index, and the noise
    generator only when ``privacy.noise_seed`` is given); the log line of round t is written
    before it. Resuming restores it, adds the journal's charges beyond the checkpoint to the
    ledger, and continues with round t + 1. Rounds released after the checkpoint by a process that
    died are re-run and charged again: after any crash and resume the ledger holds at least as
    many rounds as noised releases left the process. Each release's noise is keyed on its
    journal charge, not its round, so a re-run round draws fresh noise also when seeded (the same
    noise twice would leak the difference of the two releases with no noise at all, which no
    second charge covers). Resume refuses a checkpoint written with other privacy
    settings (noise multiplier, sensitivity, clipper configuration, sampling, adjacency,
    accountant, budget, noise mode) and a ledger with fewer rounds than the round index.

    The query: every round's clipping, noise and event come from one
    [`DPQuery`][dpfl.query.DPQuery] (``privacy.query``, or
    [`gaussian_query`][dpfl.query.gaussian_query] of ``privacy.clipper`` and
    ``privacy.noise_multiplier``). Steps 1 and 5 charge the event the query states before the
    round; step 6's release returns the event of the noise it added, and a release whose event
    differs from the charged one raises [`ReleaseEventError`][dpfl.query.ReleaseEventError] before
    its mean is applied.

    Adaptive clipping: with ``privacy.clipper`` an
    [`AdaptiveClip`][dpfl.adaptive_clip.AdaptiveClip], round t clips with the bounds fixed after
    round t − 1, the aggregator also releases the noised count (its own noise stream) and moves the
    bounds, and each round is charged as ``sampler.round_spec(noise_multiplier,
    count_noise_multiplier=z_b)``, one Gaussian of the effective multiplier. The bound(s) used in
    each round are DP releases and are logged in its record (``clip_bound``; per layer also
    ``layer_bounds``); the clipper's state (bounds, step) is checkpointed and restored on resume.

    Args:
        model: the server model; trained **in place**.
        dataset: a [`FederatedDataset`][dpfl.simulation.FederatedDataset] (``user_ids()``,
            ``user_data(uid)``).
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` for local training.
        sampler: a [`PoissonSampler`][dpfl.simulation.PoissonSampler] or
            [`FixedCohortSampler`][dpfl.simulation.FixedCohortSampler] over ``dataset``'s user ids;
            advanced in place and checkpointed.
        server_optimizer: a ``torch.optim.Optimizer`` over ``model``'s parameters.
        rounds: total number of rounds, counted across resumes.
        local: [`LocalTraining`][dpfl.simulation.LocalTraining] (learning rate, steps or epochs,
            ...).
        privacy: [`Privacy`][dpfl.simulation.Privacy] (clipper, noise multiplier, accountant, δ,
            noise seed and mode).
        seed: the *simulation* seed: local-training generators only (not the noise, see
            ``privacy.noise_seed``); ``None`` draws one from OS entropy (broadcast from rank 0
            under ``dist``; stored in checkpoints).
        lr_scheduler: optional ``torch.optim.lr_scheduler`` of ``server_optimizer``, stepped once
            per round and checkpointed.
        checkpointing: [`Checkpointing`][dpfl.simulation.Checkpointing] (directory, cadence,
            resume), or ``None`` for no checkpoints.
        logging: [`Logging`][dpfl.simulation.Logging] (JSON-lines log, progress display), or
            ``None`` for the defaults (no log, automatic progress display).
        evaluation: [`Evaluation`][dpfl.simulation.Evaluation] (hook and cadence), or ``None``.
        dist: a [`DistContext`][dpfl.simulation.DistContext] (from ``init_distributed``) or
            ``None`` for one process. Only rank 0 writes logs and checkpoints; all ranks must get
            the same arguments and read the same checkpoint directory.
        audit: a [`CanaryAudit`][dpfl.audit.CanaryAudit] to estimate the run's privacy empirically
            in
            one shot (Andrew et al., arXiv 2302.03098): its canary clients take part in each round
            with the users' inclusion probability (added to the sum on rank 0 after the real
            users, clipped and noised like them), every released iterate is observed, and the
            estimate lands in ``RunResult.audit`` and in the log (``"event": "audit"``) beside
            the accountant's ε. Canaries are not users of the population and are charged
            nothing; their updates are synthetic, so no user's data is touched. Checkpointed.

    Returns:
        A [`RunResult`][dpfl.simulation.RunResult] (rounds completed, records, stop reason, final
        ε).

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
        with the same noise seed add identical noise, so the difference of their releases has
        no noise at all (a [`SeededNoiseWarning`][dpfl.simulation.SeededNoiseWarning] at the start of every
        seeded run says so). With ``noise_seed=None`` (the default) the noise comes from OS entropy and a resumed run
        draws fresh noise. A known *sampler* seed reveals the cohorts and voids amplification by
        sampling. By default nothing that depends on the realised cohort (its size, dropped
        users, clipping statistics, cohort-dependent timings) is logged, printed or returned;
        ``Logging(unsafe_metrics=True)`` turns that on, with a warning. The mean is always
        divided by the *expected* cohort size.

    Examples:
        Three rounds on 50 synthetic users (add ``checkpointing=Checkpointing("ckpt",
        resume=True)`` and ``Logging("run.jsonl")`` for a real run):

        >>> import torch
        >>> from torch import nn
        >>> from dpfl import GlobalClip, RDPAccountant
        >>> from dpfl.simulation import (
        ...     InMemoryFederatedDataset, LocalTraining, Logging, PoissonSampler, Privacy)
        >>> gen = torch.Generator().manual_seed(0)
        >>> dataset = InMemoryFederatedDataset({
        ...     user: [(torch.randn(8, 4, generator=gen), torch.randint(2, (8,), generator=gen))]
        ...     for user in range(50)})
        >>> model = nn.Linear(4, 2)
        >>> result = run_rounds(
        ...     model, dataset, lambda m, batch: nn.functional.cross_entropy(m(batch[0]), batch[1]),
        ...     sampler=PoissonSampler(dataset.user_ids(), sample_rate=0.2, seed=0),
        ...     server_optimizer=torch.optim.SGD(model.parameters(), lr=1.0), rounds=3,
        ...     local=LocalTraining(lr=0.1, steps=1),
        ...     privacy=Privacy(GlobalClip(0.1), noise_multiplier=1.0,
        ...                     accountant=RDPAccountant(), delta=1e-6),
        ...     logging=Logging(progress=False))
        >>> result.stop_reason, result.rounds_completed
        ('completed', 3)

    References:
        Pelikan et al., arXiv 2310.00098, algorithm 1 (DP-FedAvg with a server optimizer).
    """
    arguments = dict(locals())  # run_rounds' own signature is the one parameter list
    return _RoundLoop(arguments).run()
