"""Benchmark one server optimizer step on the paper-shaped parameter set.

Compares, side by side in one run (interleaved repeats, median):

* ``LAMB`` on the ``torch._foreach_*`` fast path,
* ``LAMB`` on the per-tensor reference path,
* ``torch.optim.Adam`` (foreach), the unnormalized baseline,
* ``server_step`` with foreach LAMB (validation, ``g = −Δ``, step, grad restore),

and writes a markdown table to ``benchmarks/results/optim.md``. Timings are reported as ratios to
Adam measured in the same run. The three optimizers share one set of moment buffers (the benchmark
times passes over memory, not the trajectory), so a full-scale run needs about 5-6 GB of RAM.

Usage::

    python benchmarks/optim.py            # full paper shape, 255,800,862 parameters
    python benchmarks/optim.py --scale 0.1 --repeats 3

References:
    Pelikan et al., arXiv 2310.00098 (model layout; LAMB server optimizer).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dpfl.optim import LAMB, server_step

RESULTS = Path(__file__).resolve().parent / "results" / "optim.md"


def paper_param_shapes(num_blocks: int = 36) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter layout of the paper's ASR transformer (294 tensors, 255,800,862 params at 36).

    Conv front-end (80 → 1536, kernel 7) weight + bias; per block the fused attention
    in-projection (2304, 768) and out-projection (768, 768) without bias, MLP fc1 (3072, 768) and
    fc2 (768, 3072) without bias, two LayerNorms (weight, bias); final LayerNorm; CTC head (30).
    """
    d, mlp, vocab = 768, 3072, 30
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("frontend.conv.weight", (2 * d, 80, 7)),
        ("frontend.conv.bias", (2 * d,)),
    ]
    for b in range(num_blocks):
        shapes += [
            (f"blocks.{b}.ln1.weight", (d,)),
            (f"blocks.{b}.ln1.bias", (d,)),
            (f"blocks.{b}.attn.in_proj.weight", (3 * d, d)),
            (f"blocks.{b}.attn.out_proj.weight", (d, d)),
            (f"blocks.{b}.ln2.weight", (d,)),
            (f"blocks.{b}.ln2.bias", (d,)),
            (f"blocks.{b}.mlp.fc1.weight", (mlp, d)),
            (f"blocks.{b}.mlp.fc2.weight", (d, mlp)),
        ]
    shapes += [
        ("final_ln.weight", (d,)),
        ("final_ln.bias", (d,)),
        ("ctc_head.weight", (vocab, d)),
        ("ctc_head.bias", (vocab,)),
    ]
    return shapes


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="fraction of the 36 transformer blocks to keep (default 1.0)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per method")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown output path")
    args = parser.parse_args()
    if not 0 < args.scale <= 1:
        parser.error("--scale must lie in (0, 1]")

    num_blocks = max(1, round(36 * args.scale))
    shapes = paper_param_shapes(num_blocks)
    gen = torch.Generator().manual_seed(0)
    named = {n: torch.nn.Parameter(0.02 * torch.randn(s, generator=gen)) for n, s in shapes}
    params = list(named.values())
    grads = [1e-3 * torch.randn(p.shape, generator=gen) for p in params]
    # Timing only: reuse the gradient tensors as the update (sign is irrelevant), no extra copy.
    update = dict(zip(named, grads, strict=True))
    numel = sum(p.numel() for p in params)
    print(f"{len(params)} tensors, {numel:,} parameters, {torch.get_num_threads()} threads")

    lamb_fe = LAMB(params, lr=0.002, foreach=True)
    lamb_ref = LAMB(params, lr=0.002, foreach=False)
    adam = torch.optim.Adam(params, lr=0.002, eps=1e-6, foreach=True)

    def set_grads() -> None:
        for p, g in zip(params, grads, strict=True):
            p.grad = g

    # Warm up once (allocates state), then make all three share the same moment buffers.
    set_grads()
    lamb_fe.step()
    for p in params:
        shared = lamb_fe.state[p]
        lamb_ref.state[p] = {
            "step": 0,
            "exp_avg": shared["exp_avg"],
            "exp_avg_sq": shared["exp_avg_sq"],
        }
        adam.state[p] = {
            "step": torch.tensor(1.0),
            "exp_avg": shared["exp_avg"],
            "exp_avg_sq": shared["exp_avg_sq"],
        }
    for opt in (lamb_ref, adam):
        opt.step()

    def server() -> None:
        for p in params:
            p.grad = None
        server_step(lamb_fe, named, update)

    methods: dict[str, Callable[[], None]] = {
        "torch.optim.Adam (foreach)": adam.step,
        "LAMB foreach": lamb_fe.step,
        "LAMB per-tensor reference": lamb_ref.step,
        "server_step(LAMB foreach)": server,
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():  # interleaved: drift hits every method alike
            if name != "server_step(LAMB foreach)":
                set_grads()
            times[name].append(_timed(fn))
            print(f"  {name}: {times[name][-1]:.3f} s")

    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["torch.optim.Adam (foreach)"]
    base_min = min(times["torch.optim.Adam (foreach)"])
    adam_times = times["torch.optim.Adam (foreach)"]
    # Paired ratio: each method against the Adam step of the same repeat, then the median; this
    # is the most robust figure on a shared machine whose load drifts between repeats.
    paired = {
        k: statistics.median(t / a for t, a in zip(v, adam_times, strict=True))
        for k, v in times.items()
    }
    rows = [
        f"| {k} | {med[k]:.3f} | {min(times[k]):.3f} | {paired[k]:.2f}x | {med[k] / base:.2f}x "
        f"| {min(times[k]) / base_min:.2f}x |"
        for k in methods
    ]
    header = (
        "| method | median s | min s | vs Adam (median of paired ratios) "
        "| vs Adam (ratio of medians) | vs Adam (ratio of mins) |"
    )
    table = "\n".join([header, "|---|---|---|---|---|---|", *rows])
    info = (
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- machine: {_cpu_name()}, {torch.get_num_threads()} torch threads, "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}\n"
        f"- parameter set: {len(params)} tensors, {numel:,} float32 parameters "
        f"({num_blocks} of 36 blocks, --scale {args.scale}); {args.repeats} interleaved repeats\n"
        "- shared-CPU machine: absolute seconds are noisy, compare the ratios\n"
    )
    text = (
        "# Server optimizer step: LAMB (foreach / reference) vs torch.optim.Adam\n\n"
        "Generated by `benchmarks/optim.py`.\n\n" + info + "\n" + table + "\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print()
    print(text)


if __name__ == "__main__":
    main()
