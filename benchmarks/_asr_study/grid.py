"""The study's protocol, its cells and the order they run in (the grid)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

PROTOCOL_VERSION = 1
"""Bump when the meaning of a cell changes (code paths, data): old cells are then not reused."""

RESULTS = Path(__file__).resolve().parents[1] / "results" / "asr_privacy_utility"
PAPER_SCALE = {"cohort_size": 204_800, "population": 69_500_000, "rounds": 2_034, "delta": 1e-9}
CLIPS = ("global", "dim", "uniform", "normalize", "adaptive-global", "adaptive-dim")
OPTIMIZERS = ("lamb", "adam", "ladam", "sgd")
CLIP_LABEL = {"global": "global", "dim": "per-layer dim", "uniform": "per-layer uniform",
              "normalize": "per-layer normalize (reference code)",
              "adaptive-global": "adaptive global", "adaptive-dim": "adaptive per-layer (dim start)"}
#: Adaptive clipping (Andrew et al. 2021): starting bounds as multiples of the protocol's tuned C,
#: the target quantile, and a learning rate large enough to travel 10x in the protocol's few
#: rounds (exp(η/2) per round at most: η = 1 moves up to e^5 ≈ 150x in 10 rounds).
ADAPTIVE_STARTS = (10.0, 0.1)
ADAPTIVE_QUANTILE = 0.5
ADAPTIVE_LR = 1.0


def count_noise_multiplier(cohort_size: int, layers: int = 1) -> float:
    """z_b giving every layer's count the noise std σ_b = S/20 (Andrew et al.'s suggestion for
    one bit): the count's sensitivity is √H/2, so z_b = S / (10 √H). The count then costs little
    next to the update noise (z = σ_DP·S) at the study's σ_DP."""
    return cohort_size / (10 * math.sqrt(layers))
OPT_LABEL = {"lamb": "LAMB", "adam": "Adam", "ladam": "layer-wise Adam", "sgd": "SGD (FedAvg)"}


# --------------------------------------------------------------------------- protocol and cells
@dataclass(frozen=True)
class Protocol:
    """What every cell shares: data, seed model, rounds, cohort, local work, eval set.

    Cheaper than the main job (fewer rounds, smaller eval set) and identical for every cell.
    """

    corpus: str = "default"  # "default" (570 speakers) or "quick" (124 speakers)
    model: str = "small"
    model_overrides: tuple[tuple[str, int | float], ...] = (("d_model", 96), ("d_ff", 384))
    seed_steps: int = 1000
    seed_lr: float = 5.0
    seed_batch_size: int = 16
    rounds: int = 10
    cohort_size: int = 10
    local_steps: int = 10
    local_lr: float = 0.1
    local_batch_size: int = 4
    clip_bound: float = 0.01
    server_lr_decay: float = 1.0  # constant server LR (tuned per optimizer)
    eval_utterances: int = 200
    # From the pilot (seed 0): 3e-4 costs ~0.5 WER points, 1e-2 about half of FL's gain; 3e-2 and
    # 1e-1 extend the curve towards "destroys learning".
    sigma_levels: tuple[float, ...] = (0.0, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    sigma_depth: float = 3e-3  # where noise matters (depth, cohort and local-work studies)
    pilot_sigma: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2)
    depths: tuple[int, ...] = (2, 4, 8)
    lr_grid: tuple[tuple[str, tuple[float, ...]], ...] = (
        ("lamb", (0.005, 0.015, 0.045)),
        ("adam", (3e-4, 1e-3, 3e-3)),
        ("sgd", (30.0, 100.0, 300.0)),
    )
    lr_sweep_sigma: float = 1e-3

    def key_dict(self) -> dict[str, Any]:
        """The fields that change a cell's result (the grid definitions do not)."""
        skip = {"sigma_levels", "sigma_depth", "pilot_sigma", "seeds", "depths", "lr_grid", "lr_sweep_sigma"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


FULL = Protocol()
QUICK = Protocol(
    corpus="quick", model="tiny", model_overrides=(), seed_steps=200, rounds=3, cohort_size=4, local_steps=2,
    eval_utterances=32, sigma_levels=(0.0, 1e-2), seeds=(0,), depths=(2,),
    lr_grid=(("lamb", (0.02,)),),
)


@dataclass(frozen=True)
class Cell:
    """One configuration of the study (``None`` fields take the protocol's value)."""

    clip: str
    optimizer: str
    sigma_dp: float
    seed: int
    server_lr: float
    n_layers: int | None = None
    cohort_size: int | None = None
    local_steps: int | None = None
    groups: tuple[str, ...] = field(default=(), compare=False)
    clip_start: float | None = None  # adaptive modes: the starting bound / the protocol's C

    def key(self, protocol: Protocol) -> str:
        """Hash of the cell's configuration, the protocol and :data:`PROTOCOL_VERSION`."""
        blob = {"v": PROTOCOL_VERSION, "protocol": protocol.key_dict(), "cell": self.config()}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    def config(self) -> dict[str, Any]:
        # clip_start is left out when unset so the keys of the other cells do not change.
        return {k: v for k, v in asdict(self).items()
                if k != "groups" and not (k == "clip_start" and v is None)}

    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in (("layers", self.n_layers), ("S", self.cohort_size),
                                                  ("local", self.local_steps),
                                                  ("C0", self.clip_start)) if v is not None)
        return (f"{self.clip}/{self.optimizer} lr={self.server_lr:g} σ_DP={self.sigma_dp:g} "
                f"seed={self.seed}{extra}")


def cell_path(out: Path, cell: Cell, protocol: Protocol) -> Path:
    return out / "cells" / f"{cell.key(protocol)}.json"


def load_cells(out: Path) -> list[dict[str, Any]]:
    """Every finished cell's record under ``out/cells``."""
    return [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]


MAX_LR_EXTENSIONS = 2
"""How many times a sweep whose best LR is at an end of its grid grows by one more point there."""


def sweep_lrs(protocol: Protocol, done: Mapping[str, dict[str, Any]], optimizer: str) -> list[float]:
    """The optimizer's server LRs to sweep: its grid, extended geometrically (same ratio as the
    grid's ends) at the end holding the best WER so far, up to :data:`MAX_LR_EXTENSIONS` times,
    so that the chosen LR is an interior optimum wherever the budget allows (a fair tuning)."""
    lrs = sorted(dict(protocol.lr_grid).get(optimizer, ()))
    for _ in range(MAX_LR_EXTENSIONS):
        if len(lrs) < 2:
            break
        scores = [done.get(Cell("dim", optimizer, protocol.lr_sweep_sigma, protocol.seeds[0], lr)
                           .key(protocol)) for lr in lrs]
        if any(r is None for r in scores):
            break
        best = min(range(len(lrs)), key=lambda i: scores[i]["wer"])  # type: ignore[index]
        if best == len(lrs) - 1:
            lrs.append(float(f"{lrs[-1] * lrs[-1] / lrs[-2]:.3g}"))
        elif best == 0:
            lrs.insert(0, float(f"{lrs[0] * lrs[0] / lrs[1]:.3g}"))
        else:
            break
    return lrs


def tuned_lr(protocol: Protocol, done: Mapping[str, dict[str, Any]], optimizer: str) -> float | None:
    """The server LR with the lowest eval WER in the optimizer's finished sweep (None if the
    sweep, extensions included, is not complete). Layer-wise Adam is LAMB with weight decay 0:
    it shares LAMB's LR."""
    name = "lamb" if optimizer == "ladam" else optimizer
    lrs = sweep_lrs(protocol, done, name)
    if not lrs:
        return None
    if len(lrs) == 1:
        return lrs[0]
    scores = []
    for lr in lrs:
        rec = done.get(Cell("dim", name, protocol.lr_sweep_sigma, protocol.seeds[0], lr).key(protocol))
        if rec is None:
            return None
        scores.append((rec["wer"], lr))
    return min(scores)[1]


def plan(protocol: Protocol, done: Mapping[str, dict[str, Any]]) -> list[Cell]:
    """All cells in the order to run them (most informative first).

    Cells whose server LR depends on an unfinished sweep are left out; re-plan after each cell.
    Order: a pilot pair (global vs per-layer dim at the middle LAMB LR); LAMB LR sweep; global vs per-layer dim with LAMB across sigma_DP (seed-major, so the
    whole curve exists after the first seed); the other optimizers' LR sweeps; the optimizer
    comparison; depth; the other clipping modes; the cohort-size and local-work questions.
    """
    cells: list[Cell] = []
    seeds, mid = protocol.seeds, protocol.sigma_depth
    # Most informative sigma first: where noise matters, no noise, the largest, then the rest.
    sig = sorted(protocol.sigma_levels, key=lambda s: (s != mid, s != 0.0, s != max(protocol.sigma_levels), s))
    lr_grid = dict(protocol.lr_grid)

    def sweep(opt: str) -> None:
        cells.extend(Cell("dim", opt, protocol.lr_sweep_sigma, seeds[0], lr, groups=("lr",))
                     for lr in sweep_lrs(protocol, done, opt))

    def grid(clips: Iterable[str], opts: Iterable[str], sigmas: Iterable[float], group: str,
             sigma_major: bool = False, **extra: Any) -> None:
        """Cells of clips x opts x sigmas x seeds: seed-major (a whole curve per seed first), or
        sigma-major (every seed of a level first, so a partial grid has full-seed levels)."""
        sigmas = list(sigmas)
        blocks = [(seed, [s]) for s in sigmas for seed in seeds] if sigma_major else [(seed, sigmas) for seed in seeds]
        for seed, levels in blocks:
            for opt in opts:
                lr = tuned_lr(protocol, done, opt)
                if lr is None:
                    continue
                for s in levels:
                    for clip in clips:
                        cells.append(Cell(clip, opt, s, seed, lr, groups=(group,), **extra))

    # Pilot: global clipping where noise matters, at the middle of LAMB's LR grid (its per-layer
    # twin is the sweep's middle cell), so the first comparison exists before the sweep ends.
    prior = lr_grid["lamb"][len(lr_grid["lamb"]) // 2] if "lamb" in lr_grid else None
    if prior is not None:
        cells.append(Cell("dim", "lamb", protocol.pilot_sigma, seeds[0], prior, groups=("pilot",)))
        cells.append(Cell("global", "lamb", protocol.pilot_sigma, seeds[0], prior, groups=("pilot",)))
    sweep("lamb")
    grid(("global", "dim"), ("lamb",), sig, "clip")
    sweep("adam")
    sweep("sgd")
    grid(("global", "dim"), ("adam", "sgd"), sig, "optim")
    # Layer-wise Adam is LAMB with weight decay 0 (the study's LAMB): one identity check per
    # clipping mode instead of a full grid of duplicates.
    grid(("global", "dim"), ("ladam",), (mid,), "optim")
    for depth in protocol.depths:
        grid(("global", "dim"), ("lamb",), (0.0, mid), "depth", n_layers=depth)
    grid(("uniform", "normalize"), ("lamb",), sig, "clip")
    for s in (5, 20, 40):
        grid(("dim", "global"), ("lamb",), (mid,), "cohort", cohort_size=s)
    for steps in (1, 5, 20):
        grid(("dim", "global"), ("lamb",), (mid,), "local", local_steps=steps)
    # Sigma-major: each level gets all its seeds before the next level starts.
    grid(("uniform", "normalize"), ("adam", "sgd"), sig, "optim", sigma_major=True)
    cells.extend(adaptive_cells(protocol, done, sig))
    # Merge duplicates (the same configuration reached from several groups).
    merged: dict[str, Cell] = {}
    for c in cells:
        k = c.key(protocol)
        if k in merged:
            merged[k] = replace(merged[k], groups=tuple(dict.fromkeys(merged[k].groups + c.groups)))
        else:
            merged[k] = c
    return list(merged.values())


def adaptive_cells(protocol: Protocol, done: Mapping[str, dict[str, Any]],
                   sigmas: Iterable[float]) -> list[Cell]:
    """Group ``adaptive``: adaptive global and per-layer clipping with LAMB at the study's σ_DP,
    started from C×10 and C×0.1 (seed-major)."""
    lr = tuned_lr(protocol, done, "lamb")
    if lr is None:
        return []
    return [Cell(clip, "lamb", s, seed, lr, groups=("adaptive",), clip_start=start)
            for seed in protocol.seeds for s in sigmas
            for clip in ("adaptive-global", "adaptive-dim") for start in ADAPTIVE_STARTS]


def quick_plan(protocol: Protocol, done: Mapping[str, dict[str, Any]]) -> list[Cell]:
    """The ``--quick`` 2x2 subset: {global, dim} x {no noise, noise}, LAMB, one seed."""
    del done
    lr = dict(protocol.lr_grid)["lamb"][0]
    return [Cell(c, "lamb", s, protocol.seeds[0], lr, groups=("clip",))
            for s in protocol.sigma_levels for c in ("global", "dim")]
