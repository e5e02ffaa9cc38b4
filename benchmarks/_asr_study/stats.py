"""The plan's statistics: paired summaries, the verdict rule, power, sample size, Welch intervals.

Everything here follows ``benchmarks/results/asr_privacy_utility/v2/PLAN.md`` ("Primary metric
and tests"). Differences are oriented so that positive supports the paper's claim.

- Paired summary of differences d_1..d_n: mean, sample sd, 95% CI (t, n − 1 degrees of freedom)
  and the 90% CI of the two one-sided tests (TOST at α = 0.05).
- Verdict (mechanical, in this order): *reproduced* if the 95% CI lies above 0; *reversed* if it
  lies below 0; *not reproduced* if the 90% CI lies inside (−m, +m); else *inconclusive*.
- Power: the smallest effect a two-sided paired t test at α = 0.05 detects with 80% power at the
  observed sd and n: (t_{0.975,n−1} + t_{0.8,n−1})·sd/√n.
- Sample size that would decide an inconclusive claim, at the observed mean and sd: the
  smallest n whose 95% CI half-width falls below |mean| (a sign decision), and the smallest n
  whose 90% CI at the observed mean lies inside (−m, +m), i.e. whose half-width falls below
  m − |mean| (an equivalence decision; impossible at the observed mean if |mean| ≥ m).
- Depth growth: a Welch interval for the difference of two independent means.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as _st

REPRODUCED = "reproduced"
REVERSED = "reversed"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
MAX_N = 1_000_000


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom."""
    return float(_st.t.ppf(p, df))


def half_width(sd: float, n: int, level: float) -> float:
    """Half-width of the two-sided ``level`` t confidence interval of a mean of n values."""
    return t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)


@dataclass(frozen=True)
class Paired:
    """Summary of paired differences (positive = the paper's direction).

    Attributes:
        n, mean, sd: count, mean and sample standard deviation.
        ci95, ci90: two-sided t intervals (n − 1 degrees of freedom).
        favour: how many differences are > 0 (the paper's side) and < 0 (the other side).
    """

    n: int
    mean: float
    sd: float
    ci95: tuple[float, float]
    ci90: tuple[float, float]
    favour: tuple[int, int]


def paired(diffs: Sequence[float]) -> Paired | None:
    """The summary of ``diffs`` (None with fewer than 2 values or a non-finite one)."""
    d = [float(x) for x in diffs]
    if len(d) < 2 or not all(math.isfinite(x) for x in d):
        return None
    n, m, sd = len(d), statistics.fmean(d), statistics.stdev(d)
    h95, h90 = half_width(sd, n, 0.95), half_width(sd, n, 0.90)
    return Paired(n, m, sd, (m - h95, m + h95), (m - h90, m + h90),
                  (sum(x > 0 for x in d), sum(x < 0 for x in d)))


def verdict(s: Paired | None, margin: float | None) -> str:
    """The plan's verdict for summary ``s`` with equivalence margin ``margin`` (> 0; None: not
    available, so *not reproduced* cannot be reached)."""
    if s is None:
        return "not yet measured"
    if s.ci95[0] > 0:
        return REPRODUCED
    if s.ci95[1] < 0:
        return REVERSED
    if margin is not None and margin > 0 and -margin < s.ci90[0] and s.ci90[1] < margin:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def min_detectable_effect(sd: float, n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """(t_{1−α/2,n−1} + t_{power,n−1})·sd/√n: the smallest true mean difference a two-sided
    paired t test at ``alpha`` detects with probability ``power`` (the plan's approximation)."""
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def _smallest_n(target: float, sd: float, level: float) -> int | None:
    """Smallest n ≥ 2 whose ``level`` CI half-width at ``sd`` is below ``target`` (None if none
    up to :data:`MAX_N`)."""
    if target <= 0:
        return None
    if sd == 0:
        return 2
    if half_width(sd, MAX_N, level) >= target:
        return None
    lo, hi = 1, MAX_N  # half_width decreases in n: bisect for the first n that fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if half_width(sd, mid, level) < target:
            hi = mid
        else:
            lo = mid
    return max(2, hi)


@dataclass(frozen=True)
class SampleSize:
    """Pairs needed at the observed mean and sd: for a sign decision (95% CI excludes 0) and
    for an equivalence decision (90% CI inside ±m); None where unreachable."""

    sign: int | None
    equivalence: int | None

    @property
    def decide(self) -> int | None:
        options = [n for n in (self.sign, self.equivalence) if n is not None]
        return min(options) if options else None


def sample_size(s: Paired, margin: float | None) -> SampleSize:
    """Pairs that would decide a claim with summary ``s`` (see the module docstring)."""
    sign = _smallest_n(abs(s.mean), s.sd, 0.95) if s.mean != 0 else None
    equiv = None
    if margin is not None and margin > 0:
        equiv = _smallest_n(margin - abs(s.mean), s.sd, 0.90)
    return SampleSize(sign, equiv)


@dataclass(frozen=True)
class Welch:
    """Difference of two independent means (b − a) with Welch's t intervals."""

    diff: float
    se: float
    df: float
    ci95: tuple[float, float]
    ci90: tuple[float, float]
    n: tuple[int, int]


def welch(a: Sequence[float], b: Sequence[float]) -> Welch | None:
    """mean(b) − mean(a) with the Welch–Satterthwaite degrees of freedom (None with fewer than
    two values on a side or a non-finite value)."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2 or not all(math.isfinite(x) for x in (*a, *b)):
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(b) - statistics.fmean(a)
    se = math.sqrt(va + vb)
    if se == 0:
        return Welch(diff, 0.0, math.inf, (diff, diff), (diff, diff), (len(a), len(b)))
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    h95, h90 = t_quantile(0.975, df) * se, t_quantile(0.95, df) * se
    return Welch(diff, se, df, (diff - h95, diff + h95), (diff - h90, diff + h90), (len(a), len(b)))


def welch_verdict(w: Welch | None, margin: float | None) -> str:
    """The plan's verdict rule applied to a Welch interval."""
    if w is None:
        return "not yet measured"
    return verdict(Paired(sum(w.n), w.diff, math.nan, w.ci95, w.ci90, (0, 0)), margin)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """Mean and ``level`` t interval of independent values (None with fewer than 2)."""
    v = [float(x) for x in values]
    if len(v) < 2 or not all(math.isfinite(x) for x in v):
        return None
    m = statistics.fmean(v)
    h = half_width(statistics.stdev(v), len(v), level)
    return m, m - h, m + h


def welch_power(w: Welch) -> float:
    """The Welch analogue of :func:`min_detectable_effect`: (t_{0.975,df} + t_{0.8,df})·se."""
    return (t_quantile(0.975, w.df) + t_quantile(0.8, w.df)) * w.se


def welch_sample_size(a: Sequence[float], b: Sequence[float], margin: float | None) -> SampleSize:
    """Seeds per depth (the same n on both sides) that would decide a Welch comparison at the
    observed variances and difference (sign: 95% half-width below |diff|; equivalence: 90%
    half-width below m − |diff|), with the Welch–Satterthwaite degrees of freedom for that n."""
    va, vb = statistics.variance(a), statistics.variance(b)
    diff = statistics.fmean(b) - statistics.fmean(a)

    def hw(n: int, level: float) -> float:
        if va + vb == 0:
            return 0.0
        df = (va + vb) ** 2 * (n - 1) / (va ** 2 + vb ** 2)
        return t_quantile(0.5 + level / 2, df) * math.sqrt((va + vb) / n)

    def smallest(target: float, level: float) -> int | None:
        if target <= 0:
            return None
        if hw(MAX_N, level) >= target:
            return None
        lo, hi = 1, MAX_N
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if hw(mid, level) < target:
                hi = mid
            else:
                lo = mid
        return max(2, hi)

    sign = smallest(abs(diff), 0.95) if diff != 0 else None
    equiv = smallest(margin - abs(diff), 0.90) if margin is not None and margin > 0 else None
    return SampleSize(sign, equiv)
