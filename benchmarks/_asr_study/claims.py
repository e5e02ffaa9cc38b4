"""The claims of PLAN.md computed from the finished cells: pairing, margins, gates and verdicts.

Only cells of the current study count (:meth:`Study.is_current`: protocol version 2, the same
protocol and the depth's current seed model); v1 cells and stale cells are never mixed in.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from benchmarks._asr_study.grid import Arm, Study, metric, sweep_result
from benchmarks._asr_study.stats import (
    Paired,
    SampleSize,
    Welch,
    min_detectable_effect,
    paired,
    sample_size,
    verdict,
    welch,
    welch_power,
    welch_sample_size,
    welch_verdict,
)

METRICS = ("cer", "wer")
Slot = tuple[int, str, str, float, float, int | None, int | None, float | None]
"""(depth, clip, optimizer, σ_DP, server LR, cohort size, local steps, clip start)."""


class Cells:
    """The current study's finished cells, indexed by configuration then seed."""

    def __init__(self, study: Study, records: list[dict[str, Any]], sigma_star: float | None) -> None:
        self.study = study
        self.sigma_star = sigma_star
        self.current = [r for r in records if study.is_current(r)]
        self.stale = len(records) - len(self.current)
        self.done = {r["key"]: r for r in self.current}
        self.index: dict[Slot, dict[int, dict[str, Any]]] = {}
        for r in self.current:
            c = r["cell"]
            slot = (c["n_layers"], c["clip"], c["optimizer"], c["sigma_dp"], c["server_lr"],
                    c["cohort_size"], c["local_steps"], c["clip_start"])
            self.index.setdefault(slot, {})[c["seed"]] = r
        self._lrs: dict[tuple[int, Arm], float | None] = {}

    def lr(self, depth: int, arm: Arm) -> float | None:
        """The arm's tuned server LR at ``depth`` (None before σ* or while its sweep runs)."""
        if self.sigma_star is None:
            return None
        if (depth, arm) not in self._lrs:
            self._lrs[(depth, arm)] = sweep_result(self.study, self.done, arm, depth, self.sigma_star)["chosen"]
        return self._lrs[(depth, arm)]

    def get(self, depth: int, clip: str, opt: str, sigma: float | None, *, cohort: int | None = None,
            local: int | None = None, start: float | None = None, lr_arm: Arm | None = None) -> dict[int, dict[str, Any]]:
        """Seed -> record of an arm at its tuned LR (adaptive modes use ``lr_arm``'s LR)."""
        lr = self.lr(depth, lr_arm or (clip, opt))
        if lr is None or sigma is None:
            return {}
        return self.index.get((depth, clip, opt, sigma, lr, cohort, local, start), {})


def values(cells: Mapping[int, Mapping[str, Any]], name: str) -> list[float]:
    """``name`` (cer/wer) in points of each seed's record, in seed order."""
    return [100 * metric(cells[s], name) for s in sorted(cells)]


def pair(a: Mapping[int, Mapping[str, Any]], b: Mapping[int, Mapping[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """Seeds both have and the differences a − b in points (positive: b is better)."""
    seeds = sorted(set(a) & set(b))
    return seeds, [100 * (metric(a[s], name) - metric(b[s], name)) for s in seeds]


# --------------------------------------------------------------------------- depth gates and margins
@dataclass
class DepthStatus:
    """Whether a depth's model works (PLAN.md: the gate), its noise cost and margins."""

    depth: int
    seed_cer: float | None
    seed_wer: float | None
    no_verdict: str | None
    noise_cost: dict[str, float | None] = field(default_factory=dict)
    margin: dict[str, float | None] = field(default_factory=dict)
    no_noise_cer: float | None = None


def depth_status(cells: Cells, depth: int, seed_entry: Mapping[str, Any] | None) -> DepthStatus:
    """The gate (seed CER and no-noise improvement), noise cost and margin m at ``depth``."""
    study = cells.study
    seed_cer = seed_entry.get("eval_cer") if seed_entry and seed_entry.get("seed_id") == study.seed_ids[depth] else None
    seed_wer = seed_entry.get("eval_wer") if seed_cer is not None else None  # type: ignore[union-attr]
    st = DepthStatus(depth, seed_cer, seed_wer, None)
    if seed_cer is not None and not seed_cer <= study.protocol.cer_gate:
        st.no_verdict = (f"no verdict (model does not work): seed eval CER {100 * seed_cer:.1f}% > "
                         f"{100 * study.protocol.cer_gate:.0f}%")
    clean = [r for slot, by_seed in cells.index.items() if slot[0] == depth and slot[3] == 0.0
             and slot[5:] == (None, None, None) for r in by_seed.values()]
    if clean:
        st.no_noise_cer = statistics.fmean(metric(r, "cer") for r in clean)
        if seed_cer is not None and st.no_verdict is None and not st.no_noise_cer < seed_cer:
            st.no_verdict = (f"no verdict (model does not work): no-noise cells (mean CER "
                             f"{100 * st.no_noise_cer:.1f}%) do not improve on the seed model ({100 * seed_cer:.1f}%)")
    for name in METRICS:
        noisy = cells.get(depth, "global", "lamb", cells.sigma_star)
        quiet = cells.get(depth, "global", "lamb", 0.0)
        cost = None
        if noisy and quiet:
            cost = statistics.fmean(values(noisy, name)) - statistics.fmean(values(quiet, name))
        st.noise_cost[name] = cost
        f = study.protocol.margin_fraction
        st.margin[name] = f * cost if cost is not None and math.isfinite(cost) and cost > 0 else None
    return st


# --------------------------------------------------------------------------- claims
@dataclass
class ClaimRow:
    """One claim at one depth, level and metric, with the plan's statistics."""

    claim: str
    label: str
    depth: int | str
    level: str
    metric: str
    seeds: list[int]
    diffs: list[float]
    summary: Paired | Welch | None
    margin: float | None
    verdict: str
    mde: float | None = None
    needed: SampleSize | None = None
    codes: set[str] = field(default_factory=set)
    diverged: int = 0


def _codes(*groups: Mapping[int, Mapping[str, Any]]) -> set[str]:
    return {r.get("code", {}).get("hash", "?") for g in groups for r in g.values()}


#: Claims 1 and 2 as (id, label, arm a, arm b): d = metric(a) − metric(b), positive = the paper.
PAIRED_CLAIMS: tuple[tuple[str, str, Arm, Arm], ...] = (
    ("1", "per-layer dim beats global (LAMB)", ("global", "lamb"), ("dim", "lamb")),
    ("1", "per-layer dim beats global (Adam)", ("global", "adam"), ("dim", "adam")),
    ("1", "per-layer normalize beats global (LAMB)", ("global", "lamb"), ("normalize", "lamb")),
    ("1", "per-layer normalize beats global (Adam)", ("global", "adam"), ("normalize", "adam")),
    ("2", "LAMB beats Adam (global clipping)", ("global", "adam"), ("global", "lamb")),
    ("2", "LAMB beats Adam (per-layer dim)", ("dim", "adam"), ("dim", "lamb")),
    ("2", "LAMB beats Adam (per-layer normalize)", ("normalize", "adam"), ("normalize", "lamb")),
)


def paired_row(cells: Cells, claim: str, label: str, a_arm: Arm, b_arm: Arm, depth: int, level: str,
               sigma: float | None, name: str, status: DepthStatus | None) -> ClaimRow:
    """A paired claim row; verdicts only at σ* (``status`` given), statistics at every level."""
    a = cells.get(depth, *a_arm, sigma)
    b = cells.get(depth, *b_arm, sigma)
    seeds, d = pair(a, b, name)
    finite = [x for x in d if math.isfinite(x)]
    s = paired(finite)
    margin = status.margin.get(name) if status else None
    if status is None:
        v = "secondary (no verdict)"
    elif status.no_verdict:
        v = status.no_verdict
    else:
        v = verdict(s, margin)
    row = ClaimRow(claim, label, depth, level, name, seeds, d, s, margin, v, codes=_codes(a, b),
                   diverged=len(d) - len(finite))
    if s is not None:
        row.mde = min_detectable_effect(s.sd, s.n)
        row.needed = sample_size(s, margin)
    return row


def claim_rows(cells: Cells, statuses: Mapping[int, DepthStatus]) -> list[ClaimRow]:
    """Claims 1 and 2 at σ* (verdicts) at every depth that runs the arms, claim 3 (Welch), then
    the same paired differences at σ_pe and 0 (statistics only)."""
    study, p = cells.study, cells.study.protocol
    rows: list[ClaimRow] = []
    for name in METRICS:
        for depth in p.depths:
            arms = set(p.arms(depth))
            for claim, label, a, b in PAIRED_CLAIMS:
                if a in arms and b in arms:
                    rows.append(paired_row(cells, claim, label, a, b, depth, "σ*", cells.sigma_star, name,
                                           statuses[depth]))
        rows += depth_growth_rows(cells, statuses, name)
    for name in METRICS:
        for depth in p.depths:
            arms = set(p.arms(depth))
            levels = [("σ_pe", study.sigma_pe(depth)), ("0", 0.0)] if depth == p.main_depth else [("0", 0.0)]
            for level, sigma in levels:
                for claim, label, a, b in PAIRED_CLAIMS:
                    if a in arms and b in arms:
                        rows.append(paired_row(cells, claim, label, a, b, depth, level, sigma, name, None))
    return rows


def depth_growth_rows(cells: Cells, statuses: Mapping[int, DepthStatus], name: str) -> list[ClaimRow]:
    """Claim 3: g(L) − g(main) for every other depth L, g = mean d of claim 1 (LAMB, dim) at σ*;
    a Welch interval (different depths' seed models are independent). The margin is the smaller
    of the two depths' margins."""
    p = cells.study.protocol
    rows = []
    base = p.main_depth
    for depth in p.depths[1:]:
        sa, da = pair(cells.get(base, "global", "lamb", cells.sigma_star),
                      cells.get(base, "dim", "lamb", cells.sigma_star), name)
        sb, db = pair(cells.get(depth, "global", "lamb", cells.sigma_star),
                      cells.get(depth, "dim", "lamb", cells.sigma_star), name)
        w = welch(da, db)
        margins = [statuses[x].margin.get(name) for x in (base, depth)]
        margin = min(margins) if all(m is not None for m in margins) else None  # type: ignore[type-var]
        gate = statuses[base].no_verdict or statuses[depth].no_verdict
        v = gate or welch_verdict(w, margin)
        codes = _codes(*(cells.get(x, c, "lamb", cells.sigma_star) for x in (base, depth) for c in ("global", "dim")))
        row = ClaimRow("3", f"per-layer advantage grows with depth ({base} → {depth} blocks)",
                       f"{base}→{depth}", "σ*", name, sorted(set(sa) | set(sb)), da + db, w, margin, v,
                       codes=codes)
        if w is not None:
            row.mde = welch_power(w)
            row.needed = welch_sample_size(da, db, margin)
        rows.append(row)
    return rows
