"""Does per-layer clipping help outside speech? Global vs per-layer clipping on a federated
character-level transformer language model.

The paper's first open question (Pelikan et al., arXiv 2310.00098, section 7): is the advantage of
per-layer clipping specific to speech? This study repeats the global vs per-layer (``dim``
allocation) comparison of ``benchmarks/asr_privacy_utility.py`` on a model that exercises the same
mechanism -- a pre-LayerNorm transformer with embeddings, attention, MLP, LayerNorm and an output
head -- trained on text instead of audio:

- **Data.** The embedded corpus' sentence grammar (:mod:`examples.asr.sentences`): every federated
  user holds the sentence set of one synthetic speaker; a central seed set and held-out evaluation
  speakers are drawn the same way from disjoint seeds.
- **Recipe.** Central seed training (Adam, short, so federated learning has room to improve), then
  DP-FedAvg through :func:`dpfl.simulation.run_rounds`: Poisson sampling, local SGD, clipping at
  ``C``, Gaussian noise of std ``sigma_DP * C`` on the mean update (z = sigma_DP * S), LAMB at a
  server LR chosen by a small sweep. Metric: evaluation cross-entropy in **bits per character**
  (lower is better) on the held-out speakers' sentences.
- **Cells.** {global, per-layer dim} x sigma_DP x 3 seeds, each written to
  ``<out>/cells/<key>.json`` as it finishes (the study resumes and accumulates across sessions).

Usage::

    python benchmarks/char_lm_clipping.py run [--time-budget S]   # run unfinished cells
    python benchmarks/char_lm_clipping.py report                  # markdown + plot
    python benchmarks/char_lm_clipping.py --quick --out /tmp/lm   # tiny 2x2 smoke run

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv:2310.00098.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import copy  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from benchmarks._study import machine, mean_std, now, paired_verdict, write_json  # noqa: E402
from dpfl.accounting import RDPAccountant  # noqa: E402
from dpfl.clip import GlobalClip, PerLayerClip  # noqa: E402
from dpfl.optim import LAMB  # noqa: E402
from dpfl.simulation import (  # noqa: E402
    InMemoryFederatedDataset,
    LocalTraining,
    Logging,
    PoissonSampler,
    Privacy,
    run_rounds,
)
from examples.asr.sentences import generate_sentences  # noqa: E402

PROTOCOL_VERSION = 1
RESULTS = Path(__file__).resolve().parent / "results" / "char_lm_clipping"
ALPHABET = " 'abcdefghijklmnopqrstuvwxyz-"
PAD, BOS = 0, 1  # symbol ids; characters start at 2
CLIPS = ("global", "dim")


@dataclass(frozen=True)
class Protocol:
    """Everything shared by all cells (changing a field in :meth:`key_dict` starts a new study)."""

    users: int = 400
    sentences_per_user: int = 16
    seed_sentences: int = 4000
    eval_sentences: int = 1000
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 256
    seed_steps: int = 150
    seed_lr: float = 1e-3
    seed_batch_size: int = 32
    rounds: int = 10
    cohort_size: int = 10
    local_steps: int = 10
    local_lr: float = 0.1
    local_batch_size: int = 4
    clip_bound: float = 0.01
    sigma_levels: tuple[float, ...] = (0.0, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    seeds: tuple[int, ...] = (0, 1, 2)
    lr_grid: tuple[float, ...] = (0.005, 0.015, 0.045)
    lr_sweep_sigma: float = 1e-3

    def key_dict(self) -> dict[str, Any]:
        """The fields that change a cell's result (the grid definitions do not)."""
        skip = {"sigma_levels", "seeds", "lr_grid", "lr_sweep_sigma"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


FULL = Protocol()
QUICK = Protocol(users=40, sentences_per_user=4, seed_sentences=200, eval_sentences=50, d_model=32,
                 n_layers=2, n_heads=2, d_ff=64, seed_steps=20, rounds=2, cohort_size=4,
                 local_steps=2, sigma_levels=(0.0, 1e-2), seeds=(0,), lr_grid=(0.02,))


@dataclass(frozen=True)
class Cell:
    """One configuration: clipping mode, noise level, seed and server LR."""

    clip: str
    sigma_dp: float
    seed: int
    server_lr: float
    group: str = "clip"

    def key(self, protocol: Protocol) -> str:
        """Hash of the cell (group excluded), the protocol and :data:`PROTOCOL_VERSION`."""
        cell = {k: v for k, v in asdict(self).items() if k != "group"}
        blob = {"v": PROTOCOL_VERSION, "protocol": protocol.key_dict(), "cell": cell}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    def label(self) -> str:
        return f"{self.group}: {self.clip} lr={self.server_lr:g} σ_DP={self.sigma_dp:g} seed={self.seed}"


# --------------------------------------------------------------------------- data and model
def encode(sentences: list[str], max_len: int) -> tuple[Tensor, Tensor]:
    """Inputs ``BOS s`` and targets ``s PAD...`` (the end of a sentence is predicted as padding is
    not: targets past the sentence's last character are ignored), both ``(n, max_len)``."""
    x = torch.full((len(sentences), max_len), PAD, dtype=torch.long)
    y = torch.full((len(sentences), max_len), PAD, dtype=torch.long)
    for i, s in enumerate(sentences):
        ids = [ALPHABET.index(c) + 2 for c in s[: max_len]]
        x[i, 0] = BOS
        x[i, 1 : len(ids)] = torch.tensor(ids[:-1])
        y[i, : len(ids)] = torch.tensor(ids)
    return x, y


@dataclass
class Data:
    seed: tuple[Tensor, Tensor]
    users: dict[str, list[tuple[Tensor, Tensor]]]
    eval: tuple[Tensor, Tensor]


def load_data(p: Protocol) -> Data:
    """Sentences of the corpus grammar: seed set, one set per user, held-out evaluation set."""
    seed_text = generate_sentences(p.seed_sentences, seed="char-lm/seed")
    eval_text = generate_sentences(p.eval_sentences, seed="char-lm/eval")
    user_text = {f"user{u:04d}": generate_sentences(p.sentences_per_user, seed=f"char-lm/user/{u}")
                 for u in range(p.users)}
    max_len = max(len(s) for s in [*seed_text, *eval_text, *(s for v in user_text.values() for s in v)])
    users = {}
    for uid, text in user_text.items():
        x, y = encode(text, max_len)
        users[uid] = [(x[i : i + p.local_batch_size], y[i : i + p.local_batch_size])
                      for i in range(0, len(text), p.local_batch_size)]
    return Data(encode(seed_text, max_len), users, encode(eval_text, max_len))


class CharLM(nn.Module):
    """Causal pre-LayerNorm transformer over characters: embedding, position, blocks, head."""

    def __init__(self, p: Protocol, max_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(ALPHABET) + 2, p.d_model)
        self.position = nn.Parameter(0.02 * torch.randn(max_len, p.d_model))
        layer = nn.TransformerEncoderLayer(p.d_model, p.n_heads, p.d_ff, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, p.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(p.d_model)
        self.head = nn.Linear(p.d_model, len(ALPHABET) + 2)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(max_len),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        h = self.embed(x) + self.position[:n]
        h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
        return self.head(self.norm(h))


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean next-character cross-entropy (nats) over the real characters of ``batch``."""
    x, y = batch
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=PAD)


@torch.no_grad()
def bits_per_char(model: nn.Module, data: tuple[Tensor, Tensor], batch: int = 250) -> float:
    """Evaluation cross-entropy in bits per character."""
    x, y = data
    total, count = 0.0, 0
    for i in range(0, len(x), batch):
        logits = model(x[i : i + batch]).flatten(0, 1)
        target = y[i : i + batch].flatten()
        total += float(nn.functional.cross_entropy(logits, target, ignore_index=PAD, reduction="sum"))
        count += int((target != PAD).sum())
    return total / count / math.log(2)


_SEED_MODELS: dict[str, tuple[CharLM, float]] = {}


def seed_model(p: Protocol, data: Data) -> tuple[CharLM, float]:
    """The central seed model (Adam on the seed sentences; deterministic) and its eval bits/char."""
    key = json.dumps(p.key_dict(), sort_keys=True)
    if key not in _SEED_MODELS:
        torch.manual_seed(0)
        model = CharLM(p, data.seed[0].shape[1])
        opt = torch.optim.Adam(model.parameters(), p.seed_lr)
        gen = torch.Generator().manual_seed(0)
        for _ in range(p.seed_steps):
            idx = torch.randint(len(data.seed[0]), (p.seed_batch_size,), generator=gen)
            opt.zero_grad()
            lm_loss(model, (data.seed[0][idx], data.seed[1][idx])).backward()
            opt.step()
        _SEED_MODELS[key] = (model, bits_per_char(model, data.eval))
    return _SEED_MODELS[key]


# --------------------------------------------------------------------------- cells
def sweep_lrs(p: Protocol, done: dict[str, dict[str, Any]]) -> list[float]:
    """LAMB's LR grid, extended once (same ratio) at the end holding the best score so far."""
    lrs = sorted(p.lr_grid)
    recs = [done.get(Cell("dim", p.lr_sweep_sigma, p.seeds[0], lr, "lr").key(p)) for lr in lrs]
    if len(lrs) >= 2 and all(recs):
        best = min(range(len(lrs)), key=lambda i: recs[i]["bpc"])  # type: ignore[index]
        if best == len(lrs) - 1:
            lrs.append(float(f"{lrs[-1] ** 2 / lrs[-2]:.3g}"))
        elif best == 0:
            lrs.insert(0, float(f"{lrs[0] ** 2 / lrs[1]:.3g}"))
    return lrs


def tuned_lr(p: Protocol, done: dict[str, dict[str, Any]]) -> float | None:
    """The swept LR with the lowest eval bits/char, or None while the sweep is unfinished."""
    lrs = sweep_lrs(p, done)
    recs = [done.get(Cell("dim", p.lr_sweep_sigma, p.seeds[0], lr, "lr").key(p)) for lr in lrs]
    if len(lrs) == 1:
        return lrs[0]
    if not all(recs):
        return None
    return min(zip(recs, lrs, strict=True), key=lambda t: t[0]["bpc"])[1]  # type: ignore[index]


def plan(p: Protocol, done: dict[str, dict[str, Any]]) -> list[Cell]:
    """The LR sweep, then {global, dim} x sigma_DP, seed-major (a whole curve per seed)."""
    cells = [Cell("dim", p.lr_sweep_sigma, p.seeds[0], lr, "lr") for lr in sweep_lrs(p, done)]
    lr = tuned_lr(p, done)
    if lr is not None:
        cells += [Cell(c, s, seed, lr) for seed in p.seeds for s in p.sigma_levels for c in CLIPS]
    unique: dict[str, Cell] = {}
    for c in cells:
        unique.setdefault(c.key(p), c)
    return list(unique.values())


def run_cell(cell: Cell, p: Protocol, data: Data, out: Path) -> dict[str, Any]:
    """Fine-tune the seed model with DP-FedAvg under ``cell``; write and return its record."""
    torch.set_num_threads(1)
    base, seed_bpc = seed_model(p, data)
    model = copy.deepcopy(base)
    clipper = GlobalClip(p.clip_bound) if cell.clip == "global" else PerLayerClip(p.clip_bound, allocation="dim")
    users = sorted(data.users)
    t0 = time.time()
    run = run_rounds(
        model, InMemoryFederatedDataset(data.users), lm_loss,
        sampler=PoissonSampler(users, p.cohort_size / len(users), seed=cell.seed),
        server_optimizer=LAMB(model.parameters(), cell.server_lr, betas=(0.9, 0.999), eps=1e-6,
                              weight_decay=0.0),
        rounds=p.rounds,
        local=LocalTraining(lr=p.local_lr, steps=p.local_steps, max_grad_norm=1.0),
        # A benchmark is a simulation: seeded noise makes every cell reproducible.
        privacy=Privacy(clipper, noise_multiplier=cell.sigma_dp * p.cohort_size,
                        accountant=RDPAccountant(), delta=1e-6, noise_seed=cell.seed),
        seed=cell.seed,
        # Monitoring statistics of a synthetic benchmark, not covered by the DP guarantee.
        logging=Logging(None, progress=False, unsafe_metrics=True),
    )
    finite = all(bool(torch.isfinite(t).all()) for t in model.parameters())
    sizes = [r for r in run.records if r.num_users]
    record = {
        "key": cell.key(p), "protocol_version": PROTOCOL_VERSION, "protocol": p.key_dict(),
        "cell": {k: v for k, v in asdict(cell).items() if k != "group"}, "group": cell.group,
        "bpc": bits_per_char(model, data.eval) if finite else math.inf, "seed_bpc": seed_bpc,
        "fraction_clipped": statistics.fmean(r.fraction_clipped for r in sizes) if sizes else None,
        "mean_update_norm": statistics.fmean(r.mean_norm for r in sizes) if sizes else None,
        "parameters": sum(t.numel() for t in model.parameters()),
        "total_s": round(time.time() - t0, 1), "machine": machine(), "finished": now(),
    }
    write_json(out / "cells" / f"{record['key']}.json", record)
    return record


def load_done(out: Path) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in (json.loads(f.read_text()) for f in sorted((out / "cells").glob("*.json")))}


def run_study(p: Protocol, out: Path, *, time_budget: float | None) -> int:
    """Run unfinished cells in plan order until none is left or the time budget is spent."""
    data, started, ran = load_data(p), time.time(), 0
    while True:
        done = load_done(out)
        todo = [c for c in plan(p, done) if c.key(p) not in done]
        if not todo:
            return ran
        if time_budget is not None and time.time() - started > time_budget:
            print("time budget spent; stopping (finished cells are kept)", flush=True)
            return ran
        cell = todo[0]
        print(f"[{len(done) + 1}/{len(done) + len(todo)}] {cell.label()} ...", flush=True)
        rec = run_cell(cell, p, data, out)
        ran += 1
        print(f"    {rec['bpc']:.3f} bits/char (seed model {rec['seed_bpc']:.3f}) in {rec['total_s']:.0f}s",
              flush=True)


# --------------------------------------------------------------------------- report
def write_report(p: Protocol, out: Path) -> Path:
    """``README.md`` (tables, paired verdicts) and ``bpc_vs_sigma.png`` from the finished cells."""
    done = load_done(out)
    lr = tuned_lr(p, done)
    by: dict[tuple[str, float], dict[int, float]] = {}
    for r in done.values():
        c = r["cell"]
        if r["protocol"] == json.loads(json.dumps(p.key_dict())) and c["server_lr"] == lr:
            by.setdefault((c["clip"], c["sigma_dp"]), {})[c["seed"]] = r["bpc"]
    any_rec = next(iter(done.values()), None)
    lines = ["# Global vs per-layer clipping on a federated character-level language model", "",
             "Generated by `python benchmarks/char_lm_clipping.py report` from the cells in `cells/`.",
             "Protocol: " + ", ".join(f"{k}={v}" for k, v in p.key_dict().items()) + ".",
             f"Parameters: {any_rec['parameters']:,}; seed model {any_rec['seed_bpc']:.3f} bits/char."
             if any_rec else "", "",
             "## LAMB server LR sweep (per-layer dim, σ_DP "
             f"{p.lr_sweep_sigma:g}, seed {p.seeds[0]})", ""]
    for x in sweep_lrs(p, done):
        rec = done.get(Cell("dim", p.lr_sweep_sigma, p.seeds[0], x, "lr").key(p))
        lines.append(f"- LR {x:g}: " + (f"{rec['bpc']:.3f} bits/char" if rec else "–"))
    lines += ["", f"Chosen: {lr if lr is not None else '– (sweep unfinished)'}", "",
              "## Eval bits per character (mean ± std over seeds; lower is better)", "",
              "| σ_DP | global | per-layer dim | global − dim, paired | verdict (per-layer better?) |",
              "|---|---|---|---|---|"]

    def fmt(v: dict[int, float]) -> str:
        if not v:
            return "–"
        m, s = mean_std(list(v.values()))
        return f"{m:.3f} ± {s:.3f} (n={len(v)})" if len(v) > 1 else f"{m:.3f} (n=1)"

    for s in p.sigma_levels:
        g, d = by.get(("global", s), {}), by.get(("dim", s), {})
        diffs = [g[k] - d[k] for k in sorted(set(g) & set(d))]
        gap = f"{statistics.fmean(diffs):+.3f}" if diffs else "–"
        lines.append(f"| {s:g} | {fmt(g)} | {fmt(d)} | {gap} | "
                     f"{paired_verdict(diffs, unit='bits/char', threshold=0.01)} |")
    lines += ["", "A verdict needs the mean paired difference beyond 0.01 bits/char and beyond two "
              "standard errors of the mean over seeds.", ""]
    fc = [r["fraction_clipped"] for r in done.values() if r.get("fraction_clipped") is not None]
    if fc:
        lines += [f"Fraction of client updates clipped, over all cells: {statistics.fmean(fc):.2f} "
                  f"(mean update norm {statistics.fmean(r['mean_update_norm'] for r in done.values() if r.get('mean_update_norm') is not None):.3g} "
                  f"vs C = {p.clip_bound:g}).", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text("\n".join(lines))
    _plot(p, by, out / "bpc_vs_sigma.png")
    return out / "README.md"


def _plot(p: Protocol, by: dict[tuple[str, float], dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for clip, label in (("global", "global"), ("dim", "per-layer dim")):
        xs, ms, ss = [], [], []
        for i, s in enumerate(p.sigma_levels):
            v = list(by.get((clip, s), {}).values())
            if v:
                m, sd = mean_std(v)
                xs.append(i)
                ms.append(m)
                ss.append(0.0 if math.isnan(sd) else sd)
        ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=label)
    ax.set_xticks(range(len(p.sigma_levels)), [f"{s:g}" for s in p.sigma_levels])
    ax.set_xlabel("σ_DP (noise std on the mean update, in units of C)")
    ax.set_ylabel("eval bits per character")
    ax.set_title("Federated char-level LM: global vs per-layer clipping")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("command", nargs="?", default="all", choices=["all", "run", "report", "plan"])
    ap.add_argument("--quick", action="store_true", help="tiny 2x2 subset (seconds)")
    ap.add_argument("--out", type=Path, default=None, help=f"results directory (default {RESULTS})")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; no new cell after it")
    args = ap.parse_args(argv)
    p = QUICK if args.quick else FULL
    out = args.out or RESULTS
    if args.command == "plan":
        done = load_done(out)
        for c in plan(p, done):
            print("done" if c.key(p) in done else "todo", c.key(p), c.label())
        return 0
    if args.command in ("all", "run"):
        run_study(p, out, time_budget=args.time_budget)
    if args.command in ("all", "report"):
        print(f"report: {write_report(p, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
