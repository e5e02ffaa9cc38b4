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

    python examples/asr_librispeech.py                 # default run (measured time: docs/asr.md)
    python examples/asr_librispeech.py --quick         # smoke run: tiny corpus, model and rounds
    python examples/asr_librispeech.py --target-epsilon 8 --rounds 200 --cohort-size 64
    torchrun --nproc-per-node 2 examples/asr_librispeech.py --quick   # cohort split over ranks

Data: features are extracted once, by ``--workers`` processes, into an on-disk store under
``--cache-dir`` (default ``$DPFL_CACHE`` or ``~/.cache/dpfl``, never inside a dataset) and read
per batch and per user (:mod:`examples.asr.store`), so memory does not grow with the corpus.
Files that cannot be used (missing or corrupt audio, audio that decodes shorter than its header
says, a missing transcript) are skipped, counted per split with reasons, printed and recorded in
``results.json``; ``--strict`` makes any skip an error.

Outputs: a run directory, by default a new ``runs/asr/<YYYYmmdd-HHMMSS>/``
(``runs/asr-quick/...`` with ``--quick``), or ``--output-dir``: ``run.json`` (command line),
``seed_model.pt``, per-round JSON-lines logs ``fl_no_noise.jsonl`` / ``fl_dp.jsonl``,
checkpoints ``ckpt_fl_no_noise/`` and ``ckpt_fl_dp/`` (``--resume`` continues the latest run,
or the one in ``--output-dir``; ``--overwrite`` replaces it), ``results.json`` and
``results.md`` (the printed table). Usage and data problems end with one line on stderr and
exit status 2.

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
import shutil  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from dpfl.accounting import extrapolate  # noqa: E402
from dpfl.audit import CanaryAudit  # noqa: E402
from dpfl.simulation.checkpoint import CheckpointError  # noqa: E402
from dpfl.simulation.distributed import (  # noqa: E402
    DistContext,
    init_distributed,
    shutdown_distributed,
)
from examples.asr.corpus import CorpusConfig, default_cache_dir, ensure_corpus  # noqa: E402
from examples.asr.data import (  # noqa: E402
    DataError,
    SkippedFile,
    SpeechData,
    Utterance,
    read_common_voice,
    read_librispeech,
    summarize_skips,
)
from examples.asr.features import SpecAugment, SpecAugmentConfig, cached_features  # noqa: E402
from examples.asr.federated import FederatedConfig, resolve_noise, run_federated  # noqa: E402
from examples.asr.model import CONFIGS, CTCTransformer, get_config  # noqa: E402
from examples.asr.store import StoredBatches, StoredFederatedDataset, extract_splits  # noqa: E402
from examples.asr.text import CharTokenizer  # noqa: E402
from examples.asr.train import Augment, Batch, evaluate, train_central  # noqa: E402

__all__ = ["PAPER_SCALE", "PRESETS", "UserError", "build_parser", "load_splits", "main"]

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


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` where an option has a plain default its help does not state."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if ("default" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def _preset_help(text: str, key: str, fmt: str = "{}") -> str:
    d, q = PRESETS["default"][key], PRESETS["quick"][key]
    if d == q:
        return f"{text} (default: {fmt.format(d)})"
    return f"{text} (default: {fmt.format(d)}; with --quick: {fmt.format(q)})"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (``--help`` lists every option and its real default)."""
    p = argparse.ArgumentParser(
        description="Seed training (LARS) + DP federated fine-tuning of a CTC transformer (dpfl).",
        epilog="Without --librispeech-root / --common-voice-root an embedded synthetic corpus is "
               "generated (once) under --cache-dir. Exit status 2 means a usage or data problem; "
               "the one-line message says what to do.",
        formatter_class=_HelpFormatter,
    )
    a = p.add_argument
    a("--quick", action="store_true",
      help="smoke run: tiny corpus, tiny model, few rounds (about a minute plus corpus generation)")
    a("--output-dir", type=Path, default=None,
      help="where this run writes logs, checkpoints and results (default: a new timestamped "
           "folder runs/asr/YYYYmmdd-HHMMSS, or runs/asr-quick/... with --quick); a folder that "
           "already holds a run needs --resume or --overwrite")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true",
                     help="continue a run: reuse its seed model and FL checkpoints (the latest run "
                          "under the default folder unless --output-dir names one)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run in --output-dir (its results, logs and checkpoints)")
    a("--seed", type=int, default=0,
      help="seed of data order, sampling and training (not of the DP noise: see --noise-seed)")
    a("--threads", type=int, default=2, help="torch CPU threads per process")
    a("--workers", type=int, default=None,
      help="processes for corpus synthesis and feature extraction (default: the number of CPU "
           f"cores available, here {_cpu_count()})")
    a("--device", default=None,
      help="torch device, e.g. cuda (default: cpu; cuda:LOCAL_RANK under torchrun with NCCL)")
    g = p.add_argument_group("data")
    g.add_argument("--librispeech-root", type=Path,
                   help="LibriSpeech root directory (seed data, and FL users without "
                        "--common-voice-root)")
    g.add_argument("--common-voice-root", type=Path,
                   help="Common Voice language directory with train.tsv, dev.tsv and clips/ "
                        "(FL users and evaluation)")
    g.add_argument("--seed-split", default="train-clean-100", help="LibriSpeech seed split")
    g.add_argument("--fl-split", default="train-clean-360", help="LibriSpeech FL split")
    g.add_argument("--eval-split", default="dev-clean", help="LibriSpeech eval split")
    g.add_argument("--max-eval-utterances", type=int, default=1000,
                   help="evaluate on a random sample (seeded by --seed) of at most this many "
                        "utterances")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help="corpus and feature cache, never inside a dataset (default: $DPFL_CACHE, "
                        "else ~/.cache/dpfl)")
    g.add_argument("--strict", action="store_true",
                   help="stop (exit 2) if any file is skipped (missing/corrupt/truncated audio, "
                        "missing transcript) instead of counting and reporting it")
    g = p.add_argument_group("model and seed training")
    g.add_argument("--model", choices=sorted(CONFIGS),
                   help=_preset_help("model size (paper = 255.8M parameters)", "model"))
    g.add_argument("--seed-steps", type=int,
                   help=_preset_help("LARS steps of central seed training", "seed_steps"))
    g.add_argument("--seed-lr", type=float, help=_preset_help("peak LARS learning rate", "seed_lr"))
    g.add_argument("--batch-size", type=int,
                   help=_preset_help("seed-training batch size", "batch_size"))
    g.add_argument("--specaugment", choices=["none", "small", "paper"], default="none",
                   help="SpecAugment in seed and local training: none, small (2 x 10 bins, "
                        "4 x 20 frames) or paper (2 x 29 bins, 10 x 50 frames)")
    g = p.add_argument_group("federated fine-tuning")
    g.add_argument("--rounds", type=int, help=_preset_help("server rounds T", "rounds"))
    g.add_argument("--cohort-size", type=int,
                   help=_preset_help("expected users per round S", "cohort_size"))
    g.add_argument("--sampling", choices=["poisson", "fixed"], default="poisson",
                   help="cohort sampling: poisson (each user independently with rate S/K, as the "
                        "accountant assumes) or fixed (exactly S users; replace-one RDP)")
    g.add_argument("--local-steps", type=int, default=10, help="local SGD steps per user")
    g.add_argument("--local-lr", type=float,
                   help=_preset_help("constant local SGD learning rate", "local_lr"))
    g.add_argument("--local-batch-size", type=int,
                   help=_preset_help("utterances per local step", "local_batch_size"))
    g.add_argument("--server-optimizer", choices=["lamb", "adam", "sgd"], default="lamb",
                   help="server optimizer applied to the noised mean update (paper: lamb)")
    g.add_argument("--server-lr", type=float,
                   help=_preset_help("initial server learning rate", "server_lr"))
    g.add_argument("--server-lr-decay", type=float,
                   help=_preset_help("per-round LR decay factor", "server_lr_decay"))
    g.add_argument("--eval-every", type=int,
                   help=_preset_help("evaluate every this many rounds", "eval_every"))
    g = p.add_argument_group("differential privacy")
    g.add_argument("--clip", choices=["per-layer", "global"], default="per-layer",
                   help="clip each user's update per tensor (paper) or as one vector")
    g.add_argument("--clip-allocation", choices=["dim", "uniform"], default="dim",
                   help="how --clip per-layer splits C over tensors: C_h = C * sqrt(d_h / D) for a "
                        "tensor of d_h of D parameters (dim, paper) or C / sqrt(H) for H tensors "
                        "(uniform)")
    g.add_argument("--clip-bound", type=float, default=0.01, help="C, L2 bound per user update")
    noise = g.add_mutually_exclusive_group()
    noise.add_argument("--noise-multiplier", type=float,
                       help="z (noise std on the sum = z*C); one of the three noise options")
    noise.add_argument("--sigma-dp", type=float,
                       help="σ_DP (std on the mean per unit C); z = σ_DP*S (default when no "
                            "noise option is given: 0.001)")
    noise.add_argument("--target-epsilon", type=float,
                       help="calibrate z to reach this ε after T rounds")
    g.add_argument("--accountant", choices=["rdp", "pld"], default="rdp",
                   help="privacy accountant for the reported ε (PLD: tighter, Poisson only)")
    g.add_argument("--delta", type=float, default=1e-6, help="δ of the reported ε")
    g.add_argument("--canaries", type=int, default=0, metavar="K",
                   help="insert K canary clients into the DP run and print the one-shot "
                        "empirical ε (Andrew et al. 2023) beside the proven one; canaries are "
                        "not users and cost no privacy (default: 0, off; K >= 2)")
    seeding = g.add_mutually_exclusive_group()
    seeding.add_argument("--noise-seed", type=int, default=None,
                         help="seed the DP noise, to reproduce a table exactly (simulations only: "
                              "anyone who knows it can subtract the noise; default: unseeded, "
                              "from OS entropy)")
    seeding.add_argument("--secure-noise", action="store_true",
                         help="draw the DP noise from a CSPRNG keystream rekeyed every release "
                              "(default: off)")
    return p


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class UserError(Exception):
    """A problem with the command line or the data: printed as one line, exit status 2."""


def _fill_presets(args: argparse.Namespace) -> argparse.Namespace:
    preset = PRESETS["quick" if args.quick else "default"]
    for key, value in preset.items():
        if key == "sigma_dp":
            if args.noise_multiplier is None and args.target_epsilon is None and args.sigma_dp is None:
                args.sigma_dp = value
        elif getattr(args, key) is None:
            setattr(args, key, value)
    if getattr(args, "workers", None) is None:
        args.workers = _cpu_count()
    return args


@dataclass
class Splits:
    """Utterances of each role: seed training, federated users, evaluation.

    ``names`` says where each role's data came from (split directory or TSV) and ``skipped``
    what the readers dropped from it; both are keyed by role (``seed``, ``fl``, ``eval``,
    ``seed_dev``).
    """

    source: str
    seed: list[Utterance]
    fl_users: dict[str, list[Utterance]]
    eval: list[Utterance]
    seed_dev: list[Utterance]  # held-out speakers of the seed domain (may be empty)
    names: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, tuple[SkippedFile, ...]] = field(default_factory=dict)


def _read(what: str, reader: Any, *a: Any, **kw: Any) -> SpeechData:
    try:
        data: SpeechData = reader(*a, **kw)
    except (FileNotFoundError, DataError) as exc:
        raise UserError(f"{what}: {exc}") from exc
    if data.num_utterances == 0:
        skipped = f" ({len(data.skipped)} files skipped; see the reasons above)" if data.skipped else ""
        for entry in data.skipped[:3]:
            print(f"  skipped {entry.path}: {entry.reason}", flush=True)
        raise UserError(f"{what} has no usable utterances (found 0){skipped}")
    return data


def load_splits(args: argparse.Namespace) -> Splits:
    """Read the data: real LibriSpeech / Common Voice, or the embedded corpus."""
    ls, cv = args.librispeech_root, args.common_voice_root
    if ls is None and cv is None:
        config = CorpusConfig.quick(seed=0) if args.quick else CorpusConfig()
        workers = getattr(args, "workers", None) or max(1, args.threads)
        root = ensure_corpus(config, cache_dir=args.cache_dir, workers=workers,
                             progress=getattr(args, "progress", True))
        parts = {role: _read(f"synthetic split {root / split}", read_librispeech, root, split,
                             verify_audio=False)
                 for role, split in (("seed", "seed-train"), ("fl", "fl-train"),
                                     ("eval", "eval"), ("seed_dev", "seed-dev"))}
        names = {role: str(root / split) for role, split in (
            ("seed", "seed-train"), ("fl", "fl-train"), ("eval", "eval"), ("seed_dev", "seed-dev"))}
        return Splits(f"embedded synthetic corpus ({root})", parts["seed"].utterances(),
                      parts["fl"].users, parts["eval"].utterances(), parts["seed_dev"].utterances(),
                      names, {k: v.skipped for k, v in parts.items()})
    names: dict[str, str] = {}
    parts = {}
    if ls is not None:
        names["seed"] = str(ls / args.seed_split)
        parts["seed"] = _read(f"LibriSpeech split {names['seed']}", read_librispeech, ls,
                              args.seed_split, on_error="skip")
    if cv is None:  # seed and FL on disjoint LibriSpeech speakers
        for role, split in (("fl", args.fl_split), ("eval", args.eval_split)):
            names[role] = str(ls / split)
            parts[role] = _read(f"LibriSpeech split {names[role]}", read_librispeech, ls, split,
                                on_error="skip")
        return Splits(f"LibriSpeech {ls}", parts["seed"].utterances(), parts["fl"].users,
                      parts["eval"].utterances(), [], names,
                      {k: v.skipped for k, v in parts.items()})
    for role, tsv in (("fl", "train.tsv"), ("eval", "dev.tsv")):
        names[role] = str(cv / tsv)
        parts[role] = _read(f"Common Voice index {names[role]}", read_common_voice, cv, tsv=tsv,
                            on_error="skip")
    fl = parts["fl"].users
    skipped = {k: v.skipped for k, v in parts.items()}
    if ls is not None:  # the paper: LibriSpeech seed, Common Voice users
        return Splits(f"LibriSpeech {ls} (seed) + Common Voice {cv} (FL)",
                      parts["seed"].utterances(), fl, parts["eval"].utterances(), [], names, skipped)
    if len(fl) < 2:
        raise UserError(
            f"Common Voice index {names['fl']} has {len(fl)} user(s) (client_id values); a "
            "Common-Voice-only run needs at least 2 (a tenth, at least one, trains the seed "
            "model, the rest are the federated users); add --librispeech-root for the seed model")
    ids = sorted(fl)  # Common Voice only: a tenth of the users for the seed model
    random.Random(args.seed).shuffle(ids)
    cut = max(1, len(ids) // 10)
    seed = [u for uid in ids[:cut] for u in fl.pop(uid)]
    names["seed"] = f"{names['fl']} ({cut} of {len(ids)} users)"
    return Splits(f"Common Voice {cv}", seed, fl, parts["eval"].utterances(), [], names, skipped)


def sample_utterances(utts: Sequence[Utterance], limit: int, seed: int) -> list[Utterance]:
    """At most ``limit`` utterances drawn uniformly at random with ``seed``, in their order."""
    if len(utts) <= limit:
        return list(utts)
    keep = sorted(random.Random(f"dpfl-eval-sample/{seed}").sample(range(len(utts)), limit))
    return [utts[i] for i in keep]


def _features(utts: Sequence[Utterance], args: argparse.Namespace) -> list[torch.Tensor]:
    """In-memory features of ``utts`` (kept for callers of the earlier API; the pipeline itself
    reads features lazily from :mod:`examples.asr.store`)."""
    cache = None if args.cache_dir is None else args.cache_dir / "features"
    feats = cached_features(utts, cache_dir=cache)
    return [feats[u.utterance_id] for u in utts]


@dataclass
class PreparedData:
    """Feature-backed data of a run: lazy batches and the per-split data report."""

    seed_batches: StoredBatches
    eval_batches: StoredBatches
    dev_batches: StoredBatches | None
    dataset: StoredFederatedDataset
    report: dict[str, Any]
    fl_utterances: int
    eval_utterances: int


def prepare_data(splits: Splits, args: argparse.Namespace, tok: CharTokenizer) -> PreparedData:
    """Extract features into the on-disk store, drop and report skipped files, build batches.

    Raises:
        UserError: if a split ends up with too little data, or ``--strict`` and a file was
            skipped.
    """
    eval_utts = sample_utterances(splits.eval, args.max_eval_utterances, args.seed)
    dev_utts = sample_utterances(splits.seed_dev, args.max_eval_utterances, args.seed)
    fl_utts = [u for utts in splits.fl_users.values() for u in utts]
    roles: dict[str, list[Utterance]] = {"seed": splits.seed, "fl": fl_utts, "eval": eval_utts}
    if dev_utts:
        roles["seed_dev"] = dev_utts
    try:
        stores = extract_splits(roles, cache_dir=args.cache_dir, workers=args.workers,
                                progress=getattr(args, "progress", True))
    except ValueError as exc:  # duplicate ids, named with both files
        raise UserError(str(exc)) from exc
    report: dict[str, Any] = {}
    for role, utts in roles.items():
        store = stores[role]
        read_skips = splits.skipped.get(role, ())
        listed = {"eval": len(splits.eval), "seed_dev": len(splits.seed_dev)}.get(role, len(utts))
        unreadable = sum(1 for e in read_skips if e.path.suffix not in (".txt", ".tsv"))
        report[role] = {
            "source": splits.names.get(role, ""),
            "found": listed + unreadable,
            "not_sampled": listed - len(utts),
            "used": len(store),
            "hours": round(store.hours(), 3),
            "skipped": summarize_skips([*read_skips, *store.skipped]),
        }
    total_skipped = sum(r["skipped"]["count"] for r in report.values())
    if total_skipped and args.strict:
        first = next(e for r in report.values() for k in r["skipped"]["by_kind"].values()
                     for e in k["examples"])
        raise UserError(f"--strict: {total_skipped} file(s) skipped, e.g. {first}; fix the data "
                        "or run without --strict to skip them")
    seed_utts = [u for u in splits.seed if u.utterance_id in stores["seed"]]
    users = {uid: kept for uid, utts in splits.fl_users.items()
             if (kept := [u for u in utts if u.utterance_id in stores["fl"]])}
    eval_kept = [u for u in eval_utts if u.utterance_id in stores["eval"]]
    dev_kept = [u for u in dev_utts if dev_utts and u.utterance_id in stores["seed_dev"]]
    for role, count, need in (("seed", len(seed_utts), 1), ("fl", len(users), 2),
                              ("eval", len(eval_kept), 1)):
        if count < need:
            unit = "users" if role == "fl" else "usable utterances"
            raise UserError(f"{role} data {splits.names.get(role, '')} has {count} {unit} after "
                            f"skipping {report[role]['skipped']['count']} file(s); need at least "
                            f"{need}")
    dataset = StoredFederatedDataset(stores["fl"], users, tok, batch_size=args.local_batch_size,
                                     seed=args.seed)
    return PreparedData(
        seed_batches=StoredBatches(stores["seed"], seed_utts, tok, batch_size=args.batch_size,
                                   seed=args.seed),
        eval_batches=StoredBatches(stores["eval"], eval_kept, tok, batch_size=64),
        dev_batches=(StoredBatches(stores["seed_dev"], dev_kept, tok, batch_size=64)
                     if dev_kept else None),
        dataset=dataset, report=report,
        fl_utterances=sum(len(v) for v in users.values()), eval_utterances=len(eval_kept))


_RUN_FILES = ("seed_model.pt", "results.json", "results.md", "fl_no_noise.jsonl", "fl_dp.jsonl",
              "ckpt_fl_no_noise", "ckpt_fl_dp", "run.json")


def resolve_output_dir(args: argparse.Namespace) -> Path:
    """The run directory: a new timestamped one by default, or ``--output-dir`` checked for an
    earlier run (which needs ``--resume`` or ``--overwrite``).

    Raises:
        UserError: if the folder holds a run and neither flag is given, or ``--resume`` finds
            nothing to resume.
    """
    base = Path("runs/asr-quick" if args.quick else "runs/asr")
    out: Path | None = args.output_dir
    if out is None:
        if args.resume:
            earlier = sorted(p for p in base.glob("*") if p.is_dir() and (p / "run.json").is_file())
            if not earlier:
                raise UserError(f"--resume: no earlier run under {base}/; run without --resume "
                                "first, or give --output-dir")
            return earlier[-1]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out, n = base / stamp, 1
        while out.exists():
            n += 1
            out = base / f"{stamp}-{n}"
        return out
    held = [name for name in _RUN_FILES if (out / name).exists()]
    if held and args.overwrite:
        for name in held:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    elif held and not args.resume:
        raise UserError(f"{out} already holds a run ({', '.join(held[:3])}); pass --resume to "
                        "continue it, --overwrite to replace it, or choose another --output-dir")
    return out


def _rank0(dist: DistContext | None) -> bool:
    return dist is None or dist.rank == 0


def _say(dist: DistContext | None, *msg: object) -> None:
    if _rank0(dist):
        print(*msg, flush=True)


def _rates(model: torch.nn.Module, batches: Sequence[Batch], tok: CharTokenizer) -> dict[str, float]:
    rates, _ = evaluate(model, batches, tok)
    return {"wer": rates.wer, "cer": rates.cer}


def _seed_model(
    args: argparse.Namespace, model: CTCTransformer, batches: Sequence[Batch],
    augment: Augment | None,
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
    if dist is None:
        args.output_dir = resolve_output_dir(args)
    else:  # every rank must write into the folder rank 0 chose
        chosen: list[Any] = [None]
        if dist.rank == 0:
            try:
                chosen[0] = resolve_output_dir(args)
            except UserError as exc:
                chosen[0] = exc
        tdist.broadcast_object_list(chosen, src=0)
        if isinstance(chosen[0], UserError):
            raise chosen[0]
        args.output_dir = chosen[0]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if _rank0(dist):
        (args.output_dir / "run.json").write_text(json.dumps(
            {"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1) + "\n")
    _say(dist, f"run directory: {args.output_dir}")
    tok = CharTokenizer()

    # Data (rank 0 first, so that the corpus and the feature store are built once).
    if dist is not None and dist.rank != 0:
        tdist.barrier()
    t0 = time.time()
    args.progress = _rank0(dist)
    splits = load_splits(args)
    args.data_source = splits.source
    data = prepare_data(splits, args, tok)
    if dist is not None and dist.rank == 0:
        tdist.barrier()
    _say(dist, f"data: {splits.source}\n  seed {len(data.seed_batches.store)} utterances, FL "
         f"{len(data.dataset)} users / {data.fl_utterances} utterances, eval "
         f"{data.eval_utterances} utterances ({time.time() - t0:.0f}s incl. corpus and features)")
    _say(dist, _data_report(data.report))
    seed_batches, ev_batches, dev_batches = data.seed_batches, data.eval_batches, data.dev_batches
    dataset = data.dataset
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
    results: dict[str, Any] = {
        "data": {"source": splits.source, "seed_utterances": data.seed_batches.num_utterances(),
                 "fl_users": len(dataset), "fl_utterances": data.fl_utterances,
                 "eval_utterances": data.eval_utterances, "splits": data.report},
        "model": model.config.to_dict(),
        # what the printed numbers depend on besides the command line (see docs/asr.md,
        # "Determinism"): the float kernels torch picks for this CPU and the thread count
        "environment": {"torch": torch.__version__,
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        "threads": args.threads, "device": str(device)}}

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
    population = len(dataset)
    z, sigma_dp = resolve_noise(
        noise_multiplier=args.noise_multiplier, sigma_dp=args.sigma_dp, target_epsilon=args.target_epsilon,
        cohort_size=args.cohort_size, population=population, rounds=args.rounds, delta=args.delta,
        accountant=args.accountant)
    base = FederatedConfig(
        rounds=args.rounds, cohort_size=args.cohort_size, local_steps=args.local_steps,
        local_lr=args.local_lr, server_optimizer=args.server_optimizer, server_lr=args.server_lr,
        server_lr_decay=args.server_lr_decay, clip=args.clip, clip_allocation=args.clip_allocation,
        clip_bound=args.clip_bound, noise_multiplier=0.0, accountant=args.accountant,
        delta=args.delta, sampling=args.sampling, seed=args.seed,
        noise_seed=args.noise_seed, secure_noise=args.secure_noise)
    eval_fn = (lambda m: _rates(m, ev_batches, tok))  # noqa: E731
    for name, cfg in (("fl_no_noise", base), ("fl_dp", replace(base, noise_multiplier=z))):
        model.load_state_dict(seed_state)
        _say(dist, f"{name}: {cfg.rounds} rounds, cohort {cfg.cohort_size} of {population}, "
             f"z={cfg.noise_multiplier:.4g} (σ_DP={cfg.sigma_dp():.3g}), C={cfg.clip_bound:g} {cfg.clip}")
        t0 = time.time()
        audit = (CanaryAudit(args.canaries, seed=args.seed)
                 if args.canaries and cfg.noise_multiplier > 0 else None)
        try:
            run = run_federated(
                model, dataset, cfg, augment=augment, log_path=args.output_dir / f"{name}.jsonl",
                checkpoint_dir=args.output_dir / f"ckpt_{name}", resume=args.resume,
                eval_fn=eval_fn, eval_every=args.eval_every, dist=dist, audit=audit)
        except CheckpointError as exc:  # e.g. --resume with other privacy settings
            raise UserError(f"{exc} (or start a new run without --resume)") from exc
        if _rank0(dist):
            entry = {**score(model), "epsilon": run.epsilon, "delta": run.delta,
                     "rounds": run.rounds_completed, "stop_reason": run.stop_reason,
                     "time_s": round(time.time() - t0, 1), **cfg.to_dict()}
            if run.audit is not None:
                entry["audit"] = run.audit
                _say(dist, f"{name}: empirical ε {run.audit['empirical_epsilon']:.3g} "
                     f"({args.canaries} canaries, one-shot estimate) vs proven ε {run.epsilon:.4g}")
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
        out = args.output_dir
        print(f"\nwritten to {out}/: results.json and results.md (this table), seed_model.pt, "
              f"round logs fl_no_noise.jsonl and fl_dp.jsonl, checkpoints ckpt_fl_no_noise/ and "
              f"ckpt_fl_dp/ (continue with --resume --output-dir {out}); corpus and feature "
              f"cache: {args.cache_dir or default_cache_dir()}", flush=True)
    if dist is not None:
        shutdown_distributed()
    return results


def _data_report(report: dict[str, Any]) -> str:
    """Per-split counts and skip reasons, as printed."""
    lines = []
    for role, r in report.items():
        line = f"  {role}: {r['found']} found, {r['used']} used ({r['hours']:.2f} h)"
        if r["not_sampled"]:
            line += f", {r['not_sampled']} not in the --max-eval-utterances sample"
        skipped = r["skipped"]
        line += f", {skipped['count']} skipped" + (":" if skipped["count"] else "")
        lines.append(line + f"  [{r['source']}]")
        for kind, entry in skipped["by_kind"].items():
            lines.append(f"    {entry['count']} x {kind}, e.g. {entry['examples'][0]}")
    return "\n".join(lines)


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
        eps = _eps(r["epsilon"])
        if r.get("audit"):
            a = r["audit"]
            eps += f" (empirical {a['empirical_epsilon']:.3g}, {a['num_canaries']} canaries)"
        lines.append(row(what, r, eps))
    if "extrapolated" in results:
        e = results["extrapolated"]
        lines.append(
            f"| FL + DP extrapolated to the paper's scale: same σ_DP, S={e['cohort_size']:,}, "
            f"K={e['population'] / 1e6:g}M, T={e['rounds']:,} (z={e['noise_multiplier']:.3g}) | – | – |"
            + (" – |" if dev else "") + f" {e['epsilon']:.3g} (δ={e['delta']:g}) |")
    lines.append(f"\nDP noise: {dp.get('noise', 'unknown')}; sampling and training seeded by --seed "
                 "(a simulation: the cohorts are reproducible)")
    lines.append(f"wall time {results['wall_time_s']:.0f}s; data: {results['data']['source']}")
    if "environment" in results:
        env = results["environment"]
        lines.append(f"torch {env['torch']}, CPU kernels {env['cpu_capability']}, "
                     f"{env['threads']} threads, device {env['device']}")
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
    if args.output_dir is not None and args.output_dir.exists() and not args.output_dir.is_dir():
        parser.error(f"--output-dir {args.output_dir} is a file, not a folder")
    if args.canaries == 1 or args.canaries < 0:
        parser.error(f"--canaries must be 0 (off) or at least 2, got {args.canaries}")
    for name in ("workers", "threads", "max_eval_utterances"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    try:
        return run_pipeline(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
