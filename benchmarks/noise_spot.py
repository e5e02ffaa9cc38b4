"""Paper-size spot check of the noise release, spliced into ``benchmarks/results/primitives.md``.

On a float32 sum shaped like the paper model (255,800,862 coordinates, 294 tensors), one warm-up
then ``--repeats`` interleaved repeats (each shown) of: the clipping floor, the release before the
fix (a fresh float32 ``normal_`` buffer per tensor), and ``GaussianMechanism.add_noise_`` plain
(1 and 2 threads) and secure (2 threads). Wall and process CPU time, and minor page faults and
system time per release from ``getrusage``. The secure/plain ratio at 2 threads is computed per
repeat from the same run.

Usage: ``python benchmarks/noise_spot.py [--scale 1.0] [--repeats 2]`` (run after
``primitives.py``: its section goes after the noise section, which ``--only-noise`` keeps).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
from primitives import NOISE_STD, RESULTS, make_update, normal_release_

from dpfl.noise import GaussianMechanism

BEGIN, END = "<!-- spot:begin -->", "<!-- spot:end -->"


def cases(update: dict[str, torch.Tensor]) -> dict[str, Callable[[], object]]:
    tensors = list(update.values())
    acc = {k: torch.zeros_like(v) for k, v in update.items()}
    acc_list = list(acc.values())
    gen = torch.Generator().manual_seed(0)

    def floor() -> None:
        torch._foreach_norm(tensors)
        torch._foreach_add_(acc_list, tensors)

    out: dict[str, Callable[[], object]] = {
        "clipping floor: _foreach_norm + _foreach_add_": floor,
        "before: float32 normal_ per tensor (max 5.77σ)": lambda: normal_release_(acc, gen),
    }
    for secure, threads in ((False, 1), (False, 2), (True, 2)):
        mech = GaussianMechanism(
            1.0, NOISE_STD, seed=None if secure else 0, secure=secure, num_threads=threads
        )
        label = "secure, 4 draws" if secure else "plain"
        name = f"GaussianMechanism.add_noise_ ({label}, {threads} thread{'s' * (threads > 1)})"
        out[name] = lambda m=mech: m.add_noise_(acc)
    return out


def measure(fn: Callable[[], object]) -> tuple[float, float, int, float]:
    """Wall s, process CPU s, minor faults and system s of one call."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_SELF)
    return wall, cpu, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime


def section(scale: float, repeats: int) -> list[str]:
    update = make_update(scale)
    n = sum(t.numel() for t in update.values())
    runs = cases(update)
    for fn in runs.values():
        fn()
    rows: dict[str, list[tuple[float, float, int, float]]] = {k: [] for k in runs}
    load_start = os.getloadavg()[0]
    for _ in range(repeats):
        for k, fn in runs.items():
            rows[k].append(measure(fn))
    load_end = os.getloadavg()[0]
    lines = [
        BEGIN,
        "### Paper-size spot check (float32 sum)",
        "",
        f"{n:,} coordinates in {len(update)} tensors; one warm-up, then {repeats} interleaved "
        f"repeats (all shown); torch {torch.get_num_threads()} threads; load average "
        f"{load_start:.1f} at the start, {load_end:.1f} at the end (2 cores). Minor page faults "
        "and system time per release from `getrusage`. Produced by `benchmarks/noise_spot.py`.",
        "",
        "| operation | wall (s) | CPU (s) | minor faults | system (s) |",
        "|---|---|---|---|---|",
    ]
    for k, vals in rows.items():
        cols = [", ".join(fmt.format(v[i]) for v in vals) for i, fmt in enumerate(FORMATS)]
        lines.append(f"| {k} | {' | '.join(cols)} |")
    plain = rows["GaussianMechanism.add_noise_ (plain, 2 threads)"]
    secure = rows["GaussianMechanism.add_noise_ (secure, 4 draws, 2 threads)"]
    wall = ", ".join(f"{s[0] / p[0]:.2f}x" for s, p in zip(secure, plain, strict=True))
    cpu = ", ".join(f"{s[1] / p[1]:.2f}x" for s, p in zip(secure, plain, strict=True))
    lines += ["", f"Secure / plain (2 threads), per repeat: wall {wall}; CPU {cpu}.", "", END]
    return lines


FORMATS = ("{:.2f}", "{:.2f}", "{:,}", "{:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the model size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    block = "\n".join(section(args.scale, args.repeats))
    text = args.output.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    args.output.write_text(text)
    print(block)


if __name__ == "__main__":
    main()
