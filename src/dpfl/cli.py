"""The ``dpfl`` command line.

Top-level commands are argparse subcommands; each registers itself through an ``_add_*_command``
function so more can be added without touching the others. ``dpfl privacy`` answers the accounting
questions of a DP-FL run::

    dpfl privacy epsilon --noise-multiplier 0.6144 --sample-rate 0.002947 --rounds 2034 --delta 1e-9
    dpfl privacy calibrate --epsilon 7.2 --sample-rate 0.002947 --rounds 2034 --delta 1e-9
    dpfl privacy extrapolate --sigma-dp 3e-6 --cohort 204800 --population 69.5e6 --rounds 2034 \\
        --delta 1e-9 --accountant pld --json

Bad arguments exit with status 2 and a message naming the offending option.

References:
    Pelikan et al., arXiv 2310.00098, section 2.4.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dpfl.accounting.accountants import DEFAULT_VALUE_DISCRETIZATION_INTERVAL
from dpfl.accounting.calibration import calibrate_noise_multiplier, epsilon_for
from dpfl.accounting.extrapolation import extrapolate

__all__ = ["build_parser", "main"]

# Library argument name -> CLI option, to name the option in validation errors.
_OPTION_OF = {
    "target_epsilon": "--epsilon",
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
}


class _UsageError(Exception):
    """A validation error to report as a usage error (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    """Return the ``dpfl`` argument parser with every top-level command registered."""
    parser = argparse.ArgumentParser(
        prog="dpfl", description="Differential-privacy federated-learning tools."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_privacy_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dpfl`` command line and return its exit status (0 ok, 2 bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse reports usage errors (status 2) and --help (0) this way
        return exit_.code if isinstance(exit_.code, int) else 2
    handler: Callable[[argparse.Namespace], dict[str, Any]] = args.handler
    try:
        result = handler(args)
    except (ValueError, TypeError) as err:
        args.command_parser.print_usage(sys.stderr)
        print(f"{args.command_parser.prog}: error: {_name_option(str(err))}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_json_safe(result), sort_keys=True))
    else:
        print(_format_human(result))
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

    eps = actions.add_parser("epsilon", help="epsilon of a run")
    eps.add_argument(
        "--noise-multiplier",
        type=float,
        required=True,
        metavar="Z",
        help="noise std on the sum / clipping bound",
    )
    _add_run_options(eps)
    eps.set_defaults(handler=_privacy_epsilon, command_parser=eps)

    cal = actions.add_parser("calibrate", help="smallest noise multiplier meeting a target epsilon")
    cal.add_argument("--epsilon", type=float, required=True, metavar="E", help="target epsilon")
    _add_run_options(cal)
    cal.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance on z (<= 0.01)")
    cal.add_argument(
        "--max-noise-multiplier",
        type=float,
        default=1e4,
        help="give up above this noise multiplier",
    )
    cal.set_defaults(handler=_privacy_calibrate, command_parser=cal)

    ext = actions.add_parser(
        "extrapolate", help="epsilon at a larger cohort/population, fixed sigma_DP"
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
    ext.add_argument("--rounds", type=int, required=True, metavar="T", help="number of rounds")
    ext.add_argument("--delta", type=float, required=True, metavar="D", help="target delta")
    _add_output_options(ext)
    ext.set_defaults(handler=_privacy_extrapolate, command_parser=ext)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sample-rate",
        type=float,
        required=True,
        metavar="Q",
        help="Poisson sampling rate q = S/K",
    )
    parser.add_argument("--rounds", type=int, required=True, metavar="T", help="number of rounds")
    parser.add_argument("--delta", type=float, required=True, metavar="D", help="target delta")
    _add_output_options(parser)
    parser.add_argument(
        "--value-discretization-interval",
        type=float,
        default=DEFAULT_VALUE_DISCRETIZATION_INTERVAL,
        help="PLD grid step (pld only; coarser = faster, still an upper bound)",
    )


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--accountant",
        choices=("rdp", "pld"),
        default="rdp",
        help="RDP (default, as the paper) or PLD (tighter)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _privacy_epsilon(args: argparse.Namespace) -> dict[str, Any]:
    eps = epsilon_for(
        args.noise_multiplier,
        args.sample_rate,
        args.rounds,
        args.delta,
        accountant=args.accountant,
        value_discretization_interval=args.value_discretization_interval,
    )
    return _run_result(args, args.noise_multiplier, args.sample_rate, eps)


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
    )
    eps = epsilon_for(
        z,
        args.sample_rate,
        args.rounds,
        args.delta,
        accountant=args.accountant,
        value_discretization_interval=args.value_discretization_interval,
    )
    return {**_run_result(args, z, args.sample_rate, eps), "target_epsilon": args.epsilon}


def _privacy_extrapolate(args: argparse.Namespace) -> dict[str, Any]:
    r = extrapolate(
        sigma_dp=args.sigma_dp,
        cohort_size=args.cohort,
        population=args.population,
        rounds=args.rounds,
        delta=args.delta,
        accountant=args.accountant,
    )
    return {
        **_run_result(args, r.noise_multiplier, r.sample_rate, r.epsilon),
        "sigma_dp": r.sigma_dp,
        "cohort_size": r.cohort_size,
        "population": r.population,
    }


def _run_result(args: argparse.Namespace, z: float, q: float, eps: float) -> dict[str, Any]:
    return {
        "epsilon": eps,
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
    if "sigma_dp" in result:
        lines.append(
            f"sigma_dp = {result['sigma_dp']:g}, cohort_size = {result['cohort_size']:g}, "
            f"population = {result['population']:g}"
        )
    lines.append(
        f"accountant = {result['accountant']} (Poisson sampling, add/remove-one-user adjacency)"
    )
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
