"""Benchmark of the simulation layer: vectorized vs sequential local training, and a round split.

Measures, in one run on 2 CPU threads:

1. Users trained per second for cohorts of 8-128 users, with
   :func:`dpfl.simulation.train_cohort_vectorized` (``torch.func``) and with the sequential loop
   over :func:`dpfl.simulation.train_local` (one reused scratch module), for two small models:
   the quickstart MLP (20 -> 64 -> 2) and a 2-layer transformer encoder (d = 64, 4 heads).
   Every user runs 10 local SGD steps on batches of 16 (the paper's local recipe).
2. ``train_local`` with a fresh deepcopy per user vs one reused scratch copy.
3. The time split of one DP-FedAvg round (sample / local training / clip + aggregate /
   noise + mean / server step) built from dpfl's primitives, for both models at cohort 64.

Timings are medians over interleaved repeats; compare ratios within one run only.
Writes ``benchmarks/results/simulation.md`` and ``benchmarks/results/simulation.png``.

Usage: ``python benchmarks/simulation.py [--repeats N] [--quick]``.
"""

from __future__ import annotations

import os

# Shared CI/dev machines run other jobs beside the benchmark: with OpenMP's default active
# spin-waiting, 2 torch threads on 2 busy cores slow tiny ops down by 10-50x (each parallel region
# waits for a descheduled spinner). Passive waiting keeps the measurement meaningful. Must be set
# before torch initialises OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpfl.aggregate import DPAggregator
from dpfl.clip import PerLayerClip
from dpfl.noise import GaussianMechanism
from dpfl.optim import LAMB, server_step
from dpfl.simulation import (
    FixedCohortSampler,
    InMemoryFederatedDataset,
    VectorizationFallbackWarning,
    train_cohort_vectorized,
    train_local,
)

LOAD = os.getloadavg()
RESULTS = Path(__file__).resolve().parent / "results"
STEPS, BATCH, LR = 10, 16, 0.1
COHORTS = (8, 16, 32, 64, 128)
# The sequential loop's cost is linear in the number of users, so its users/s is measured on the
# first SEQ_USERS users of each cohort (same data, same run) to keep the benchmark short.
SEQ_USERS = 16


class Transformer(nn.Module):
    """A small transformer encoder classifier: 2 pre-LN layers, d=64, 4 heads, MLP 128."""

    def __init__(self, features: int = 16, d_model: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, 4, 2 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))


# model factory, per-example input shape
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "MLP 20-64-2": (make_mlp, (20,)),
    "transformer 2x d64": (Transformer, (8, 16)),
}


def loss_fn(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def user_batches(num_users: int, shape: tuple[int, ...], seed: int) -> list[list[Any]]:
    """Synthetic users: 3 batches of 16 examples each, labels from a noisy linear rule."""
    g = torch.Generator().manual_seed(seed)
    users = []
    for _ in range(num_users):
        data = []
        for _ in range(3):
            x = torch.randn(BATCH, *shape, generator=g)
            y = (x.flatten(1).sum(1) + 0.5 * torch.randn(BATCH, generator=g) > 0).long()
            data.append((x, y))
        users.append(data)
    return users


def run_sequential(model: nn.Module, cohort: list[list[Any]], *, scratch: bool = True) -> None:
    work = copy.deepcopy(model) if scratch else None
    g = torch.Generator().manual_seed(0)
    for batches in cohort:
        train_local(model, batches, loss_fn, lr=LR, steps=STEPS, generator=g, scratch=work)


def run_vectorized(model: nn.Module, cohort: list[list[Any]]) -> None:
    g = torch.Generator().manual_seed(0)
    train_cohort_vectorized(model, cohort, loss_fn, lr=LR, steps=STEPS, generator=g, fallback=False)


def timed(fn: Callable[..., object], *args: Any, **kwargs: Any) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def bench_throughput(repeats: int, cohorts: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    for name, (make, shape) in MODELS.items():
        torch.manual_seed(0)
        model = make()
        for size in cohorts:
            cohort = user_batches(size, shape, seed=size)
            run_vectorized(model, cohort[:2])  # warm-up (lazy init of torch.func)
            run_sequential(model, cohort[:2])
            seq, vec = [], []
            n_seq = min(size, SEQ_USERS)
            for _ in range(repeats):  # interleaved so both see the same machine load
                seq.append(timed(run_sequential, model, cohort[:n_seq]))
                vec.append(timed(run_vectorized, model, cohort))
            seq_rate = n_seq / statistics.median(seq)
            vec_rate = size / statistics.median(vec)
            row = {
                "model": name,
                "cohort": size,
                "seq_users_s": seq_rate,
                "vec_users_s": vec_rate,
                "speedup": vec_rate / seq_rate,
            }
            rows.append(row)
            print(
                f"{name:20s} cohort {size:4d}: sequential {row['seq_users_s']:8.1f} users/s, "
                f"vectorized {row['vec_users_s']:8.1f} users/s, speedup {row['speedup']:.2f}x",
                flush=True,
            )
    return rows


def bench_copy(repeats: int) -> dict[str, float]:
    """train_local with a deepcopy per user vs one reused scratch module (MLP, cohort 64)."""
    make, shape = MODELS["MLP 20-64-2"]
    model, cohort = make(), user_batches(64, shape, seed=1)
    deep, scratch = [], []
    for _ in range(repeats):
        deep.append(timed(run_sequential, model, cohort, scratch=False))
        scratch.append(timed(run_sequential, model, cohort, scratch=True))
    out = {"deepcopy_s": statistics.median(deep), "scratch_s": statistics.median(scratch)}
    print(
        f"train_local x64: deepcopy per user {out['deepcopy_s']:.3f} s, "
        f"reused scratch {out['scratch_s']:.3f} s",
        flush=True,
    )
    return out


def bench_round_split(rounds: int, cohort_size: int = 64) -> list[dict[str, Any]]:
    """Seconds per phase of one DP-FedAvg round, averaged over ``rounds`` rounds."""
    rows = []
    for name, (make, shape) in MODELS.items():
        torch.manual_seed(0)
        model = make()
        population = 4 * cohort_size
        dataset = InMemoryFederatedDataset(dict(enumerate(user_batches(population, shape, seed=7))))
        sampler = FixedCohortSampler(dataset.user_ids(), cohort_size, seed=0)
        clipper = PerLayerClip(0.01)
        mechanism = GaussianMechanism(1.0, clipper.sensitivity, seed=0)
        aggregator = DPAggregator(
            clipper, mechanism, expected_cohort_size=sampler.expected_cohort_size
        )
        optimizer = LAMB(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        phases = {
            "sample": 0.0,
            "local training": 0.0,
            "clip + aggregate": 0.0,
            "noise + mean": 0.0,
            "server step": 0.0,
        }
        for r in range(rounds + 1):  # round 0 is a warm-up, not counted
            t0 = time.perf_counter()
            cohort = sampler.sample()
            t1 = time.perf_counter()
            updates = train_cohort_vectorized(
                model,
                [dataset.user_data(u) for u in cohort],
                loss_fn,
                lr=LR,
                steps=STEPS,
                generator=gen,
                user_ids=cohort,
                fallback=False,
            )
            t2 = time.perf_counter()
            for update in updates:
                aggregator.add(update)
            t3 = time.perf_counter()
            mean, _ = aggregator.release()
            t4 = time.perf_counter()
            server_step(optimizer, model, mean)
            t5 = time.perf_counter()
            if r:
                for key, dt in zip(
                    phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True
                ):
                    phases[key] += dt / rounds
        total = sum(phases.values())
        row = {"model": name, "cohort": cohort_size, "total_s": total, **phases}
        rows.append(row)
        split = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in phases.items())
        print(
            f"round split {name} (cohort {cohort_size}): {total * 1e3:.1f} ms/round: {split}",
            flush=True,
        )
    return rows


def write_results(
    throughput: list[dict[str, Any]],
    copy_cost: dict[str, float],
    split: list[dict[str, Any]],
    repeats: int,
) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Simulation benchmark: vectorized vs sequential local training",
        "",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}). "
        f"Each user: {STEPS} local SGD steps, batch {BATCH}, "
        "per-step gradient clipping at 1.0. Median of "
        f"{repeats} interleaved repeats; compare ratios, not absolute numbers. The sequential "
        f"rate is measured on the first {SEQ_USERS} users of each cohort (its cost is linear in "
        f"users). Load average during the run: {LOAD[0]:.1f} at start, {os.getloadavg()[0]:.1f} "
        "at the end (other jobs shared the machine).",
        "Produced by `python benchmarks/simulation.py`.",
        "",
        "## Users trained per second",
        "",
        "| model | cohort | sequential (users/s) | vectorized (users/s) | speedup |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in throughput:
        lines.append(
            f"| {r['model']} | {r['cohort']} | {r['seq_users_s']:.1f} | "
            f"{r['vec_users_s']:.1f} | {r['speedup']:.2f}x |"
        )
    lines += [
        "",
        "## Sequential loop: deepcopy per user vs one reused scratch module (MLP, 64 users)",
        "",
        "| variant | seconds for 64 users |",
        "|---|---:|",
        f"| `copy.deepcopy(model)` per user | {copy_cost['deepcopy_s']:.3f} |",
        f"| one scratch module, `load_state_dict` per user | {copy_cost['scratch_s']:.3f} |",
        "",
        "## Time split of one DP-FedAvg round (vectorized local training, per-layer clip, LAMB)",
        "",
        "| model | cohort | ms/round | sample | local training | clip + aggregate "
        "| noise + mean | server step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = ["sample", "local training", "clip + aggregate", "noise + mean", "server step"]
    for r in split:
        cells = " | ".join(f"{100 * r[k] / r['total_s']:.1f}%" for k in keys)
        lines.append(f"| {r['model']} | {r['cohort']} | {1e3 * r['total_s']:.1f} | {cells} |")
    lines.append("")
    (RESULTS / "simulation.md").write_text("\n".join(lines))
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in MODELS:
        rows = [r for r in throughput if r["model"] == name]
        sizes = [r["cohort"] for r in rows]
        (line,) = axes[0].plot(
            sizes, [r["vec_users_s"] for r in rows], "o-", label=f"{name}, vectorized"
        )
        axes[0].plot(
            sizes,
            [r["seq_users_s"] for r in rows],
            "s--",
            color=line.get_color(),
            label=f"{name}, sequential",
        )
        axes[1].plot(sizes, [r["speedup"] for r in rows], "o-", label=name)
    axes[1].axhline(3.0, color="gray", linestyle=":", label="3x target")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cohort size (users)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("users trained per second")
    axes[1].set_ylabel("speedup of vectorized over sequential")
    fig.suptitle(
        f"dpfl local training, {STEPS} steps x batch {BATCH}, {torch.get_num_threads()} CPU threads"
    )
    fig.tight_layout()
    fig.savefig(RESULTS / "simulation.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="cohorts 8 and 64 only, 1 repeat")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("error", VectorizationFallbackWarning)
    repeats = 1 if args.quick else args.repeats
    cohorts = (8, 64) if args.quick else COHORTS
    throughput = bench_throughput(repeats, cohorts)
    copy_cost = bench_copy(repeats)
    split = bench_round_split(2 if args.quick else args.rounds)
    write_results(throughput, copy_cost, split, repeats)


if __name__ == "__main__":
    main()
