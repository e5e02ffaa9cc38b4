"""Diagnostics beside the cells: per-layer update norms and clipping fidelity per depth, speed.

The norms and fidelity are measured at every depth of the grid and at the diagnostic depth
(36 blocks in the full protocol: a model built only for this, one seed, no training grid). Each
depth's result is stored under its depth in ``update_norms.json`` / ``fidelity.json`` with the
seed model's identity and reused while that model is unchanged.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks._asr_study.cells import Data, fl_run, make_clipper, make_optimizer, read_sigma_star
from benchmarks._asr_study.grid import FIXED_CLIPS, ROOT, Study
from benchmarks._asr_study.provenance import code_version, machine_info
from benchmarks._asr_study.seeds import seed_model
from benchmarks._study import now as _now
from benchmarks._study import write_json as _write_json
from dpfl.clip import ClipStats, PerLayerClip
from dpfl.simulation import train_local
from examples.asr.train import batch_loss


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


def relative_rms(layer: Mapping[str, Any], layers: Sequence[Mapping[str, Any]]) -> float:
    """(‖Δ_h‖/√d_h) / (‖Δ‖/√D): a layer's per-element RMS relative to the whole update's.

    Under global clipping and noise a layer's signal-to-noise ratio is proportional to this
    (per-layer dim clipping makes it 1 for every clipped layer); below 1 the layer drowns first.
    """
    total_d = sum(a["numel"] for a in layers)
    total = math.sqrt(sum(a["norm"] ** 2 for a in layers))
    return (layer["norm"] / math.sqrt(layer["numel"])) / (total / math.sqrt(total_d))


class _RecordingClip(PerLayerClip):
    """A :class:`PerLayerClip` (dim, one layer per tensor) that keeps every pre-clip layer norm."""

    def __init__(self, bound: float) -> None:
        super().__init__(bound, allocation="dim")
        self.seen: list[dict[str, float]] = []

    def clip_and_accumulate_(self, update: Mapping[str, torch.Tensor], accumulator: dict[str, torch.Tensor]) -> ClipStats:
        stats = super().clip_and_accumulate_(update, accumulator)
        self.seen.append(dict(stats.layer_norms))
        return stats


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def diagnostic_depths(study: Study) -> list[int]:
    """The grid's depths and the diagnostic depth."""
    return list(dict.fromkeys((*study.protocol.depths, study.protocol.diag_depth)))


def measure_norms(study: Study, data: Data, out: Path) -> dict[str, Any]:
    """Per-tensor L2 norms of real client updates (before clipping) in the first ``norm_rounds``
    rounds of an FL run from each depth's seed model (per-layer dim clipping, LAMB at its
    middle LR, no noise, seed 0), averaged over clients."""
    torch.set_num_threads(1)
    p = study.protocol
    path = out / "update_norms.json"
    for depth in diagnostic_depths(study):
        if _load(path).get(str(depth), {}).get("seed_id") == study.seed_ids[depth]:
            continue
        t0 = time.time()
        base, entry = seed_model(study, depth, data.eval_batches, out)
        model = copy.deepcopy(base)
        clipper = _RecordingClip(p.clip_bound)
        fl_run(model, data.users, clipper=clipper, optimizer=make_optimizer("lamb", model, p.pilot_lr()),
               sigma_dp=0.0, cohort_size=p.cohort_size, rounds=p.norm_rounds, local_lr=p.local_lr,
               local_steps=p.local_steps, local_grad_clip=p.local_grad_clip, seed=0)
        names = list(clipper.seen[0])
        sizes = {n: q.numel() for n, q in base.named_parameters()}
        bounds = clipper.layer_bounds({n: q.detach() for n, q in base.named_parameters()})
        mean = {n: statistics.fmean(s[n] for s in clipper.seen) for n in names}
        total_sq = sum(v * v for v in mean.values())
        layers: list[dict[str, Any]] = [{"name": n, "type": layer_type(n), "numel": sizes[n], "norm": mean[n],
                   "share_of_squared_norm": mean[n] ** 2 / total_sq, "dim_bound": bounds[n],
                   "clip_factor_dim": min(1.0, bounds[n] / mean[n]) if mean[n] > 0 else 1.0}
                  for n in names]
        for a in layers:
            a["relative_rms"] = relative_rms(a, layers)
        rel = [a["relative_rms"] for a in layers]
        result = {
            "n_layers": depth, "seed_id": study.seed_ids[depth], "seed_cer": entry["eval_cer"],
            "diagnostic_only": depth not in p.depths, "clients": len(clipper.seen), "rounds": p.norm_rounds,
            "clip_bound": p.clip_bound, "layers": layers,
            "mean_total_norm": statistics.fmean(math.hypot(*s.values()) for s in clipper.seen),
            "relative_rms_span": max(rel) / min(r for r in rel if r > 0),
            "seconds": round(time.time() - t0, 1), "code": code_version(ROOT), "machine": machine_info(),
            "finished": _now(),
        }
        blob = _load(path)
        blob[str(depth)] = result
        _write_json(path, blob)
        print(f"update norms ({depth} blocks): per-element RMS spans x{result['relative_rms_span']:.3g} "
              f"across {len(layers)} tensors", flush=True)
    return _load(path)


def measure_fidelity(study: Study, data: Data, out: Path, *, draws: int = 5) -> dict[str, Any]:
    """How well the noised, clipped mean keeps each layer type's direction, per depth.

    One cohort (the first S users) of real client updates (the protocol's local work from the
    depth's seed model) is clipped globally, per layer (dim) or normalized, averaged over S,
    noised with std σ_DP·C per coordinate (at 0, the depth's σ_pe and σ* when fixed), and
    compared by cosine with the unclipped mean update, overall and per layer type. Also: the
    fraction of the users clipped and the mean factor by which clipping scales the update.
    """
    torch.set_num_threads(1)
    p = study.protocol
    path = out / "fidelity.json"
    sigma_star = read_sigma_star(study, out)
    for depth in diagnostic_depths(study):
        sigmas = sorted({0.0, study.sigma_pe(depth), *((sigma_star,) if sigma_star else ())})
        old = _load(path).get(str(depth), {})
        if old.get("seed_id") == study.seed_ids[depth] and old.get("sigmas") == sigmas:
            continue
        base, _ = seed_model(study, depth, data.eval_batches, out)
        users = sorted(data.users)[: p.cohort_size]
        updates = [train_local(base, data.users[u], batch_loss, lr=p.local_lr, steps=p.local_steps,
                               max_grad_norm=p.local_grad_clip, generator=torch.Generator().manual_seed(i))
                   for i, u in enumerate(users)]
        names = list(updates[0])
        true_mean = {n: torch.stack([u[n] for u in updates]).mean(0) for n in names}
        types = sorted({layer_type(n) for n in names})
        gen = torch.Generator().manual_seed(0)
        rows = []
        for clip in FIXED_CLIPS:
            clipper = make_clipper(clip, p.clip_bound)
            clipped, factors = [], []
            for u in updates:
                c = clipper.clip(u)[0]
                clipped.append(c)
                norm_u = math.sqrt(sum(float(v.double().pow(2).sum()) for v in u.values()))
                norm_c = math.sqrt(sum(float(v.double().pow(2).sum()) for v in c.values()))
                factors.append(norm_c / norm_u if norm_u > 0 else 1.0)
            mean = {n: torch.stack([c[n] for c in clipped]).mean(0) for n in names}
            for sigma in sigmas:
                cos: dict[str, list[float]] = {t: [] for t in ["all", *types]}
                for _ in range(draws):
                    noisy = {n: mean[n] + sigma * p.clip_bound * torch.randn(mean[n].shape, generator=gen)
                             for n in names}
                    for t in cos:
                        sel = [n for n in names if t == "all" or layer_type(n) == t]
                        a = torch.cat([noisy[n].flatten() for n in sel]).double()
                        b = torch.cat([true_mean[n].flatten() for n in sel]).double()
                        cos[t].append(float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30)))
                rows.append({"clip": clip, "sigma_dp": sigma, "mean_norm_factor": statistics.fmean(factors),
                             **{t: statistics.fmean(v) for t, v in cos.items()}})
        blob = _load(path)
        blob[str(depth)] = {"n_layers": depth, "seed_id": study.seed_ids[depth], "users": len(users),
                            "draws": draws, "types": types, "sigmas": sigmas, "rows": rows, "finished": _now()}
        _write_json(path, blob)
    return _load(path)


def measure_speed(study: Study, data: Data, out: Path, *, rounds: int = 2) -> dict[str, Any]:
    """Seconds per round of sequential vs ``vectorized=True`` cohort training (main depth)."""
    torch.set_num_threads(1)
    p = study.protocol
    base, _ = seed_model(study, p.main_depth, data.eval_batches, out)
    times: dict[str, list[float]] = {"sequential": [], "vectorized": []}
    fell_back: list[str] = []
    for _ in range(2):
        for mode in ("sequential", "vectorized"):
            model = copy.deepcopy(base)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.time()
                fl_run(model, data.users, clipper=make_clipper("dim", p.clip_bound),
                       optimizer=make_optimizer("lamb", model, p.pilot_lr()), sigma_dp=0.0,
                       cohort_size=p.cohort_size, rounds=rounds, local_lr=p.local_lr,
                       local_steps=p.local_steps, local_grad_clip=p.local_grad_clip, seed=0,
                       vectorized=mode == "vectorized")
                times[mode].append((time.time() - t0) / rounds)
            fell_back += [str(w.message)[:300] for w in caught if "vectoriz" in str(w.message).lower()]
    result = {"seconds_per_round": {k: statistics.median(v) for k, v in times.items()},
              "speedup": statistics.median(times["sequential"]) / statistics.median(times["vectorized"]),
              "fallback_warnings": sorted(set(fell_back)), "cohort_size": p.cohort_size,
              "local_steps": p.local_steps, "n_layers": p.main_depth, "machine": machine_info(),
              "finished": _now()}
    _write_json(out / "speed.json", result)
    return result
