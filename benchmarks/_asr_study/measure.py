"""Measurements beside the cells: per-layer update norms of real clients, noise fidelity, cohort speed."""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from benchmarks._asr_study.cells import Data, fl_run, make_clipper, make_optimizer, seed_model
from benchmarks._asr_study.grid import (
    Protocol,
)
from benchmarks._study import machine
from benchmarks._study import now as _now
from benchmarks._study import write_json as _write_json
from dpfl.clip import ClipStats, PerLayerClip
from examples.asr.train import batch_loss


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



def _relative_rms(layer: Mapping[str, Any], n: Mapping[str, Any]) -> float:
    """(‖Δ_h‖/√d_h) / (‖Δ‖/√D): a layer's share of the global norm relative to its dim share.

    Under global clipping and noise, a layer's signal-to-noise ratio is proportional to this
    (per-layer dim clipping makes it 1 for every clipped layer); below 1 the layer drowns first.
    """
    total_d = sum(a["numel"] for a in n["layers"])
    total = math.sqrt(sum(a["norm"] ** 2 for a in n["layers"]))
    return (layer["norm"] / math.sqrt(layer["numel"])) / (total / math.sqrt(total_d))
