"""Benchmark one server optimizer step on the paper-shaped parameter set.

Compares, side by side in one run (interleaved repeats, medians of per-repeat ratios):

* ``torch.optim.Adam(fused=True)``, the baseline, and ``torch.optim.Adam(foreach=True)``,
* ``LAMB`` on its opt-in fused CPU path (``fused=True``), its ``torch._foreach_*`` path (the
  default) and its per-tensor reference path,
* ``server_step`` with fused and with foreach LAMB (validation, update as gradient, finiteness
  check, step, grad restore), also without the finiteness check as ``run_rounds`` calls it after a
  release that certified its mean, and the procedure ``server_step`` followed before (a separate
  finiteness pass and a ``−Δ`` copy, then a foreach LAMB step),
* the finiteness pass alone (the fused kernel's, and the default torch one of ``dpfl._finite``),
* the release's division by the cohort size, alone and with its finiteness test (the default),

plus the one-off build time of the fused kernel (in a fresh cache directory), and writes
``benchmarks/results/optim.md`` and ``benchmarks/results/optim.png``. The optimizers share one set
of moment buffers (the benchmark times passes over memory, not the trajectory), so a full-scale
run needs about 5-6 GB of RAM.

Usage::

    python benchmarks/optim.py            # full paper shape, 255,800,862 parameters
    python benchmarks/optim.py --scale 0.1 --repeats 3

References:
    Pelikan et al., arXiv 2310.00098 (model layout; LAMB server optimizer).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dpfl._finite import divide_
from dpfl._finite import first_non_finite as torch_first_non_finite
from dpfl.optim import LAMB, _kernel, server_step
from dpfl.optim._lamb_fused import first_non_finite
from dpfl.optim.server import _check_finite

RESULTS = Path(__file__).resolve().parent / "results" / "optim.md"
BASE = "torch Adam (fused)"


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


def _kernel_build_seconds(cache: Path) -> tuple[float, str]:
    """Time building the opt-in fused kernel from scratch in the fresh cache root ``cache``."""
    _kernel.reset()
    start = time.perf_counter()
    try:
        _kernel.load(cache)
    except _kernel.KernelError as err:
        return time.perf_counter() - start, f"unavailable: {err}"
    return time.perf_counter() - start, "built"


def _check_fused(kernel: _kernel.Kernel, tensors: list[torch.Tensor]) -> None:
    """The finiteness pass ``server_step`` runs with fused LAMB before any tensor changes."""
    assert first_non_finite(kernel, tensors) is None


CERTIFIED = "server_step(LAMB fused), release-certified mean (run_rounds)"
CERTIFIED_FE = "server_step(LAMB foreach), release-certified mean (run_rounds default)"
DIV_TORCH = "release division (torch div_)"
DIV_CHECKED = "release division + finiteness check (DPAggregator.release, torch)"


def _check_torch(tensors: list[torch.Tensor]) -> None:
    """The default finiteness pass (``server_step``, ``LAMB.step(check_finite=True)``)."""
    assert torch_first_non_finite(tensors) is None


def _divide_checked(tensors: list[torch.Tensor]) -> None:
    """``DPAggregator.release``'s division by the cohort size and its finiteness test of the
    quotients (divisor 1 here, so repeated calls keep the values)."""
    if not divide_(tensors, 1.0):
        raise AssertionError("benchmark update is not finite")


def _plot(path: Path, paired: dict[str, float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(paired)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    bars = ax.barh(names[::-1], [paired[n] for n in names[::-1]], color="tab:blue")
    for bar, name in zip(bars, names[::-1], strict=True):
        if name.startswith("LAMB fused") or name.startswith("server_step(LAMB fused"):
            bar.set_color("tab:orange")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.axvline(1.5, color="tab:red", linewidth=0.8, linestyle="--", label="1.5x target")
    ax.set_xlabel("time relative to torch Adam (fused), median of paired ratios")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    parser.add_argument(
        "--fused-only",
        action="store_true",
        help="time only torch Adam (fused), LAMB fused, server_step(LAMB fused) and the "
        "finiteness pass (about 1.5 s a repeat instead of 12: many repeats fit a short window)",
    )
    args = parser.parse_args()
    if not 0 < args.scale <= 1:
        parser.error("--scale must lie in (0, 1]")

    cache = Path(tempfile.mkdtemp(prefix="dpfl-bench-kernel-"))  # never the user's cache
    try:
        build_s, build_status = _kernel_build_seconds(cache)
        _run(args, build_s, build_status, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _run(args: argparse.Namespace, build_s: float, build_status: str, cache: Path) -> None:
    num_blocks = max(1, round(36 * args.scale))
    shapes = paper_param_shapes(num_blocks)
    gen = torch.Generator().manual_seed(0)
    named = {n: torch.nn.Parameter(0.02 * torch.randn(s, generator=gen)) for n, s in shapes}
    params = list(named.values())
    grads = [1e-3 * torch.randn(p.shape, generator=gen) for p in params]
    # Timing only: the gradient tensors double as the update (sign is irrelevant), no extra copy.
    update = dict(zip(named, grads, strict=True))
    numel = sum(p.numel() for p in params)
    print(f"{len(params)} tensors, {numel:,} parameters, {torch.get_num_threads()} threads")
    print(f"fused kernel build: {build_s:.2f} s ({build_status})")

    fused_ok = build_status == "built"
    lamb_fused = LAMB(params, lr=0.002, fused=True, cache_dir=cache) if fused_ok else None
    lamb_fe = LAMB(params, lr=0.002, foreach=True, fused=False)
    lamb_ref = LAMB(params, lr=0.002, foreach=False, fused=False)
    adam_fused = torch.optim.Adam(params, lr=0.002, eps=1e-6, fused=True)
    adam_fe = torch.optim.Adam(params, lr=0.002, eps=1e-6, foreach=True)

    def set_grads() -> None:
        for p, g in zip(params, grads, strict=True):
            p.grad = g

    # Warm up once (allocates state), then make all optimizers share the same moment buffers.
    set_grads()
    lamb_fe.step()
    for p in params:
        shared = lamb_fe.state[p]
        moments = {"exp_avg": shared["exp_avg"], "exp_avg_sq": shared["exp_avg_sq"]}
        for opt in (lamb_fused, lamb_ref):
            if opt is not None:
                opt.state[p] = {"step": 1, **moments}
        for opt in (adam_fused, adam_fe):
            opt.state[p] = {"step": torch.tensor(1.0), **moments}

    def server(opt: LAMB) -> Callable[[], None]:
        def run() -> None:
            for p in params:
                p.grad = None
            server_step(opt, named, update)

        return run

    def server_certified(opt: LAMB) -> Callable[[], None]:
        def run() -> None:
            for p in params:
                p.grad = None
            server_step(opt, named, update, check_finite=False)

        return run

    quotients = [g.clone() for g in grads]  # the release's division pass, on its own buffers

    def divide_torch() -> None:
        for q in quotients:
            q.div_(1.0)

    def server_as_before() -> None:
        """What server_step did before: a finiteness pass, a −Δ copy, then the step."""
        _check_finite(update, list(named))
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.grad = torch.neg(g)
        lamb_fe.step()
        for p in params:
            p.grad = None

    methods: dict[str, Callable[[], None]] = {
        BASE: adam_fused.step,
        "torch Adam (foreach)": adam_fe.step,
    }
    if lamb_fused is not None:
        methods["LAMB fused"] = lamb_fused.step
    methods["LAMB foreach"] = lamb_fe.step
    methods["LAMB per-tensor reference"] = lamb_ref.step
    if lamb_fused is not None:
        methods["server_step(LAMB fused)"] = server(lamb_fused)
        methods[CERTIFIED] = server_certified(lamb_fused)
    methods["server_step(LAMB foreach)"] = server(lamb_fe)
    methods[CERTIFIED_FE] = server_certified(lamb_fe)
    methods["server_step as before (copy + check), LAMB foreach"] = server_as_before
    if fused_ok:
        kernel = _kernel.load(cache)
        methods["finiteness check alone (fused kernel)"] = lambda: _check_fused(kernel, grads)
    methods["finiteness check alone (torch, dpfl._finite)"] = lambda: _check_torch(grads)
    methods[DIV_TORCH] = divide_torch
    methods[DIV_CHECKED] = lambda: _divide_checked(quotients)
    if args.fused_only:
        keep = (BASE, "LAMB fused", "server_step(LAMB fused)", "finiteness check alone", "release division")
        methods = {k: f for k, f in methods.items() if k.startswith(keep)}
    for fn in methods.values():  # warm-up round, not timed
        set_grads()
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():  # interleaved: drift hits every method alike
            set_grads()
            times[name].append(_timed(fn))
            print(f"  {name}: {times[name][-1]:.3f} s")

    med = {k: statistics.median(v) for k, v in times.items()}

    def ratios(num: str, den: str) -> list[float]:
        return [a / b for a, b in zip(times[num], times[den], strict=True)]

    def paired(num: str, den: str) -> float:
        # Each method against the other's time in the same repeat, then the median: the most
        # robust figure on a shared machine whose load drifts between repeats.
        return statistics.median(ratios(num, den))

    def spread(num: str, den: str) -> str:
        r = ratios(num, den)
        return f"{min(r):.2f}-{max(r):.2f}"

    vs_base = {k: paired(k, BASE) for k in methods}
    fe = "torch Adam (foreach)"
    rows = [
        f"| {k} | {med[k]:.3f} | {min(times[k]):.3f} | {vs_base[k]:.2f}x | {spread(k, BASE)} "
        f"| {f'{paired(k, fe):.2f}x' if fe in methods else '-'} |"
        for k in methods
    ]
    header = (
        "| method | median s | min s | vs torch Adam (fused) | per-repeat range "
        "| vs torch Adam (foreach) |"
    )
    table = "\n".join([header, "|---|---|---|---|---|---|", *rows])
    overhead = [
        ("server_step(LAMB fused)", "LAMB fused"),
        (CERTIFIED, "LAMB fused"),
        ("server_step(LAMB foreach)", "LAMB foreach"),
        (CERTIFIED_FE, "LAMB foreach"),
        (DIV_CHECKED, DIV_TORCH),
        ("server_step as before (copy + check), LAMB foreach", "LAMB foreach"),
    ]
    over_rows = "\n".join(
        f"| {a} | {b} | {paired(a, b):.2f}x | {spread(a, b)} |"
        for a, b in overhead
        if a in methods and b in methods
    )
    over_table = (
        "| server step | optimizer step alone | ratio | per-repeat range |\n|---|---|---|---|\n"
        + over_rows
    )
    info = (
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- machine: {_cpu_name()}, {torch.get_num_threads()} torch threads, "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}; load average before the run "
        f"{os.getloadavg()[0]:.1f}\n"
        f"- parameter set: {len(params)} tensors, {numel:,} float32 parameters "
        f"({num_blocks} of 36 blocks, --scale {args.scale}); {args.repeats} interleaved repeats "
        f"after one warm-up round{' (--fused-only)' if args.fused_only else ''}\n"
        f"- fused kernel build (once per machine, cached): {build_s:.2f} s ({build_status})\n"
        "- ratios are medians of per-repeat ratios; shared-CPU machine: absolute seconds are "
        "noisy, compare the ratios\n"
    )
    text = (
        "# Server optimizer step: LAMB (fused / foreach / reference) vs torch.optim.Adam\n\n"
        "Generated by `benchmarks/optim.py`.\n\n" + info + "\n" + table + "\n\n"
        "## server_step overhead over the optimizer step alone\n\n" + over_table + "\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    _plot(
        args.out.with_suffix(".png"),
        vs_base,
        f"{numel / 1e6:.1f}M params in {len(params)} tensors, {torch.get_num_threads()} threads",
    )
    print()
    print(text)


if __name__ == "__main__":
    main()
