"""Benchmark dpfl.accounting: ε and calibration cost vs dp_accounting, the paper's table, PLD
precision of the automatic grid, and the per-round cost of accounting inside a round loop.

Run:  python benchmarks/accounting.py  (writes benchmarks/results/accounting.md and prints it)
      python benchmarks/accounting.py --section rounds   (only the round-loop section, printed)

Timings are medians of a few repeats measured side by side in one run; compare ratios, not
absolute seconds (the machine is shared). Setting: Poisson rate q = 0.003, δ = 1e-9, ε computed at
z = 0.8, calibration to ε = 4 with relative tolerance 1e-3 (dp_accounting's absolute ``tol`` is set
to 1e-3 × the calibrated z, i.e. the same tolerance).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import dp_accounting
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant as DpaPLD
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant as DpaRDP

from dpfl.accounting import (
    PLDAccountant,
    PoissonRound,
    PrivacyBudget,
    RDPAccountant,
    calibrate_noise_multiplier,
)

Q, DELTA, Z, TARGET, RTOL = 0.003, 1e-9, 0.8, 4.0, 1e-3
ROUNDS = (100, 2000, 20_000)
PLD_ROUNDS = (100, 2000)  # dp_accounting's default PLD grid takes seconds per ε here
REPEATS = 3
RESULTS = Path(__file__).resolve().parent / "results" / "accounting.md"


def _median_time(fn: Callable[[], object], repeats: int = REPEATS) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def _dpfl_epsilon(kind: str, t: int) -> float:
    acc = RDPAccountant() if kind == "rdp" else PLDAccountant()
    acc.add_rounds(PoissonRound(Z, Q), t)
    return acc.epsilon(DELTA)


def _dpa_fresh(kind: str) -> Callable[[], dp_accounting.PrivacyAccountant]:
    return DpaRDP if kind == "rdp" else DpaPLD  # dp_accounting's defaults (PLD grid 1e-4)


def _dpa_epsilon(kind: str, t: int) -> float:
    event = dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(Z))
    return _dpa_fresh(kind)().compose(event, t).get_epsilon(DELTA)


def _dpa_calibrate(kind: str, t: int, tol: float) -> float:
    def make_event(z: float) -> dp_accounting.DpEvent:
        event = dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(z))
        return dp_accounting.SelfComposedDpEvent(event, t)

    return dp_accounting.calibrate_dp_mechanism(
        _dpa_fresh(kind), make_event, TARGET, DELTA, tol=tol
    )


def timing_table() -> list[str]:
    lines = [
        "| accountant | T | ε at z=0.8 (dpfl / dp_acc.) | dpfl ε (s) | dp_accounting ε (s) | ratio | "
        "calibrated z (dpfl / dp_acc.) | dpfl calibrate (s) | dp_accounting calibrate (s) | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("rdp", "pld"):
        for t in ROUNDS if kind == "rdp" else PLD_ROUNDS:
            reps = REPEATS if kind == "rdp" else 1
            t_eps, eps = _median_time(lambda: _dpfl_epsilon(kind, t), reps)  # noqa: B023
            t_dpa_eps, dpa_eps = _median_time(lambda: _dpa_epsilon(kind, t), reps)  # noqa: B023
            if kind == "rdp":
                assert abs(float(eps) - float(dpa_eps)) <= 1e-9 * max(1.0, float(eps))  # type: ignore[arg-type]
            t_cal, z = _median_time(
                lambda: calibrate_noise_multiplier(TARGET, DELTA, Q, t, accountant=kind, rtol=RTOL),  # noqa: B023
                reps,
            )
            if kind == "rdp":
                tol = RTOL * float(z)  # type: ignore[arg-type]
                t_dpa_cal, z_dpa = _median_time(lambda: _dpa_calibrate(kind, t, tol), reps)  # noqa: B023
                dpa_cal = f"{z_dpa:.4f} | {t_cal:.3f} | {t_dpa_cal:.3f} | {t_cal / t_dpa_cal:.2f}"
            else:  # ~10 evaluations of several seconds each at dp_accounting's default grid
                dpa_cal = f"not run | {t_cal:.3f} | not run | —"
            lines.append(
                f"| {kind} | {t} | {eps:.4f} / {dpa_eps:.4f} | {t_eps:.3f} | {t_dpa_eps:.3f} | "
                f"{t_eps / t_dpa_eps:.3f} | {z:.4f} / {dpa_cal} |"
            )
            print(lines[-1], flush=True)
    return lines


PAPER_ROWS = [  # sigma_dp, S, K, T, reported ε (RDP, δ = 1e-9), arXiv 2310.00098 section 2.4
    (3e-6, 204_800, 69.5e6, 2034, 7.2),
    (1e-5, 204_800, 6.95e6, 2006, 4.5),
    (3e-6, 204_800, 695e6, 3390, 3.7),
]


ISSUE_ROW = (1.97, 5.25e-4, 2525, 2.5e-10)  # issue 9 item 7: grid 1e-3 gave +60%


def _pld_timed(z: float, q: float, t: int, delta: float, interval: float | None) -> tuple:
    start = time.perf_counter()
    if interval == -1.0:  # dp_accounting's PLDAccountant with its defaults, called directly
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
        eps, grid = DpaPLD().compose(event, t).get_epsilon(delta), 1e-4
    else:
        acc = PLDAccountant(value_discretization_interval=interval)
        acc.add_rounds(PoissonRound(z, q), t)
        eps, grid = acc.epsilon(delta), acc.discretization_interval(delta)
    return float(eps), time.perf_counter() - start, grid


def paper_table() -> list[str]:
    lines = [
        "| σ_DP | S | K | T | z | q | ε reported (RDP) | dpfl RDP ε | PLD ε, grid 1e-3 "
        "(old default) | s | PLD ε now (auto grid) | grid | s | dp_accounting default "
        "(grid 1e-4) | s | time now / dp_acc. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(sigma * s, s / k, t, 1e-9, (sigma, s, k, rep)) for sigma, s, k, t, rep in PAPER_ROWS]
    rows.append((*ISSUE_ROW, None))
    for z, q, t, delta, paper in rows:
        rdp = RDPAccountant()
        rdp.add_rounds(PoissonRound(z, q), t)
        old, t_old, _ = _pld_timed(z, q, t, delta, 1e-3)
        new, t_new, grid = _pld_timed(z, q, t, delta, None)
        ref, t_ref, _ = _pld_timed(z, q, t, delta, -1.0)
        sigma, s, k, reported = paper if paper else ("issue", "", "", "")
        head = f"| {sigma:g} | {s:,} | {k:,.0f} |" if paper else f"| issue 9 (δ = {delta:g}) | | |"
        lines.append(
            f"{head} {t:,} | {z:.4f} | {q:.6f} | {reported} | {rdp.epsilon(delta):.3f} | "
            f"{old:.4f} | {t_old:.2f} | {new:.4f} | {grid:.3g} | {t_new:.2f} | {ref:.4f} | "
            f"{t_ref:.2f} | {t_new / t_ref:.3f} |"
        )
        print(lines[-1], flush=True)
    return lines


def rounds_table(checkpoints: tuple[int, ...] = (10, 100, 1000)) -> list[str]:
    """Per-round accountant cost inside a round loop (what run_rounds does each round).

    Each round: ``would_exceed(spec)``, ``add_rounds(spec)`` under a budget, ``epsilon(δ)``.
    "now" runs the loop to the last checkpoint and times the rounds at each checkpoint (median of
    3 rounds); memory is the accountant's traced allocation (tracemalloc, after gc). "before" is
    what the previous accountant did at round n: recompose the whole ledger from scratch with
    dp_accounting at grid 1e-3, twice (budget check, then ε); timed once per checkpoint.
    """
    spec, delta = PoissonRound(1.0, 0.5), 1e-6
    acc = PLDAccountant(budget=PrivacyBudget(epsilon=1e9, delta=delta))
    lines = [
        "| round n | now: s per round | now: accountant memory (MiB) | before: s per round |",
        "|---|---|---|---|",
    ]
    tracemalloc.start()
    done = 0
    try:
        for n in checkpoints:
            while done < n - 2:
                acc.would_exceed(spec)
                acc.add_rounds(spec)
                acc.epsilon(delta)
                done += 1
            times = []
            for _ in range(3):
                start = time.perf_counter()
                acc.would_exceed(spec)
                acc.add_rounds(spec)
                acc.epsilon(delta)
                times.append(time.perf_counter() - start)
                done += 1
            gc.collect()
            memory = tracemalloc.get_traced_memory()[0] / 2**20
            before = "—"
            if n <= 300:
                start = time.perf_counter()
                for _ in range(2):
                    event = dp_accounting.PoissonSampledDpEvent(
                        0.5, dp_accounting.GaussianDpEvent(1.0)
                    )
                    DpaPLD(value_discretization_interval=1e-3).compose(event, n).get_epsilon(delta)
                before = f"{time.perf_counter() - start:.3f}"
            lines.append(f"| {n:,} | {statistics.median(times):.4f} | {memory:.1f} | {before} |")
            print(lines[-1], flush=True)
    finally:
        tracemalloc.stop()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=("all", "rounds", "paper"), default="all")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    if args.section == "rounds":
        rounds_table()
        return
    if args.section == "paper":
        paper_table()
        return
    header = [
        "# dpfl.accounting benchmark",
        "",
        f"Generated by `python benchmarks/accounting.py` on {platform.machine()} "
        f"({platform.python_version()}, dp_accounting {_dpa_version()}); shared 2-core machine, "
        "so compare the ratios within a row, not absolute seconds.",
        "",
        f"## Cost of ε and of calibration (q = {Q}, δ = {DELTA:g}, target ε = {TARGET}, "
        f"rtol = {RTOL})",
        "",
        "dpfl ε: construct the accountant, `add_rounds(round, T)`, `epsilon(δ)` (PLD: automatic "
        "grid); dp_accounting ε: `compose(event, T).get_epsilon(δ)` with its defaults (PLD grid "
        "1e-4). Calibration: `calibrate_noise_multiplier` vs "
        "`dp_accounting.calibrate_dp_mechanism` with `tol` = rtol × z (the same tolerance). "
        f"RDP: medians of {REPEATS} runs; PLD: 1 run (dp_accounting's PLD calibration at its "
        "default grid was not run: ~10 evaluations of several seconds each).",
        "",
    ]
    timings = timing_table()
    paper = [
        "",
        "## PLD precision: the paper's extrapolation rows (δ = 1e-9) and issue 9's case",
        "",
        "RDP reproduces the reported ε to ±0.1. Grid 1e-3: the old fixed default (timed with",
        "today's code, which builds dp_accounting's PLD objects with array operations). PLD",
        "now: the automatic grid (starts at 4× the per-round privacy-loss scale, halves until ε",
        "moves ≤ 1%, reports the smallest; every grid is an upper bound). dp_accounting default:",
        "`dp_accounting.pld.PLDAccountant()` called directly (grid 1e-4). Times include building",
        "the accountant; the last column is the time ratio now / dp_accounting default.",
        "",
        *paper_table(),
    ]
    loop = [
        "",
        "## PLD accounting inside a round loop (q = 0.5, z = 1.0, δ = 1e-6)",
        "",
        (rounds_table.__doc__ or "").split("\n\n")[1].replace("\n    ", " ").strip(),
        "",
        *rounds_table(),
    ]
    header[2] += (
        f" Load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end."
    )
    text = "\n".join([*header, *timings, *paper, *loop, ""])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print()
    print(text)


def _dpa_version() -> str:
    from importlib.metadata import version

    return version("dp-accounting")


if __name__ == "__main__":
    main()
