"""Privacy-utility study of DP-FedAvg on the embedded ASR corpus, protocol v2: does the paper reproduce?

Claims under test (Pelikan et al., arXiv 2310.00098; design notes 2.2, 2.3, 2.6):

1. Under DP noise, per-layer clipping beats global clipping.
2. A layer-wise normalizing server optimizer (LAMB) beats Adam.
3. The per-layer advantage grows with depth (4 -> 16 blocks).

The pre-registered analysis plan is ``benchmarks/results/asr_privacy_utility/v2/PLAN.md``: CTC
transformers of width 96 with 4 and 16 blocks, each fine-tuned from its own seed model (the
shipped ``examples/asr/checkpoints/seed-study-{4,16}.pt`` when present, else trained once and
cached); Poisson cohorts of S = 20 of 400 users, 12 rounds, C = 0.01, z = σ_DP·S; arms clipping
{global, per-layer dim, per-layer normalize} x server optimizer {LAMB, Adam}; noise 0, the
paper-equivalent σ_pe (σ_pe·√D = 0.048) and σ* from a pilot (about 5 CER points of noise cost).
Eval CER on all 400 eval utterances is the primary metric; paired differences over seeds,
95%/90% t intervals, an equivalence margin and a mechanical verdict rule decide each claim.

Every configuration is a **cell**, run once; its record (``<out>/cells/<key>.json``) holds the
protocol version, the git commit, a hash of the code that determines it, and the machine. Cells
run in the plan's order (pilot, LR sweeps, main cells seed-major, secondary, 16 blocks, later
questions); finished cells are skipped, so the study resumes and accumulates across sessions, and
several runners share one plan (each cell is claimed with an exclusive file).

Usage::

    python benchmarks/asr_privacy_utility.py run [--groups G ...] [--depths L ...] [--max-cells N] [--time-budget S]
    python benchmarks/asr_privacy_utility.py plan      # list the known cells, done or not
    python benchmarks/asr_privacy_utility.py norms     # per-layer update norms at every depth and 36 blocks
    python benchmarks/asr_privacy_utility.py fidelity  # clipping fidelity at the same depths
    python benchmarks/asr_privacy_utility.py report    # README.md, claims.json and plots from the cells
    python benchmarks/asr_privacy_utility.py --quick   # the whole pipeline on a tiny model (about a minute)

Groups: pilot, sweep, main, secondary, cohort, local, adaptive. Set ``OMP_NUM_THREADS=1``: every
cell runs on one thread.

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv:2310.00098.
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._asr_study.cells import fix_sigma_star, load_data, run_study  # noqa: E402
from benchmarks._asr_study.grid import FULL, QUICK, QUICK_RESULTS, RESULTS, load_cells, plan  # noqa: E402
from benchmarks._asr_study.measure import measure_fidelity, measure_norms, measure_speed  # noqa: E402
from benchmarks._asr_study.report import write_report  # noqa: E402
from benchmarks._asr_study.seeds import failing_depths, resolve_study  # noqa: E402

COMMANDS = ("all", "run", "norms", "fidelity", "speed", "report", "plan")
GROUPS = ("pilot", "sweep", "main", "secondary", "cohort", "local", "adaptive")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("commands", nargs="*", default=["all"], metavar="command",
                   help=f"one or more of {', '.join(COMMANDS)} (default: all = run, norms, fidelity, report)")
    p.add_argument("--quick", action="store_true", help="tiny model, quick corpus, a handful of cells")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results directory (default {RESULTS}; with --quick {QUICK_RESULTS})")
    p.add_argument("--max-cells", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; no new cell after it")
    p.add_argument("--groups", nargs="+", choices=GROUPS, default=None, help="only cells of these groups")
    p.add_argument("--depths", nargs="+", type=int, default=None, help="only cells of these depths")
    args = p.parse_args(argv)
    bad = [c for c in args.commands if c not in COMMANDS]
    if bad:
        p.error(f"unknown command(s) {bad}; choose from {', '.join(COMMANDS)}")
    commands = set(args.commands)
    if "all" in commands:
        commands |= {"run", "norms", "fidelity", "report"}
    torch.set_num_threads(1)
    protocol = QUICK if args.quick else FULL
    out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    study = resolve_study(protocol)
    if "plan" in commands:
        done = {r["key"]: r for r in load_cells(out)}
        sigma_star = fix_sigma_star(study, done, out)
        for c in plan(study, done, sigma_star, failing_depths(study, out)):
            k = study.key(c)
            print(("done " if k in done else "todo ") + f"{k} {','.join(c.groups)}: {c.label()}")
        print(f"σ* = {sigma_star if sigma_star is not None else 'not chosen yet (pilot unfinished)'}; "
              "cells that depend on unfinished ones are not listed yet", flush=True)
    if commands & {"run", "norms", "fidelity", "speed"}:
        data = load_data(protocol)
        print(f"data: {data.source}; {len(data.users)} FL users, {data.num_eval} eval utterances", flush=True)
        if "run" in commands:
            run_study(study, data, out, max_cells=args.max_cells, time_budget=args.time_budget,
                      groups=args.groups, depths=args.depths)
        if "norms" in commands:
            measure_norms(study, data, out)
        if "fidelity" in commands:
            measure_fidelity(study, data, out)
        if "speed" in commands:
            print(measure_speed(study, data, out), flush=True)
    if "report" in commands or "run" in commands:
        print(f"report: {write_report(study, out)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
