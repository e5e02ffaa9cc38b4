"""``dpfl audit``: empirical ε from saved canary cosines or from in/out trial counts.

Wired into the ``dpfl`` command by ``add_audit_parser``::

    dpfl audit estimate --cosines run_cosines.json --delta 1e-5 [--json]
    dpfl audit bound --false-positives 0 --trials-out 1000000 --false-negatives 990000 \\
        --trials-in 1000000 --delta 1e-5 --confidence 0.95 [--json]

``--cosines`` reads the JSON written from
[`dpfl.audit.CanaryAudit.cosines`][dpfl.audit.CanaryAudit.cosines] (keys ``final`` and optionally
``all_iterates``, each ``{"canary": [...], "unseen": [...]}``).

Handlers return a dict; ``dpfl.cli.main`` prints it (``--json``) or formats it with the
parser's ``formatter`` default. Importing this module does not import torch (handlers import
what they need), so ``dpfl privacy`` keeps its start-up time.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["add_audit_parser", "format_audit"]


def add_audit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dpfl audit`` (actions ``estimate`` and ``bound``) on ``subparsers``."""
    audit = subparsers.add_parser(
        "audit",
        help="empirical privacy estimates (canary cosines, in/out trial counts)",
        description="Empirical epsilon of a run or a release: a lower-bound-style estimate "
        "under a specific attack, to compare with the accountant's proven epsilon.",
    )
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    est = actions.add_parser(
        "estimate",
        help="epsilon from saved canary cosines (one-shot)",
        description="One-shot empirical epsilon (Andrew et al., arXiv 2302.03098) from the cosines "
        "of inserted and unseen canary directions saved by CanaryAudit.cosines().",
    )
    est.add_argument(
        "--cosines", required=True, metavar="FILE", help="JSON of CanaryAudit.cosines()"
    )
    est.add_argument("--delta", type=float, required=True, metavar="D", help="target delta")
    est.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    est.set_defaults(handler=_estimate, command_parser=est, formatter=format_audit)

    bnd = actions.add_parser(
        "bound",
        help="epsilon lower bound from one threshold test's counts",
        description="Epsilon lower bound at delta from the error counts of one canary in/out "
        "threshold test, with Clopper-Pearson confidence.",
    )
    bnd.add_argument(
        "--false-positives", type=int, required=True, metavar="N",
        help="out-trials (canary absent) that the test called 'in'",
    )
    bnd.add_argument(
        "--trials-out", type=int, required=True, metavar="N", help="trials without the canary"
    )
    bnd.add_argument(
        "--false-negatives", type=int, required=True, metavar="N",
        help="in-trials (canary present) that the test called 'out'",
    )
    bnd.add_argument(
        "--trials-in", type=int, required=True, metavar="N", help="trials with the canary"
    )
    bnd.add_argument("--delta", type=float, required=True, metavar="D", help="target delta")
    bnd.add_argument("--confidence", type=float, default=0.95, help="confidence of the bound (default: 0.95)")
    bnd.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    bnd.set_defaults(handler=_bound, command_parser=bnd, formatter=format_audit)
    return audit


class _OptionError(ValueError):
    """A bad value of one command-line option; the message starts ``argument --OPTION:``."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"argument {option}: {message}")


def _cosine_list(value: object, where: str) -> list[float]:
    """``value`` as a list of finite cosines, else an error naming ``where`` and the entry."""
    if not isinstance(value, list):
        raise _OptionError("--cosines", f"{where} must be a list of numbers, got {value!r:.60}")
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
            raise _OptionError("--cosines", f"{where}[{i}] is not a finite number: {x!r:.60}")
    if len(value) < 2:
        raise _OptionError("--cosines", f"{where} needs at least 2 values, got {len(value)}")
    return [float(x) for x in value]


def _estimate(args: argparse.Namespace) -> dict[str, Any]:
    from dpfl.audit.canary import estimate_from_cosines

    name = args.cosines
    try:
        data = json.loads(Path(name).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _OptionError("--cosines", f"{name!r} cannot be read as JSON: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("final"), dict):
        raise _OptionError(
            "--cosines", f"{name!r} needs a 'final' object (written from CanaryAudit.cosines())"
        )
    parts: dict[str, tuple[list[float], list[float]] | None] = {}
    for key in ("final", "all_iterates"):
        part = data.get(key)
        if part is None:
            parts[key] = None
            continue
        if not isinstance(part, dict) or "canary" not in part or "unseen" not in part:
            raise _OptionError("--cosines", f"{name!r}: [{key!r}] needs 'canary' and 'unseen' lists")
        parts[key] = (
            _cosine_list(part["canary"], f"{name!r}: [{key!r}]['canary']"),
            _cosine_list(part["unseen"], f"{name!r}: [{key!r}]['unseen']"),
        )
    out: dict[str, Any] = {"delta": args.delta, "audit": "canary_cosines"}
    for key, pair in parts.items():
        if pair is None:
            out[f"epsilon_{key}"] = None
            continue
        e = estimate_from_cosines(pair[0], pair[1], delta=args.delta)
        out[f"epsilon_{key}"] = e.epsilon
        out[f"mu_{key}"] = e.mu
        out[f"count_{key}"] = e.count
    out["epsilon"] = out["epsilon_final"]
    return out


def _bound(args: argparse.Namespace) -> dict[str, Any]:
    from dpfl.audit.bounds import clopper_pearson_upper, epsilon_from_rates

    for errors, trials in (("false_positives", "trials_out"), ("false_negatives", "trials_in")):
        n_err, n = getattr(args, errors), getattr(args, trials)
        err_opt, trials_opt = (f"--{x.replace('_', '-')}" for x in (errors, trials))
        if n < 1:
            raise _OptionError(trials_opt, f"must be >= 1 (the number of trials), got {n}")
        if n_err < 0:
            raise _OptionError(err_opt, f"must be >= 0 (a count), got {n_err}")
        if n_err > n:
            raise _OptionError(
                err_opt, f"{n_err} is more than {trials_opt} ({n}): a count of errors cannot "
                "exceed its number of trials"
            )
    if not 0 < args.confidence < 1:
        raise _OptionError("--confidence", f"must lie in (0, 1), got {args.confidence!r}")
    alpha = (1 - args.confidence) / 2
    fpr = clopper_pearson_upper(args.false_positives, args.trials_out, alpha)
    fnr = clopper_pearson_upper(args.false_negatives, args.trials_in, alpha)
    return {
        "epsilon": epsilon_from_rates(fpr, fnr, args.delta),
        "delta": args.delta,
        "confidence": args.confidence,
        "fpr_upper": fpr,
        "fnr_upper": fnr,
        "audit": "threshold_counts",
    }


def format_audit(result: dict[str, Any]) -> str:
    """Human-readable lines for an ``audit`` result."""
    if result.get("audit") == "threshold_counts":
        return (
            f"empirical epsilon >= {result['epsilon']:.4f} at delta = {result['delta']:g} "
            f"with confidence {result['confidence']:g}\n"
            f"(Clopper-Pearson upper bounds: FPR <= {result['fpr_upper']:.3g}, "
            f"FNR <= {result['fnr_upper']:.3g})"
        )
    lines = [
        f"empirical epsilon (final model) = {result['epsilon_final']:.4f} at delta = {result['delta']:g}"
    ]
    if result.get("epsilon_all_iterates") is not None:
        lines.append(f"empirical epsilon (all iterates) = {result['epsilon_all_iterates']:.4f}")
    lines.append(
        "an estimate under the cosine attack, not a guarantee; compare with the accountant"
    )
    return "\n".join(lines)
