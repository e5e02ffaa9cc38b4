"""Mechanism-level audits: canary in/out trials of a Gaussian release or a whole DP aggregator.

* [`audit_gaussian_mechanism`][dpfl.audit.audit_gaussian_mechanism] audits the noise of a
  [`GaussianMechanism`][dpfl.noise.GaussianMechanism] (or any object with ``add_noise`` and
  ``sensitivity``): the canary is the value ``C`` (the sensitivity) added to one coordinate, out
  trials release ``0``. Every coordinate of one ``add_noise`` call is one trial, which is valid
  because the mechanism must add independent noise to every coordinate (a property
  [`dpfl.noise`][dpfl.noise] is tested for); billions of trials cost seconds per 10⁸.
* [`audit_aggregator`][dpfl.audit.audit_aggregator] audits one
  [`DPAggregator`][dpfl.aggregate.DPAggregator] release end to end (validation, clipping with any
  clipper, accumulation, noise, fixed denominator): one release per trial, the canary is a random
  update at the clip bound, the score its projection.

Both score trials in units of the sensitivity (in-trials centre on 1, out-trials on 0) and bound
ε with [`ThresholdAudit`][dpfl.audit.ThresholdAudit] over a grid from
[`tail_thresholds`][dpfl.audit.tail_thresholds] that reaches ~9 claimed standard deviations into the
tail, so a sampler whose tail is cut short of that shows up once enough trials land past the cut.

References:
    Jagielski, Ullman & Oprea, arXiv 2006.07709; Nasr et al., arXiv 2101.04535.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from dpfl._checks import require_int, require_non_negative
from dpfl.adaptive_clip import AdaptiveClip
from dpfl.aggregate import DPAggregator
from dpfl.audit.bounds import AuditBound, ThresholdAudit
from dpfl.audit.canary import canary_update

__all__ = [
    "NoiseRelease",
    "audit_aggregator",
    "audit_gaussian_mechanism",
    "gaussian_mechanism_trials",
    "tail_thresholds",
]


class NoiseRelease(Protocol):
    """What [`audit_gaussian_mechanism`][dpfl.audit.audit_gaussian_mechanism] needs.

    A sensitivity and ``add_noise``, as [`GaussianMechanism`][dpfl.noise.GaussianMechanism] has.
    """

    sensitivity: float
    """The L2 sensitivity the mechanism claims to be calibrated for."""

    def add_noise(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Return noised copies of ``tensors`` (one release of the mechanism under audit).

        Args:
            tensors: Name -> tensor to noise (left unchanged).
        """
        ...


def tail_thresholds(
    noise_multiplier: float, *, max_sigmas: float = 9.0, step: float = 0.25
) -> np.ndarray:
    """Score thresholds for an audit of a release *claimed* to have noise multiplier ``z``.

    Scores are in units of the sensitivity (out ~ N(0, z²), in ~ N(1, z²) for an honest release);
    the grid is ``0.5`` (the midpoint) and ``z · k`` for ``k = 0, step, …, max_sigmas``. Fix it
    from the *accounted* multiplier, never from the trials.

    Args:
        noise_multiplier: The claimed noise multiplier ``z >= 0``.
        max_sigmas: The largest threshold, in multiples of ``z`` (default 9).
        step: The grid step, in multiples of ``z`` (default 0.25).

    Raises:
        ValueError: if an argument is negative or ``step`` is not > 0.
    """
    z = require_non_negative("noise_multiplier", noise_multiplier)
    top = require_non_negative("max_sigmas", max_sigmas)
    if not step > 0:
        raise ValueError(f"step must be > 0, got {step!r}")
    ks = np.arange(0.0, top + step / 2, step)
    return np.unique(np.concatenate([[0.5], z * ks]))


def gaussian_mechanism_trials(
    mechanism: NoiseRelease,
    *,
    trials: int,
    trials_in: int | None = None,
    thresholds: Sequence[float] | np.ndarray | None = None,
    batch_size: int = 2**22,
) -> ThresholdAudit:
    """Run canary-out and canary-in trials of a Gaussian release; return the counts.

    Out trials release ``add_noise(0)``, in trials ``add_noise(C)`` with ``C =
    mechanism.sensitivity``; the score is the released value divided by ``C`` (out ~ N(0, z²),
    in ~ N(1, z²) for an honest mechanism). Every coordinate of one ``add_noise`` call is one
    trial. Call [`bound`][dpfl.audit.ThresholdAudit.bound] on the result, or read its
    counts (e.g. for a tail test of the sampler).

    Args:
        mechanism: a [`GaussianMechanism`][dpfl.noise.GaussianMechanism] or any
            [`NoiseRelease`][dpfl.audit.NoiseRelease].
        trials: number of out trials (the false-positive side, which the far tail needs most).
        trials_in: number of in trials (default ``trials``).
        thresholds: score grid; default [`tail_thresholds`][dpfl.audit.tail_thresholds] of
            ``mechanism.noise_multiplier`` (the claimed multiplier).
        batch_size: trials per ``add_noise`` call (memory: ~12 bytes per trial).

    Raises:
        ValueError: on a bad count, or without ``thresholds`` for a mechanism that has no
            ``noise_multiplier``.
    """
    trials = require_int("trials", trials, minimum=1)
    n_in = trials if trials_in is None else require_int("trials_in", trials_in, minimum=1)
    batch = require_int("batch_size", batch_size, minimum=1)
    if thresholds is None:
        z = getattr(mechanism, "noise_multiplier", None)
        if z is None:
            raise ValueError("pass thresholds= for a mechanism without a noise_multiplier")
        thresholds = tail_thresholds(z)
    audit = ThresholdAudit(thresholds)
    c = float(mechanism.sensitivity)
    for canary, count in ((False, trials), (True, n_in)):
        done = 0
        while done < count:
            b = min(batch, count - done)
            value = torch.full((b,), c if canary else 0.0, dtype=torch.float32)
            noised = mechanism.add_noise({"canary": value})["canary"]
            audit.observe(noised / c, canary=canary)
            done += b
    return audit


def audit_gaussian_mechanism(
    mechanism: NoiseRelease,
    *,
    trials: int,
    delta: float,
    confidence: float = 0.95,
    trials_in: int | None = None,
    thresholds: Sequence[float] | np.ndarray | None = None,
    batch_size: int = 2**22,
) -> AuditBound:
    """Empirical ε lower bound of a Gaussian release from canary in/out trials.

    Runs [`gaussian_mechanism_trials`][dpfl.audit.gaussian_mechanism_trials] and bounds ε at
    ``delta`` with probability ``confidence``. An honest mechanism's bound stays below the
    accountant's ε (but for the ``1 − confidence`` chance of a false alarm); noise smaller than
    accounted, or a sampler whose tail is cut short of the grid, pushes it above once there are
    enough trials.

    Args:
        mechanism: the release under audit (as in
            [`gaussian_mechanism_trials`][dpfl.audit.gaussian_mechanism_trials]).
        trials: number of out-trials (as in
            [`gaussian_mechanism_trials`][dpfl.audit.gaussian_mechanism_trials]).
        trials_in: number of in-trials (as in
            [`gaussian_mechanism_trials`][dpfl.audit.gaussian_mechanism_trials]).
        thresholds: the score thresholds (as in
            [`gaussian_mechanism_trials`][dpfl.audit.gaussian_mechanism_trials]).
        batch_size: trials per release (as in
            [`gaussian_mechanism_trials`][dpfl.audit.gaussian_mechanism_trials]).
        delta: δ of the bound, in (0, 1).
        confidence: probability that the returned ε is a valid lower bound.

    Examples:
        >>> from dpfl.noise import GaussianMechanism
        >>> bound = audit_gaussian_mechanism(GaussianMechanism(1.0, 1.0, seed=0),
        ...                                  trials=100_000, delta=1e-5)
        >>> 1.0 < bound.epsilon < 4.38  # accountant (exact): 4.377
        True
    """
    audit = gaussian_mechanism_trials(
        mechanism, trials=trials, trials_in=trials_in, thresholds=thresholds, batch_size=batch_size
    )
    return audit.bound(delta, confidence=confidence)


def audit_aggregator(
    aggregator: DPAggregator,
    template: Mapping[str, Tensor],
    *,
    trials: int,
    delta: float,
    confidence: float = 0.95,
    thresholds: Sequence[float] | np.ndarray | None = None,
    background: Sequence[Mapping[str, Tensor]] = (),
    seed: int | None = None,
) -> AuditBound:
    """Empirical ε lower bound of one [`DPAggregator`][dpfl.aggregate.DPAggregator] release.

    Trial ``i`` adds the ``background`` updates (the same every trial) and, for even ``i``, the
    canary; then ``release(allow_empty=True)``. The canary is a random direction (from ``seed``)
    scaled per layer to the clipper's bounds, so it is a full-strength user under any clipper;
    the score is the projection of ``expected_cohort_size · mean`` on the canary direction minus
    the background's known clipped projection, divided by the sensitivity. Uses the aggregator's
    own mechanism (and its generator) for the noise.

    Args:
        aggregator: the aggregator under audit, with no pending users.
        template: an update fixing names, shapes, dtypes and devices.
        trials: number of releases; half with the canary in.
        delta: δ of the bound, in (0, 1) (as in
            [`audit_gaussian_mechanism`][dpfl.audit.audit_gaussian_mechanism]).
        confidence: probability that the returned ε is a valid lower bound.
        thresholds: score thresholds (default: a grid from
            ``aggregator.mechanism.noise_multiplier``).
        background: other users' updates added in every trial.
        seed: seed of the canary direction (``None``: OS entropy).

    Raises:
        ValueError: if ``trials < 2`` or the aggregator holds pending users (nothing changes).
    """
    trials = require_int("trials", trials, minimum=2)
    if isinstance(aggregator.clipper, AdaptiveClip):
        raise ValueError(
            "the mechanism audit needs a fixed clipper; audit an aggregator built with "
            "aggregator.clipper.clipper() (the current round's GlobalClip/PerLayerClip) instead"
        )
    if aggregator.num_users:
        raise ValueError(
            f"aggregator holds {aggregator.num_users} pending user(s); release them before auditing"
        )
    if thresholds is None:
        thresholds = tail_thresholds(aggregator.mechanism.noise_multiplier)
    audit = ThresholdAudit(thresholds)
    gen = torch.Generator().manual_seed(seed if seed is not None else _entropy())
    canary = canary_update(template, aggregator.clipper, gen)
    direction = _unit(canary)
    c = aggregator.clipper.sensitivity
    names = list(direction)
    flat_dir = torch.cat([direction[k].reshape(-1) for k in names])
    offset = sum((_dot(aggregator.clipper.clip(b)[0], flat_dir, names) for b in background), 0.0)
    size = aggregator.expected_cohort_size
    scores: dict[bool, list[float]] = {True: [], False: []}
    for i in range(trials):
        for b in background:
            aggregator.add(b)
        if i % 2 == 0:
            aggregator.add(canary)
        mean, _ = aggregator.release(allow_empty=True)
        scores[i % 2 == 0].append((_dot(mean, flat_dir, names) * size - offset) / c)
    for kind, values in scores.items():
        audit.observe(values, canary=kind)
    return audit.bound(delta, confidence=confidence)


def _entropy() -> int:
    import secrets

    return secrets.randbits(63)


def _unit(update: Mapping[str, Tensor]) -> dict[str, Tensor]:
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))
    return {k: t.detach().to("cpu", torch.float64) / norm for k, t in update.items()}


def _dot(a: Mapping[str, Any], flat_b: Tensor, names: list[str]) -> float:
    flat_a = torch.cat([a[k].detach().reshape(-1).to("cpu", torch.float64) for k in names])
    return float(flat_a @ flat_b)
