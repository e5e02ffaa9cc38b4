"""Benchmark dpfl's clipping, accumulation and noise primitives on the paper model's update shape.

For one user's update shaped like the paper's 255.8M-parameter ASR transformer (294 tensors), it
times, interleaved and as the median of several repeats:

* the memory-traffic floor: ``torch._foreach_norm`` + ``torch._foreach_add_`` on the same tensors;
* ``GlobalClip.clip_and_accumulate_`` and ``PerLayerClip.clip_and_accumulate_`` (dim allocation,
  every layer clipped: the worst case, one distinct scale per tensor);
* the norm pass alone: the clippers' error-bounded norms (float32 128-element rows combined in
  float64, see ``dpfl._clip_kernels``) beside a float64-accumulated ``torch._foreach_norm``, the
  simplest accurate alternative (the floor's float32 ``_foreach_norm`` under-estimates long
  tensors' norms, so it cannot decide clipping);
* alternatives for the per-layer scaled add (materialised ``_foreach_mul`` + ``_foreach_add_``);
* a straightforward per-tensor Python loop (clone, norm, mul, add);
* the noise release (``GaussianMechanism.add_noise_`` on the sum, standard and secure) beside a
  per-tensor ``randn_like`` loop.

Writes ``benchmarks/results/primitives.md`` and prints the table.
Usage: ``python benchmarks/primitives.py [--scale 0.1] [--repeats 7] [--noise-repeats 3]``.

References: Pelikan et al., arXiv 2310.00098 (model shape, per-layer clipping).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dpfl._clip_kernels import tensor_norms
from dpfl.clip import GlobalClip, PerLayerClip
from dpfl.noise import GaussianMechanism

RESULTS = Path(__file__).parent / "results" / "primitives.md"


def paper_model_layout(scale: float = 1.0) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of the paper model's update (294 tensors, 255,800,862 params).

    Conv front-end (80 -> 1536, kernel 7) + 36 pre-LN blocks (fused in-projection 2304x768,
    out-projection 768x768, MLP 3072x768 and 768x3072, all without bias, two LayerNorms) + final
    LayerNorm + CTC head (30 x 768). ``scale < 1`` shrinks the leading dimension of every matrix
    (same tensor count, about ``scale`` times the parameters).
    """
    d, mlp = 768, 3072

    def s(n: int) -> int:
        return max(1, round(n * scale))

    layout: list[tuple[str, tuple[int, ...]]] = [
        ("frontend.conv.weight", (s(1536), 80, 7)),
        ("frontend.conv.bias", (1536,)),
    ]
    for b in range(36):
        p = f"blocks.{b}."
        layout += [
            (p + "attn.in_proj.weight", (s(3 * d), d)),
            (p + "attn.out_proj.weight", (s(d), d)),
            (p + "mlp.fc1.weight", (s(mlp), d)),
            (p + "mlp.fc2.weight", (s(d), mlp)),
            (p + "norm1.weight", (d,)),
            (p + "norm1.bias", (d,)),
            (p + "norm2.weight", (d,)),
            (p + "norm2.bias", (d,)),
        ]
    layout += [("final_norm.weight", (d,)), ("final_norm.bias", (d,))]
    layout += [("head.weight", (30, d)), ("head.bias", (30,))]
    return layout


def make_update(scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A synthetic update with heterogeneous layer norms (LayerNorm updates larger)."""
    gen = torch.Generator().manual_seed(seed)
    update = {}
    for name, shape in paper_model_layout(scale):
        magnitude = 1e-3 if "norm" in name else 1e-5
        update[name] = torch.randn(shape, generator=gen) * magnitude
    return update


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_times(
    cases: dict[str, Callable[[], object]], repeats: int, *, warmup: bool = True
) -> dict[str, float]:
    """Run every case once per repeat, interleaved; return the median seconds of each."""
    for fn in cases.values() if warmup else ():
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(_timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def clip_cases(update: dict[str, torch.Tensor], bound: float) -> dict[str, Callable[[], object]]:
    names = list(update)
    tensors = list(update.values())
    acc = {k: torch.zeros_like(v) for k, v in update.items()}
    acc_list = [acc[k] for k in names]
    global_clip = GlobalClip(bound)
    layer_clip = PerLayerClip(bound, allocation="dim")
    layer_bounds = layer_clip.layer_bounds(update)

    def floor() -> None:
        torch._foreach_norm(tensors)
        torch._foreach_add_(acc_list, tensors)

    def per_layer_materialised() -> None:
        norms = torch.stack(torch._foreach_norm(tensors)).tolist()
        scales = [
            min(1.0, layer_bounds[k] / n) if n > 0 else 1.0
            for k, n in zip(names, norms, strict=True)
        ]
        torch._foreach_add_(acc_list, torch._foreach_mul(tensors, scales))

    def naive_per_layer() -> None:
        for k, x in update.items():
            c = x.clone()
            n = float(c.norm())
            c.mul_(min(1.0, layer_bounds[k] / n) if n > 0 else 1.0)
            acc[k].add_(c)

    def naive_global() -> None:
        total = sum(float(x.norm()) ** 2 for x in tensors) ** 0.5
        s = min(1.0, bound / total) if total > 0 else 1.0
        for k, x in update.items():
            acc[k].add_(x.clone().mul_(s))

    return {
        "floor: _foreach_norm + _foreach_add_": floor,
        "GlobalClip.clip_and_accumulate_": lambda: global_clip.clip_and_accumulate_(update, acc),
        "PerLayerClip.clip_and_accumulate_ (dim)": lambda: layer_clip.clip_and_accumulate_(
            update, acc
        ),
        "per-layer, _foreach_mul copy + _foreach_add_": per_layer_materialised,
        "naive loop, global (clone, norm, mul, add)": naive_global,
        "naive loop, per-layer (clone, norm, mul, add)": naive_per_layer,
        "norm pass: dpfl error-bounded norms (float32 rows + float64)": lambda: tensor_norms(
            names, tensors
        ),
        "norm pass: _foreach_norm accumulating in float64": lambda: torch._foreach_norm(
            tensors, 2, dtype=torch.float64
        ),
    }


def noise_cases(update: dict[str, torch.Tensor]) -> dict[str, Callable[[], object]]:
    tensors = list(update.values())
    acc = {k: torch.zeros_like(v) for k, v in update.items()}
    acc_list = list(acc.values())
    mech = GaussianMechanism(1.0, 0.01, seed=0)
    secure = GaussianMechanism(1.0, 0.01, secure=True)
    gen = torch.Generator().manual_seed(0)

    def floor() -> None:
        torch._foreach_norm(tensors)
        torch._foreach_add_(acc_list, tensors)

    def naive() -> None:
        for t in acc_list:
            t.add_(torch.randn(t.shape, generator=gen) * 0.01)

    return {
        "floor: _foreach_norm + _foreach_add_": floor,
        "GaussianMechanism.add_noise_": lambda: mech.add_noise_(acc),
        "GaussianMechanism.add_noise_ (secure, 4 draws)": lambda: secure.add_noise_(acc),
        "naive loop (randn * std, add)": naive,
    }


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"{cpu}; {os.cpu_count()} logical cores; torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; Python {platform.python_version()}; "
        f"load average at the end {load}"
    )


def table(title: str, times: dict[str, float]) -> list[str]:
    floor = next(iter(times.values()))
    lines = [
        f"### {title}",
        "",
        "| operation | median time (s) | ratio to floor |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} | {v / floor:.2f}x |" for k, v in times.items()]
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the model size")
    parser.add_argument("--repeats", type=int, default=7, help="repeats of the clipping cases")
    parser.add_argument("--noise-repeats", type=int, default=3, help="repeats of the noise cases")
    parser.add_argument("--bound", type=float, default=0.01, help="clipping bound C")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    update = make_update(args.scale)
    n_params = sum(t.numel() for t in update.values())
    clip_times = _median_times(clip_cases(update, args.bound), args.repeats)
    noise_times = _median_times(noise_cases(update), args.noise_repeats, warmup=False)
    lines = [
        "# dpfl primitives benchmark",
        "",
        f"Update shaped like the paper model (scale {args.scale:g}): {len(update)} tensors, "
        f"{n_params:,} float32 parameters; clipping bound {args.bound:g} (every layer clipped).",
        f"Machine: {machine_info()}.",
        f"Median of {args.repeats} (clipping, after one warm-up) / {args.noise_repeats} (noise) "
        "interleaved repeats; ratios are to the floor measured in the same run.",
        "",
        *table("Per-user clip and accumulate", clip_times),
        *table("Noise release (once per round, on the sum)", noise_times),
    ]
    text = "\n".join(lines)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
