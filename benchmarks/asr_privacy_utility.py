"""Privacy-utility study of DP-FedAvg on the embedded ASR corpus: does the paper reproduce?

Claims under test (Pelikan et al., arXiv 2310.00098; design notes 2.2, 2.3, 2.6):

1. Under DP noise, per-layer clipping (``dim`` allocation) beats global clipping by a wide margin.
2. A layer-wise normalizing server optimizer (LAMB) beats Adam.
3. Both gaps grow with depth.

Also measured (group ``adaptive``): adaptive clipping (Andrew et al., NeurIPS 2021), global and
per layer, started from 10x and 0.1x the tuned C: WER, and the per-round bound trajectory of each
cell (a DP release; ``bound_trajectories.png``).

The study fine-tunes one cached seed model (central LARS training, :mod:`examples.asr.train`) with
DP-FedAvg through dpfl's public API and scores greedy-decoding WER/CER on held-out speakers. Every
configuration is a **cell** (clipping x server optimizer x sigma_DP x depth x seed, ...). A cell is
run once under a fixed, cheap **protocol** (same rounds, cohort, local work and eval set for every
cell) and its result is written to ``<out>/cells/<key>.json``, where ``key`` hashes the cell, the
protocol and :data:`PROTOCOL_VERSION`. Finished cells are skipped, so the study accumulates across
interrupted runs and sessions. Cells run in the order of :func:`plan` (most informative first).

Usage::

    python benchmarks/asr_privacy_utility.py run [--max-cells N] [--time-budget S] [--groups ...]
    python benchmarks/asr_privacy_utility.py norms     # per-layer update norms of real clients
    python benchmarks/asr_privacy_utility.py speed     # vectorized vs sequential cohort training
    python benchmarks/asr_privacy_utility.py report    # markdown + plots from the finished cells
    python benchmarks/asr_privacy_utility.py plan      # list the cells, done or not
    python benchmarks/asr_privacy_utility.py --quick   # 2x2 subset, tiny model (a few minutes)

Set ``OMP_NUM_THREADS=1``: every cell runs on one thread (``torch.set_num_threads(1)``).

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv:2310.00098.
"""

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._asr_study.cells import load_data, run_study  # noqa: E402
from benchmarks._asr_study.grid import FULL, QUICK, RESULTS, load_cells, plan, quick_plan  # noqa: E402
from benchmarks._asr_study.measure import measure_fidelity, measure_norms, measure_speed  # noqa: E402
from benchmarks._asr_study.report import write_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", nargs="?", default="all", choices=["all", "run", "norms", "fidelity", "speed", "report", "plan"])
    p.add_argument("--quick", action="store_true", help="2x2 subset on the tiny model (a few minutes)")
    p.add_argument("--out", type=Path, default=None, help=f"results directory (default {RESULTS})")
    p.add_argument("--max-cells", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; no new cell after it")
    p.add_argument("--groups", nargs="*", default=None, help="only cells of these groups (lr clip optim depth ...)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    protocol = QUICK if args.quick else FULL
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    planner = quick_plan if args.quick else plan
    groups = set(args.groups) if args.groups else None
    if args.command == "plan":
        done = {r["key"]: r for r in load_cells(out)}
        for c in planner(protocol, done):
            print(("done " if c.key(protocol) in done else "todo ") + f"{c.key(protocol)} {','.join(c.groups)}: {c.label()}")
        return 0
    if args.command in ("all", "norms", "fidelity", "speed", "run"):
        data = load_data(protocol)
        if args.command in ("all", "norms"):
            measure_norms(protocol, data, out, rounds=1 if args.quick else 2)
        if args.command in ("all", "fidelity"):
            measure_fidelity(protocol, data, out)
        if args.command in ("all", "speed"):
            print(json.dumps(measure_speed(protocol, data, out, rounds=1)), flush=True)
        if args.command in ("all", "run"):
            run_study(protocol, data, out, planner=planner, max_cells=args.max_cells, time_budget=args.time_budget,
                      groups=groups)
    print(f"report: {write_report(protocol, out)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
