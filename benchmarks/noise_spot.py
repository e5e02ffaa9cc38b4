"""Paper-size spot check of the noise release, spliced into ``benchmarks/results/primitives.md``.

On a float32 sum shaped like the paper model (255,800,862 coordinates, 294 tensors), one warm-up
then ``--repeats`` interleaved repeats (each shown) of: the clipping floor, the release before the
fix (a fresh float32 ``normal_`` buffer per tensor), and ``GaussianMechanism.add_noise_`` plain
(1 and 2 threads) and secure (2 threads). Wall and process CPU time, and minor page faults and
system time per release from ``getrusage``. The secure/plain ratio at 2 threads is computed per
repeat from the same run.

``--profile`` adds where one thread's CPU time goes on one CPU piece (cache-resident, float32
and float64): the keystream, each op of the Box–Muller transform, and the adds, for a plain piece
(32,768 coordinates) and a secure one (8,192 coordinates, the same 16,384 pairs).

Usage: ``python benchmarks/noise_spot.py [--scale 1.0] [--repeats 2] [--profile]`` (run after
``primitives.py``: its sections go after the noise section, which ``--only-noise`` keeps).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from primitives import NOISE_STD, RESULTS, make_update, normal_release_

from dpfl import _sampler as S
from dpfl.noise import GaussianMechanism

K = TypeVar("K")
BEGIN, END = "<!-- spot:begin -->", "<!-- spot:end -->"
PROFILE_BEGIN, PROFILE_END = "<!-- profile:begin -->", "<!-- profile:end -->"


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


def _cpu_us(cases: dict[K, Callable[[], object]], reps: int) -> dict[K, float]:
    """Median thread CPU time of each case in microseconds: one warm-up call each, then
    ``reps`` rounds that call every case once (interleaved, so drifting load hits all alike)."""
    for fn in cases.values():
        fn()
    times: dict[K, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for k, fn in cases.items():
            start = time.thread_time()
            fn()
            times[k].append(time.thread_time() - start)
    return {k: 1e6 * sorted(v)[len(v) // 2] for k, v in times.items()}


def _piece_cases(dtype: torch.dtype, secure: bool) -> dict[str, Callable[[], object]]:
    cpu = torch.device("cpu")
    count = S.PIECE // (S.SECURE_DRAWS if secure else 1)
    pairs = S._pairs(count, secure)
    words = S._words(pairs, dtype)
    scratch = S._Scratch()
    work = scratch.work(pairs, dtype, cpu)
    stream = S._AesStream(bytes(32), 0, 0)
    target = torch.zeros(count, dtype=dtype)
    piece = S._Piece(target, 0, count, pairs, words, 0)
    out: dict[str, Callable[[], object]] = {}
    out["AES keystream"] = lambda: stream.fill(scratch, work, words, cpu)
    stream.fill(scratch, work, words, cpu)
    r, a, angles = work.radius, work.angle, work.angle_words
    ints, fine = work.radius_words, work.fine_words
    work.radial_words.bitwise_and_(S.LOW63)
    unit = S._CONST["2pi/2^32"] if dtype == torch.float32 else S._CONST["2pi/2^64"]
    k, j = ints.to(dtype), fine.to(dtype)
    x = k + j * 2.0**-63
    u = torch.add(S._CONST["2^-126"], x, alpha=2.0**-63)
    log_u, theta = u.log(), angles.to(dtype) * unit
    minus2 = log_u * -2
    radius = minus2.sqrt()
    ops: dict[str, Callable[[], object]] = {
        "clear sign bits (radius + fine words)": lambda: work.radial_words.bitwise_and_(S.LOW63),
        "words to floats (radius)": lambda: r.copy_(ints),
        "words to floats (fine)": lambda: a.copy_(fine),
        "+ 2^-63 fine": lambda: torch.add(k, j, alpha=2.0**-63, out=r),
        "to u1 (2^-126 + 2^-63 x)": lambda: torch.add(S._CONST["2^-126"], x, alpha=2.0**-63, out=r),
        "log": lambda: torch.log(u, out=r),
        "× -2": lambda: torch.mul(log_u, S._CONST["-2"], out=r),
        "sqrt": lambda: torch.sqrt(minus2, out=r),
        "words to floats (angle)": lambda: a.copy_(angles),
        "× 2π/2^w": lambda: torch.mul(theta, unit, out=a),
        "cos": lambda: torch.cos(theta, out=work.cos),
        "sin": lambda: torch.sin(theta, out=work.sin),
        "× radius (both halves)": lambda: work.rows.mul_(radius),
    }
    for name, fn in ops.items():
        out[f"transform: {name}"] = fn
    out["transform (all ops, one call)"] = lambda: S._box_muller(
        ints, fine, angles, work.cos, work.sin, work.rows, r, a
    )
    out["transform + adds"] = lambda: S._noise_piece(piece, work, 1e-3, secure)
    out["whole piece (keystream + transform + adds)"] = lambda: (
        stream.fill(scratch, work, words, cpu),
        S._noise_piece(piece, work, 1e-3, secure),
    )
    return out


def profile_section(reps: int = 200) -> list[str]:
    torch.set_num_threads(1)
    lines = [
        PROFILE_BEGIN,
        "### Where the time goes: one CPU piece, one thread",
        "",
        f"Median thread CPU time (µs) over {reps} calls on a cache-resident piece; a plain piece "
        f"is {S.PIECE:,} coordinates, a secure one {S.PIECE // S.SECURE_DRAWS:,} (both "
        f"{S.PIECE // 2:,} Box–Muller pairs, the same transform). Ops are timed one at a time "
        "on valid inputs; a whole call also pays torch's per-op dispatch once per op. Load "
        f"average {os.getloadavg()[0]:.1f}. Produced by `benchmarks/noise_spot.py --profile`.",
        "",
    ]
    for dtype in (torch.float32, torch.float64):
        cases = {
            (mode, k): fn for mode in (False, True) for k, fn in _piece_cases(dtype, mode).items()
        }
        times = _cpu_us(cases, reps)
        plain = {k: v for (mode, k), v in times.items() if not mode}
        secure = {k: v for (mode, k), v in times.items() if mode}
        for d in (plain, secure):
            d["adds (target; secure: wrap + 2 sums + target)"] = max(
                d.pop("transform + adds") - d["transform (all ops, one call)"], 0.0
            )
            d["whole piece (keystream + transform + adds)"] = d.pop(
                "whole piece (keystream + transform + adds)"
            )
        name = "float32" if dtype == torch.float32 else "float64"
        lines += [
            f"| {name} | plain piece (µs) | secure piece (µs) |",
            "|---|---|---|",
            *(f"| {k} | {plain[k]:.1f} | {secure[k]:.1f} |" for k in plain),
        ]
        whole = "whole piece (keystream + transform + adds)"
        ratio = S.SECURE_DRAWS * secure[whole] / plain[whole]
        lines += [
            "",
            f"{name}: {1e3 * plain[whole] / S.PIECE:.2f} ns per coordinate plain, "
            f"{1e3 * secure[whole] * S.SECURE_DRAWS / S.PIECE:.2f} secure: **{ratio:.2f}x** "
            "(four normals per coordinate instead of one; only the target add is shared).",
            "",
        ]
    return [*lines, PROFILE_END]


def splice(text: str, begin: str, end: str, block: str) -> str:
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the model size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--profile", action="store_true", help="add the per-piece profile")
    args = parser.parse_args()
    block = "\n".join(section(args.scale, args.repeats))
    text = splice(args.output.read_text(), BEGIN, END, block)
    print(block)
    if args.profile:
        block = "\n".join(profile_section())
        text = splice(text, PROFILE_BEGIN, PROFILE_END, block)
        print(block)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
