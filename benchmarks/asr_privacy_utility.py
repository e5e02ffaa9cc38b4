"""Privacy-utility study of DP-FedAvg on the embedded ASR corpus: does the paper reproduce?

Claims under test (Pelikan et al., arXiv 2310.00098; design notes 2.2, 2.3, 2.6):

1. Under DP noise, per-layer clipping (``dim`` allocation) beats global clipping by a wide margin.
2. A layer-wise normalizing server optimizer (LAMB) beats Adam.
3. Both gaps grow with depth.

Also measured (group ``adaptive``): adaptive clipping (Andrew et al., NeurIPS 2021), global and
per layer, started from 10x and 0.1x the tuned C: WER, and the per-round bound trajectory of each
cell (a DP release; ``bound_trajectories.png``).

The study fine-tunes one cached seed model (central LARS training, :mod:`examples.asr.train`) with
DP-FedAvg through dpfl's public API and scores greedy-decoding WER/CER on held-out speakers. Every
configuration is a **cell** (clipping x server optimizer x sigma_DP x depth x seed, ...). A cell is
run once under a fixed, cheap **protocol** (same rounds, cohort, local work and eval set for every
cell) and its result is written to ``<out>/cells/<key>.json``, where ``key`` hashes the cell, the
protocol and :data:`PROTOCOL_VERSION`. Finished cells are skipped, so the study accumulates across
interrupted runs and sessions. Cells run in the order of :func:`plan` (most informative first).

Usage::

    python benchmarks/asr_privacy_utility.py run [--max-cells N] [--time-budget S] [--groups ...]
    python benchmarks/asr_privacy_utility.py norms     # per-layer update norms of real clients
    python benchmarks/asr_privacy_utility.py speed     # vectorized vs sequential cohort training
    python benchmarks/asr_privacy_utility.py report    # markdown + plots from the finished cells
    python benchmarks/asr_privacy_utility.py plan      # list the cells, done or not
    python benchmarks/asr_privacy_utility.py --quick   # 2x2 subset, tiny model (a few minutes)

Set ``OMP_NUM_THREADS=1``: every cell runs on one thread (``torch.set_num_threads(1)``).

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv:2310.00098.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import copy  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterable, Mapping  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from benchmarks._study import machine  # noqa: E402
from benchmarks._study import mean_std as _mean_std  # noqa: E402
from benchmarks._study import now as _now  # noqa: E402
from benchmarks._study import write_json as _write_json  # noqa: E402
from dpfl.accounting import RDPAccountant, extrapolate  # noqa: E402
from dpfl.adaptive_clip import AdaptiveClip  # noqa: E402
from dpfl.clip import ClipStats, GlobalClip, PerLayerClip  # noqa: E402
from dpfl.optim import LAMB, layerwise_adam  # noqa: E402
from dpfl.simulation import (  # noqa: E402
    InMemoryFederatedDataset,
    LocalTraining,
    Logging,
    PoissonSampler,
    Privacy,
    RunResult,
    run_rounds,
)
from examples.asr.corpus import CorpusConfig, ensure_corpus  # noqa: E402
from examples.asr.data import read_librispeech  # noqa: E402
from examples.asr.features import cached_features  # noqa: E402
from examples.asr.model import CTCTransformer, get_config  # noqa: E402
from examples.asr.text import CharTokenizer  # noqa: E402
from examples.asr.train import Batch, batch_loss, evaluate, make_batches, train_central  # noqa: E402

PROTOCOL_VERSION = 1
"""Bump when the meaning of a cell changes (code paths, data): old cells are then not reused."""

RESULTS = Path(__file__).resolve().parent / "results" / "asr_privacy_utility"
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
             **extra: Any) -> None:
        for seed in seeds:
            for opt in opts:
                lr = tuned_lr(protocol, done, opt)
                if lr is None:
                    continue
                for s in sigmas:
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
    grid(("uniform", "normalize"), ("adam", "sgd"), sig, "optim")
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


# --------------------------------------------------------------------------- data and seed model
@dataclass
class Data:
    """Features and batches shared by every cell (built once per process)."""

    source: str
    seed_batches: list[Batch]
    eval_batches: list[Batch]
    users: dict[str, list[Batch]]
    num_eval: int


def load_data(protocol: Protocol) -> Data:
    """The embedded corpus, cached features, and batches (seed, eval subset, FL users)."""
    config = CorpusConfig.quick(seed=0) if protocol.corpus == "quick" else CorpusConfig()
    root = ensure_corpus(config, workers=1)
    tok = CharTokenizer()

    def split(name: str) -> tuple[dict[str, list[Any]], dict[str, torch.Tensor]]:
        users = read_librispeech(root, name, verify_audio=False).users
        feats = cached_features([u for utts in users.values() for u in utts])
        return users, feats

    seed_users, seed_feats = split("seed-train")
    seed_utts = [u for utts in seed_users.values() for u in utts]
    seed_batches = make_batches([seed_feats[u.utterance_id] for u in seed_utts],
                                [u.transcript for u in seed_utts], tok,
                                batch_size=protocol.seed_batch_size, seed=0)
    ev_users, ev_feats = split("eval")
    # Eval subset: the same number of utterances from every eval speaker (round robin).
    per_user = [list(u) for u in ev_users.values()]
    ev_utts = []
    while len(ev_utts) < protocol.eval_utterances and any(per_user):
        for utts in per_user:
            if utts and len(ev_utts) < protocol.eval_utterances:
                ev_utts.append(utts.pop(0))
    eval_batches = make_batches([ev_feats[u.utterance_id] for u in ev_utts],
                                [u.transcript for u in ev_utts], tok, batch_size=64)
    fl_users, fl_feats = split("fl-train")
    users = {uid: make_batches([fl_feats[u.utterance_id] for u in utts], [u.transcript for u in utts],
                               tok, batch_size=protocol.local_batch_size, seed=0)
             for uid, utts in fl_users.items()}
    return Data(f"embedded corpus {root.name}", seed_batches, eval_batches, users, len(ev_utts))


def model_config(protocol: Protocol, n_layers: int | None) -> Any:
    """The protocol's model configuration, with ``n_layers`` blocks if given."""
    overrides = dict(protocol.model_overrides)
    if n_layers is not None:
        overrides["n_layers"] = n_layers
    return get_config(protocol.model, **overrides)


def seed_model(protocol: Protocol, data: Data, n_layers: int | None, out: Path) -> tuple[CTCTransformer, dict[str, float]]:
    """The seed model of this depth: trained once (LARS, seed 0), cached, and its eval WER/CER.

    The weights are cached in ``$DPFL_CACHE/asr_study`` (default ``~/.cache/dpfl``), their
    scores in ``out/seed_models.json``.
    """
    cfg = model_config(protocol, n_layers)
    key_blob = {"v": PROTOCOL_VERSION, "model": cfg.to_dict(), "steps": protocol.seed_steps,
                "lr": protocol.seed_lr, "batch": protocol.seed_batch_size, "data": data.source}
    key = hashlib.sha256(json.dumps(key_blob, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("DPFL_CACHE", Path.home() / ".cache" / "dpfl")) / "asr_study"
    path = cache / f"seed-{key}.pt"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CTCTransformer(cfg)
    trained = not path.is_file()
    if not trained:
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        t0 = time.time()
        print(f"seed model ({cfg.n_layers} blocks): {protocol.seed_steps} LARS steps ...", flush=True)
        train_central(model, data.seed_batches, steps=protocol.seed_steps, lr=protocol.seed_lr,
                      warmup_steps=protocol.seed_steps // 10, seed=0)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
        print(f"seed model trained in {time.time() - t0:.0f}s", flush=True)
    index_path = out / "seed_models.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    if key in index and trained:  # retrained (e.g. a new session): the cells assume the same model
        rates, _ = evaluate(model, data.eval_batches, CharTokenizer())
        if (rates.wer, rates.cer) != (index[key]["wer"], index[key]["cer"]):
            warnings.warn(f"retrained seed model {key} scores WER {rates.wer:.4f} / CER {rates.cer:.4f}, "
                          f"not the recorded {index[key]['wer']:.4f} / {index[key]['cer']:.4f}: cells from "
                          "before and after are not strictly comparable", stacklevel=2)
            index[key].setdefault("retrained", []).append({"wer": rates.wer, "cer": rates.cer})
            _write_json(index_path, index)
    if key not in index:
        rates, _ = evaluate(model, data.eval_batches, CharTokenizer())
        index[key] = {"n_layers": cfg.n_layers, "params": sum(p.numel() for p in model.parameters()),
                      "wer": rates.wer, "cer": rates.cer, **key_blob}
        out.mkdir(parents=True, exist_ok=True)
        _write_json(index_path, index)
    return model, index[key]


# --------------------------------------------------------------------------- one cell
def make_clipper(kind: str, bound: float, cohort_size: int = 1,
                 layers: int = 1) -> GlobalClip | PerLayerClip | AdaptiveClip:
    """The clipper of a mode; adaptive modes need the cohort size and (per layer) the number of
    parameter tensors (one layer each) for their count's noise."""
    if kind in ("adaptive-global", "adaptive-dim"):
        base = GlobalClip(bound) if kind == "adaptive-global" else PerLayerClip(bound, allocation="dim")
        h = 1 if kind == "adaptive-global" else layers
        return AdaptiveClip(base, count_noise_multiplier=count_noise_multiplier(cohort_size, h),
                            target_quantile=ADAPTIVE_QUANTILE, learning_rate=ADAPTIVE_LR)
    if kind == "global":
        return GlobalClip(bound)
    if kind in ("dim", "uniform"):
        return PerLayerClip(bound, allocation=kind)
    if kind == "normalize":
        return PerLayerClip(bound, allocation="dim", normalize=True)
    raise ValueError(f"unknown clipping mode {kind!r}; choose one of {CLIPS}")


def make_optimizer(name: str, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Server optimizers with the paper's betas/eps. ``lamb`` uses weight decay 0 as the paper,
    which makes it the same update rule as ``ladam`` (:func:`dpfl.optim.layerwise_adam`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "lamb":
        return LAMB(params, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    if name == "ladam":
        return layerwise_adam(params, lr, betas=(0.9, 0.999), eps=1e-6)
    if name == "adam":
        return torch.optim.Adam(params, lr, betas=(0.9, 0.999), eps=1e-6)
    if name == "sgd":
        return torch.optim.SGD(params, lr)
    raise ValueError(f"unknown server optimizer {name!r}; choose one of {OPTIMIZERS}")


def fl_run(
    model: torch.nn.Module,
    users: Mapping[str, list[Batch]],
    *,
    clipper: GlobalClip | PerLayerClip | AdaptiveClip,
    optimizer: torch.optim.Optimizer,
    sigma_dp: float,
    cohort_size: int,
    rounds: int,
    local_lr: float,
    local_steps: int,
    seed: int,
    vectorized: bool = False,
    log_path: Path | None = None,
) -> RunResult:
    """DP-FedAvg on ``model`` in place: the study's **only** call of ``run_rounds``.

    Poisson sampling at rate ``S / K``, z = sigma_DP * S, RDP accountant (add/remove one user),
    local SGD with per-step gradient clipping at 1.0, no checkpoints (a cell is short and is
    re-run from scratch if interrupted). With an :class:`AdaptiveClip` the update noise is still
    z = sigma_DP * S and each round also pays for the count (the ledger's effective multiplier).
    """
    population = sorted(users)
    sampler = PoissonSampler(population, min(1.0, cohort_size / len(population)), seed=seed)
    return run_rounds(
        model,
        InMemoryFederatedDataset(dict(users)),
        batch_loss,
        sampler=sampler,
        server_optimizer=optimizer,
        rounds=rounds,
        local=LocalTraining(lr=local_lr, steps=local_steps, max_grad_norm=1.0,
                            vectorized=vectorized),
        # A benchmark is a simulation: seeded noise makes every cell reproducible.
        privacy=Privacy(clipper, noise_multiplier=sigma_dp * cohort_size,
                        accountant=RDPAccountant(), delta=1e-6, noise_seed=seed),
        seed=seed,
        # Monitoring statistics of a synthetic benchmark (cohort sizes, clipped fraction, norms):
        # not covered by the DP guarantee, which is why run_rounds makes them opt-in.
        logging=Logging(log_path, progress=False, unsafe_metrics=True),
    )


def run_cell(cell: Cell, protocol: Protocol, data: Data, out: Path) -> dict[str, Any]:
    """Fine-tune the seed model under ``cell``, score it, write and return its record."""
    torch.set_num_threads(1)
    base, seed_scores = seed_model(protocol, data, cell.n_layers, out)
    model = copy.deepcopy(base)
    cohort = cell.cohort_size or protocol.cohort_size
    layers = sum(1 for p in model.parameters() if p.requires_grad)
    clipper = make_clipper(cell.clip, protocol.clip_bound * (cell.clip_start or 1.0), cohort, layers)
    t0 = time.time()
    run = fl_run(
        model, data.users, clipper=clipper,
        optimizer=make_optimizer(cell.optimizer, model, cell.server_lr), sigma_dp=cell.sigma_dp,
        cohort_size=cohort, rounds=protocol.rounds, local_lr=protocol.local_lr,
        local_steps=cell.local_steps or protocol.local_steps, seed=cell.seed,
    )
    train_s = time.time() - t0
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if finite:
        rates, _ = evaluate(model, data.eval_batches, CharTokenizer())
        wer, cer = rates.wer, rates.cer
    else:
        wer = cer = math.inf
    records = run.records
    record = {
        "key": cell.key(protocol), "protocol_version": PROTOCOL_VERSION,
        "protocol": protocol.key_dict(), "cell": cell.config(), "groups": list(cell.groups),
        "wer": wer, "cer": cer, "seed_model": {"wer": seed_scores["wer"], "cer": seed_scores["cer"]},
        "rounds": run.rounds_completed, "run_epsilon_delta_1e-6": run.epsilon,
        "mean_users_per_round": statistics.fmean(r.num_users for r in records),
        "fraction_clipped": statistics.fmean(r.fraction_clipped for r in records if r.num_users) if
        any(r.num_users for r in records) else None,
        "mean_update_norm": statistics.fmean(r.mean_norm for r in records if r.num_users) if
        any(r.num_users for r in records) else None,
        "train_s": round(train_s, 1), "total_s": round(time.time() - t0, 1),
        "machine": machine(), "finished": _now(),
    }
    if isinstance(clipper, AdaptiveClip):  # the bounds are DP releases: logged per round
        record["adaptive"] = {
            "count_noise_multiplier": clipper.count_noise_multiplier, "target_quantile": ADAPTIVE_QUANTILE,
            "learning_rate": ADAPTIVE_LR, "tuned_clip_bound": protocol.clip_bound,
            "bound_trajectory": [r.clip_bound for r in records],
            "layer_bound_trajectory": [r.layer_bounds for r in records] if cell.clip == "adaptive-dim" else None,
        }
    _write_json(cell_path(out, cell, protocol), record)
    return record


# --------------------------------------------------------------------------- per-layer norms
def layer_type(name: str) -> str:
    """Layer type of a parameter tensor of :class:`CTCTransformer`."""
    if name.startswith("conv."):
        return "conv"
    if name.startswith("head."):
        return "head"
    if "ln" in name.split(".")[-2]:
        return "LayerNorm"
    if "proj" in name:
        return "attention"
    if ".fc" in name:
        return "MLP"
    return "other"


class _RecordingClip(PerLayerClip):
    """A :class:`PerLayerClip` (one layer per tensor) that keeps every pre-clip layer norm."""

    def __init__(self, bound: float) -> None:
        super().__init__(bound, allocation="dim")
        self.seen: list[dict[str, float]] = []

    def clip_and_accumulate_(self, update: Mapping[str, torch.Tensor], accumulator: dict[str, torch.Tensor]) -> ClipStats:
        stats = super().clip_and_accumulate_(update, accumulator)
        self.seen.append(dict(stats.layer_norms))
        return stats


def measure_norms(protocol: Protocol, data: Data, out: Path, *, rounds: int = 3) -> dict[str, Any]:
    """Per-tensor L2 norms of real client updates (pre-clipping) during the FL run's first
    ``rounds`` rounds (per-layer dim clipping, LAMB, no noise), averaged over clients."""
    torch.set_num_threads(1)
    base, _ = seed_model(protocol, data, None, out)
    model = copy.deepcopy(base)
    clipper = _RecordingClip(protocol.clip_bound)
    lr = dict(protocol.lr_grid)["lamb"][len(dict(protocol.lr_grid)["lamb"]) // 2]
    fl_run(model, data.users, clipper=clipper, optimizer=make_optimizer("lamb", model, lr),
           sigma_dp=0.0, cohort_size=protocol.cohort_size, rounds=rounds, local_lr=protocol.local_lr,
           local_steps=protocol.local_steps, seed=0)
    names = list(clipper.seen[0])
    sizes = {n: p.numel() for n, p in base.named_parameters()}
    bounds = clipper.layer_bounds({n: p.detach() for n, p in base.named_parameters()})
    mean = {n: statistics.fmean(s[n] for s in clipper.seen) for n in names}
    total_sq = sum(v * v for v in mean.values())
    result = {
        "clients": len(clipper.seen), "rounds": rounds, "protocol": protocol.key_dict(),
        "layers": [{"name": n, "type": layer_type(n), "numel": sizes[n], "norm": mean[n],
                    "share_of_squared_norm": mean[n] ** 2 / total_sq, "dim_bound": bounds[n],
                    "clip_factor_dim": min(1.0, bounds[n] / mean[n]) if mean[n] > 0 else 1.0}
                   for n in names],
        "mean_total_norm": statistics.fmean(math.hypot(*s.values()) for s in clipper.seen),
        "machine": machine(), "finished": _now(),
    }
    _write_json(out / "update_norms.json", result)
    return result


def measure_fidelity(protocol: Protocol, data: Data, out: Path, *, draws: int = 5) -> dict[str, Any]:
    """How well the noised, clipped mean keeps each layer type's direction (no training needed).

    One cohort of real client updates (``train_local`` from the seed model, the protocol's local
    work) is clipped globally or per layer (dim), averaged over S, noised with std σ_DP·C per
    coordinate, and compared by cosine with the unclipped mean update, per layer type.
    """
    from dpfl.simulation import train_local

    torch.set_num_threads(1)
    base, _ = seed_model(protocol, data, None, out)
    users = sorted(data.users)[: protocol.cohort_size]
    updates = [train_local(base, data.users[u], batch_loss, lr=protocol.local_lr, steps=protocol.local_steps,
                           max_grad_norm=1.0, generator=torch.Generator().manual_seed(i))
               for i, u in enumerate(users)]
    names = list(updates[0])
    true_mean = {n: sum(u[n] for u in updates) / len(updates) for n in names}
    types = sorted({layer_type(n) for n in names})
    gen = torch.Generator().manual_seed(0)
    rows = []
    for clip in ("global", "dim"):
        clipper = make_clipper(clip, protocol.clip_bound)
        clipped = [clipper.clip(u)[0] for u in updates]
        mean = {n: sum(c[n] for c in clipped) / protocol.cohort_size for n in names}
        for sigma in protocol.sigma_levels:
            cos: dict[str, list[float]] = {t: [] for t in types + ["all"]}
            for _ in range(draws):
                noisy = {n: mean[n] + sigma * protocol.clip_bound * torch.randn(mean[n].shape, generator=gen)
                         for n in names}
                for t in types + ["all"]:
                    sel = [n for n in names if t == "all" or layer_type(n) == t]
                    a = torch.cat([noisy[n].flatten() for n in sel]).double()
                    b = torch.cat([true_mean[n].flatten() for n in sel]).double()
                    cos[t].append(float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30)))
            rows.append({"clip": clip, "sigma_dp": sigma, **{t: statistics.fmean(v) for t, v in cos.items()}})
    result = {"users": len(users), "draws": draws, "types": types, "rows": rows, "finished": _now()}
    _write_json(out / "fidelity.json", result)
    return result


def _fidelity_section(f: dict[str, Any]) -> list[str]:
    types = ["all"] + f["types"]
    lines = ["## Direction kept by the noised mean, per layer type", "",
             f"Cosine between the clipped, noised cohort mean and the unclipped mean of {f['users']} real client "
             f"updates (mean over {f['draws']} noise draws; 1 = direction kept, 0 = pure noise).", "",
             "| clipping | σ_DP | " + " | ".join(types) + " |", "|---" * (len(types) + 2) + "|"]
    for r in f["rows"]:
        lines.append(f"| {r['clip']} | {r['sigma_dp']:g} | " + " | ".join(f"{r[t]:.3f}" for t in types) + " |")
    return lines + [""]


# --------------------------------------------------------------------------- speed
def measure_speed(protocol: Protocol, data: Data, out: Path, *, rounds: int = 2) -> dict[str, Any]:
    """Seconds per round of sequential vs ``vectorized=True`` cohort training, side by side."""
    torch.set_num_threads(1)
    base, _ = seed_model(protocol, data, None, out)
    times: dict[str, list[float]] = {"sequential": [], "vectorized": []}
    fell_back: list[str] = []
    for _ in range(2):
        for mode in ("sequential", "vectorized"):
            model = copy.deepcopy(base)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.time()
                fl_run(model, data.users, clipper=make_clipper("dim", protocol.clip_bound),
                       optimizer=make_optimizer("lamb", model, 0.01), sigma_dp=0.0,
                       cohort_size=protocol.cohort_size, rounds=rounds, local_lr=protocol.local_lr,
                       local_steps=protocol.local_steps, seed=0, vectorized=mode == "vectorized")
                times[mode].append((time.time() - t0) / rounds)
            fell_back += [str(w.message)[:300] for w in caught if "Vectoriz" in type(w.category).__name__
                          or "vectoriz" in str(w.message).lower()]
    result = {"seconds_per_round": {k: statistics.median(v) for k, v in times.items()},
              "speedup": statistics.median(times["sequential"]) / statistics.median(times["vectorized"]),
              "fallback_warnings": sorted(set(fell_back)), "cohort_size": protocol.cohort_size,
              "local_steps": protocol.local_steps, "machine": machine(), "finished": _now()}
    _write_json(out / "speed.json", result)
    return result


# --------------------------------------------------------------------------- runner
def run_study(protocol: Protocol, data: Data, out: Path, *, planner: Callable[..., list[Cell]],
              max_cells: int | None, time_budget: float | None, groups: set[str] | None) -> int:
    """Run unfinished cells in plan order until none is left, ``max_cells`` or the budget."""
    started, ran = time.time(), 0
    while True:
        done = {r["key"]: r for r in load_cells(out)}
        todo = [c for c in planner(protocol, done) if c.key(protocol) not in done
                and (groups is None or groups & set(c.groups))]
        total = len(done) + len(todo)
        if not todo or (max_cells is not None and ran >= max_cells):
            break
        if time_budget is not None and time.time() - started > time_budget:
            print("time budget spent; stopping (finished cells are kept)", flush=True)
            break
        cell = todo[0]
        print(f"[{len(done) + 1}/{total}] {','.join(cell.groups)}: {cell.label()} ...", flush=True)
        rec = run_cell(cell, protocol, data, out)
        ran += 1
        print(f"    WER {rec['wer']:.1%} CER {rec['cer']:.1%} (seed {rec['seed_model']['wer']:.1%}) "
              f"in {rec['total_s']:.0f}s; {len(todo) - 1} left, elapsed {time.time() - started:.0f}s",
              flush=True)
    return ran


# --------------------------------------------------------------------------- report
def _fmt(values: list[float] | None, pct: bool = True) -> str:
    if not values:
        return "–"
    m, s = _mean_std(values)
    if pct:
        return f"{100 * m:.1f} ± {100 * s:.1f} (n={len(values)})" if len(values) > 1 else f"{100 * m:.1f} (n=1)"
    return f"{m:.3g} ± {s:.2g}"


def aggregate(records: list[dict[str, Any]], protocol: Protocol) -> dict[tuple, dict[str, list[float]]]:
    """Cells of the current protocol grouped by configuration without the seed."""
    out: dict[tuple, dict[str, list[float]]] = {}
    current = json.loads(json.dumps(protocol.key_dict()))  # tuples become lists, as in the files
    for r in records:
        if r["protocol"] != current or r["protocol_version"] != PROTOCOL_VERSION:
            continue
        c = r["cell"]
        clip = c["clip"] if c.get("clip_start") is None else f"{c['clip']}@{c['clip_start']:g}"
        k = (clip, c["optimizer"], c["sigma_dp"], c["server_lr"], c["n_layers"],
             c["cohort_size"], c["local_steps"])
        slot = out.setdefault(k, {"wer": [], "cer": [], "seeds": [], "total_s": []})
        slot["wer"].append(r["wer"])
        slot["cer"].append(r["cer"])
        slot["seeds"].append(c["seed"])
        slot["total_s"].append(r["total_s"])
    return out


PAPER_PARAMS = 255_800_862
"""Parameters of the paper's model (design notes 2.5)."""


def paper_equivalent_sigma(sigma_dp: float, params: int) -> float:
    """σ_DP giving the paper's 255.8M-parameter model the same noise norm per unit of C
    (noise norm on the mean = σ_DP · C · √D) as ``sigma_dp`` gives a model of ``params``."""
    return sigma_dp * math.sqrt(params / PAPER_PARAMS)


def _paper_eps(sigma: float) -> dict[str, Any]:
    entry: dict[str, Any] = {"noise_multiplier": sigma * PAPER_SCALE["cohort_size"]}
    for acc in ("rdp", "pld"):
        try:
            entry[acc] = extrapolate(sigma_dp=sigma, accountant=acc, cohort_size=PAPER_SCALE["cohort_size"],
                                     population=PAPER_SCALE["population"], rounds=int(PAPER_SCALE["rounds"]),
                                     delta=PAPER_SCALE["delta"]).epsilon
        except (ValueError, RuntimeError, OverflowError) as exc:  # report, do not crash
            entry[acc] = f"failed: {exc}"[:120]
    return entry


def extrapolated_epsilons(sigmas: Iterable[float], out: Path, params: int) -> dict[str, dict[str, Any]]:
    """Paper-scale ε (S 204,800, K 69.5M, T 2,034, δ 1e-9) per σ_DP, RDP and PLD, both for the
    σ_DP itself and for its paper-model equivalent (:func:`paper_equivalent_sigma`); cached."""
    path = out / "extrapolated_epsilon.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    for s in sigmas:
        key = f"{s:g}@{params}"
        if s <= 0 or key in cache:
            continue
        eq = paper_equivalent_sigma(s, params)
        cache[key] = {**_paper_eps(s), "paper_equivalent_sigma": eq, "paper_equivalent": _paper_eps(eq)}
        _write_json(path, cache)
    return {k.split("@")[0]: v for k, v in cache.items() if k.endswith(f"@{params}")}


def _eps_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    return f"{v:.3g}"


def write_report(protocol: Protocol, out: Path) -> Path:
    """Markdown tables and PNG plots from whatever cells exist under ``out``."""
    records = load_cells(out)
    agg = aggregate(records, protocol)
    done = {r["key"]: r for r in records}
    lines = ["# ASR privacy-utility study (DP-FedAvg on the embedded corpus)", "",
             "Generated by `python benchmarks/asr_privacy_utility.py report` from the cells in "
             "`cells/` (one JSON per finished cell; mean ± std over seeds, WER/CER in %).", ""]
    seeds_json = out / "seed_models.json"
    seeds = json.loads(seeds_json.read_text()) if seeds_json.is_file() else {}
    lines += ["## Protocol (shared by every cell)", "", "```",
              json.dumps(protocol.key_dict(), indent=1), "```", ""]
    for v in seeds.values():
        lines.append(f"- seed model, {v['n_layers']} blocks ({v['params']:,} parameters): eval WER "
                     f"{100 * v['wer']:.1f}, CER {100 * v['cer']:.1f}")
    wall = sum(r["total_s"] for r in records)
    machines = sorted({r["machine"]["description"] for r in records})
    lines += ["", f"{len(records)} cells finished; cell wall time in all {wall / 3600:.2f} h "
              f"(one thread each); mean {wall / max(1, len(records)):.0f} s per cell.",
              f"Machine(s): {'; '.join(machines) or '–'}", ""]

    sigmas = sorted({k[2] for k in agg} | set(protocol.sigma_levels))
    params = next((v["params"] for v in seeds.values() if v["n_layers"] == model_config(protocol, None).n_layers), None)
    eps = extrapolated_epsilons(sigmas, out, params) if params else {}
    lines += ["## Extrapolated ε of each σ_DP (paper scale: S 204,800, K 69.5M, T 2,034, δ 1e-9)", "",
              "The noise norm on the mean is σ_DP·C·√D, so a given σ_DP is far noisier relative to C on this "
              f"{params or 0:,}-parameter model than on the paper's 255.8M-parameter one. The last three columns "
              "give the paper-model σ_DP with the same noise norm per unit of C (σ_DP·√(D/255.8M)) and its ε: "
              "the privacy level this utility point corresponds to at the paper's model size. ε below ~0.05 "
              "is at the accountants' resolution (RDP is floored by its largest order, PLD by its "
              "discretisation), i.e. effectively 0.", "",
              "| σ_DP | z = σ_DP·S | ε RDP | ε PLD | paper-model equivalent σ_DP | its ε RDP | its ε PLD |",
              "|---|---|---|---|---|---|---|"]
    for s in sigmas:
        if s > 0 and f"{s:g}" in eps:
            e = eps[f"{s:g}"]
            q = e["paper_equivalent"]
            lines.append(f"| {s:g} | {e['noise_multiplier']:.4g} | {_eps_str(e['rdp'])} | {_eps_str(e['pld'])} | "
                         f"{e['paper_equivalent_sigma']:.3g} | {_eps_str(q['rdp'])} | {_eps_str(q['pld'])} |")
    lines.append("")

    lr = {o: tuned_lr(protocol, done, o) for o in OPTIMIZERS}
    lines += ["## Server learning rates (sweep: per-layer dim, σ_DP "
              f"{protocol.lr_sweep_sigma:g}, seed {protocol.seeds[0]}; 3 LRs per optimizer, extended by up to "
              f"{MAX_LR_EXTENSIONS} more at the end holding the best)", "",
              "| optimizer | LR → eval WER % | chosen |", "|---|---|---|"]
    for opt, _ in protocol.lr_grid:
        grid = sweep_lrs(protocol, done, opt)
        cells = [done.get(Cell("dim", opt, protocol.lr_sweep_sigma, protocol.seeds[0], x).key(protocol))
                 for x in grid]
        txt = ", ".join(f"{x:g} → {100 * c['wer']:.1f}" if c else f"{x:g} → –" for x, c in zip(grid, cells, strict=True))
        lines.append(f"| {OPT_LABEL[opt]} | {txt} | {lr[opt] if lr[opt] is not None else '–'} |")
    lines.append("")

    def table(title: str, rows: list[tuple[str, tuple]], note: str = "") -> None:
        lines.extend([f"## {title}", ""] + ([note, ""] if note else []))
        lines.extend(["| setting | eval WER % | eval CER % |", "|---|---|---|"])
        for label, k in rows:
            slot = agg.get(k)
            lines.append(f"| {label} | {_fmt(slot['wer'] if slot else None)} | {_fmt(slot['cer'] if slot else None)} |")
        lines.append("")

    lamb = lr["lamb"]
    rows = []
    for s in sigmas:
        for clip in CLIPS:
            if (clip, "lamb", s, lamb, None, None, None) in agg or clip in ("global", "dim"):
                rows.append((f"σ_DP {s:g}, {CLIP_LABEL[clip]}", (clip, "lamb", s, lamb, None, None, None)))
    table("Clipping mode vs σ_DP (LAMB)", rows)
    rows = [(f"σ_DP {s:g}, {OPT_LABEL[o]}, {CLIP_LABEL[c]}", (c, o, s, lr[o], None, None, None))
            for s in sigmas for o in OPTIMIZERS for c in ("global", "dim") if lr[o] is not None]
    table("Server optimizer comparison", rows)
    rows = [(f"{d} blocks, σ_DP {s:g}, {CLIP_LABEL[c]}", (c, "lamb", s, lamb, None if d == model_config(protocol, None).n_layers else d, None, None))
            for d in protocol.depths for s in (0.0, protocol.sigma_depth) for c in ("global", "dim")]
    table("Depth (LAMB)", rows)
    rows = [(f"S={s}, {CLIP_LABEL[c]}", (c, "lamb", protocol.sigma_depth, lamb, None,
                                         None if s == protocol.cohort_size else s, None))
            for s in (5, 10, 20, 40) for c in ("dim", "global")]
    table(f"Cohort size at σ_DP {protocol.sigma_depth:g} (fixed extrapolated ε)", rows)
    rows = [(f"{n} local steps, {CLIP_LABEL[c]}", (c, "lamb", protocol.sigma_depth, lamb, None, None,
                                                  None if n == protocol.local_steps else n))
            for n in (1, 5, 10, 20) for c in ("dim", "global")]
    table(f"Local steps at σ_DP {protocol.sigma_depth:g}", rows)
    rows = [(f"σ_DP {s:g}, {CLIP_LABEL[c]}" + (f", start C×{x:g}" if x else ""),
             (f"{c}@{x:g}" if x else c, "lamb", s, lamb, None, None, None))
            for s in sigmas for c, x in (("global", None), ("dim", None), *(
                (a, x) for a in ("adaptive-global", "adaptive-dim") for x in ADAPTIVE_STARTS))]
    table("Adaptive clipping (LAMB; target quantile 0.5, η 1, count noise std S/20 per layer)", rows,
          "Adaptive cells also release a noised count each round, charged as one Gaussian of "
          "z_eff⁻² = z⁻² + z_b⁻² (the cell files record z_b and the run's ε). With the count std "
          "S/20 per layer, z_b = S/(10√H): at the paper's scale (S 204,800, H 296 tensors, "
          "z_b ≈ 1190) the count leaves the extrapolated ε of each σ_DP unchanged (7.22 at the "
          "paper's z), so the rows compare utility at equal extrapolated privacy; at this study's "
          "S = 10 the count itself is very noisy (std 0.5 users per layer), which is part of what "
          "the adaptive rows measure. The bound trajectories are in bound_trajectories.png.")

    speed = out / "speed.json"
    if speed.is_file():
        sp = json.loads(speed.read_text())
        lines += ["## Vectorized cohort training", "",
                  f"Seconds per round, sequential {sp['seconds_per_round']['sequential']:.1f}, "
                  f"`vectorized=True` {sp['seconds_per_round']['vectorized']:.1f}: speed-up "
                  f"{sp['speedup']:.2f}x (cohort {sp['cohort_size']}, {sp['local_steps']} local steps)."]
        if sp["fallback_warnings"]:
            lines.append("The vectorized path fell back to the sequential loop, so both timings are of the "
                         "same code and their ratio reflects only machine load, not a speed-up: "
                         + "; ".join(f"`{w}`" for w in sp["fallback_warnings"]))
        lines.append("")
    norms = out / "update_norms.json"
    if norms.is_file():
        lines += _norms_section(json.loads(norms.read_text()))
    fidelity = out / "fidelity.json"
    if fidelity.is_file():
        lines += _fidelity_section(json.loads(fidelity.read_text()))
    lines += claims_section(protocol, agg, lr)
    plots = make_plots(protocol, agg, lr, eps, out)
    plots += plot_bound_trajectories(protocol, records, out)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    conclusions = out / "conclusions.md"
    if conclusions.is_file():
        lines += [conclusions.read_text()]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _relative_rms(layer: Mapping[str, Any], n: Mapping[str, Any]) -> float:
    """(‖Δ_h‖/√d_h) / (‖Δ‖/√D): a layer's share of the global norm relative to its dim share.

    Under global clipping and noise, a layer's signal-to-noise ratio is proportional to this
    (per-layer dim clipping makes it 1 for every clipped layer); below 1 the layer drowns first.
    """
    total_d = sum(a["numel"] for a in n["layers"])
    total = math.sqrt(sum(a["norm"] ** 2 for a in n["layers"]))
    return (layer["norm"] / math.sqrt(layer["numel"])) / (total / math.sqrt(total_d))


def paired_gap(a: Mapping[str, list[float]] | None, b: Mapping[str, list[float]] | None) -> list[float]:
    """WER(a) − WER(b) in points for every seed both have finished."""
    if not a or not b:
        return []
    common = sorted(set(a["seeds"]) & set(b["seeds"]))
    return [100 * (a["wer"][a["seeds"].index(s)] - b["wer"][b["seeds"].index(s)]) for s in common]


def verdict(diffs: list[float], *, claim_sign: int = 1) -> str:
    """Plain verdict on paired WER differences (points; positive supports the claim if
    ``claim_sign`` is 1): beyond two standard errors and 1 point either way, or not."""
    if not diffs:
        return "not yet measured"
    diffs = [claim_sign * d for d in diffs]
    if len(diffs) < 2:
        return f"not yet measured (one seed: {diffs[0]:+.1f} points)"
    m, sd = _mean_std(diffs)
    se = sd / math.sqrt(len(diffs))
    text = f"{m:+.1f} ± {sd:.1f} points over {len(diffs)} seeds"
    if m > max(1.0, 2 * se):
        return f"reproduced ({text})"
    if m < -max(1.0, 2 * se):
        return f"reversed ({text})"
    return f"not reproduced: no clear difference ({text})"


def claims_section(protocol: Protocol, agg: Mapping[tuple, Mapping[str, list[float]]],
                   lr: Mapping[str, float | None]) -> list[str]:
    """Automatic per-claim verdicts from paired seeds (re-derived whenever the report is built)."""
    lamb, adam = lr["lamb"], lr["adam"]
    lines = ["## Claims (automatic verdicts from paired seeds)", "",
             "A claim counts as reproduced at a σ_DP when the paired WER difference exceeds both 1 point "
             "and two standard errors; reversed when it does so the other way.", "",
             "| claim | σ_DP | verdict |", "|---|---|---|"]
    for s in sorted(protocol.sigma_levels):
        g = agg.get(("global", "lamb", s, lamb, None, None, None))
        d = agg.get(("dim", "lamb", s, lamb, None, None, None))
        lines.append(f"| 1. per-layer dim beats global clipping (LAMB) | {s:g} | {verdict(paired_gap(g, d))} |")
    for s in sorted(protocol.sigma_levels):
        for clip in ("dim", "global"):
            a = agg.get((clip, "adam", s, adam, None, None, None))
            b = agg.get((clip, "lamb", s, lamb, None, None, None))
            lines.append(f"| 2. LAMB beats Adam ({clip} clipping) | {s:g} | {verdict(paired_gap(a, b))} |")
    default_depth = model_config(protocol, None).n_layers
    for depth in protocol.depths:
        nl = None if depth == default_depth else depth
        g = agg.get(("global", "lamb", protocol.sigma_depth, lamb, nl, None, None))
        d = agg.get(("dim", "lamb", protocol.sigma_depth, lamb, nl, None, None))
        lines.append(f"| 3. clipping gap at {depth} blocks (grows with depth?) | {protocol.sigma_depth:g} | "
                     f"{verdict(paired_gap(g, d))} |")
    return lines + [""]


def _norms_section(n: dict[str, Any]) -> list[str]:
    by_type: dict[str, dict[str, float]] = {}
    for layer in n["layers"]:
        t = by_type.setdefault(layer["type"], {"share": 0.0, "numel": 0, "count": 0, "norms": []})  # type: ignore[dict-item]
        t["share"] += layer["share_of_squared_norm"]
        t["numel"] += layer["numel"]
        t["count"] += 1
        t["norms"].append(layer["norm"])  # type: ignore[attr-defined]
    total = sum(t["numel"] for t in by_type.values())
    lines = ["## Per-layer update norms of real clients", "",
             f"{n['clients']} client updates from the first {n['rounds']} rounds of the FL run (no noise, "
             f"before clipping); mean total norm {n['mean_total_norm']:.3g} (C = {n['protocol']['clip_bound']:g}).", "",
             "| layer type | tensors | share of parameters | share of squared update norm | median tensor norm |"
             " relative per-element RMS (median, min–max) |",
             "|---|---|---|---|---|---|"]
    for name, t in sorted(by_type.items(), key=lambda kv: -kv[1]["share"]):
        rel = [_relative_rms(x, n) for x in n["layers"] if x["type"] == name]
        lines.append(f"| {name} | {t['count']} | {100 * t['numel'] / total:.2f}% | {100 * t['share']:.1f}% | "
                     f"{statistics.median(t['norms']):.3g} | {statistics.median(rel):.2f} ({min(rel):.2f}–{max(rel):.2f}) |")  # type: ignore[arg-type]
    lines += ["", "Relative per-element RMS = (‖Δ_h‖/√d_h)/(‖Δ‖/√D). Under global clipping plus noise a "
              "layer's signal-to-noise ratio is proportional to it; per-layer dim clipping equalises it to 1 "
              "for every clipped layer. Layer types well below 1 are the ones global clipping drowns."]
    return lines + [""]


def plot_bound_trajectories(protocol: Protocol, records: list[dict[str, Any]], out: Path) -> list[Path]:
    """``bound_trajectories.png``: the total bound per round / the tuned C, per adaptive cell."""
    current = json.loads(json.dumps(protocol.key_dict()))
    cells = [r for r in records if "adaptive" in r and r["protocol"] == current]
    if not cells:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = sorted({r["cell"]["sigma_dp"] for r in cells})
    colors = {s: plt.cm.viridis(i / max(1, len(sigmas) - 1)) for i, s in enumerate(sigmas)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, clip in zip(axes, ("adaptive-global", "adaptive-dim"), strict=True):
        seen = set()
        for r in sorted(cells, key=lambda r: r["cell"]["sigma_dp"]):
            if r["cell"]["clip"] != clip:
                continue
            traj = [b / r["adaptive"]["tuned_clip_bound"] for b in r["adaptive"]["bound_trajectory"]]
            s = r["cell"]["sigma_dp"]
            ax.plot(range(1, len(traj) + 1), traj, color=colors[s], alpha=0.7,
                    ls="-" if r["cell"]["clip_start"] > 1 else "--", label=None if s in seen else f"σ_DP {s:g}")
            seen.add(s)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("round")
        ax.set_title(f"{CLIP_LABEL[clip]} (solid: start C×10, dashed: C×0.1)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("total clip bound / tuned C (used in the round)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "bound_trajectories.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def make_plots(protocol: Protocol, agg: dict[tuple, dict[str, list[float]]], lr: dict[str, float | None],
               eps: dict[str, Any], out: Path) -> list[Path]:
    """PNG plots from the aggregated cells (only those with data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    lamb = lr["lamb"]

    def series(clip: str, opt: str, lrv: float | None, **kw: Any) -> list[tuple[float, float, float]]:
        pts = []
        for k, slot in agg.items():
            if k[:2] == (clip, opt) and k[3] == lrv and k[4:] == (kw.get("n_layers"), None, None):
                m, s = _mean_std(slot["wer"])
                pts.append((k[2], 100 * m, 0.0 if math.isnan(s) else 100 * s))
        return sorted(pts)

    # 1. WER vs σ_DP (and vs extrapolated ε) per clipping mode.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    any_data = False
    for clip in CLIPS:
        pts = series(clip, "lamb", lamb)
        if not pts:
            continue
        any_data = True
        xs = [max(p[0], min(protocol.sigma_levels[1:] or (1e-4,)) / 3) for p in pts]
        axes[0].errorbar(xs, [p[1] for p in pts], [p[2] for p in pts], marker="o", capsize=3, label=CLIP_LABEL[clip])
        def eq_eps(sigma: float) -> Any:
            return eps.get(f"{sigma:g}", {}).get("paper_equivalent", {}).get("rdp")

        noisy = [p for p in pts if p[0] > 0 and isinstance(eq_eps(p[0]), float)]
        axes[1].errorbar([eq_eps(p[0]) for p in noisy], [p[1] for p in noisy], [p[2] for p in noisy],
                         marker="o", capsize=3, label=CLIP_LABEL[clip])
    if any_data:
        axes[0].set_xscale("log")
        axes[0].set_xlabel("σ_DP (leftmost point: no noise)")
        axes[1].set_xscale("log")
        axes[1].set_xlabel("ε (RDP, δ 1e-9) at paper scale of the paper-model-equivalent σ_DP")
        for ax in axes:
            ax.set_ylabel("eval WER %")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("WER vs noise, LAMB server optimizer (mean ± std over seeds)")
        fig.tight_layout()
        paths.append(out / "wer_vs_sigma.png")
        fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # 2. Optimizer comparison.
    fig, ax = plt.subplots(figsize=(6.5, 4))
    any_data = False
    for opt in OPTIMIZERS:
        for clip, style in (("global", "--"), ("dim", "-")):
            pts = series(clip, opt, lr[opt])
            if not pts:
                continue
            any_data = True
            xs = [max(p[0], min(protocol.sigma_levels[1:] or (1e-4,)) / 3) for p in pts]
            ax.errorbar(xs, [p[1] for p in pts], [p[2] for p in pts], linestyle=style, marker="o", capsize=3,
                        label=f"{OPT_LABEL[opt]}, {clip}")
    if any_data:
        ax.set_xscale("log")
        ax.set_xlabel("σ_DP (leftmost point: no noise)")
        ax.set_ylabel("eval WER %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title("Server optimizers (tuned LR each)")
        fig.tight_layout()
        paths.append(out / "optimizers.png")
        fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # 3. Gap vs depth.
    default_depth = model_config(protocol, None).n_layers
    gaps = []
    for d in protocol.depths:
        nl = None if d == default_depth else d
        g = agg.get(("global", "lamb", protocol.sigma_depth, lamb, nl, None, None))
        p = agg.get(("dim", "lamb", protocol.sigma_depth, lamb, nl, None, None))
        if g and p:
            seeds = sorted(set(g["seeds"]) & set(p["seeds"]))
            diffs = [100 * (g["wer"][g["seeds"].index(s)] - p["wer"][p["seeds"].index(s)]) for s in seeds]
            if diffs:
                m, s = _mean_std(diffs)
                gaps.append((d, m, 0.0 if math.isnan(s) else s))
    if gaps:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.errorbar([g[0] for g in gaps], [g[1] for g in gaps], [g[2] for g in gaps], marker="o", capsize=3)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("transformer blocks")
        ax.set_ylabel("WER(global) − WER(per-layer dim), points")
        ax.set_title(f"Clipping gap vs depth (LAMB, σ_DP {protocol.sigma_depth:g})")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / "gap_vs_depth.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    # 4. Per-layer update norms.
    norms_path = out / "update_norms.json"
    if norms_path.is_file():
        n = json.loads(norms_path.read_text())
        colors = {"LayerNorm": "tab:red", "attention": "tab:blue", "MLP": "tab:green", "conv": "tab:purple",
                  "head": "tab:orange", "other": "gray"}
        fig, axes = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True)
        layers = n["layers"]
        x = list(range(len(layers)))
        cols = [colors[a["type"]] for a in layers]
        axes[0].bar(x, [a["norm"] for a in layers], color=cols)
        dots = axes[0].plot(x, [a["dim_bound"] * n["mean_total_norm"] / n["protocol"]["clip_bound"] for a in layers],
                            "k.", ms=4)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("client update norm")
        axes[1].bar(x, [100 * a["share_of_squared_norm"] for a in layers], color=cols)
        axes[1].set_ylabel("% of squared norm")
        axes[2].bar(x, [_relative_rms(a, n) for a in layers], color=cols)
        axes[2].axhline(1.0, color="k", lw=0.8)
        axes[2].set_yscale("log")
        axes[2].set_ylabel("per-element RMS /\nwhole-update RMS")
        axes[2].set_xticks(x)
        axes[2].set_xticklabels([a["name"] for a in layers], rotation=90, fontsize=5)
        present = [t for t in colors if any(a["type"] == t for a in layers)]
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[t]) for t in present] + dots
        fig.legend(handles, present + ["norm at its dim share of the total"], fontsize=7, ncol=len(handles),
                   loc="lower center", bbox_to_anchor=(0.5, 0.93), frameon=False)
        fig.suptitle(f"Per-tensor norms of real client updates ({n['clients']} clients, before clipping)", y=0.995)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        paths.append(out / "update_norms.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", nargs="?", default="all", choices=["all", "run", "norms", "fidelity", "speed", "report", "plan"])
    p.add_argument("--quick", action="store_true", help="2x2 subset on the tiny model (a few minutes)")
    p.add_argument("--out", type=Path, default=None, help=f"results directory (default {RESULTS})")
    p.add_argument("--max-cells", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; no new cell after it")
    p.add_argument("--groups", nargs="*", default=None, help="only cells of these groups (lr clip optim depth ...)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    protocol = QUICK if args.quick else FULL
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    planner = quick_plan if args.quick else plan
    groups = set(args.groups) if args.groups else None
    if args.command == "plan":
        done = {r["key"]: r for r in load_cells(out)}
        for c in planner(protocol, done):
            print(("done " if c.key(protocol) in done else "todo ") + f"{c.key(protocol)} {','.join(c.groups)}: {c.label()}")
        return 0
    if args.command in ("all", "norms", "fidelity", "speed", "run"):
        data = load_data(protocol)
        if args.command in ("all", "norms"):
            measure_norms(protocol, data, out, rounds=1 if args.quick else 2)
        if args.command in ("all", "fidelity"):
            measure_fidelity(protocol, data, out)
        if args.command in ("all", "speed"):
            print(json.dumps(measure_speed(protocol, data, out, rounds=1)), flush=True)
        if args.command in ("all", "run"):
            run_study(protocol, data, out, planner=planner, max_cells=args.max_cells, time_budget=args.time_budget,
                      groups=groups)
    print(f"report: {write_report(protocol, out)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
