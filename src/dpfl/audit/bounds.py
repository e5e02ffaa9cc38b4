"""Lower bounds on ε from canary in/out trials: threshold tests and Clopper–Pearson intervals.

An auditor runs a release many times with a canary *in* (the neighbouring dataset with the
canary) and *out*, and reduces each output to a score (higher = "canary in"). A threshold test
"in if score > t" has a false-positive rate FPR(t) on *out* trials and a false-negative rate
FNR(t) on *in* trials. Every (ε, δ)-DP mechanism satisfies, for every t (Kairouz, Oh &
Viswanath, Theorem 2.1),

    FPR + e^ε · FNR >= 1 − δ   and   FNR + e^ε · FPR >= 1 − δ,

so ``ε >= log((1 − δ − FNR) / FPR)`` and ``ε >= log((1 − δ − FPR) / FNR)``. With finitely many
trials the rates are replaced by one-sided Clopper–Pearson upper bounds; the resulting ε is a lower
bound on the mechanism's true ε(δ) holding with the stated confidence.

[`ThresholdAudit`][dpfl.audit.ThresholdAudit] streams scores into counts at a grid of thresholds
fixed *before* the
trials (no threshold is picked after seeing the data, so no split is needed): every one of the
``2m`` rate bounds of ``m`` thresholds gets ``(1 − confidence) / (2m)`` (Bonferroni), and the bound
is the best over the grid. A grid that reaches into the far tail of the *out* scores detects a
noise sampler whose tail is truncated: past the cutoff no *out* score ever lands while *in*
scores still do, and the bound grows with the number of trials without limit.

References:
    Jagielski, Ullman & Oprea, "Auditing Differentially Private Machine Learning: How Private is
    Private SGD?", NeurIPS 2020, arXiv 2006.07709.
    Nasr et al., "Adversary Instantiation: Lower Bounds for Differentially Private Machine
    Learning", IEEE S&P 2021, arXiv 2101.04535.
    Kairouz, Oh & Viswanath, "The Composition Theorem for Differential Privacy", ICML 2015.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats

from dpfl._checks import require_int, require_probability

__all__ = ["AuditBound", "ThresholdAudit", "clopper_pearson_upper", "epsilon_from_rates"]


def clopper_pearson_upper(successes: int, trials: int, alpha: float) -> float:
    """One-sided Clopper–Pearson upper bound on a binomial rate, holding with prob. ``1 − alpha``.

    Args:
        successes: Observed count, ``0 <= successes <= trials``.
        trials: Number of trials, ``>= 1``.
        alpha: Error probability in (0, 1).

    Raises:
        ValueError: if a count is out of range or ``alpha`` is outside (0, 1).

    Examples:
        >>> round(clopper_pearson_upper(0, 1000, 0.05), 5)  # the "rule of three": ~3/n
        0.00299
    """
    trials = require_int("trials", trials, minimum=1)
    successes = require_int("successes", successes, minimum=0)
    if successes > trials:
        raise ValueError(f"successes ({successes}) must be <= trials ({trials})")
    alpha = require_probability("alpha", alpha, high_open=True)
    if successes == trials:
        return 1.0
    return float(stats.beta.ppf(1.0 - alpha, successes + 1, trials - successes))


def epsilon_from_rates(
    false_positive_rate: float, false_negative_rate: float, delta: float
) -> float:
    """The smallest ε compatible with a test's (FPR, FNR) at ``delta`` (0 if none is implied).

    Returns ``max(0, log((1−δ−FNR)/FPR), log((1−δ−FPR)/FNR))``, ``inf`` when a rate is 0 and the
    other leaves room (a test that never errs on one side).

    Args:
        false_positive_rate: The test's FPR (canary out, test says in), in [0, 1].
        false_negative_rate: The test's FNR (canary in, test says out), in [0, 1].
        delta: The δ at which ε is stated, in (0, 1].

    Raises:
        ValueError: if a rate is outside [0, 1] or ``delta`` outside (0, 1].
    """
    fpr = require_probability("false_positive_rate", false_positive_rate, low_open=False)
    fnr = require_probability("false_negative_rate", false_negative_rate, low_open=False)
    delta = require_probability("delta", delta)
    best = 0.0
    for err, other in ((fpr, fnr), (fnr, fpr)):
        num = 1.0 - delta - other
        if num <= 0.0:
            continue
        best = max(best, math.inf if err == 0.0 else math.log(num / err))
    return best


@dataclass(frozen=True)
class AuditBound:
    """An empirical lower bound on ε from in/out trials, and the evidence behind it.

    Attributes:
        epsilon: Lower bound on the release's ε(δ), holding with probability ``confidence``.
        delta: The δ of the bound.
        confidence: Probability (over the trials) that ``epsilon`` is a valid lower bound.
        threshold: The grid threshold that gave the bound (``nan`` if no threshold gave ε > 0).
        false_positives: *Out* trials scoring above ``threshold``.
        false_negatives: *In* trials scoring at or below ``threshold``.
        trials_in: Number of *in* trials.
        trials_out: Number of *out* trials.
        fpr_upper: Clopper–Pearson upper bound on the false-positive rate at ``threshold``.
        fnr_upper: Clopper–Pearson upper bound on the false-negative rate at ``threshold``.
        thresholds: Number of grid thresholds the confidence was split over.
    """

    epsilon: float
    delta: float
    confidence: float
    threshold: float
    false_positives: int
    false_negatives: int
    trials_in: int
    trials_out: int
    fpr_upper: float
    fnr_upper: float
    thresholds: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``inf``/``nan`` become ``None``)."""
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self).items()
        }


class ThresholdAudit:
    """Streaming threshold test over a fixed grid: count scores, then bound ε with confidence.

    Args:
        thresholds: The pre-registered score thresholds (finite, at least one; sorted and
            de-duplicated here). Fix them before running trials.

    Raises:
        ValueError: if ``thresholds`` is empty or holds a non-finite value.

    Examples:
        >>> audit = ThresholdAudit([0.5, 1.0])
        >>> audit.observe(torch.tensor([2.0, 3.0, 0.7]), canary=True)
        >>> audit.observe(torch.tensor([0.1, -1.0, 0.6]), canary=False)
        >>> audit.counts_above(canary=False)
        [1, 0]
    """

    def __init__(self, thresholds: Sequence[float] | np.ndarray | torch.Tensor) -> None:
        grid = np.unique(np.asarray(thresholds, dtype=np.float64).ravel())
        if grid.size == 0:
            raise ValueError("thresholds must hold at least one value")
        if not np.all(np.isfinite(grid)):
            raise ValueError(f"thresholds must be finite, got {grid.tolist()!r}")
        self.thresholds = grid
        self._grid = torch.from_numpy(grid)
        self._above = {True: np.zeros(grid.size, np.int64), False: np.zeros(grid.size, np.int64)}
        self._n = {True: 0, False: 0}

    @property
    def trials_in(self) -> int:
        """Scores observed with the canary in."""
        return self._n[True]

    @property
    def trials_out(self) -> int:
        """Scores observed with the canary out."""
        return self._n[False]

    def observe(self, scores: torch.Tensor | np.ndarray | Sequence[float], *, canary: bool) -> None:
        """Count a batch of scores of trials with the canary in (``canary=True``) or out.

        Args:
            scores: One score per trial (any shape, flattened).
            canary: ``True`` for trials with the canary in, ``False`` for trials without it.

        Raises:
            ValueError: if a score is NaN (nothing is counted then).
        """
        s = torch.as_tensor(scores).detach().flatten().cpu()
        if not s.is_floating_point():
            s = s.double()
        if bool(torch.isnan(s).any()):
            raise ValueError("scores must not be NaN")
        n = int(s.numel())
        # Only scores above the lowest threshold are ever counted: keep those (with a margin for
        # the comparison in the scores' dtype) and bucket them exactly in float64.
        lo = float(self.thresholds[0])
        s = s[s > lo - abs(lo) * 1e-6 - 1e-300].double()
        # bucket b counts scores in (t[b-1], t[b]]: scores above t[j] are those in buckets > j.
        buckets = torch.bucketize(s, self._grid, right=False)
        hist = torch.bincount(buckets, minlength=self.thresholds.size + 1).numpy()
        above = np.cumsum(hist[::-1])[::-1][1:]
        self._above[bool(canary)] += above
        self._n[bool(canary)] += n

    def counts_above(self, *, canary: bool) -> list[int]:
        """Number of scores strictly above each threshold, for in (``True``) or out trials.

        Args:
            canary: ``True`` for the trials with the canary in, ``False`` for those without.
        """
        return [int(c) for c in self._above[bool(canary)]]

    def bound(self, delta: float, *, confidence: float = 0.95) -> AuditBound:
        """The ε lower bound at ``delta``, valid with probability ``confidence``.

        Args:
            delta: The δ of the bound, in (0, 1).
            confidence: The probability that the bound holds, in (0, 1); split over the
                thresholds (Bonferroni) and the two error rates.

        Raises:
            ValueError: if ``delta`` or ``confidence`` is outside (0, 1), or no trial of one kind
                has been observed.
        """
        delta = require_probability("delta", delta, high_open=True)
        confidence = require_probability("confidence", confidence, high_open=True)
        n_in, n_out = self._n[True], self._n[False]
        if n_in == 0 or n_out == 0:
            raise ValueError(
                f"need trials with the canary in and out, got {n_in} in and {n_out} out"
            )
        m = self.thresholds.size
        alpha = (1.0 - confidence) / (2 * m)
        best = AuditBound(0.0, delta, confidence, math.nan, 0, 0, n_in, n_out, 1.0, 1.0, m)
        for j, t in enumerate(self.thresholds):
            fp = int(self._above[False][j])
            fn = n_in - int(self._above[True][j])
            fpr_hi = clopper_pearson_upper(fp, n_out, alpha)
            fnr_hi = clopper_pearson_upper(fn, n_in, alpha)
            eps = epsilon_from_rates(fpr_hi, fnr_hi, delta)
            if eps > best.epsilon:
                best = AuditBound(
                    eps, delta, confidence, float(t), fp, fn, n_in, n_out, fpr_hi, fnr_hi, m
                )
        return best
