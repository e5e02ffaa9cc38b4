"""The study's figures (matplotlib, PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks._asr_study.cells import depth_slot
from benchmarks._asr_study.grid import CLIP_LABEL, CLIPS, OPT_LABEL, OPTIMIZERS, Protocol
from benchmarks._asr_study.measure import _relative_rms
from benchmarks._study import mean_std as _mean_std


def plot_bound_trajectories(protocol: Protocol, records: list[dict[str, Any]], out: Path) -> list[Path]:
    """``bound_trajectories.png``: the total bound per round / the tuned C, per adaptive cell."""
    current = json.loads(json.dumps(protocol.key_dict()))
    cells = [r for r in records if "adaptive" in r and r["protocol"] == current]
    if not cells:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = sorted({r["cell"]["sigma_dp"] for r in cells})
    colors = {s: plt.cm.viridis(i / max(1, len(sigmas) - 1)) for i, s in enumerate(sigmas)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, clip in zip(axes, ("adaptive-global", "adaptive-dim"), strict=True):
        seen = set()
        for r in sorted(cells, key=lambda r: r["cell"]["sigma_dp"]):
            if r["cell"]["clip"] != clip:
                continue
            traj = [b / r["adaptive"]["tuned_clip_bound"] for b in r["adaptive"]["bound_trajectory"]]
            s = r["cell"]["sigma_dp"]
            ax.plot(range(1, len(traj) + 1), traj, color=colors[s], alpha=0.7,
                    ls="-" if r["cell"]["clip_start"] > 1 else "--", label=None if s in seen else f"σ_DP {s:g}")
            seen.add(s)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("round")
        ax.set_title(f"{CLIP_LABEL[clip]} (solid: start C×10, dashed: C×0.1)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("total clip bound / tuned C (used in the round)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "bound_trajectories.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def make_plots(protocol: Protocol, agg: dict[tuple, dict[str, list[float]]], lr: dict[str, float | None],
               eps: dict[str, Any], out: Path) -> list[Path]:
    """PNG plots from the aggregated cells (only those with data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    paths: list[Path] = []
    lamb = lr["lamb"]

    def series(clip: str, opt: str, lrv: float | None, **kw: Any) -> list[tuple[float, float, float]]:
        pts = []
        for k, slot in agg.items():
            if k[:2] == (clip, opt) and k[3] == lrv and k[4:] == (kw.get("n_layers"), None, None):
                m, s = _mean_std(slot["wer"])
                pts.append((k[2], 100 * m, 0.0 if math.isnan(s) else 100 * s))
        return sorted(pts)

    # 1. WER vs σ_DP (and vs extrapolated ε) per clipping mode.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    any_data = False
    for clip in CLIPS:
        pts = series(clip, "lamb", lamb)
        if not pts:
            continue
        any_data = True
        xs = [max(p[0], min(protocol.sigma_levels[1:] or (1e-4,)) / 3) for p in pts]
        axes[0].errorbar(xs, [p[1] for p in pts], [p[2] for p in pts], marker="o", capsize=3, label=CLIP_LABEL[clip])
        def eq_eps(sigma: float) -> Any:
            return eps.get(f"{sigma:g}", {}).get("paper_equivalent", {}).get("rdp")

        noisy = [p for p in pts if p[0] > 0 and isinstance(eq_eps(p[0]), float)]
        axes[1].errorbar([eq_eps(p[0]) for p in noisy], [p[1] for p in noisy], [p[2] for p in noisy],
                         marker="o", capsize=3, label=CLIP_LABEL[clip])
    if any_data:
        axes[0].set_xscale("log")
        axes[0].set_xlabel("σ_DP (leftmost point: no noise)")
        axes[1].set_xscale("log")
        axes[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no overlapping labels
        axes[1].set_xlabel("ε (RDP, δ 1e-9) at paper scale of the paper-model-equivalent σ_DP")
        for ax in axes:
            ax.set_ylabel("eval WER %")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("WER vs noise, LAMB server optimizer (mean ± std over seeds)")
        fig.tight_layout()
        paths.append(out / "wer_vs_sigma.png")
        fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # 2. Optimizer comparison.
    fig, ax = plt.subplots(figsize=(6.5, 4))
    any_data = False
    for opt in OPTIMIZERS:
        for clip, style in (("global", "--"), ("dim", "-")):
            pts = series(clip, opt, lr[opt])
            if not pts:
                continue
            any_data = True
            xs = [max(p[0], min(protocol.sigma_levels[1:] or (1e-4,)) / 3) for p in pts]
            ax.errorbar(xs, [p[1] for p in pts], [p[2] for p in pts], linestyle=style, marker="o", capsize=3,
                        label=f"{OPT_LABEL[opt]}, {clip}")
    if any_data:
        ax.set_xscale("log")
        ax.set_xlabel("σ_DP (leftmost point: no noise)")
        ax.set_ylabel("eval WER %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title("Server optimizers (tuned LR each)")
        fig.tight_layout()
        paths.append(out / "optimizers.png")
        fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # 3. Gap vs depth.
    gaps = []
    for d in protocol.depths:
        nl = depth_slot(protocol, agg, d, protocol.sigma_depth, lamb)
        g = agg.get(("global", "lamb", protocol.sigma_depth, lamb, nl, None, None))
        p = agg.get(("dim", "lamb", protocol.sigma_depth, lamb, nl, None, None))
        if g and p:
            seeds = sorted(set(g["seeds"]) & set(p["seeds"]))
            diffs = [100 * (g["wer"][g["seeds"].index(s)] - p["wer"][p["seeds"].index(s)]) for s in seeds]
            if diffs:
                m, s = _mean_std(diffs)
                gaps.append((d, m, 0.0 if math.isnan(s) else s))
    if gaps:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.errorbar([g[0] for g in gaps], [g[1] for g in gaps], [g[2] for g in gaps], marker="o", capsize=3)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("transformer blocks")
        ax.set_ylabel("WER(global) − WER(per-layer dim), points")
        ax.set_title(f"Clipping gap vs depth (LAMB, σ_DP {protocol.sigma_depth:g})")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / "gap_vs_depth.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    # 4. Cohort size and local work at one σ_DP (the paper's open question on that trade-off).
    sweeps = (("cohort", "users per round S", (5, 10, 20, 40), protocol.cohort_size, 5),
              ("local", "local SGD steps per user", (1, 5, 10, 20), protocol.local_steps, 6))
    panels = []
    for _name, label, values, default, slot in sweeps:
        lines = []
        for clip in ("global", "dim"):
            pts = []
            for v in values:
                key = [clip, "lamb", protocol.sigma_depth, lamb, None, None, None]
                key[slot] = None if v == default else v
                cell = agg.get(tuple(key))
                if cell and cell["wer"]:
                    m, sd = _mean_std(cell["wer"])
                    pts.append((v, 100 * m, 0.0 if math.isnan(sd) else 100 * sd, len(cell["wer"])))
            if pts:
                lines.append((clip, pts))
        panels.append((label, lines))
    if any(lines for _, lines in panels):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, (label, lines), (_, _, values, _, _) in zip(axes, panels, sweeps, strict=True):
            for clip, pts in lines:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], marker="o", capsize=3,
                            linestyle="--" if clip == "global" else "-",
                            label=f"{CLIP_LABEL[clip]} (seeds: {'/'.join(str(p[3]) for p in pts)})")
            ax.set_xscale("log", base=2)
            ax.set_xticks(values, [str(v) for v in values])
            ax.set_xlabel(label)
            ax.set_ylabel("eval WER %")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"Cohort size and local work at σ_DP {protocol.sigma_depth:g} (LAMB; mean ± std over seeds)")
        fig.tight_layout()
        paths.append(out / "cohort_local.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    # 5. Per-layer update norms.
    norms_path = out / "update_norms.json"
    if norms_path.is_file():
        n = json.loads(norms_path.read_text())
        colors = {"LayerNorm": "tab:red", "attention": "tab:blue", "MLP": "tab:green", "conv": "tab:purple",
                  "head": "tab:orange", "other": "gray"}
        fig, axes = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True)
        layers = n["layers"]
        x = list(range(len(layers)))
        cols = [colors[a["type"]] for a in layers]
        axes[0].bar(x, [a["norm"] for a in layers], color=cols)
        dots = axes[0].plot(x, [a["dim_bound"] * n["mean_total_norm"] / n["protocol"]["clip_bound"] for a in layers],
                            "k.", ms=4)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("client update norm")
        axes[1].bar(x, [100 * a["share_of_squared_norm"] for a in layers], color=cols)
        axes[1].set_ylabel("% of squared norm")
        axes[2].bar(x, [_relative_rms(a, n) for a in layers], color=cols)
        axes[2].axhline(1.0, color="k", lw=0.8)
        axes[2].set_yscale("log")
        axes[2].set_ylabel("per-element RMS /\nwhole-update RMS")
        axes[2].set_xticks(x)
        axes[2].set_xticklabels([a["name"] for a in layers], rotation=90, fontsize=5)
        present = [t for t in colors if any(a["type"] == t for a in layers)]
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[t]) for t in present] + dots
        fig.legend(handles, present + ["norm at its dim share of the total"], fontsize=7, ncol=len(handles),
                   loc="lower center", bbox_to_anchor=(0.5, 0.93), frameon=False)
        fig.suptitle(f"Per-tensor norms of real client updates ({n['clients']} clients, before clipping)", y=0.995)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        paths.append(out / "update_norms.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
