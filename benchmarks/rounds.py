"""Benchmark the round loop's overhead and the cost of verified, atomic checkpoints.

Measured side by side in one run (interleaved repeats, medians), reported as ratios:

1. **Loop overhead**: seconds per round of a hand-written DP-FedAvg loop built from the same
   primitives (``train_local``, ``DPAggregator``, ``server_step``, ``RDPAccountant``) against
   :func:`dpfl.simulation.rounds.run_rounds` without I/O and with a JSON-lines log plus a
   checkpoint after every round. Model: an MLP; cohort of 8 users, 10 local steps each.
2. **Checkpoint cost**: :func:`~dpfl.simulation.checkpoint.save_checkpoint` (SHA-256 digest,
   fsync, atomic replace) against a plain ``torch.save``, and
   :func:`~dpfl.simulation.checkpoint.load_checkpoint` (digest check) against
   ``torch.load(weights_only=True)``, for model states of several sizes.
3. **Phase split** of a ``run_rounds`` round from its :class:`RoundRecord` timings.
4. **Accountant per round**: what a budgeted PLD accountant costs in each round of a long run
   (``would_exceed``, ``add_rounds``, ``epsilon``) at rounds 10, 100 and 1,000, against recomposing
   the whole ledger (:func:`benchmarks.accounting.rounds_table`).

Usage::

    python benchmarks/rounds.py                # writes benchmarks/results/rounds.md and prints it
    python benchmarks/rounds.py --repeats 5 --sizes 1e6 1e7 6.4e7
    python benchmarks/rounds.py --only-accountant   # section 4 only, replaced in rounds.md

Absolute seconds depend on the (shared) machine; compare the ratios.

References:
    Pelikan et al., arXiv 2310.00098 (DP-FedAvg rounds; 2,000-round runs need checkpoints).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpfl.accounting import RDPAccountant
from dpfl.aggregate import DPAggregator
from dpfl.clip import GlobalClip
from dpfl.noise import GaussianMechanism
from dpfl.optim import LAMB, server_step
from dpfl.simulation import (
    Checkpointing,
    InMemoryFederatedDataset,
    LocalTraining,
    Logging,
    PoissonSampler,
    Privacy,
    train_local,
)
from dpfl.simulation.checkpoint import load_checkpoint, save_checkpoint
from dpfl.simulation.rounds import RoundRecord, run_rounds

if __package__ in (None, ""):  # run as a script: make `benchmarks.accounting` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "rounds.md"
USERS, RATE, STEPS, ROUNDS, Z, DELTA = 32, 0.25, 10, 6, 1.0, 1e-6
ORDERS = tuple(range(2, 129))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def make_dataset() -> InMemoryFederatedDataset:
    g = torch.Generator().manual_seed(0)
    return InMemoryFederatedDataset(
        {
            u: [(torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g))]
            for u in range(USERS)
        }
    )


def loss_fn(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def bare_loop(dataset: InMemoryFederatedDataset) -> float:
    """The same DP-FedAvg rounds written by hand from the primitives; seconds per round."""
    model = make_model()
    sampler = PoissonSampler(dataset.user_ids(), RATE, seed=1)
    clipper = GlobalClip(1.0)
    mechanism = GaussianMechanism(Z, clipper.sensitivity, seed=2)
    optimizer, accountant = LAMB(model.parameters(), lr=0.01), RDPAccountant(orders=ORDERS)
    accountant.epsilon(DELTA)
    scratch = copy.deepcopy(model)
    start = time.perf_counter()
    for t in range(ROUNDS):
        agg = DPAggregator(clipper, mechanism, expected_cohort_size=sampler.expected_cohort_size)
        for i, uid in enumerate(sampler.sample()):
            gen = torch.Generator().manual_seed(t * 1000 + i)
            agg.add(
                train_local(
                    model,
                    dataset.user_data(uid),
                    loss_fn,
                    lr=0.1,
                    steps=STEPS,
                    generator=gen,
                    scratch=scratch,
                )
            )
        mean, _ = agg.release(allow_empty=True)
        server_step(optimizer, model, mean)
        accountant.add_rounds(sampler.round_spec(Z))
        accountant.epsilon(DELTA)
    return (time.perf_counter() - start) / ROUNDS


def loop(dataset: InMemoryFederatedDataset, *, io: bool) -> tuple[float, list[RoundRecord]]:
    """``run_rounds`` on the same problem; seconds per round and the records."""
    model = make_model()
    sampler, clipper = PoissonSampler(dataset.user_ids(), RATE, seed=1), GlobalClip(1.0)
    optimizer, accountant = LAMB(model.parameters(), lr=0.01), RDPAccountant(orders=ORDERS)
    accountant.epsilon(DELTA)
    with tempfile.TemporaryDirectory() as tmp:
        extra: dict[str, Any] = {}
        if io:
            extra = {
                "logging": Logging(Path(tmp) / "log.jsonl", progress=False, unsafe_metrics=True),
                "checkpointing": Checkpointing(tmp, every=1),
            }
        else:
            extra = {"logging": Logging(progress=False, unsafe_metrics=True)}
        start = time.perf_counter()
        result = run_rounds(
            model,
            dataset,
            loss_fn,
            sampler=sampler,
            server_optimizer=optimizer,
            rounds=ROUNDS,
            local=LocalTraining(lr=0.1, steps=STEPS),
            privacy=Privacy(clipper, noise_multiplier=Z, accountant=accountant, delta=DELTA),
            seed=3,
            **extra,
        )
        return (time.perf_counter() - start) / ROUNDS, list(result.records)


def checkpoint_times(numel: int, repeats: int) -> dict[str, float]:
    """Median seconds of dpfl's and plain torch's save and load for a ``numel``-float state."""
    state = {"round": 1, "model": {"w": torch.randn(numel)}, "config": {"z": 1.0}}
    times: dict[str, list[float]] = {
        "torch.save": [],
        "save_checkpoint": [],
        "torch.load": [],
        "load_checkpoint": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        plain, ours = Path(tmp) / "plain.pt", Path(tmp) / "ours.pt"
        ops: list[tuple[str, Callable[[], object]]] = [
            ("torch.save", lambda: torch.save(state, plain)),
            ("save_checkpoint", lambda: save_checkpoint(ours, state)),
            ("torch.load", lambda: torch.load(plain, weights_only=True)),
            ("load_checkpoint", lambda: load_checkpoint(ours)),
        ]
        for _ in range(repeats):
            for name, op in ops:
                start = time.perf_counter()
                op()
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


ACCOUNTANT_HEADING = "## Accountant per round (PLD under a budget, q = 0.5, z = 1, δ = 1e-6)"


def accountant_section() -> list[str]:
    """Section 4: the per-round cost of budgeted PLD accounting at rounds 10, 100 and 1,000."""
    from benchmarks.accounting import rounds_table

    return [
        ACCOUNTANT_HEADING,
        "",
        "Each round of `run_rounds` asks the accountant `would_exceed(spec)`, `add_rounds(spec)` "
        "and `epsilon(δ)`. \"now\": dpfl's `PLDAccountant` (composition cached and extended, "
        "automatic grid), median of 3 rounds at each round count, memory traced with tracemalloc. "
        "\"before\": recomposing the whole ledger with dp_accounting at grid 1e-3 (budget check, "
        "then ε), as the round loop did before; not run past 300 rounds. Memory is flat; the "
        "per-round time grows with the width of the composed privacy-loss distribution (more "
        "grid points at more rounds), not with the ledger's length.",
        "",
        *rounds_table(),
        "",
    ]


def _replace_section(text: str, heading: str, section: list[str]) -> str:
    """``text`` with the section under ``heading`` (up to the next ``## ``) replaced or appended."""
    lines = text.splitlines()
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = section
    else:
        lines += ["", *section]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 6.4e7])
    parser.add_argument("--only-accountant", action="store_true",
                        help="run section 4 only and replace it in the existing results file")
    args = parser.parse_args()
    if args.only_accountant:
        old = RESULTS.read_text() if RESULTS.exists() else "# Round loop and checkpoint benchmark\n"
        RESULTS.write_text(_replace_section(old, ACCOUNTANT_HEADING, accountant_section()))
        print(RESULTS.read_text())
        return
    load_start = os.getloadavg()[0]
    torch.set_num_threads(1)
    dataset = make_dataset()
    bare_loop(dataset)  # warm-up (lazy imports, allocator)
    per_round: dict[str, list[float]] = {"bare": [], "run_rounds": [], "run_rounds+io": []}
    records: list[RoundRecord] = []
    for _ in range(args.repeats):
        per_round["bare"].append(bare_loop(dataset))
        per_round["run_rounds"].append(loop(dataset, io=False)[0])
        seconds, recs = loop(dataset, io=True)
        per_round["run_rounds+io"].append(seconds)
        records += recs
    med = {k: statistics.median(v) for k, v in per_round.items()}
    params = sum(p.numel() for p in make_model().parameters())
    lines = [
        "# Round loop and checkpoint benchmark",
        "",
        f"Generated by `benchmarks/rounds.py` on {datetime.date.today()} ({platform.machine()}, "
        f"torch {torch.__version__}, 1 thread, shared machine: compare ratios; load average "
        f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end). Medians of "
        f"{args.repeats} interleaved repeats.",
        "",
        f"## Loop overhead (MLP with {params:,} parameters, {USERS} users, q = {RATE}, "
        f"{STEPS} local steps, {ROUNDS} rounds)",
        "",
        "| loop | s / round | ratio to hand-written |",
        "|---|---|---|",
    ]
    for name, label in (
        ("bare", "hand-written from primitives"),
        ("run_rounds", "`run_rounds`, no I/O"),
        ("run_rounds+io", "`run_rounds`, JSONL log + checkpoint every round"),
    ):
        lines.append(f"| {label} | {med[name]:.4f} | {med[name] / med['bare']:.2f} |")
    phases = ["sample", "train", "aggregate", "server_step", "account"]
    total = sum(statistics.median(r.timings[p] for r in records) for p in phases)
    lines += [
        "",
        "## Phase split of a `run_rounds` round (median over rounds)",
        "",
        "| phase | s | share |",
        "|---|---|---|",
    ]
    for p in phases:
        m = statistics.median(r.timings[p] for r in records)
        lines.append(f"| {p} | {m:.4f} | {m / total:.0%} |")
    lines += [
        "",
        "## Checkpoint cost (float32 state, local disk)",
        "",
        "| parameters | MB | torch.save s | save_checkpoint s | ratio | torch.load s | "
        "load_checkpoint s | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in args.sizes:
        n = int(size)
        c = checkpoint_times(n, args.repeats)
        lines.append(
            f"| {n:,} | {n * 4 / 2**20:.0f} | {c['torch.save']:.3f} | {c['save_checkpoint']:.3f} | "
            f"{c['save_checkpoint'] / c['torch.save']:.2f} | {c['torch.load']:.3f} | "
            f"{c['load_checkpoint']:.3f} | {c['load_checkpoint'] / c['torch.load']:.2f} |"
        )
    lines += [
        "",
        "`save_checkpoint` adds a SHA-256 pass over the state, an fsync of the file and "
        "of its directory and an atomic rename; `load_checkpoint` adds the digest check.",
        "",
        *accountant_section(),
    ]
    text = "\n".join(lines)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
