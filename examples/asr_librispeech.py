"""Differentially private federated fine-tuning of a CTC transformer ASR model, end to end.

Reproduces the pipeline of Pelikan et al. (arXiv:2310.00098) with dpfl at a size that runs on a
laptop: a seed model is trained centrally with LARS on one set of speakers, then fine-tuned with
federated learning on other speakers (the users), once without noise and once with user-level DP
(per-layer clipping, Gaussian noise, LAMB on the server), and scored by greedy-decoding WER and
CER on held-out speakers. ε is reported for the run itself and, paper-style, extrapolated to the
paper's cohort 204,800 / population 69.5M / 2,034 rounds at the same σ_DP.

Data: with no data option, an embedded synthetic corpus (espeak-ng speech in LibriSpeech layout)
is generated once and cached; ``--librispeech-root`` / ``--common-voice-root`` use real data.

Usage::

    python examples/asr_librispeech.py                 # default run (about 15 min on 2 cores)
    python examples/asr_librispeech.py --quick         # smoke run (under 2 minutes)
    python examples/asr_librispeech.py --target-epsilon 8 --rounds 200 --cohort-size 64
    torchrun --nproc-per-node 2 examples/asr_librispeech.py --quick   # cohort split over ranks

Outputs (``--output-dir``, default ``runs/asr``): ``seed_model.pt``, per-round JSON-lines logs
``fl_no_noise.jsonl`` / ``fl_dp.jsonl``, checkpoints (``--resume`` continues), ``results.json``
and the printed results table.

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
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from dpfl.accounting import extrapolate  # noqa: E402
from dpfl.simulation import InMemoryFederatedDataset  # noqa: E402
from dpfl.simulation.distributed import (  # noqa: E402
    DistContext,
    init_distributed,
    shutdown_distributed,
)
from examples.asr.corpus import CorpusConfig, ensure_corpus  # noqa: E402
from examples.asr.data import Utterance, read_common_voice, read_librispeech  # noqa: E402
from examples.asr.features import SpecAugment, SpecAugmentConfig, cached_features  # noqa: E402
from examples.asr.federated import FederatedConfig, resolve_noise, run_federated  # noqa: E402
from examples.asr.model import CONFIGS, CTCTransformer, get_config  # noqa: E402
from examples.asr.text import CharTokenizer  # noqa: E402
from examples.asr.train import Augment, Batch, evaluate, make_batches, train_central  # noqa: E402

__all__ = ["PAPER_SCALE", "PRESETS", "build_parser", "main"]

PAPER_SCALE = {"cohort_size": 204_800, "population": 69_500_000, "rounds": 2_034, "delta": 1e-9}
"""The paper's extrapolation point (table in design notes 2.4: σ_DP 3e-6 gives ε 7.2, RDP)."""

# Tunables whose default depends on --quick. Everything else has a plain argparse default.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "model": "small", "seed_steps": 1800, "seed_lr": 5.0, "batch_size": 16,
        "rounds": 30, "cohort_size": 10, "local_batch_size": 4, "local_lr": 0.1,
        "server_lr": 0.02, "server_lr_decay": 0.98, "eval_every": 5, "sigma_dp": 1e-3,
    },
    "quick": {
        "model": "tiny", "seed_steps": 200, "seed_lr": 5.0, "batch_size": 16,
        "rounds": 4, "cohort_size": 4, "local_batch_size": 4, "local_lr": 0.1,
        "server_lr": 0.02, "server_lr_decay": 0.97, "eval_every": 2, "sigma_dp": 1e-3,
    },
}


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (``--help`` lists every option)."""
    p = argparse.ArgumentParser(
        description="Seed training (LARS) + DP federated fine-tuning of a CTC transformer (dpfl).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--quick", action="store_true", help="tiny corpus, tiny model, few rounds (smoke test)")
    a("--output-dir", type=Path, default=Path("runs/asr"), help="logs, checkpoints, results")
    a("--resume", action="store_true", help="reuse the seed model and resume FL checkpoints")
    a("--seed", type=int, default=0, help="seed of data order, sampling, training and noise")
    a("--threads", type=int, default=2, help="torch CPU threads per process")
    a("--device", default=None, help="torch device, e.g. cuda (default: cpu; cuda:LOCAL_RANK under NCCL)")
    g = p.add_argument_group("data")
    g.add_argument("--librispeech-root", type=Path, help="LibriSpeech root (seed and/or FL data)")
    g.add_argument("--common-voice-root", type=Path, help="Common Voice language dir (FL users)")
    g.add_argument("--seed-split", default="train-clean-100", help="LibriSpeech seed split")
    g.add_argument("--fl-split", default="train-clean-360", help="LibriSpeech FL split")
    g.add_argument("--eval-split", default="dev-clean", help="LibriSpeech eval split")
    g.add_argument("--max-eval-utterances", type=int, default=1000, help="cap on eval set size")
    g.add_argument("--cache-dir", type=Path, help="corpus and feature cache (default ~/.cache/dpfl)")
    g = p.add_argument_group("model and seed training")
    g.add_argument("--model", choices=sorted(CONFIGS), help="model size (paper = 255.8M params)")
    g.add_argument("--seed-steps", type=int, help="LARS steps of central seed training")
    g.add_argument("--seed-lr", type=float, help="peak LARS learning rate")
    g.add_argument("--batch-size", type=int, help="seed-training batch size")
    g.add_argument("--specaugment", choices=["none", "small", "paper"], default="none")
    g = p.add_argument_group("federated fine-tuning")
    g.add_argument("--rounds", type=int, help="server rounds T")
    g.add_argument("--cohort-size", type=int, help="expected users per round S")
    g.add_argument("--sampling", choices=["poisson", "fixed"], default="poisson")
    g.add_argument("--local-steps", type=int, default=10, help="local SGD steps per user")
    g.add_argument("--local-lr", type=float, help="constant local SGD learning rate")
    g.add_argument("--local-batch-size", type=int, help="utterances per local step")
    g.add_argument("--server-optimizer", choices=["lamb", "adam", "sgd"], default="lamb")
    g.add_argument("--server-lr", type=float, help="initial server learning rate")
    g.add_argument("--server-lr-decay", type=float, help="per-round LR decay factor")
    g.add_argument("--eval-every", type=int, help="evaluate every this many rounds")
    g = p.add_argument_group("differential privacy")
    g.add_argument("--clip", choices=["per-layer", "global"], default="per-layer")
    g.add_argument("--clip-allocation", choices=["dim", "uniform"], default="dim")
    g.add_argument("--clip-bound", type=float, default=0.01, help="C, L2 bound per user update")
    noise = g.add_mutually_exclusive_group()
    noise.add_argument("--noise-multiplier", type=float, help="z (noise std on the sum = z*C)")
    noise.add_argument("--sigma-dp", type=float, help="σ_DP (std on the mean per unit C); z = σ_DP*S")
    noise.add_argument("--target-epsilon", type=float, help="calibrate z to reach this ε after T rounds")
    g.add_argument("--accountant", choices=["rdp", "pld"], default="rdp")
    g.add_argument("--delta", type=float, default=1e-6, help="δ of the reported ε")
    return p


def _fill_presets(args: argparse.Namespace) -> argparse.Namespace:
    preset = PRESETS["quick" if args.quick else "default"]
    for key, value in preset.items():
        if key == "sigma_dp":
            if args.noise_multiplier is None and args.target_epsilon is None and args.sigma_dp is None:
                args.sigma_dp = value
        elif getattr(args, key) is None:
            setattr(args, key, value)
    return args


@dataclass
class Splits:
    """Utterances of each role: seed training, federated users, evaluation."""

    source: str
    seed: list[Utterance]
    fl_users: dict[str, list[Utterance]]
    eval: list[Utterance]
    seed_dev: list[Utterance]  # held-out speakers of the seed domain (may be empty)


def load_splits(args: argparse.Namespace) -> Splits:
    """Read the data: real LibriSpeech / Common Voice, or the embedded corpus."""
    ls, cv = args.librispeech_root, args.common_voice_root
    if ls is None and cv is None:
        config = CorpusConfig.quick(seed=0) if args.quick else CorpusConfig()
        root = ensure_corpus(config, cache_dir=args.cache_dir, workers=max(1, args.threads))
        seed = read_librispeech(root, "seed-train", verify_audio=False).utterances()
        fl = read_librispeech(root, "fl-train", verify_audio=False).users
        ev = read_librispeech(root, "eval", verify_audio=False).utterances()
        dev = read_librispeech(root, "seed-dev", verify_audio=False).utterances()
        return Splits(f"embedded synthetic corpus ({root})", seed, fl, ev, dev)
    if ls is not None and cv is None:  # seed and FL on disjoint LibriSpeech speakers
        seed = read_librispeech(ls, args.seed_split, on_error="skip").utterances()
        fl = read_librispeech(ls, args.fl_split, on_error="skip").users
        ev = read_librispeech(ls, args.eval_split, on_error="skip").utterances()
        return Splits(f"LibriSpeech {ls}", seed, fl, ev, [])
    assert cv is not None
    fl = read_common_voice(cv, tsv="train.tsv", on_error="skip").users
    ev = read_common_voice(cv, tsv="dev.tsv", on_error="skip").utterances()
    if ls is not None:  # the paper: LibriSpeech seed, Common Voice users
        seed = read_librispeech(ls, args.seed_split, on_error="skip").utterances()
        return Splits(f"LibriSpeech {ls} (seed) + Common Voice {cv} (FL)", seed, fl, ev, [])
    ids = sorted(fl)  # Common Voice only: a tenth of the users for the seed model
    random.Random(args.seed).shuffle(ids)
    cut = max(1, len(ids) // 10)
    seed = [u for uid in ids[:cut] for u in fl.pop(uid)]
    return Splits(f"Common Voice {cv}", seed, fl, ev, [])


def _features(utts: Sequence[Utterance], args: argparse.Namespace) -> list[torch.Tensor]:
    cache = None if args.cache_dir is None else args.cache_dir / "features"
    feats = cached_features(utts, cache_dir=cache)
    return [feats[u.utterance_id] for u in utts]


def _rank0(dist: DistContext | None) -> bool:
    return dist is None or dist.rank == 0


def _say(dist: DistContext | None, *msg: object) -> None:
    if _rank0(dist):
        print(*msg, flush=True)


def _rates(model: torch.nn.Module, batches: list[Batch], tok: CharTokenizer) -> dict[str, float]:
    rates, _ = evaluate(model, batches, tok)
    return {"wer": rates.wer, "cer": rates.cer}


def _seed_model(
    args: argparse.Namespace, model: CTCTransformer, batches: list[Batch], augment: Augment | None,
    dist: DistContext | None,
) -> bool:
    """Train (rank 0) or reload the seed model; returns True if it was reloaded."""
    path = args.output_dir / "seed_model.pt"
    key = {"model": model.config.to_dict(), "steps": args.seed_steps, "lr": args.seed_lr,
           "batch_size": args.batch_size, "seed": args.seed, "data": args.data_source}
    reused = False
    if _rank0(dist):
        if args.resume and path.is_file():
            blob = torch.load(path, weights_only=True, map_location="cpu")
            if blob["key"] == json.loads(json.dumps(key)):
                model.load_state_dict(blob["state"])
                reused = True
                print(f"seed model: reusing {path}", flush=True)
        if not reused:
            t0 = time.time()
            losses = train_central(
                model, batches, steps=args.seed_steps, lr=args.seed_lr, warmup_steps=args.seed_steps // 10,
                augment=augment, seed=args.seed, progress=True,
            )
            print(f"seed model: {args.seed_steps} LARS steps in {time.time() - t0:.0f}s, "
                  f"final loss {sum(losses[-20:]) / max(1, len(losses[-20:])):.3f}", flush=True)
            torch.save({"key": key, "state": model.state_dict()}, path)
    if dist is not None:
        tdist.barrier()
        model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu")["state"])
    return reused


def run_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """Data, seed model, FL without noise, FL with DP, table; returns the results dict."""
    started = time.time()
    args = _fill_presets(args)
    torch.set_num_threads(args.threads)
    dist = init_distributed(timeout_s=7200.0) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    args.output_dir.mkdir(parents=True, exist_ok=True)
    tok = CharTokenizer()

    # Data (rank 0 first, so that the corpus and the feature cache are built once).
    if dist is not None and dist.rank != 0:
        tdist.barrier()
    t0 = time.time()
    splits = load_splits(args)
    args.data_source = splits.source
    ev_utts = splits.eval[: args.max_eval_utterances]
    seed_feats = _features(splits.seed, args)
    fl_utts = [u for utts in splits.fl_users.values() for u in utts]
    fl_feats = dict(zip((u.utterance_id for u in fl_utts), _features(fl_utts, args), strict=True))
    ev_feats = _features(ev_utts, args)
    dev_utts = splits.seed_dev[: args.max_eval_utterances]
    dev_feats = _features(dev_utts, args) if dev_utts else []
    if dist is not None and dist.rank == 0:
        tdist.barrier()
    _say(dist, f"data: {splits.source}\n  seed {len(splits.seed)} utterances, FL "
         f"{len(splits.fl_users)} users / {len(fl_utts)} utterances, eval {len(ev_utts)} "
         f"utterances ({time.time() - t0:.0f}s incl. corpus and features)")

    seed_batches = make_batches(seed_feats, [u.transcript for u in splits.seed], tok,
                                batch_size=args.batch_size, seed=args.seed)
    ev_batches = make_batches(ev_feats, [u.transcript for u in ev_utts], tok, batch_size=64)
    dev_batches = make_batches(dev_feats, [u.transcript for u in dev_utts], tok, batch_size=64)
    dataset = InMemoryFederatedDataset({
        uid: make_batches([fl_feats[u.utterance_id] for u in utts], [u.transcript for u in utts],
                          tok, batch_size=args.local_batch_size, seed=args.seed)
        for uid, utts in splits.fl_users.items()
    })
    augment = None if args.specaugment == "none" else SpecAugment(
        SpecAugmentConfig.small() if args.specaugment == "small" else SpecAugmentConfig())

    # Seed model, centrally with LARS.
    with torch.random.fork_rng():  # seeded initialisation, caller's RNG state untouched
        torch.manual_seed(args.seed)
        model = CTCTransformer(get_config(args.model))
    device = torch.device(args.device) if args.device else (dist.device if dist else torch.device("cpu"))
    model.to(device)
    _say(dist, f"model: {args.model}, {sum(p.numel() for p in model.parameters()):,} parameters")
    _seed_model(args, model, seed_batches, augment, dist)
    seed_state = {k: v.clone() for k, v in model.state_dict().items()}
    results: dict[str, Any] = {"data": {"source": splits.source, "seed_utterances": len(splits.seed),
                                        "fl_users": len(splits.fl_users), "eval_utterances": len(ev_utts)},
                               "model": model.config.to_dict()}

    def score(m: torch.nn.Module) -> dict[str, float]:
        out = _rates(m, ev_batches, tok)
        if dev_batches:
            dev = _rates(m, dev_batches, tok)
            out.update(dev_wer=dev["wer"], dev_cer=dev["cer"])
        return out

    if _rank0(dist):
        results["seed"] = score(model)
        _say(dist, f"seed model: {_summary(results['seed'])}")

    # Federated fine-tuning: without noise, then with DP.
    population = len(splits.fl_users)
    z, sigma_dp = resolve_noise(
        noise_multiplier=args.noise_multiplier, sigma_dp=args.sigma_dp, target_epsilon=args.target_epsilon,
        cohort_size=args.cohort_size, population=population, rounds=args.rounds, delta=args.delta,
        accountant=args.accountant)
    base = FederatedConfig(
        rounds=args.rounds, cohort_size=args.cohort_size, local_steps=args.local_steps,
        local_lr=args.local_lr, server_optimizer=args.server_optimizer, server_lr=args.server_lr,
        server_lr_decay=args.server_lr_decay, clip=args.clip, clip_allocation=args.clip_allocation,
        clip_bound=args.clip_bound, noise_multiplier=0.0, accountant=args.accountant,
        delta=args.delta, sampling=args.sampling, seed=args.seed)
    eval_fn = (lambda m: _rates(m, ev_batches, tok))  # noqa: E731
    for name, cfg in (("fl_no_noise", base), ("fl_dp", replace(base, noise_multiplier=z))):
        model.load_state_dict(seed_state)
        _say(dist, f"{name}: {cfg.rounds} rounds, cohort {cfg.cohort_size} of {population}, "
             f"z={cfg.noise_multiplier:.4g} (σ_DP={cfg.sigma_dp():.3g}), C={cfg.clip_bound:g} {cfg.clip}")
        t0 = time.time()
        run = run_federated(
            model, dataset, cfg, augment=augment, log_path=args.output_dir / f"{name}.jsonl",
            checkpoint_dir=args.output_dir / f"ckpt_{name}", resume=args.resume, eval_fn=eval_fn,
            eval_every=args.eval_every, dist=dist)
        if _rank0(dist):
            entry = {**score(model), "epsilon": run.epsilon, "delta": run.delta,
                     "rounds": run.rounds_completed, "stop_reason": run.stop_reason,
                     "time_s": round(time.time() - t0, 1), **cfg.to_dict()}
            results[name] = entry
            _say(dist, f"{name}: {_summary(entry)}  ε={run.epsilon:.4g}")
    if sigma_dp > 0:
        ext = extrapolate(
            sigma_dp=sigma_dp, cohort_size=PAPER_SCALE["cohort_size"],
            population=PAPER_SCALE["population"], rounds=int(PAPER_SCALE["rounds"]),
            delta=PAPER_SCALE["delta"], accountant=args.accountant)
        results["extrapolated"] = {**PAPER_SCALE, "sigma_dp": sigma_dp, "noise_multiplier":
                                   ext.noise_multiplier, "epsilon": ext.epsilon, "accountant": args.accountant}
    results["wall_time_s"] = round(time.time() - started, 1)
    if _rank0(dist):
        table = format_table(results)
        print("\n" + table, flush=True)
        (args.output_dir / "results.json").write_text(json.dumps(_jsonable(results), indent=2) + "\n")
        (args.output_dir / "results.md").write_text(table + "\n")
    if dist is not None:
        shutdown_distributed()
    return results


def _summary(r: dict[str, Any]) -> str:
    text = f"eval WER {r['wer']:.1%} CER {r['cer']:.1%}"
    if "dev_wer" in r:
        text += f"; seed-dev WER {r['dev_wer']:.1%} CER {r['dev_cer']:.1%}"
    return text


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _eps(x: float) -> str:
    return "∞ (no noise)" if math.isinf(x) else f"{x:.3g}"


def format_table(results: dict[str, Any]) -> str:
    """The final markdown table: seed WER, FL WER without noise, FL+DP WER, ε."""
    dp = results["fl_dp"]
    dev = "dev_wer" in results["seed"]
    head = "| run | eval WER | eval CER |" + (" seed-dev WER |" if dev else "")
    head += f" ε (δ={dp['delta']:g}, {dp['accountant'].upper()}) |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]

    def row(label: str, r: dict[str, Any], eps: str) -> str:
        cells = f"| {label} | {r['wer']:.1%} | {r['cer']:.1%} |"
        return cells + (f" {r['dev_wer']:.1%} |" if dev else "") + f" {eps} |"

    lines.append(row("seed model (central, LARS)", results["seed"], "–"))
    for name, label in (("fl_no_noise", "FL, no noise"), ("fl_dp", "FL + DP")):
        r = results[name]
        noise = f" σ_DP={r['sigma_dp']:.3g}, z={r['noise_multiplier']:.3g}," if r["noise_multiplier"] else ""
        what = f"{label} ({r['rounds']} rounds, S={r['cohort_size']},{noise} C={r['clip_bound']:g} {r['clip']})"
        lines.append(row(what, r, _eps(r["epsilon"])))
    if "extrapolated" in results:
        e = results["extrapolated"]
        lines.append(
            f"| FL + DP extrapolated to the paper's scale: same σ_DP, S={e['cohort_size']:,}, "
            f"K={e['population'] / 1e6:g}M, T={e['rounds']:,} (z={e['noise_multiplier']:.3g}) | – | – |"
            + (" – |" if dev else "") + f" {e['epsilon']:.3g} (δ={e['delta']:g}) |")
    lines.append(f"\nwall time {results['wall_time_s']:.0f}s; data: {results['data']['source']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default ``sys.argv``), run the pipeline and return its results."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sampling == "fixed" and args.accountant == "pld":
        parser.error("--sampling fixed needs --accountant rdp (fixed cohorts are accounted under "
                     "replace-one adjacency, which the PLD accountant does not support)")
    if args.sampling == "fixed" and args.target_epsilon is not None:
        parser.error("--target-epsilon calibrates for Poisson sampling; use --sampling poisson "
                     "or give --noise-multiplier / --sigma-dp with --sampling fixed")
    return run_pipeline(args)


if __name__ == "__main__":
    main()
