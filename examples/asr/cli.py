"""Command line of the ASR example: options, the ``--quick``/default presets, user errors.

:func:`build_parser` is the interface of ``examples/asr_librispeech.py`` (``--help`` lists every
option and its real default); :data:`PRESETS` holds the tunables whose default depends on
``--quick``; :class:`UserError` is a problem with the command line or the data, which the script
prints as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import textwrap
from pathlib import Path
from typing import Any

# The model sizes of examples.asr.model.CONFIGS, named here so that building the parser (and so
# --help) does not import torch; tests/examples/test_asr_help.py keeps the two in step.
MODEL_NAMES = ("paper", "small", "tiny")

__all__ = ["PRESETS", "SEED_TRAINING_OPTIONS", "UserError", "build_parser", "check_args", "fill_presets"]

# Tunables whose default depends on --quick. Everything else has a plain argparse default.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "model": "small", "seed_steps": 6000, "seed_lr": 5.0, "batch_size": 16,
        "rounds": 50, "cohort_size": 10, "local_batch_size": 4, "local_lr": 0.3,
        "server_lr": 0.01, "server_lr_decay": 0.98, "eval_every": 10, "sigma_dp": 3e-3,
    },
    "quick": {
        "model": "tiny", "seed_steps": 200, "seed_lr": 5.0, "batch_size": 16,
        "rounds": 4, "cohort_size": 4, "local_batch_size": 4, "local_lr": 0.1,
        "server_lr": 0.02, "server_lr_decay": 0.97, "eval_every": 2, "sigma_dp": 0.05,
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
        description="DP federated fine-tuning of a CTC transformer seed model (dpfl).",
        epilog=textwrap.fill("Without --librispeech-root / --common-voice-root an embedded synthetic corpus is "
               "generated (once) under --cache-dir. The default run, measured from a fresh cache "
               "on 2 CPU cores: 13 min 43 s (the shipped seed model, three FL stages; "
               "--no-compare-clip drops one), about 540 MB of corpus and feature cache and 55 MB of run outputs. Exit status 2 means a usage or data problem; the one-line "
               "message says what to do."),
        formatter_class=_HelpFormatter,
    )
    a = p.add_argument
    a("--quick", action="store_true",
      help="smoke run: tiny corpus, tiny model, few rounds (measured: 46 s from a fresh "
           "cache, about 90 MB of it, and 4 MB of outputs; it checks the plumbing)")
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
    g = p.add_argument_group(
        "model and seed training",
        "On the embedded corpus with --model small (the default), the seed model is the "
        "checkpoint shipped in examples/asr/checkpoints/ (trained once by `python -m "
        "examples.asr.seed --recipe small`: 6,000 LARS steps, about 35 min on 2 cores; its "
        "record is checked against the code before use). Any seed-training option below, "
        "--train-seed, --quick, another model or real data trains it instead.")
    g.add_argument("--train-seed", action="store_true",
                   help="train the seed model here instead of loading the shipped checkpoint")
    g.add_argument("--model", choices=MODEL_NAMES,
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
    g.add_argument("--vectorized", action=argparse.BooleanOptionalAction, default=False,
                   help="train each cohort at once with torch.func (dpfl's vectorized cohort "
                        "training; same updates up to float rounding, other dropout draws; "
                        "measured 1.04x per round on the small model with 2 threads) instead "
                        "of user by user; not with LayerDrop (--model paper) or --specaugment")
    g.add_argument("--eval-every", type=int,
                   help=_preset_help("in-run evaluation (logged per round, on a seeded sample "
                                     "of 100 eval utterances; the final table scores them all) "
                                     "every this many rounds", "eval_every"))
    g = p.add_argument_group("differential privacy")
    g.add_argument("--clip", choices=["per-layer", "global"], default="per-layer",
                   help="clip each user's update per tensor (paper) or as one vector")
    g.add_argument("--clip-allocation", choices=["dim", "uniform"], default="dim",
                   help="how --clip per-layer splits C over tensors: C_h = C * sqrt(d_h / D) for a "
                        "tensor of d_h of D parameters (dim, paper) or C / sqrt(H) for H tensors "
                        "(uniform)")
    g.add_argument("--clip-bound", type=float, default=0.01, help="C, L2 bound per user update")
    g.add_argument("--compare-clip", action=argparse.BooleanOptionalAction, default=True,
                   help="also run FL + DP with the other --clip mode at the same noise (a third FL "
                        "stage, fl_dp_other_clip: the paper's per-layer vs global comparison)")
    noise = g.add_mutually_exclusive_group()
    noise.add_argument("--noise-multiplier", type=float,
                       help="z (noise std on the sum = z*C); one of the three noise options")
    noise.add_argument("--sigma-dp", type=float,
                       help="σ_DP (std on the mean per unit C); z = σ_DP*S (default when no "
                            "noise option is given: 0.003; with --quick: 0.05)")
    noise.add_argument("--target-epsilon", type=float,
                       help="calibrate z to reach this ε after T rounds")
    g.add_argument("--accountant", choices=["rdp", "pld"], default="rdp",
                   help="privacy accountant for the reported ε (PLD: tighter, Poisson only)")
    g.add_argument("--delta", type=float, default=1e-6, help="δ of the reported ε")
    g.add_argument("--canaries", type=int, default=0, metavar="K",
                   help="insert K canary clients into the DP run and print the one-shot "
                        "empirical ε (Andrew et al. 2023) beside the proven one; canaries are "
                        "not users and cost no privacy (default: 0, off; K >= 2)")
    g.add_argument("--unsafe-metrics", action="store_true",
                   help="also print and record timings (each stage's time, the run's wall "
                        "time); they depend on the realised cohorts and are NOT covered by the "
                        "DP guarantee (default: off: no stage prints a time)")
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


SEED_TRAINING_OPTIONS = ("seed_steps", "seed_lr", "batch_size")
"""Options that change the seed model: giving any of them trains it instead of loading it."""


def fill_presets(args: argparse.Namespace) -> argparse.Namespace:
    if not hasattr(args, "seed_options_given"):  # before the presets hide what was given
        args.seed_options_given = [name for name in SEED_TRAINING_OPTIONS
                                   if getattr(args, name, None) is not None]
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



_SEED_LIMIT = 2**63  # dpfl's seeds are below 2**63


def check_args(args: argparse.Namespace) -> None:
    """Check every option of ``args`` (presets filled in) before any work.

    Raises:
        UserError: naming the first option that is out of range, with what it accepts.
    """
    for name, low in (("rounds", 1), ("cohort_size", 1), ("local_steps", 1), ("batch_size", 1),
                      ("local_batch_size", 1), ("eval_every", 1), ("seed_steps", 0),
                      ("seed", 0), ("workers", 1), ("threads", 1), ("max_eval_utterances", 1)):
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise UserError(f"{_flag(name)} must be at least {low}, got {value}")
    if args.seed >= _SEED_LIMIT:
        raise UserError(f"--seed must be below 2**63, got {args.seed}")
    if args.noise_seed is not None and not 0 <= args.noise_seed < _SEED_LIMIT:
        raise UserError(f"--noise-seed must be an integer in [0, 2**63), got {args.noise_seed}")
    for name in ("local_lr", "seed_lr", "server_lr", "clip_bound", "target_epsilon"):
        value = getattr(args, name, None)
        if value is not None and not 0 < value < math.inf:
            raise UserError(f"{_flag(name)} must be > 0 and finite, got {value}")
    for name in ("noise_multiplier", "sigma_dp"):
        value = getattr(args, name, None)
        if value is not None and not 0 <= value < math.inf:
            raise UserError(f"{_flag(name)} must be >= 0 and finite, got {value}")
    if not 0 < args.server_lr_decay <= 1:
        raise UserError(f"--server-lr-decay must lie in (0, 1], got {args.server_lr_decay}")
    if not 0 < args.delta < 1:
        raise UserError(f"--delta must lie in (0, 1), got {args.delta}")
    if args.canaries == 1 or args.canaries < 0:
        raise UserError(f"--canaries must be 0 (off) or at least 2, got {args.canaries}")
    if args.sampling == "fixed" and args.accountant == "pld":
        raise UserError("--sampling fixed needs --accountant rdp (fixed cohorts are accounted "
                        "under replace-one adjacency, which the PLD accountant does not support)")
    if args.sampling == "fixed" and args.target_epsilon is not None:
        raise UserError("--target-epsilon calibrates for Poisson sampling; use --sampling "
                        "poisson or give --noise-multiplier / --sigma-dp with --sampling fixed")
    from examples.asr.model import CONFIGS  # here, not at import: --help must not load torch

    if args.vectorized and (args.specaugment != "none" or CONFIGS[args.model].layerdrop > 0):
        raise UserError("--vectorized needs a model without LayerDrop (not --model paper) and no "
                        "--specaugment: both branch on data, which torch.func.vmap cannot trace")
    _check_device(args.device)
    if args.output_dir is not None:
        _check_folder("--output-dir", args.output_dir)
    if args.cache_dir is not None:
        _check_folder("--cache-dir", args.cache_dir)
    for name in ("librispeech_root", "common_voice_root"):
        root = getattr(args, name)
        if root is not None and not root.is_dir():
            raise UserError(f"{_flag(name)} {root} is not a folder")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"--device {device!r} is not a torch device ({exc})") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")


def _check_folder(flag: str, path: Path) -> None:
    """``path`` is a folder this process can write in, or can be created as one."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder")
    existing = path
    while not existing.exists():  # the nearest existing ancestor is where it gets created
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created in {existing}"
        raise UserError(f"{flag} {path} {what} (read-only); choose a writable folder")
