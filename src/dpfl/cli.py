"""The ``dpfl`` command line.

Top-level commands are argparse subcommands; each registers itself through an ``add_*`` function
so more can be added without touching the others: ``dpfl privacy`` (below) and ``dpfl audit``
(empirical ε from saved canary cosines or in/out trial counts, [`dpfl.audit`][dpfl.audit]).
``dpfl privacy`` answers the accounting questions of a DP-FL run::

    dpfl privacy epsilon --noise-multiplier 0.6144 --sample-rate 0.002947 --rounds 2034 --delta 1e-9
    dpfl privacy calibrate --epsilon 7.2 --sample-rate 0.002947 --rounds 2034 --delta 1e-9
    dpfl privacy extrapolate --sigma-dp 3e-6 --cohort 204800 --population 69.5e6 --rounds 2034 \\
        --delta 1e-9 --accountant pld --json

Bad arguments exit with status 2 and a message naming the offending option, never a traceback:
out-of-range values, negative numbers (``--delta -1e-5`` is read as a value, then rejected), and
PLD work that would not fit in memory (``--rounds 1e12``, a ``1e-9`` grid, a tiny noise
multiplier) are all refused up front. Noise multipliers above ``NOISE_MULTIPLIER_CAP`` (1e6) are
accounted at the cap, which keeps ε an upper bound.

References:
    Pelikan et al., arXiv 2310.00098, section 2.4.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dpfl import __version__
from dpfl._checks import require_int, require_probability
from dpfl.accounting.accountants import PLDAccountant, RDPAccountant
from dpfl.accounting.calibration import calibrate_noise_multiplier
from dpfl.accounting.events import PoissonRound, effective_noise_multiplier
from dpfl.accounting.extrapolation import extrapolate
from dpfl.audit._cli import add_audit_parser

__all__ = ["build_parser", "main"]

# Library argument name -> CLI option, to name the option in validation errors.
_OPTION_OF = {
    "target_epsilon": "--epsilon",
    "count_noise_multiplier": "--count-noise-multiplier",
    "noise_multiplier": "--noise-multiplier",
    "sample_rate": "--sample-rate",
    "sigma_dp": "--sigma-dp",
    "cohort_size": "--cohort",
    "population": "--population",
    "rounds": "--rounds",
    "delta": "--delta",
    "rtol": "--rtol",
    "max_noise_multiplier": "--max-noise-multiplier",
    "value_discretization_interval": "--value-discretization-interval",
    "false_positives": "--false-positives",
    "false_negatives": "--false-negatives",
    "trials_out": "--trials-out",
    "trials_in": "--trials-in",
    "confidence": "--confidence",
}


# A number such as -1e-5, -.5, -3 or -inf: a value, never an option (dpfl has no such options).
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.I)


class _Parser(argparse.ArgumentParser):
    """``ArgumentParser`` that reads negative numbers in any float spelling as values.

    argparse only recognises ``-5`` and ``-.5`` as numbers; ``--delta -1e-5`` would otherwise
    fail with "expected one argument" before dpfl could say that δ must be positive.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER


def _integer(text: str) -> int:
    """An integer, also written like a float (``1e12``, ``2000.0``)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer value: {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}")
    return int(value)


def _interval(text: str) -> float | None:
    """A PLD grid step, or ``auto`` (None) for the automatic grid."""
    if text.lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'auto', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """Return the ``dpfl`` argument parser with every top-level command registered."""
    parser = _Parser(prog="dpfl", description="Differential-privacy federated-learning tools.")
    parser.add_argument("--version", action="version", version=f"dpfl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_privacy_command(commands)
    add_audit_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dpfl`` command line and return its exit status (0 ok, 2 bad arguments).

    Args:
        argv: The arguments after ``dpfl`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status; errors are reported on stderr, never as a traceback.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse reports usage errors (status 2) and --help (0) this way
        return exit_.code if isinstance(exit_.code, int) else 2
    handler: Callable[[argparse.Namespace], dict[str, Any]] = args.handler
    try:
        result = handler(args)
    except (ValueError, TypeError, OverflowError, MemoryError) as err:
        # OverflowError/MemoryError: dp_accounting's own limits, after dpfl's checks let a case
        # through; still a usage problem (the arguments), never a traceback.
        args.command_parser.print_usage(sys.stderr)
        message = str(err) or type(err).__name__
        print(f"{args.command_parser.prog}: error: {_name_option(message)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_json_safe(result), sort_keys=True))
    else:
        print(getattr(args, "formatter", _format_human)(result))
    return 0


# --------------------------------------------------------------------------- dpfl privacy
def _add_privacy_command(commands: Any) -> None:
    privacy = commands.add_parser(
        "privacy",
        help="privacy accounting: epsilon, noise calibration, population extrapolation",
        description="Privacy accounting for Poisson-subsampled Gaussian rounds "
        "(user-level, add/remove-one-user adjacency).",
    )
    actions = privacy.add_subparsers(dest="privacy_command", required=True, metavar="ACTION")

    eps = actions.add_parser(
        "epsilon",
        help="epsilon of a run",
        description="Epsilon at a given delta after T rounds of the Poisson-subsampled Gaussian "
        "mechanism with noise multiplier Z and sampling rate Q.",
    )
    eps.add_argument(
        "--noise-multiplier",
        type=float,
        required=True,
        metavar="Z",
        help="noise std on the sum / clipping bound (values above 1e6 are accounted as 1e6)",
    )
    _add_run_options(eps)
    eps.set_defaults(handler=_privacy_epsilon, command_parser=eps)

    cal = actions.add_parser(
        "calibrate",
        help="smallest noise multiplier meeting a target epsilon",
        description="Smallest noise multiplier Z (to a relative tolerance) whose epsilon after "
        "T rounds at sampling rate Q stays at or below a target; the epsilon printed is that "
        "of the returned Z.",
    )
    cal.add_argument("--epsilon", type=float, required=True, metavar="E", help="target epsilon")
    _add_run_options(cal)
    cal.add_argument(
        "--rtol",
        type=float,
        default=1e-3,
        help="relative tolerance on z, in (0, 0.01] (default: %(default)s)",
    )
    cal.add_argument(
        "--max-noise-multiplier",
        type=float,
        default=1e4,
        help="give up above this noise multiplier (default: %(default)s)",
    )
    cal.set_defaults(handler=_privacy_calibrate, command_parser=cal)

    ext = actions.add_parser(
        "extrapolate",
        help="epsilon at a larger cohort/population, fixed sigma_DP",
        description="Epsilon of the same model quality at another scale: keep the noise on the "
        "mean (sigma_DP) fixed, set the expected cohort S and population K; then "
        "z = sigma_DP * S and q = S / K (arXiv 2310.00098, section 2.4).",
    )
    ext.add_argument(
        "--sigma-dp",
        type=float,
        required=True,
        metavar="S",
        help="noise std on the mean per unit of clipping bound (kept fixed)",
    )
    ext.add_argument(
        "--cohort", type=float, required=True, metavar="C", help="expected cohort size"
    )
    ext.add_argument("--population", type=float, required=True, metavar="K", help="population size")
    ext.add_argument("--rounds", type=_integer, required=True, metavar="T", help="number of rounds")
    ext.add_argument(
        "--delta", type=float, required=True, metavar="D", help="target delta, in (0, 1)"
    )
    _add_output_options(ext)
    ext.set_defaults(handler=_privacy_extrapolate, command_parser=ext)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sample-rate",
        type=float,
        required=True,
        metavar="Q",
        help="Poisson sampling rate q = S/K, in [0, 1]",
    )
    parser.add_argument(
        "--rounds",
        type=_integer,
        required=True,
        metavar="T",
        help="number of rounds (an integer; 1e4 is accepted)",
    )
    parser.add_argument(
        "--delta", type=float, required=True, metavar="D", help="target delta, in (0, 1)"
    )
    parser.add_argument(
        "--count-noise-multiplier",
        type=float,
        default=None,
        metavar="ZB",
        help="adaptive clipping: noise std of the per-round clip count / its sensitivity; each "
        "round is then one Gaussian of z_eff^-2 = z^-2 + ZB^-2 (epsilon: --noise-multiplier is "
        "the update's z; calibrate: z_eff is calibrated and the update's z reported)",
    )
    _add_output_options(parser)
    parser.add_argument(
        "--value-discretization-interval",
        type=_interval,
        default=None,
        metavar="STEP",
        help="PLD grid step, or 'auto': start at 4x the per-round privacy-loss scale and "
        "halve until epsilon changes by <= 1%% (pld only; every grid gives an upper bound) "
        "(default: auto)",
    )


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--accountant",
        choices=("rdp", "pld"),
        default="rdp",
        help="rdp (as the paper) or pld (tighter) (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _account(
    args: argparse.Namespace, z: float, q: float, interval: float | None = None
) -> dict[str, Any]:
    """ε of ``args.rounds`` rounds of (z, q) and how it was obtained (RDP order / PLD grid)."""
    count = getattr(args, "count_noise_multiplier", None)
    rnd = PoissonRound(noise_multiplier=z, sample_rate=q, count_noise_multiplier=count)
    require_int("rounds", args.rounds, minimum=0)
    require_probability("delta", args.delta, high_open=True)
    if args.accountant == "rdp":
        rdp = RDPAccountant()
        rdp.add_rounds(rnd, args.rounds)
        order = rdp.epsilon_order(args.delta)
        return {
            "epsilon": rdp.epsilon(args.delta),
            "rdp_order": None if math.isnan(order) else order,
            "excluded_orders": list(rdp.excluded_orders),
        }
    pld = PLDAccountant(value_discretization_interval=interval)
    pld.add_rounds(rnd, args.rounds)
    return {
        "epsilon": pld.epsilon(args.delta),
        "value_discretization_interval": pld.discretization_interval(args.delta),
    }


def _privacy_epsilon(args: argparse.Namespace) -> dict[str, Any]:
    details = _account(
        args, args.noise_multiplier, args.sample_rate, args.value_discretization_interval
    )
    return {**_run_result(args, args.noise_multiplier, args.sample_rate), **details}


def _privacy_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    z = calibrate_noise_multiplier(
        args.epsilon,
        args.delta,
        args.sample_rate,
        args.rounds,
        accountant=args.accountant,
        rtol=args.rtol,
        max_noise_multiplier=args.max_noise_multiplier,
        value_discretization_interval=args.value_discretization_interval,
        count_noise_multiplier=args.count_noise_multiplier,
    )
    details = _account(args, z, args.sample_rate, args.value_discretization_interval)
    return {**_run_result(args, z, args.sample_rate), **details, "target_epsilon": args.epsilon}


def _privacy_extrapolate(args: argparse.Namespace) -> dict[str, Any]:
    r = extrapolate(
        sigma_dp=args.sigma_dp,
        cohort_size=args.cohort,
        population=args.population,
        rounds=args.rounds,
        delta=args.delta,
        accountant=args.accountant,
    )
    details = _account(args, r.noise_multiplier, r.sample_rate)
    return {
        **_run_result(args, r.noise_multiplier, r.sample_rate),
        **details,
        "epsilon": r.epsilon,
        "sigma_dp": r.sigma_dp,
        "cohort_size": r.cohort_size,
        "population": r.population,
    }


def _run_result(args: argparse.Namespace, z: float, q: float) -> dict[str, Any]:
    count = getattr(args, "count_noise_multiplier", None)
    extra: dict[str, Any] = {}
    if count is not None:
        extra = {
            "count_noise_multiplier": count,
            "effective_noise_multiplier": effective_noise_multiplier(z, count),
        }
    return {
        **extra,
        "delta": args.delta,
        "noise_multiplier": z,
        "sample_rate": q,
        "rounds": args.rounds,
        "accountant": args.accountant,
        "adjacency": "add_or_remove_one",
        "sampling": "poisson",
    }


# --------------------------------------------------------------------------- output helpers
def _format_human(result: dict[str, Any]) -> str:
    lines = [f"epsilon = {result['epsilon']:.4f} at delta = {result['delta']:g}"]
    if "target_epsilon" in result:
        lines.insert(
            0,
            f"noise_multiplier = {result['noise_multiplier']:.6g} "
            f"(smallest z meeting target epsilon {result['target_epsilon']:g})",
        )
    lines.append(
        f"noise_multiplier = {result['noise_multiplier']:.6g}, "
        f"sample_rate = {result['sample_rate']:.6g}, rounds = {result['rounds']}"
    )
    if "count_noise_multiplier" in result:
        lines.append(
            f"count_noise_multiplier = {result['count_noise_multiplier']:.6g}, "
            f"effective_noise_multiplier = {result['effective_noise_multiplier']:.6g} "
            "(adaptive clipping: update and count compose into one Gaussian)"
        )
    if "sigma_dp" in result:
        lines.append(
            f"sigma_dp = {result['sigma_dp']:g}, cohort_size = {result['cohort_size']:g}, "
            f"population = {result['population']:g}"
        )
    lines.append(
        f"accountant = {result['accountant']} (Poisson sampling, add/remove-one-user adjacency)"
    )
    if result.get("rdp_order") is not None:
        excluded = result["excluded_orders"]
        lines.append(
            f"rdp order = {result['rdp_order']:g}"
            + (f"; orders excluded (no convergence): {excluded}" if excluded else "")
        )
    if "value_discretization_interval" in result:
        lines.append(f"pld grid step = {result['value_discretization_interval']:g}")
    return "\n".join(lines)


def _json_safe(result: dict[str, Any]) -> dict[str, Any]:
    """JSON has no infinity: an infinite epsilon (zero noise) is written as null."""
    return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in result.items()}


def _name_option(message: str) -> str:
    for name, option in _OPTION_OF.items():
        if message.startswith(name + " ") or message.startswith(name + "="):
            return f"argument {option}: {message}"
    return message


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
