"""What an ASR run prints and records: the data report, result summaries, the final table."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["data_report", "format_table", "jsonable", "summary"]


def data_report(report: dict[str, Any]) -> str:
    """Per-split counts and skip reasons, as printed."""
    lines = []
    for role, r in report.items():
        line = f"  {role}: {r['found']} found, {r['used']} used ({r['hours']:.2f} h)"
        if r["not_sampled"]:
            line += f", {r['not_sampled']} not in the --max-eval-utterances sample"
        skipped = r["skipped"]
        line += f", {skipped['count']} skipped" + (":" if skipped["count"] else "")
        lines.append(line + f"  [{r['source']}]")
        for kind, entry in skipped["by_kind"].items():
            lines.append(f"    {entry['count']} x {kind}, e.g. {entry['examples'][0]}")
    return "\n".join(lines)


def summary(r: dict[str, Any]) -> str:
    """One line of WER and CER (eval, and seed-dev where measured)."""
    text = f"eval WER {r['wer']:.1%} CER {r['cer']:.1%}"
    if "dev_wer" in r:
        text += f"; seed-dev WER {r['dev_wer']:.1%} CER {r['dev_cer']:.1%}"
    return text


def jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats spelled as JSON can hold them (None, "inf", "-inf")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def _eps(x: float | str, z: float = 0.0) -> str:
    x = float(x)
    if not math.isinf(x):
        return f"{x:.3g}"
    # z > 0 and still no finite ε: below z ~ 0.15 the noise sampler's ceiling alone costs more
    # than δ (docs/privacy.md, "noise ceiling in δ"), on top of a Gaussian ε in the 1e5s
    return "∞ (no noise)" if not z else "∞ (z too small for any ε at this δ)"


def format_table(results: dict[str, Any]) -> str:
    """The final markdown table: seed WER, FL WER without noise, FL+DP WER, ε."""
    dp = results["fl_dp"]
    dev = "dev_wer" in results["seed"]
    head = "| run | eval WER | eval CER |" + (" seed-dev WER |" if dev else "")
    head += f" ε (δ={dp['delta']:g}, {dp['accountant'].upper()}) |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]

    def row(label: str, r: dict[str, Any], eps: str) -> str:
        cells = f"| {label} | {r['wer']:.1%} | {r['cer']:.1%} |"
        return cells + (f" {r['dev_wer']:.1%} |" if dev else "") + f" {eps} |"

    lines.append(row("seed model (central, LARS)", results["seed"], "–"))
    for name, label in (("fl_no_noise", "FL, no noise"), ("fl_dp", "FL + DP"),
                        ("fl_dp_other_clip", "FL + DP")):
        if name not in results:
            continue
        r = results[name]
        noise = f" σ_DP={r['sigma_dp']:.3g}, z={r['noise_multiplier']:.3g}," if r["noise_multiplier"] else ""
        what = f"{label} ({r['rounds']} rounds, S={r['cohort_size']},{noise} C={r['clip_bound']:g} {r['clip']})"
        eps = _eps(r["epsilon"], r["noise_multiplier"])
        if r.get("audit"):
            a = r["audit"]
            eps += f" (empirical {a['empirical_epsilon']:.3g}, {a['num_canaries']} canaries)"
        lines.append(row(what, r, eps))
    if "extrapolated" in results:
        e = results["extrapolated"]
        lines.append(
            f"| FL + DP extrapolated to the paper's scale: same σ_DP, S={e['cohort_size']:,}, "
            f"K={e['population'] / 1e6:g}M, T={e['rounds']:,} (z={e['noise_multiplier']:.3g}) | – | – |"
            + (" – |" if dev else "") + f" {e['epsilon']:.3g} (δ={e['delta']:g}) |")
    lines.append(f"\nDP noise: {dp.get('noise', 'unknown')}; sampling and training seeded by --seed "
                 "(a simulation: the cohorts are reproducible)")
    wall = (f"wall time {results['wall_time_s']:.0f}s" if "wall_time_s" in results else
            "wall time not recorded (it depends on the DP stages' realised cohorts; --unsafe-metrics)")
    lines.append(f"{wall}; data: {results['data']['source']}")
    if "environment" in results:
        env = results["environment"]
        lines.append(f"torch {env['torch']}, CPU kernels {env['cpu_capability']}, "
                     f"{env['threads']} threads, device {env['device']}")
    return "\n".join(lines)
