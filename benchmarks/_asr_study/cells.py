"""Running cells: the shared data, one FL run per cell, σ* fixed once, and the resumable runner."""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
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
    ROOT,
    Cell,
    Protocol,
    Study,
    cell_path,
    choose_sigma_star,
    count_noise_multiplier,
    load_cells,
    plan,
)
from benchmarks._asr_study.provenance import code_version, machine_info
from benchmarks._asr_study.seeds import corpus_config, failing_depths, seed_model
from benchmarks._study import now as _now
from benchmarks._study import write_json as _write_json
from dpfl.accounting import RDPAccountant
from dpfl.adaptive_clip import AdaptiveClip
from dpfl.clip import GlobalClip, PerLayerClip
from dpfl.optim import LAMB
from dpfl.simulation import (
    InMemoryFederatedDataset,
    LocalTraining,
    Logging,
    PoissonSampler,
    Privacy,
    RunResult,
    run_rounds,
)
from examples.asr.corpus import ensure_corpus
from examples.asr.data import read_librispeech
from examples.asr.features import cached_features
from examples.asr.text import CharTokenizer
from examples.asr.train import (
    Batch,
    BatchTensors,
    align_batches,
    batch_loss,
    evaluate,
    make_batches,
)


# --------------------------------------------------------------------------- data
@dataclass
class Data:
    """Features and batches shared by every cell (built once per process)."""

    source: str
    eval_batches: list[Batch]
    users: dict[str, list[Batch]]
    num_eval: int


def load_data(protocol: Protocol) -> Data:
    """The embedded corpus, cached features, the eval batches and every FL user's batches.

    The eval set is every eval utterance (``eval_utterances=None``) or, for ``--quick``, the same
    number of utterances from every eval speaker (round robin) up to ``eval_utterances``.
    """
    root = ensure_corpus(corpus_config(protocol), workers=1)
    tok = CharTokenizer()

    def split(name: str) -> tuple[dict[str, list[Any]], dict[str, torch.Tensor]]:
        users = read_librispeech(root, name, verify_audio=False).users
        return users, cached_features([u for utts in users.values() for u in utts])

    ev_users, ev_feats = split("eval")
    per_user = [list(u) for u in ev_users.values()]
    limit = protocol.eval_utterances if protocol.eval_utterances is not None else math.inf
    ev_utts: list[Any] = []
    while len(ev_utts) < limit and any(per_user):
        for utts in per_user:
            if utts and len(ev_utts) < limit:
                ev_utts.append(utts.pop(0))
    eval_batches = make_batches([ev_feats[u.utterance_id] for u in ev_utts],
                                [u.transcript for u in ev_utts], tok, batch_size=64)
    fl_users, fl_feats = split("fl-train")
    users = {uid: make_batches([fl_feats[u.utterance_id] for u in utts], [u.transcript for u in utts],
                               tok, batch_size=protocol.local_batch_size, seed=0)
             for uid, utts in fl_users.items()}
    return Data(f"embedded corpus {root.name}", eval_batches, users, len(ev_utts))


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
    if kind == "dim":
        return PerLayerClip(bound, allocation="dim")
    if kind == "normalize":
        return PerLayerClip(bound, allocation="dim", normalize=True)
    raise ValueError(f"unknown clipping mode {kind!r}; choose one of {CLIPS}")


def make_optimizer(name: str, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Server optimizers with the paper's betas/eps (LAMB with weight decay 0, as the paper)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "lamb":
        return LAMB(params, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    if name == "adam":
        return torch.optim.Adam(params, lr, betas=(0.9, 0.999), eps=1e-6)
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
    local_grad_clip: float,
    seed: int,
    vectorized: bool = False,
) -> RunResult:
    """DP-FedAvg on ``model`` in place: the study's **only** call of ``run_rounds``.

    Poisson sampling at rate ``S / K`` (seeded by ``seed``), z = σ_DP·S with noise seeded by
    ``seed`` (a simulation), RDP accountant, local SGD with per-step gradient clipping.
    """
    population = sorted(users)
    sampler = PoissonSampler(population, min(1.0, cohort_size / len(population)), seed=seed)
    data: dict[Hashable, Any] = {u: list(batches) for u, batches in users.items()}
    if vectorized:  # vmap stacks tensors only: hand out the batches without their transcripts
        data = {u: [BatchTensors(*b.tensors()) for b in batches] for u, batches in users.items()}
    return run_rounds(
        model,
        InMemoryFederatedDataset(data),
        batch_loss,
        sampler=sampler,
        server_optimizer=optimizer,
        rounds=rounds,
        local=LocalTraining(lr=local_lr, steps=local_steps, max_grad_norm=local_grad_clip,
                            vectorized=vectorized, align=align_batches if vectorized else None),
        privacy=Privacy(clipper, noise_multiplier=sigma_dp * cohort_size,
                        accountant=RDPAccountant(), delta=1e-6, noise_seed=seed),
        seed=seed,
        # Monitoring statistics of a synthetic benchmark (cohort sizes, clipped fraction, norms):
        # not covered by the DP guarantee, which is why run_rounds makes them opt-in.
        logging=Logging(None, progress=False, unsafe_metrics=True),
    )


def run_cell(cell: Cell, study: Study, data: Data, out: Path) -> dict[str, Any]:
    """Fine-tune the depth's seed model under ``cell``, score it, write and return its record."""
    torch.set_num_threads(1)
    p = study.protocol
    base, seed_entry = seed_model(study, cell.n_layers, data.eval_batches, out)
    model = copy.deepcopy(base)
    cohort = cell.cohort_size or p.cohort_size
    layers = sum(1 for q in model.parameters() if q.requires_grad)
    clipper = make_clipper(cell.clip, p.clip_bound * (cell.clip_start or 1.0), cohort, layers)
    t0 = time.time()
    run = fl_run(model, data.users, clipper=clipper,
                 optimizer=make_optimizer(cell.optimizer, model, cell.server_lr), sigma_dp=cell.sigma_dp,
                 cohort_size=cohort, rounds=p.rounds, local_lr=p.local_lr,
                 local_steps=cell.local_steps or p.local_steps, local_grad_clip=p.local_grad_clip,
                 seed=cell.seed)
    train_s = time.time() - t0
    if all(bool(torch.isfinite(q).all()) for q in model.parameters()):
        rates, _ = evaluate(model, data.eval_batches, CharTokenizer())
        wer, cer = rates.wer, rates.cer
    else:
        wer = cer = math.inf
    rec = run.records
    active = [r for r in rec if r.num_users]  # unsafe monitoring statistics (None when off)
    clipped = [float(r.fraction_clipped or 0.0) for r in active]
    norms = [float(r.mean_norm or 0.0) for r in active]
    record: dict[str, Any] = {
        "key": study.key(cell), "protocol_version": PROTOCOL_VERSION, "protocol": p.key_dict(),
        "cell": cell.config(), "groups": list(cell.groups), "wer": wer, "cer": cer,
        "seed_model": {"seed_id": study.seed_ids[cell.n_layers], "sha256": seed_entry["sha256"],
                       "wer": seed_entry["eval_wer"], "cer": seed_entry["eval_cer"]},
        "eval_utterances": data.num_eval, "rounds": run.rounds_completed,
        "run_epsilon_delta_1e-6": run.epsilon,
        "mean_users_per_round": statistics.fmean(float(r.num_users or 0) for r in rec),
        "fraction_clipped": statistics.fmean(clipped) if active else None,
        "mean_update_norm": statistics.fmean(norms) if active else None,
        "train_s": round(train_s, 1), "total_s": round(time.time() - t0, 1),
        "code": code_version(ROOT), "machine": machine_info(), "finished": _now(),
    }
    if isinstance(clipper, AdaptiveClip):  # the bounds are DP releases: logged per round
        record["adaptive"] = {
            "count_noise_multiplier": clipper.count_noise_multiplier, "target_quantile": ADAPTIVE_QUANTILE,
            "learning_rate": ADAPTIVE_LR, "tuned_clip_bound": p.clip_bound,
            "bound_trajectory": [r.clip_bound for r in rec],
        }
    _write_json(cell_path(out, record["key"]), record)
    return record


# --------------------------------------------------------------------------- σ*
def read_sigma_star(study: Study, out: Path) -> float | None:
    """σ* from ``out/sigma_star.json`` (None if not chosen yet).

    Raises:
        ValueError: if the file was written for another protocol version or protocol.
    """
    path = out / "sigma_star.json"
    if not path.is_file():
        return None
    blob = json.loads(path.read_text())
    if blob.get("protocol_version") != PROTOCOL_VERSION or blob.get("protocol") != study.protocol.key_dict():
        raise ValueError(f"{path} was written for another protocol (version {blob.get('protocol_version')}); "
                         "use another --out for this protocol")
    return float(blob["sigma_star"])


def fix_sigma_star(study: Study, done: Mapping[str, Mapping[str, Any]], out: Path) -> float | None:
    """σ*: read from ``sigma_star.json``, or chosen from the finished pilot and written there
    once (created exclusively: the first runner to finish the pilot writes it, nobody rewrites
    it). None while the pilot is unfinished."""
    current = read_sigma_star(study, out)
    if current is not None:
        return current
    choice = choose_sigma_star(study, done)
    if choice is None:
        return None
    blob = {**choice, "protocol_version": PROTOCOL_VERSION, "protocol": study.protocol.key_dict(),
            "rule": "the pilot level (global clipping, LAMB at its middle LR, seed 0, main depth) whose "
                    "eval-CER cost over no noise is closest to the target; fixed once chosen",
            "chosen": _now(), "code": code_version(ROOT)}
    path = out / "sigma_star.json"
    tmp = out / f".sigma_star.{os.getpid()}.tmp"
    _write_json(tmp, blob)
    try:
        os.link(tmp, path)  # fails if another runner wrote it first: theirs stands
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    print(f"σ* fixed: {read_sigma_star(study, out):g} (see {path})", flush=True)
    return read_sigma_star(study, out)


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
    if cell_path(out, key).exists():
        (out / "cells" / f".claim-{key}").unlink(missing_ok=True)
        return False
    return True


def todo_cells(study: Study, out: Path, *, groups: set[str] | None = None,
               depths: set[int] | None = None) -> tuple[dict[str, dict[str, Any]], list[Cell]]:
    """The finished cells (by key) and the unfinished ones of the plan, filtered."""
    done = {r["key"]: r for r in load_cells(out)}
    sigma_star = fix_sigma_star(study, done, out)
    todo = [c for c in plan(study, done, sigma_star, failing_depths(study, out))
            if study.key(c) not in done and (groups is None or groups & set(c.groups))
            and (depths is None or c.n_layers in depths)]
    return done, todo


def run_study(study: Study, data: Data, out: Path, *, max_cells: int | None = None,
              time_budget: float | None = None, groups: Iterable[str] | None = None,
              depths: Iterable[int] | None = None, wait_s: float = 30.0,
              on_cell: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Run unfinished cells in plan order until none is left, ``max_cells`` or the budget.

    While every remaining cell is held by another live runner, wait (their results may unlock
    new cells: σ*, sweep extensions, tuned LRs) and plan again. Returns the cells run.
    """
    groups = set(groups) if groups else None
    depths = set(depths) if depths else None
    started, ran = time.time(), 0
    while True:
        done, todo = todo_cells(study, out, groups=groups, depths=depths)
        if not todo or (max_cells is not None and ran >= max_cells):
            break
        if time_budget is not None and time.time() - started > time_budget:
            print("time budget spent; stopping (finished cells are kept)", flush=True)
            break
        cell = next((c for c in todo if _claim_unfinished(out, study.key(c))), None)
        if cell is None:
            print(f"every remaining cell ({len(todo)}) is held by another runner; waiting {wait_s:.0f}s",
                  flush=True)
            time.sleep(wait_s)
            continue
        key = study.key(cell)
        try:
            _, entry = seed_model(study, cell.n_layers, data.eval_batches, out)
            if not entry["passes_gate"]:
                print(f"{cell.n_layers} blocks: seed model fails the CER gate; its cells are skipped",
                      flush=True)
                continue
            print(f"[{len(done) + 1}/{len(done) + len(todo)}] {','.join(cell.groups)}: {cell.label()} ...",
                  flush=True)
            rec = run_cell(cell, study, data, out)
        finally:
            (out / "cells" / f".claim-{key}").unlink(missing_ok=True)
        ran += 1
        if on_cell is not None:
            on_cell(rec)
        print(f"    CER {rec['cer']:.1%} WER {rec['wer']:.1%} (seed CER {rec['seed_model']['cer']:.1%}) "
              f"in {rec['total_s']:.0f}s; {len(todo) - 1} known left, elapsed {time.time() - started:.0f}s",
              flush=True)
    return ran
