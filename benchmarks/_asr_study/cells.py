"""Running one cell: shared data, the cached seed model, the FL run; norms, fidelity and speed."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks._asr_study.grid import (
    ADAPTIVE_LR,
    ADAPTIVE_QUANTILE,
    CLIPS,
    OPTIMIZERS,
    PROTOCOL_VERSION,
    Cell,
    Protocol,
    cell_path,
    count_noise_multiplier,
    load_cells,
)
from benchmarks._study import machine
from benchmarks._study import now as _now
from benchmarks._study import write_json as _write_json
from dpfl.accounting import RDPAccountant
from dpfl.adaptive_clip import AdaptiveClip
from dpfl.clip import GlobalClip, PerLayerClip
from dpfl.optim import LAMB, layerwise_adam
from dpfl.simulation import (
    InMemoryFederatedDataset,
    LocalTraining,
    Logging,
    PoissonSampler,
    Privacy,
    RunResult,
    run_rounds,
)
from examples.asr.corpus import CorpusConfig, ensure_corpus
from examples.asr.data import read_librispeech
from examples.asr.features import cached_features
from examples.asr.model import CTCTransformer, get_config
from examples.asr.text import CharTokenizer
from examples.asr.train import (
    Batch,
    BatchTensors,
    align_batches,
    batch_loss,
    evaluate,
    make_batches,
    train_central,
)


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


def depth_slot(protocol: Protocol, agg: Mapping[tuple, Any], depth: int, sigma: float, lr: float | None) -> int | None:
    """The ``n_layers`` entry of the depth study's cells at ``depth``: the depth group's own cells
    where both clipping modes have them (run with the same code as the other depths), else the
    main grid's cells (``None``) when ``depth`` is the protocol's default."""
    if all((c, "lamb", sigma, lr, depth, None, None) in agg for c in ("global", "dim")):
        return depth
    return None if depth == model_config(protocol, None).n_layers else depth


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
    if vectorized:  # vmap stacks tensors only: hand out the batches without their transcripts
        users = {u: [BatchTensors(*b.tensors()) for b in batches] for u, batches in users.items()}
    return run_rounds(
        model,
        InMemoryFederatedDataset(dict(users)),
        batch_loss,
        sampler=sampler,
        server_optimizer=optimizer,
        rounds=rounds,
        local=LocalTraining(lr=local_lr, steps=local_steps, max_grad_norm=1.0,
                            vectorized=vectorized, align=align_batches if vectorized else None),
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


# --------------------------------------------------------------------------- runner
def _claim(out: Path, key: str) -> bool:
    """Claim cell ``key`` for this process, so that several runners share one plan; a claim
    whose process has died is taken over."""
    path = out / "cells" / f".claim-{key}"
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text() or 0)
                os.kill(pid, 0)
                return False  # held by a live runner
            except (ValueError, ProcessLookupError):
                path.unlink(missing_ok=True)  # a dead runner's claim
                continue
            except FileNotFoundError:
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def _claim_unfinished(out: Path, key: str) -> bool:
    """Claim cell ``key`` unless another runner holds it or has finished it since the plan."""
    if not _claim(out, key):
        return False
    if (out / "cells" / f"{key}.json").exists():
        (out / "cells" / f".claim-{key}").unlink(missing_ok=True)
        return False
    return True


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
        cell = next((c for c in todo if _claim_unfinished(out, c.key(protocol))), None)
        if cell is None:
            print("every remaining cell is claimed by another live runner; stopping", flush=True)
            break
        print(f"[{len(done) + 1}/{total}] {','.join(cell.groups)}: {cell.label()} ...", flush=True)
        try:
            rec = run_cell(cell, protocol, data, out)
        finally:
            (out / "cells" / f".claim-{cell.key(protocol)}").unlink(missing_ok=True)
        ran += 1
        print(f"    WER {rec['wer']:.1%} CER {rec['cer']:.1%} (seed {rec['seed_model']['wer']:.1%}) "
              f"in {rec['total_s']:.0f}s; {len(todo) - 1} left, elapsed {time.time() - started:.0f}s",
              flush=True)
    return ran
