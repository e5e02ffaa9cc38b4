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
* the noise release (``GaussianMechanism.add_noise_`` on a float32 and a float64 sum, plain and
  secure, 1 and 2 threads) beside the release before the fix (a fresh CPU ``normal_`` buffer per
  tensor, whose float32 draws stop at 5.77σ), and a figure of the sampler's attainable tail
  (``results/noise_tail.png``).

Writes ``benchmarks/results/primitives.md`` and prints the table.
Usage: ``python benchmarks/primitives.py [--scale 0.1] [--repeats 7] [--noise-repeats 3]
[--only-noise | --only-clip]`` (``--only-noise`` reruns just the noise section of the results
file, ``--only-clip`` just the clipping table).

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


# ------------------------------------------------------------------------------------ noise
NOISE_STD = 0.01
NOISE_BEGIN, NOISE_END = "<!-- noise:begin -->", "<!-- noise:end -->"
TAIL_FIGURE = RESULTS.with_name("noise_tail.png")


def normal_release_(acc: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """The release before the fix: per tensor a fresh CPU ``normal_`` buffer (float32 unless the
    sum is float64; Box–Muller on 24-bit uniforms, so never beyond 5.77σ), moved and added."""
    for t in acc.values():
        dtype = t.dtype if t.dtype == torch.float64 else torch.float32
        noise = torch.empty(t.shape, dtype=dtype).normal_(0.0, NOISE_STD, generator=gen)
        t.add_(noise.to(t.device))


def noise_cases(
    update: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, Callable[[], object]]:
    """Noise releases on a sum of ``dtype`` shaped like ``update``, beside the before-fix one."""
    tensors = list(update.values())
    acc = {k: torch.zeros_like(v, dtype=dtype) for k, v in update.items()}
    gen = torch.Generator().manual_seed(0)
    name = "float32" if dtype == torch.float32 else "float64"
    cases: dict[str, Callable[[], object]] = {}
    if dtype == torch.float32:
        acc_list = list(acc.values())

        def floor() -> None:
            torch._foreach_norm(tensors)
            torch._foreach_add_(acc_list, tensors)

        cases["clipping floor: _foreach_norm + _foreach_add_"] = floor
    cases[f"before: {name} normal_ per tensor (max 5.77σ)"] = lambda: normal_release_(acc, gen)
    for secure in (False, True):
        for threads in (1, 2):
            seed = None if secure else 0
            mech = GaussianMechanism(1.0, NOISE_STD, seed=seed, secure=secure, num_threads=threads)
            label = "secure, 4 draws" if secure else "plain"
            cases[
                f"GaussianMechanism.add_noise_ ({label}, {threads} thread{'s' * (threads > 1)})"
            ] = lambda m=mech: m.add_noise_(acc)
    return cases


def _noise_times(
    cases: dict[str, Callable[[], object]], repeats: int
) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds per case, interleaved, after one warm-up each."""
    for fn in cases.values():
        fn()
    walls: dict[str, list[float]] = {k: [] for k in cases}
    cpus: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            walls[k].append(time.perf_counter() - wall)
            cpus[k].append(time.process_time() - cpu)
    return {k: (statistics.median(walls[k]), statistics.median(cpus[k])) for k in cases}


def noise_table(title: str, times: dict[str, tuple[float, float]]) -> list[str]:
    base_key = next(k for k in times if k.startswith("before"))
    base_wall, base_cpu = times[base_key]
    lines = [
        f"### {title}",
        "",
        "| operation | wall (s) | wall / before | CPU (s) | CPU / before |",
        "|---|---|---|---|---|",
    ]
    for k, (wall, cpu) in times.items():
        lines.append(
            f"| {k} | {wall:.3f} | {wall / base_wall:.2f}x | {cpu:.3f} | {cpu / base_cpu:.2f}x |"
        )
    return [*lines, ""]


def tail_figure(path: Path) -> str:
    """Plot the largest attainable |draw|/σ against -log2(u1): dpfl's transform (fed the radius
    and fine words that give each u1) and Box–Muller on 24-bit uniforms (torch's float32
    ``normal_``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpfl._sampler import MAX_ABS_NORMAL, box_muller_

    k = torch.linspace(0.0, 126.0, 1009, dtype=torch.float64)
    # u1 = 2^-126 (2^63 k1 + j + 1): the radius word k1 = floor(u1 · 2^63), the fine word j the
    # rest (exact in float64 for every k here, as only one of them is nonzero below 2^-63).
    target = 2.0 ** (126.0 - k) - 1.0
    k1 = torch.floor(target / 2.0**63)
    j = torch.clamp(target - k1 * 2.0**63, 0, 2.0**63 - 2**10)
    radius_words = torch.clamp(k1, 0, 2.0**63 - 2**10).to(torch.int64)
    fine_words = torch.round(j).to(torch.int64)
    radius_words = torch.cat([radius_words, radius_words[:3]])  # a multiple of 4 pairs
    fine_words = torch.cat([fine_words, fine_words[:3]])
    p = radius_words.numel()
    radius = {}
    for dtype, angle_dtype in ((torch.float32, torch.int32), (torch.float64, torch.int64)):
        out = torch.empty(2 * p, dtype=dtype)
        box_muller_(
            radius_words.clone(),
            fine_words.clone(),
            torch.zeros(p, dtype=angle_dtype),
            out,
            torch.empty(p, dtype=dtype),
            torch.empty(p, dtype=dtype),
        )
        radius[dtype] = out[: k.numel()].double()
    u24 = torch.clamp(2.0**-k, min=2.0**-24)
    old = torch.sqrt(-2 * torch.log(u24))
    old_max = float(old.max())
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(k, radius[torch.float32], label="dpfl transform, float32 math (2 × 64-bit words)")
    ax.plot(k, radius[torch.float64], "--", label="dpfl transform, float64 math")
    ax.plot(k, old, label="Box–Muller on 24-bit uniforms (torch float32 normal_)")
    ax.axhline(old_max, color="gray", lw=0.8, ls=":")
    ax.axhline(MAX_ABS_NORMAL, color="gray", lw=0.8, ls=":")
    ax.axhline(8.0, color="red", lw=0.8, ls="--", label="8σ (required)")
    ax.text(1, old_max + 0.15, f"{old_max:.4f}σ: P(|Z| beyond) = 8e-9", fontsize=8)
    ax.text(1, MAX_ABS_NORMAL + 0.15, f"{MAX_ABS_NORMAL:.4f}σ: P(r beyond) = 2^-126", fontsize=8)
    ax.set_xlabel("-log2(u1)  (u1: the radius uniform)")
    ax.set_ylabel("radius r = sqrt(-2 ln u1) = largest |draw| / σ")
    ax.set_ylim(0, 14.5)
    ax.set_title("Attainable noise magnitude: dpfl sampler vs float32 normal_")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return (
        f"![tail check]({path.name}) — the transform evaluated on the radius and fine words of each u1: "
        f"largest attainable |draw| {float(radius[torch.float32].max()):.4f}σ (float32 math), "
        f"{float(radius[torch.float64].max()):.4f}σ (float64), against {old_max:.4f}σ for "
        "Box–Muller on 24-bit uniforms."
    )


def noise_section(update: dict[str, torch.Tensor], repeats: int, figure: Path) -> list[str]:
    n_params = sum(t.numel() for t in update.values())
    f32 = _noise_times(noise_cases(update, torch.float32), repeats)
    f64 = _noise_times(noise_cases(update, torch.float64), repeats)
    return [
        NOISE_BEGIN,
        "## Noise release (once per round, on the sum)",
        "",
        f"{n_params:,} coordinates in {len(update)} tensors ({n_params / 255_800_862:.2g} of the "
        f"paper model), std {NOISE_STD:g}; median of "
        f"{repeats} interleaved repeats after one warm-up. Wall and process CPU time (all "
        "threads); ratios to the before-fix release measured in the same run. The machine is "
        "shared: where the load average exceeds the core count, CPU time is the steadier "
        "measure of work and wall time shows what two threads obtained.",
        "",
        *noise_table("Float32 sum", f32),
        *noise_table("Float64 sum", f64),
        tail_figure(figure),
        "",
        NOISE_END,
    ]


def splice_noise_section(text: str, section: list[str]) -> str:
    """Replace the noise section of an existing results file (or append it)."""
    block = "\n".join(section)
    if NOISE_BEGIN in text and NOISE_END in text:
        head, rest = text.split(NOISE_BEGIN, 1)
        return head + block + rest.split(NOISE_END, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


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
    parser.add_argument(
        "--only-noise", action="store_true", help="rerun only the noise section of --output"
    )
    parser.add_argument("--only-clip", action="store_true", help="keep --output's noise section")
    args = parser.parse_args()

    if args.only_noise:
        update = make_update(args.scale)
        section = noise_section(update, args.noise_repeats, args.output.with_name(TAIL_FIGURE.name))
        old = args.output.read_text() if args.output.exists() else "# dpfl primitives benchmark\n"
        text = splice_noise_section(
            old, [*section[:3], f"Machine: {machine_info()}.", *section[3:]]
        )
        args.output.write_text(text)
        print(text)
        return

    update = make_update(args.scale)
    n_params = sum(t.numel() for t in update.values())
    clip_times = _median_times(clip_cases(update, args.bound), args.repeats)
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
    ]
    old = args.output.read_text() if args.only_clip else ""
    if NOISE_BEGIN in old:  # the noise section and what follows it (the paper-size spot check)
        lines.append(NOISE_BEGIN + old.split(NOISE_BEGIN, 1)[1].rstrip("\n"))
    else:
        lines += noise_section(update, args.noise_repeats, args.output.with_name(TAIL_FIGURE.name))
    text = "\n".join(lines)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
