"""The v2 figures (matplotlib, PNG): CER/WER vs σ_DP per depth, gap vs depth, per-layer norms."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks._asr_study.claims import Cells, DepthStatus, pair, values
from benchmarks._asr_study.grid import CLIP_LABEL, OPT_LABEL, Study
from benchmarks._asr_study.stats import mean_ci, paired

COLORS = {"global": "tab:red", "dim": "tab:blue", "normalize": "tab:green"}
STYLES = {"lamb": "-", "adam": "--"}
TYPE_COLORS = {"LayerNorm": "tab:red", "attention": "tab:blue", "MLP": "tab:green", "conv": "tab:purple",
               "head": "tab:orange", "other": "gray"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _point(got: Mapping[int, Any], name: str) -> tuple[float, float, float] | None:
    """Mean and 95% CI half-widths (below, above) of a metric over seeds (0 with one seed)."""
    if not got:
        return None
    v = values(got, name)
    ci = mean_ci(v)
    if ci is None:
        return v[0], 0.0, 0.0
    return ci[0], ci[0] - ci[1], ci[2] - ci[0]


def plot_vs_sigma(study: Study, cells: Cells, out: Path) -> Path | None:
    """``metric_vs_sigma.png``: CER (top) and WER (bottom) vs σ_DP, one column per depth, one
    line per arm (mean and 95% CI over seeds; no noise drawn at the left edge)."""
    p = study.protocol
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(p.depths), figsize=(5.5 * len(p.depths), 7.5), squeeze=False)
    any_data = False
    for j, depth in enumerate(p.depths):
        levels = sorted({0.0, study.sigma_pe(depth), *((cells.sigma_star,) if cells.sigma_star else ())})
        floor = min(s for s in levels if s > 0) / 3
        for i, name in enumerate(("cer", "wer")):
            ax = axes[i][j]
            arms = p.arms(depth)
            for k, (clip, opt) in enumerate(arms):
                found = [(s, _point(cells.get(depth, clip, opt, s), name)) for s in levels]
                pts = [(s, q) for s, q in found if q is not None]
                if not pts:
                    continue
                any_data = True
                shift = 1.08 ** (k - (len(arms) - 1) / 2)  # side by side, so the intervals stay readable
                ax.errorbar([max(s, floor) * shift for s, _ in pts], [q[0] for _, q in pts],
                            [[q[1] for _, q in pts], [q[2] for _, q in pts]], marker="o", capsize=3,
                            color=COLORS.get(clip, "k"), linestyle=STYLES.get(opt, ":"),
                            label=f"{CLIP_LABEL[clip]}, {OPT_LABEL[opt]}")
            ax.set_xscale("log")
            ax.set_title(f"{depth} blocks ({study.params[depth]:,} parameters)", fontsize=9)
            ax.set_xlabel(f"σ_DP (leftmost: no noise; σ_pe {study.sigma_pe(depth):.2g}"
                          + (f", σ* {cells.sigma_star:g})" if cells.sigma_star else ")"), fontsize=8)
            ax.set_ylabel(f"eval {name.upper()} %")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    path = None
    if any_data:
        fig.suptitle("Eval CER / WER vs σ_DP (mean and 95% CI over seeds; each arm at its tuned LR)")
        fig.tight_layout()
        path = out / "metric_vs_sigma.png"
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gap_vs_depth(study: Study, cells: Cells, out: Path) -> Path | None:
    """``gap_vs_depth.png``: g(L) = mean paired CER/WER(global) − (dim), LAMB, σ*, with 95% CIs."""
    p = study.protocol
    pts: dict[str, list[tuple[int, float, float, float, int]]] = {"cer": [], "wer": []}
    for name in pts:
        for depth in p.depths:
            _, d = pair(cells.get(depth, "global", "lamb", cells.sigma_star),
                        cells.get(depth, "dim", "lamb", cells.sigma_star), name)
            s = paired(d)
            if s is not None:
                pts[name].append((depth, s.mean, s.mean - s.ci95[0], s.ci95[1] - s.mean, s.n))
    if not any(pts.values()):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (name, rows) in zip(axes, pts.items(), strict=True):
        ax.errorbar([r[0] for r in rows], [r[1] for r in rows], [[r[2] for r in rows], [r[3] for r in rows]],
                    marker="o", capsize=4)
        for r in rows:
            ax.annotate(f"n={r[4]}", (r[0], r[1]), textcoords="offset points", xytext=(6, 4), fontsize=7)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(p.depths), [str(d) for d in p.depths])
        ax.set_xlabel("transformer blocks")
        ax.set_ylabel(f"{name.upper()}(global) − {name.upper()}(per-layer dim), points")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Per-layer advantage vs depth (LAMB, σ* {cells.sigma_star:g}; paired mean and 95% CI; "
                 "positive favours per-layer)", fontsize=9)
    fig.tight_layout()
    path = out / "gap_vs_depth.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_norms(out: Path) -> Path | None:
    """``update_norms.png``: relative per-element RMS of every tensor, one panel per depth."""
    path = out / "update_norms.json"
    if not path.is_file():
        return None
    norms = json.loads(path.read_text())
    depths = sorted(norms, key=int)
    plt = _pyplot()
    fig, axes = plt.subplots(len(depths), 1, figsize=(12, 2.8 * len(depths)), squeeze=False)
    for ax, depth in zip(axes[:, 0], depths, strict=True):
        n = norms[depth]
        layers = n["layers"]
        ax.bar(range(len(layers)), [a["relative_rms"] for a in layers],
               color=[TYPE_COLORS[a["type"]] for a in layers], width=1.0)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlim(-0.5, len(layers) - 0.5)
        kind = "diagnostic model" if n.get("diagnostic_only") else "study seed model"
        ax.set_title(f"{depth} blocks ({kind}, seed CER {100 * n['seed_cer']:.1f}%): per-element RMS spans "
                     f"x{n['relative_rms_span']:.3g} over {len(layers)} tensors", fontsize=9)
        ax.set_ylabel("RMS_h / RMS", fontsize=8)
    axes[-1, 0].set_xlabel("parameter tensor (input → output)")
    present = [t for t in TYPE_COLORS if any(a["type"] == t for d in depths for a in norms[d]["layers"])]
    fig.suptitle("Per-tensor update RMS relative to the whole update's (real clients, before clipping)")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=TYPE_COLORS[t]) for t in present], present, fontsize=7,
               ncol=len(present), loc="upper center", bbox_to_anchor=(0.5, 0.965), frameon=False)
    out_path = out / "update_norms.png"
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def make_plots(study: Study, cells: Cells, statuses: Mapping[int, DepthStatus], out: Path) -> list[Path]:
    """Every plot that has data."""
    del statuses  # the gate is stated in the tables
    return [q for q in (plot_vs_sigma(study, cells, out), plot_gap_vs_depth(study, cells, out), plot_norms(out))
            if q is not None]
