"""A tiny federated problem (an MLP on synthetic users) shared by the round-loop tests.

Also a command-line training script: the resume test starts it as a real subprocess, kills it
(SIGKILL) after some round and starts it again with ``--resume``; the distributed tests start it
as several ``torch.distributed`` ranks.

Usage: ``python tests/_scripts/tiny_fl.py OUT_DIR --rounds N [--resume] [--dist]
[--checkpoint-every K] [--slow S] [--timeout T] [--kill-at K] [--noise seeded|entropy|secure]
[--data-seed D] [--server-sgd] [--record-releases]``.
Writes ``OUT_DIR/log.jsonl``, ``OUT_DIR/ckpt/``, ``OUT_DIR/progress.txt`` (one line per noised
model that ``eval_fn`` observed on rank 0, i.e. per release, appended across restarts; with
``--record-releases`` also ``OUT_DIR/releases.jsonl``, the parameters of each), the final
``model.pt`` and ``ledger.json`` (accountant state) in ``OUT_DIR`` or, with ``--dist``, in
``OUT_DIR/rank<r>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpfl.accounting import PrivacyBudget, RDPAccountant
from dpfl.clip import GlobalClip
from dpfl.optim import LAMB
from dpfl.simulation import (
    Checkpointing,
    Evaluation,
    InMemoryFederatedDataset,
    LocalTraining,
    Logging,
    PoissonSampler,
    Privacy,
    RunResult,
    run_rounds,
)

IN, HIDDEN, OUT = 4, 8, 2
#: Integer RDP orders: much faster to evaluate than dp_accounting's default fractional orders.
ORDERS = tuple(range(2, 129))


def make_model(seed: int = 0) -> nn.Module:
    """A 2-layer MLP with deterministic initial weights."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


def make_dataset(num_users: int = 12, seed: int = 0) -> InMemoryFederatedDataset:
    """Users with 1-3 batches of 5 examples each, from a fixed generator."""
    g = torch.Generator().manual_seed(seed)
    data: dict[Hashable, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for u in range(num_users):
        batches = int(torch.randint(1, 4, (1,), generator=g))
        data[f"u{u}"] = [
            (torch.randn(5, IN, generator=g), torch.randint(0, OUT, (5,), generator=g))
            for _ in range(batches)
        ]
    return InMemoryFederatedDataset(data)


def loss_fn(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def run(
    out: Path,
    *,
    rounds: int,
    resume: bool = False,
    checkpoint_every: int = 1,
    dist: Any = None,
    slow: float = 0.0,
    budget: float | None = None,
    noise_multiplier: float = 1.0,
    noise_seed: int | None = 4321,
    secure_noise: bool = False,
    vectorized: bool = False,
    unsafe_metrics: bool = False,
    crash_at: int = 0,
    kill_at: int = 0,
    scheduler: bool = False,
    clipper: Any = None,
    sampler: Any = None,
    model: nn.Module | None = None,
    optimizer_cls: Any = None,
    accountant: Any = None,
    server_lr: float = 0.01,
    checkpoint_dir: Path | None = None,
    log_path: Path | None = None,
    data_seed: int = 0,
    record_releases: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, Any, RunResult]:
    """Build the tiny problem and run it; returns (model, accountant, result).

    ``crash_at=k`` makes the run raise right after round ``k`` was computed, before it is logged
    or checkpointed (the in-process analogue of killing the process there); ``kill_at=k`` kills
    the process (SIGKILL) at the same point of a fresh run. ``secure_noise`` implies
    ``noise_seed=None``. ``data_seed`` picks the users' examples (same user ids);
    ``record_releases`` appends every observed model's parameters to ``out/releases.jsonl``.
    """
    model = make_model() if model is None else model
    dataset = make_dataset(seed=data_seed)
    if sampler is None:
        sampler = PoissonSampler(dataset.user_ids(), 0.5, seed=11)
    if accountant is None:
        accountant = RDPAccountant(
            budget=None if budget is None else PrivacyBudget(budget, 1e-5), orders=ORDERS
        )
    optimizer = (LAMB if optimizer_cls is None else optimizer_cls)(model.parameters(), lr=server_lr)
    if scheduler:
        kwargs["lr_scheduler"] = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.8)
    progress_file = out / "progress.txt"

    def eval_fn(m: nn.Module) -> dict[str, float]:
        if accountant.rounds == crash_at:  # simulate a crash after the round, before its log
            raise RuntimeError(f"simulated crash after round {crash_at}")
        with progress_file.open("a") as f:  # one line per noised model observed (a release)
            f.write(f"{accountant.rounds}\n")
            f.flush()
            os.fsync(f.fileno())
        if record_releases:
            params = [float(x) for p in m.parameters() for x in p.detach().flatten()]
            with (out / "releases.jsonl").open("a") as f:
                f.write(json.dumps({"charges": accountant.rounds, "params": params}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if kill_at and accountant.rounds == kill_at:  # die between a release and its checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        if slow:
            time.sleep(slow)
        return {"weight_sum": float(sum(float(p.detach().sum()) for p in m.parameters()))}

    result = run_rounds(
        model,
        dataset,
        loss_fn,
        sampler=sampler,
        server_optimizer=optimizer,
        rounds=rounds,
        local=LocalTraining(lr=0.1, steps=3, vectorized=vectorized),
        privacy=Privacy(
            GlobalClip(0.5) if clipper is None else clipper,
            noise_multiplier=noise_multiplier,
            accountant=accountant,
            delta=1e-5,
            noise_seed=None if secure_noise else noise_seed,
            secure_noise=secure_noise,
        ),
        seed=1234,
        checkpointing=Checkpointing(
            out / "ckpt" if checkpoint_dir is None else checkpoint_dir,
            every=checkpoint_every,
            resume=resume,
        ),
        logging=Logging(
            out / "log.jsonl" if log_path is None else log_path,
            progress=False,
            unsafe_metrics=unsafe_metrics,
        ),
        evaluation=Evaluation(eval_fn, every=1),
        dist=dist,
        **kwargs,
    )
    return model, accountant, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--dist", action="store_true", help="join a gloo group (torchrun env)")
    parser.add_argument("--checkpoint-every", type=int, default=1)
    parser.add_argument("--slow", type=float, default=0.0, help="seconds to sleep per round")
    parser.add_argument("--timeout", type=float, default=30.0, help="collective timeout (s)")
    parser.add_argument("--unsafe-metrics", action="store_true", help="log cohort statistics")
    parser.add_argument("--kill-at", type=int, default=0, help="SIGKILL itself after round k")
    parser.add_argument(
        "--noise", choices=("seeded", "entropy", "secure"), default="seeded", help="noise source"
    )
    parser.add_argument(
        "--adaptive", action="store_true", help="per-layer adaptive clipping (AdaptiveClip)"
    )
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the users' examples")
    parser.add_argument("--server-sgd", action="store_true", help="server SGD at lr 1 (linear)")
    parser.add_argument("--record-releases", action="store_true", help="write releases.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ctx = None
    if args.dist:
        from dpfl.simulation.distributed import init_distributed

        ctx = init_distributed(backend="gloo", timeout_s=args.timeout)
    results = args.out / f"rank{ctx.rank}" if ctx is not None else args.out
    clipper = None
    if args.adaptive:
        from dpfl.adaptive_clip import AdaptiveClip
        from dpfl.clip import PerLayerClip

        clipper = AdaptiveClip(PerLayerClip(0.5), count_noise_multiplier=4.0)
    results.mkdir(parents=True, exist_ok=True)
    model, accountant, result = run(
        args.out,
        rounds=args.rounds,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        dist=ctx,
        slow=args.slow,
        kill_at=args.kill_at,
        unsafe_metrics=args.unsafe_metrics,
        noise_seed=4321 if args.noise == "seeded" else None,
        secure_noise=args.noise == "secure",
        clipper=clipper,
        data_seed=args.data_seed,
        record_releases=args.record_releases,
        **({"optimizer_cls": torch.optim.SGD, "server_lr": 1.0} if args.server_sgd else {}),
    )
    torch.save(model.state_dict(), results / "model.pt")
    if clipper is not None:
        (results / "bounds.json").write_text(json.dumps(clipper.bounds))
    (results / "ledger.json").write_text(json.dumps(accountant.state_dict()))
    print(f"done: {result.rounds_completed} rounds, epsilon {result.epsilon:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
