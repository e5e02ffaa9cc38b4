"""Protocol v2 of the study: what every cell shares, the cells, and the order they run in.

The pre-registered analysis plan is ``benchmarks/results/asr_privacy_utility/v2/PLAN.md``; this
module is its grid. A cell's **key** hashes :data:`PROTOCOL_VERSION`, the protocol fields that
change a result, the identity of the depth's seed model and the cell's own configuration, so a
finished cell is reused exactly when the same computation would be repeated.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

PROTOCOL_VERSION = 2
"""Bump whenever code that changes cell results changes (old cells are then not reused)."""

ROOT = Path(__file__).resolve().parents[2]
RESULTS_ROOT = ROOT / "benchmarks" / "results" / "asr_privacy_utility"
RESULTS = RESULTS_ROOT / "v2"
"""Where protocol v2 keeps its cells and report (v1's cells stay in ``RESULTS_ROOT / "cells"``)."""
QUICK_RESULTS = ROOT / "runs" / "asr_study_quick"
PAPER_SCALE = {"cohort_size": 204_800, "population": 69_500_000, "rounds": 2_034, "delta": 1e-9}
PAPER_NOISE_NORM = 0.048
"""σ_DP·√D of the paper (3e-6·√255.8M): the noise norm on the mean in units of C."""
FIXED_CLIPS = ("global", "dim", "normalize")
ADAPTIVE_CLIPS = ("adaptive-global", "adaptive-dim")
CLIPS = FIXED_CLIPS + ADAPTIVE_CLIPS
OPTIMIZERS = ("lamb", "adam")
CLIP_LABEL = {"global": "global", "dim": "per-layer dim", "normalize": "per-layer normalize",
              "adaptive-global": "adaptive global", "adaptive-dim": "adaptive per-layer (dim)"}
OPT_LABEL = {"lamb": "LAMB", "adam": "Adam"}
#: Adaptive clipping (Andrew et al. 2021): target quantile and a learning rate large enough to
#: travel 10x in the protocol's few rounds (exp(η/2) per round at most).
ADAPTIVE_QUANTILE = 0.5
ADAPTIVE_LR = 1.0

Arm = tuple[str, str]
"""(clipping mode, server optimizer)."""


def count_noise_multiplier(cohort_size: int, layers: int = 1) -> float:
    """z_b giving every layer's count the noise std S/20 (Andrew et al.'s suggestion for one
    bit): the count's sensitivity is √H/2, so z_b = S / (10 √H)."""
    return cohort_size / (10 * math.sqrt(layers))


def sig3(x: float) -> float:
    """``x`` rounded to three significant digits (the grid's σ and LR values)."""
    return float(f"{x:.3g}")


# --------------------------------------------------------------------------- protocol and cells
@dataclass(frozen=True)
class Protocol:
    """What every cell shares (the first block: part of every cell's key) and the grid.

    Attributes:
        corpus: ``"default"`` (the embedded corpus) or ``"quick"``.
        model, model_overrides: the model of every depth (``n_layers`` is the cell's depth).
        seed_steps, seed_lr, seed_batch_size: the seed recipe (central LARS training).
        rounds, cohort_size, local_steps, local_lr, local_batch_size, local_grad_clip,
        clip_bound: the federated protocol; the server LR is constant.
        eval_utterances: utterances scored per cell (``None``: all eval utterances).
        depths: model depths of the grid; the first is the main one (pilot, all arms).
        deep_arms: the arms run at the other depths.
        clips, optimizers: the arms at the main depth.
        pilot_sigmas, target_cost: the pilot's noise levels and the CER cost (points) σ* aims at.
        lr_grid, max_lr_extensions: the server-LR sweeps.
        sweep_seeds, main_seeds, secondary_seeds, deep_secondary_seeds, later_seeds: seeds of
            each cell group.
        cohort_sizes, local_steps_grid: the cohort x local-work question (one factor at a time).
        adaptive_starts: starting bounds of adaptive clipping, as multiples of ``clip_bound``.
        cer_gate: a depth whose seed model's eval CER exceeds it gets no verdict.
        margin_fraction: the equivalence margin as a fraction of the noise cost.
        diag_depth, diag_seed_steps: the one-seed diagnostic model (norms and fidelity only).
        norm_rounds: rounds of real client updates recorded by the norms diagnostic.
    """

    corpus: str = "default"
    model: str = "small"
    model_overrides: tuple[tuple[str, int | float], ...] = (("d_model", 96), ("d_ff", 384))
    seed_steps: int = 6000
    seed_lr: float = 5.0
    seed_batch_size: int = 16
    rounds: int = 12
    cohort_size: int = 20
    local_steps: int = 10
    local_lr: float = 0.1
    local_batch_size: int = 4
    local_grad_clip: float = 1.0
    clip_bound: float = 0.01
    eval_utterances: int | None = None
    # ---- the grid (not part of a cell's key)
    depths: tuple[int, ...] = (4, 16)
    deep_arms: tuple[Arm, ...] = (("global", "lamb"), ("dim", "lamb"))
    clips: tuple[str, ...] = FIXED_CLIPS
    optimizers: tuple[str, ...] = OPTIMIZERS
    pilot_sigmas: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    target_cost: float = 5.0
    lr_grid: tuple[tuple[str, tuple[float, ...]], ...] = (
        ("lamb", (0.002, 0.005, 0.0125)),
        ("adam", (3e-4, 1e-3, 3e-3)),
    )
    max_lr_extensions: int = 2
    sweep_seeds: tuple[int, ...] = (0, 1)
    main_seeds: tuple[int, ...] = tuple(range(8))
    secondary_seeds: tuple[int, ...] = tuple(range(4))
    deep_secondary_seeds: tuple[int, ...] = (0, 1)
    later_seeds: tuple[int, ...] = tuple(range(4))
    cohort_sizes: tuple[int, ...] = (10, 40)
    local_steps_grid: tuple[int, ...] = (1, 5, 20)
    adaptive_starts: tuple[float, ...] = (10.0, 0.1)
    cer_gate: float = 0.15
    margin_fraction: float = 0.25
    diag_depth: int = 36
    diag_seed_steps: int = 1000
    norm_rounds: int = 2

    _KEY_FIELDS = ("corpus", "model", "model_overrides", "seed_steps", "seed_lr", "seed_batch_size",
                   "rounds", "cohort_size", "local_steps", "local_lr", "local_batch_size",
                   "local_grad_clip", "clip_bound", "eval_utterances")

    def key_dict(self) -> dict[str, Any]:
        """The fields that change a cell's result (as JSON would hold them)."""
        d = asdict(self)
        return json.loads(json.dumps({k: d[k] for k in self._KEY_FIELDS}))

    @property
    def main_depth(self) -> int:
        return self.depths[0]

    def arms(self, depth: int) -> list[Arm]:
        """The (clip, optimizer) arms run at ``depth``: all at the main depth, else ``deep_arms``."""
        if depth == self.main_depth:
            return [(c, o) for o in self.optimizers for c in self.clips]
        return list(self.deep_arms)

    def lr_values(self, optimizer: str) -> tuple[float, ...]:
        return tuple(sorted(dict(self.lr_grid).get(optimizer, ())))

    def pilot_lr(self) -> float:
        """The middle of LAMB's LR grid (the pilot's server LR)."""
        lrs = self.lr_values("lamb")
        return lrs[len(lrs) // 2]


FULL = Protocol()
QUICK = Protocol(
    corpus="quick", model="tiny", model_overrides=(), seed_steps=200, rounds=3, cohort_size=4,
    local_steps=2, eval_utterances=32, depths=(2, 3), pilot_sigmas=(3e-3, 3e-2),
    lr_grid=(("lamb", (0.02,)), ("adam", (0.003,))), sweep_seeds=(0, 1), main_seeds=(0, 1),
    secondary_seeds=(0,), deep_secondary_seeds=(0,), later_seeds=(0,), cohort_sizes=(8,),
    local_steps_grid=(1,), adaptive_starts=(10.0,), cer_gate=1.0, diag_depth=4, diag_seed_steps=50,
    norm_rounds=1,
)


@dataclass(frozen=True)
class Cell:
    """One configuration (``None`` fields take the protocol's value)."""

    clip: str
    optimizer: str
    sigma_dp: float
    seed: int
    server_lr: float
    n_layers: int
    cohort_size: int | None = None
    local_steps: int | None = None
    clip_start: float | None = None  # adaptive modes: the starting bound / the protocol's C
    groups: tuple[str, ...] = field(default=(), compare=False)

    def config(self) -> dict[str, Any]:
        """The configuration as stored in a cell's record (without ``groups``)."""
        return {k: v for k, v in asdict(self).items() if k != "groups"}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], groups: Iterable[str] = ()) -> Cell:
        return cls(**config, groups=tuple(groups))

    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in (("S", self.cohort_size), ("local", self.local_steps),
                                                  ("C0", self.clip_start)) if v is not None)
        return (f"{self.n_layers} blocks {self.clip}/{self.optimizer} lr={self.server_lr:g} "
                f"σ_DP={self.sigma_dp:g} seed={self.seed}{extra}")


@dataclass(frozen=True)
class Study:
    """A protocol resolved against this checkout: each depth's seed-model identity and size.

    Attributes:
        protocol: the protocol.
        seed_ids: depth -> identity of its seed model (part of every key of that depth).
        params: depth -> the model's parameter count D (σ_pe = 0.048 / √D).
        tensors: depth -> the model's number of parameter tensors.
    """

    protocol: Protocol
    seed_ids: Mapping[int, str]
    params: Mapping[int, int]
    tensors: Mapping[int, int]

    def key(self, cell: Cell) -> str:
        """Hash of :data:`PROTOCOL_VERSION`, the protocol, the depth's seed model and the cell."""
        blob = {"v": PROTOCOL_VERSION, "protocol": self.protocol.key_dict(),
                "seed_model": self.seed_ids[cell.n_layers], "cell": cell.config()}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    def sigma_pe(self, depth: int) -> float:
        """The paper-equivalent σ_DP of ``depth``: σ_pe·√D = :data:`PAPER_NOISE_NORM`."""
        return sig3(PAPER_NOISE_NORM / math.sqrt(self.params[depth]))

    def is_current(self, record: Mapping[str, Any]) -> bool:
        """Whether ``record`` is a cell of this study (same version, protocol and seed model)."""
        try:
            return (record.get("protocol_version") == PROTOCOL_VERSION
                    and record["cell"]["n_layers"] in self.seed_ids
                    and self.key(Cell.from_config(record["cell"])) == record["key"])
        except (KeyError, TypeError):
            return False


def cell_path(out: Path, key: str) -> Path:
    return out / "cells" / f"{key}.json"


def load_cells(out: Path) -> list[dict[str, Any]]:
    """Every finished cell's record under ``out/cells``."""
    return [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]


def metric(record: Mapping[str, Any], name: str) -> float:
    """A record's ``"cer"`` or ``"wer"`` as a float (a diverged cell's is ``inf``)."""
    v = record[name]
    return math.inf if v in ("inf", None) else float(v)


# --------------------------------------------------------------------------- the pilot and σ*
def pilot_cells(protocol: Protocol) -> list[Cell]:
    """Global clipping, LAMB at its middle LR, seed 0, main depth: no noise and the pilot levels."""
    return [Cell("global", "lamb", s, 0, protocol.pilot_lr(), protocol.main_depth, groups=("pilot",))
            for s in (0.0, *protocol.pilot_sigmas)]


def choose_sigma_star(study: Study, done: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The pilot's choice (None until every pilot cell is done): the level whose eval-CER cost
    over no noise is closest to ``target_cost`` points (ties: the smaller level)."""
    cells = pilot_cells(study.protocol)
    found = [done.get(study.key(c)) for c in cells]
    recs = [r for r in found if r is not None]
    if len(recs) < len(cells):
        return None
    base = metric(recs[0], "cer")
    rows = [{"sigma_dp": c.sigma_dp, "key": r["key"], "cer": metric(r, "cer"), "wer": metric(r, "wer"),
             "cost_points": 100 * (metric(r, "cer") - base)} for c, r in zip(cells, recs, strict=True)]
    noisy = rows[1:]
    best = min(noisy, key=lambda r: (abs(r["cost_points"] - study.protocol.target_cost), r["sigma_dp"]))
    return {"sigma_star": best["sigma_dp"], "cost_points": best["cost_points"],
            "target_cost_points": study.protocol.target_cost, "pilot": rows}


# --------------------------------------------------------------------------- LR sweeps
def _mean_cer(study: Study, done: Mapping[str, Mapping[str, Any]], cells: list[Cell]) -> float | None:
    recs = [done.get(study.key(c)) for c in cells]
    if any(r is None for r in recs):
        return None
    return statistics.fmean(metric(r, "cer") for r in recs)  # type: ignore[arg-type]


def sweep_lrs(study: Study, done: Mapping[str, Mapping[str, Any]], arm: Arm, depth: int,
              sigma: float) -> list[float]:
    """The arm's server LRs to sweep at ``depth`` and σ*: its optimizer's grid, extended by one
    geometric step at the end that holds the best mean CER over the sweep seeds, up to
    ``max_lr_extensions`` times, so that the chosen LR is interior wherever the budget allows."""
    p = study.protocol
    clip, opt = arm
    lrs = list(p.lr_values(opt))
    for _ in range(p.max_lr_extensions):
        if len(lrs) < 2:
            break
        means = [_mean_cer(study, done, [Cell(clip, opt, sigma, s, lr, depth) for s in p.sweep_seeds])
                 for lr in lrs]
        if any(m is None for m in means):
            break
        best = min(range(len(lrs)), key=lambda i: means[i])  # type: ignore[arg-type,return-value]
        if best == len(lrs) - 1:
            lrs.append(sig3(lrs[-1] * lrs[-1] / lrs[-2]))
        elif best == 0:
            lrs.insert(0, sig3(lrs[0] * lrs[0] / lrs[1]))
        else:
            break
    return lrs


def sweep_result(study: Study, done: Mapping[str, Mapping[str, Any]], arm: Arm, depth: int,
                 sigma: float) -> dict[str, Any]:
    """The sweep's mean CER per LR (None where unfinished), the chosen LR (None until the whole
    sweep, extensions included, is done) and whether it is interior."""
    p = study.protocol
    lrs = sweep_lrs(study, done, arm, depth, sigma)
    means = [_mean_cer(study, done, [Cell(arm[0], arm[1], sigma, s, lr, depth) for s in p.sweep_seeds])
             for lr in lrs]
    chosen = None
    if lrs and all(m is not None for m in means):
        chosen = lrs[min(range(len(lrs)), key=lambda i: means[i])]  # type: ignore[arg-type,return-value]
    interior = chosen is not None and (len(lrs) == 1 or chosen not in (lrs[0], lrs[-1]))
    return {"lrs": lrs, "mean_cer": means, "chosen": chosen, "interior": interior}


def tuned_lrs(study: Study, done: Mapping[str, Mapping[str, Any]], depth: int,
              sigma_star: float) -> dict[Arm, float | None]:
    """Every arm's chosen server LR at ``depth`` (None while its sweep is unfinished)."""
    return {arm: sweep_result(study, done, arm, depth, sigma_star)["chosen"]
            for arm in study.protocol.arms(depth)}


# --------------------------------------------------------------------------- the plan
def plan(study: Study, done: Mapping[str, Mapping[str, Any]], sigma_star: float | None,
         skip_depths: Iterable[int] = ()) -> list[Cell]:
    """All cells known so far, in the order of PLAN.md.

    Pilot; then per depth: LR sweeps, main cells at σ* (seed-major: every arm of seed s before
    seed s + 1), secondary cells (main depth: σ_pe and 0; other depths: 0); then the later
    questions (cohort size and local work, adaptive clipping) at the main depth. Cells that
    depend on something unfinished (σ*, a sweep) are left out: re-plan after each cell. Depths
    in ``skip_depths`` (their seed model fails the gate) get no cells; without the main depth
    there is no pilot and so no plan.
    """
    p = study.protocol
    skip = set(skip_depths)
    if p.main_depth in skip:  # no pilot, hence no σ*: nothing of the study can run
        return []
    cells: list[Cell] = list(pilot_cells(p))
    if sigma_star is not None:
        for depth in p.depths:
            if depth in skip:
                continue
            arms = p.arms(depth)
            for clip, opt in arms:
                for seed in p.sweep_seeds:
                    cells += [Cell(clip, opt, sigma_star, seed, lr, depth, groups=("sweep",))
                              for lr in sweep_lrs(study, done, (clip, opt), depth, sigma_star)]
            lrs = tuned_lrs(study, done, depth, sigma_star)
            for seed in p.main_seeds:
                cells += [Cell(c, o, sigma_star, seed, lrs[(c, o)], depth, groups=("main",))  # type: ignore[arg-type]
                          for c, o in arms if lrs[(c, o)] is not None]
            levels, seeds = ((study.sigma_pe(depth), 0.0), p.secondary_seeds) if depth == p.main_depth \
                else ((0.0,), p.deep_secondary_seeds)
            for seed in seeds:
                cells += [Cell(c, o, s, seed, lrs[(c, o)], depth, groups=("secondary",))  # type: ignore[arg-type]
                          for s in levels for c, o in arms if lrs[(c, o)] is not None]
        cells += later_cells(study, done, sigma_star, skip)
    merged: dict[str, Cell] = {}
    for c in cells:
        k = study.key(c)
        merged[k] = replace(merged[k], groups=tuple(dict.fromkeys(merged[k].groups + c.groups))) \
            if k in merged else c
    return list(merged.values())


def later_cells(study: Study, done: Mapping[str, Mapping[str, Any]], sigma_star: float,
                skip: set[int]) -> list[Cell]:
    """Cohort size and local work (global vs dim, LAMB) and adaptive clipping (global and per
    layer from each start) at σ*, main depth, seed-major."""
    p = study.protocol
    depth = p.main_depth
    if depth in skip:
        return []
    lrs = tuned_lrs(study, done, depth, sigma_star)
    cells: list[Cell] = []
    for seed in p.later_seeds:
        for clip in ("global", "dim"):
            lr = lrs.get((clip, "lamb"))
            if lr is None:
                continue
            cells += [Cell(clip, "lamb", sigma_star, seed, lr, depth, cohort_size=s, groups=("cohort",))
                      for s in p.cohort_sizes]
            cells += [Cell(clip, "lamb", sigma_star, seed, lr, depth, local_steps=n, groups=("local",))
                      for n in p.local_steps_grid]
    for seed in p.later_seeds:
        for clip, base in (("adaptive-global", "global"), ("adaptive-dim", "dim")):
            lr = lrs.get((base, "lamb"))
            if lr is None:
                continue
            cells += [Cell(clip, "lamb", sigma_star, seed, lr, depth, clip_start=x, groups=("adaptive",))
                      for x in p.adaptive_starts]
    return cells
