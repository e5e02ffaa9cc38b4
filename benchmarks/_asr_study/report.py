"""The v2 report (``README.md`` in the results folder): tables with CIs, verdicts, power, plots."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from benchmarks._asr_study.cells import read_sigma_star
from benchmarks._asr_study.claims import (
    METRICS,
    Cells,
    ClaimRow,
    DepthStatus,
    claim_rows,
    depth_status,
    pair,
    values,
)
from benchmarks._asr_study.grid import (
    CLIP_LABEL,
    OPT_LABEL,
    PAPER_NOISE_NORM,
    PAPER_SCALE,
    PROTOCOL_VERSION,
    Cell,
    Study,
    choose_sigma_star,
    load_cells,
    sweep_result,
)
from benchmarks._asr_study.plots import make_plots
from benchmarks._asr_study.stats import Paired, Welch, mean_ci, paired
from benchmarks._study import write_json as _write_json
from dpfl.accounting import extrapolate


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _f(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"


def _ci(ci: tuple[float, float] | None, digits: int = 2) -> str:
    return "–" if ci is None else f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def arm_label(clip: str, opt: str) -> str:
    return f"{CLIP_LABEL[clip]}, {OPT_LABEL[opt]}"


def code_flag(hashes: set[str], parts: Mapping[str, Mapping[str, str]]) -> list[str]:
    """A warning line when a table's cells come from more than one code version."""
    hashes = {h for h in hashes if h}
    if len(hashes) <= 1:
        return []
    differing = sorted({k for h in hashes for k in parts.get(h, {})
                        if len({parts.get(x, {}).get(k) for x in hashes}) > 1})
    return [f"**Flag:** the cells of this table come from {len(hashes)} code versions "
            f"({', '.join(sorted(hashes))}; differing: {', '.join(differing) or 'unknown'}).", ""]


def _paper_eps(sigma: float) -> dict[str, Any]:
    out: dict[str, Any] = {"noise_multiplier": sigma * PAPER_SCALE["cohort_size"]}
    for acc in ("rdp", "pld"):
        try:
            out[acc] = extrapolate(sigma_dp=sigma, accountant=acc, cohort_size=PAPER_SCALE["cohort_size"],
                                   population=PAPER_SCALE["population"], rounds=int(PAPER_SCALE["rounds"]),
                                   delta=PAPER_SCALE["delta"]).epsilon
        except (ValueError, RuntimeError, OverflowError) as exc:  # report, do not crash
            out[acc] = f"failed: {exc}"[:120]
    return out


def extrapolated_epsilons(sigmas: Iterable[float], out: Path) -> dict[str, dict[str, Any]]:
    """Paper-scale ε (S 204,800, K 69.5M, T 2,034, δ 1e-9) of each σ_DP, RDP and PLD (cached)."""
    path = out / "extrapolated_epsilon.json"
    cache = _load(path)
    for s in sigmas:
        if s > 0 and f"{s:g}" not in cache:
            cache[f"{s:g}"] = _paper_eps(s)
            _write_json(path, cache)
    return cache


def _eps(v: Any) -> str:
    return v if isinstance(v, str) else f"{v:.3g}"


# --------------------------------------------------------------------------- sections
def seeds_section(study: Study, statuses: Mapping[int, DepthStatus], seeds: Mapping[str, Any]) -> list[str]:
    p = study.protocol
    lines = ["## Seed models and the gate", "",
             f"A depth enters the study only if its seed model's eval CER is ≤ {100 * p.cer_gate:.0f}% and its "
             "no-noise cells improve on it (PLAN.md). The diagnostic model is used for update norms and "
             "clipping fidelity only.", "",
             "| blocks | parameters D | tensors | seed model | SHA-256 | eval CER % | eval WER % | σ_pe = 0.048/√D |"
             " no-noise cells, mean CER % | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for depth in dict.fromkeys((*p.depths, p.diag_depth)):
        e = seeds.get(str(depth))
        cur = e if e and e.get("seed_id") == study.seed_ids[depth] else None
        st = statuses.get(depth)
        if depth not in p.depths:
            status = "diagnostic only"
        elif st is None or st.seed_cer is None:
            status = "seed model not loaded yet"
        else:
            status = st.no_verdict or "works"
        src = "–" if cur is None else (f"{cur['source']}: `{cur['checkpoint']}`" if cur["source"] == "shipped"
                                       else f"{cur['source']} here ({cur['recipe']['steps']} LARS steps, cached)")
        lines.append(
            f"| {depth} | {study.params[depth]:,} | {study.tensors[depth]} | {src} | "
            f"{cur['sha256'][:12] if cur else '–'} | {100 * cur['eval_cer']:.1f} | {100 * cur['eval_wer']:.1f} | "
            f"{study.sigma_pe(depth):.3g} | "
            f"{'–' if st is None or st.no_noise_cer is None else f'{100 * st.no_noise_cer:.1f}'} | {status} |"
            if cur else f"| {depth} | {study.params[depth]:,} | {study.tensors[depth]} | – | – | – | – | "
                        f"{study.sigma_pe(depth):.3g} | – | {status} |")
    return lines + [""]


def pilot_section(study: Study, cells: Cells, out: Path) -> list[str]:
    blob = _load(out / "sigma_star.json")
    lines = ["## Pilot and σ*", "",
             f"Global clipping, LAMB at LR {study.protocol.pilot_lr():g}, seed 0, {study.protocol.main_depth} "
             f"blocks; σ* = the level whose eval-CER cost over no noise is closest to "
             f"{study.protocol.target_cost:g} points, written once to `sigma_star.json`.", ""]
    rows = blob.get("pilot") or (choose_sigma_star(study, cells.done) or {}).get("pilot")
    if rows:
        lines += ["| σ_DP | eval CER % | eval WER % | CER cost (points) |", "|---|---|---|---|"]
        lines += [f"| {r['sigma_dp']:g} | {100 * r['cer']:.2f} | {100 * r['wer']:.2f} | {r['cost_points']:+.2f} |"
                  for r in rows]
        lines.append("")
    if cells.sigma_star is None:
        return lines + ["σ* is not chosen yet (pilot unfinished).", ""]
    lines.append(f"**σ* = {cells.sigma_star:g}** (chosen {blob.get('chosen', '?')}; pilot cost "
                 f"{blob.get('cost_points', math.nan):+.2f} CER points). Noise norm on the mean σ*·√D: " +
                 ", ".join(f"{d} blocks {cells.sigma_star * math.sqrt(study.params[d]):.3g}·C"
                           for d in study.protocol.depths) + f" (the paper: {PAPER_NOISE_NORM}·C).")
    now = choose_sigma_star(study, cells.done)
    if now and now["sigma_star"] != cells.sigma_star:
        lines.append(f"**Flag:** the pilot cells now on disk would choose σ* = {now['sigma_star']:g}; "
                     "the recorded σ* stands (PLAN.md: fixed once chosen).")
    return lines + [""]


def eps_section(study: Study, cells: Cells, out: Path) -> list[str]:
    sig = sorted({study.sigma_pe(d) for d in study.protocol.depths}
                 | ({cells.sigma_star} if cells.sigma_star else set()))
    eps = extrapolated_epsilons(sig, out)
    lines = ["## Extrapolated ε (paper scale: S 204,800, K 69.5M, T 2,034, δ 1e-9)", "",
             "| σ_DP | z at paper scale | ε RDP | ε PLD |", "|---|---|---|---|"]
    for s in sig:
        e = eps[f"{s:g}"]
        lines.append(f"| {s:g} | {e['noise_multiplier']:.4g} | {_eps(e['rdp'])} | {_eps(e['pld'])} |")
    return lines + [""]


def sweeps_section(study: Study, cells: Cells, parts: Mapping[str, Mapping[str, str]]) -> list[str]:
    p = study.protocol
    lines = ["## Server learning rates", "",
             f"Swept per arm at σ* on seeds {', '.join(map(str, p.sweep_seeds))} (mean eval CER %), "
             f"extended at an end holding the best mean (up to {p.max_lr_extensions} extensions); the "
             "chosen LR is used at every level of the arm.", "",
             "| blocks | arm | LR → mean CER % | chosen | interior |", "|---|---|---|---|---|"]
    if cells.sigma_star is None:
        return lines[:-3] + ["Not started (σ* not chosen yet).", ""]
    hashes: set[str] = set()
    for depth in p.depths:
        for arm in p.arms(depth):
            r = sweep_result(study, cells.done, arm, depth, cells.sigma_star)
            hashes |= {cells.done[k].get("code", {}).get("hash", "?") for k in
                       (study.key(Cell(*arm, cells.sigma_star, seed, lr, depth))
                        for lr in r["lrs"] for seed in p.sweep_seeds) if k in cells.done}
            txt = ", ".join(f"{lr:g} → {'–' if m is None else f'{100 * m:.2f}'}"
                            for lr, m in zip(r["lrs"], r["mean_cer"], strict=True))
            interior = "–" if r["chosen"] is None else ("yes" if r["interior"] else "**no** (at an end)")
            lines.append(f"| {depth} | {arm_label(*arm)} | {txt} | {r['chosen'] if r['chosen'] else '–'} | {interior} |")
    return lines + [""] + code_flag(hashes, parts)


def results_section(study: Study, cells: Cells, parts: Mapping[str, Mapping[str, str]]) -> list[str]:
    p = study.protocol
    lines = ["## Results per arm", "", "Eval CER and WER (%) after the last round: mean and 95% t interval "
             "over seeds (each arm at its tuned LR).", ""]
    for depth in p.depths:
        levels = [("σ*", cells.sigma_star), ("σ_pe", study.sigma_pe(depth)), ("0", 0.0)]
        lines += [f"### {depth} blocks", "", "| arm | level | σ_DP | seeds | CER % | WER % |",
                  "|---|---|---|---|---|---|"]
        hashes: set[str] = set()
        for level, sigma in levels:
            for arm in p.arms(depth):
                got = cells.get(depth, *arm, sigma)
                if not got:
                    continue
                hashes |= _hashes(got)
                cols = []
                for name in METRICS:
                    v = values(got, name)
                    ci = mean_ci(v)
                    cols.append(f"{statistics.fmean(v):.2f} [{ci[1]:.2f}, {ci[2]:.2f}]" if ci else
                                f"{statistics.fmean(v):.2f}")
                lines.append(f"| {arm_label(*arm)} | {level} | {sigma:g} | {len(got)} | {cols[0]} | {cols[1]} |")
        lines.append("")
        lines += code_flag(hashes, parts)
    return lines


def _needed(r: ClaimRow) -> str:
    if r.needed is None or r.verdict not in ("inconclusive",):
        return "–"
    unit = " (seeds per depth)" if r.claim == "3" else ""
    s = "unreachable" if r.needed.sign is None else f"{r.needed.sign}"
    e = "unreachable" if r.needed.equivalence is None else f"{r.needed.equivalence}"
    return f"sign {s}, equivalence {e}{unit}"


def _stat_cols(r: ClaimRow) -> list[str]:
    """n, mean d, sd, 95% CI, 90% CI, pairs for/against."""
    s = r.summary
    if isinstance(s, Paired):
        return [str(s.n), _f(s.mean), f"{s.sd:.2f}", _ci(s.ci95), _ci(s.ci90), f"{s.favour[0]}/{s.favour[1]}"]
    if isinstance(s, Welch):
        return [f"{s.n[0]}+{s.n[1]}", _f(s.diff), f"se {s.se:.2f}, df {s.df:.1f}", _ci(s.ci95), _ci(s.ci90), "–"]
    finite = [d for d in r.diffs if math.isfinite(d)]
    return [str(len(finite)), _f(finite[0]) if len(finite) == 1 else "–", "–", "–", "–", "–"]


def verdicts_section(rows: list[ClaimRow]) -> list[str]:
    """One line per claim and depth: the CER verdict at σ* (and the WER one beside it)."""
    lines = ["## Verdicts (σ*, CER primary; WER secondary)", "",
             "| claim | blocks | CER: mean d [95% CI] | verdict (CER) | verdict (WER) |", "|---|---|---|---|---|"]
    wer = {(r.claim, r.label, r.depth): r.verdict for r in rows if r.metric == "wer" and r.level == "σ*"}
    for r in rows:
        if r.metric != "cer" or r.level != "σ*":
            continue
        s = r.summary
        mean = s.mean if isinstance(s, Paired) else s.diff if isinstance(s, Welch) else None
        est = "–" if s is None else f"{mean:+.2f} {_ci(s.ci95)}"
        lines.append(f"| {r.claim}. {r.label} | {r.depth} | {est} | **{r.verdict}** | "
                     f"{wer.get((r.claim, r.label, r.depth), '–')} |")
    return lines + ["", "Positive d favours the paper; details, margins, power and sample sizes below.", ""]


def claims_section(rows: list[ClaimRow], parts: Mapping[str, Mapping[str, str]]) -> list[str]:
    head = ("| claim | blocks | metric | n | mean d | sd | 95% CI | 90% CI | margin m | verdict | MDE (80%) |"
            " pairs needed to decide | pairs for/against | code versions |")
    sep = "|---" * 14 + "|"
    lines = ["## Claims (verdicts at σ*)", "",
             "d = metric(paper's loser) − metric(paper's winner) per seed in points, so **positive favours the "
             "paper**. Verdict (mechanical, PLAN.md): reproduced if the 95% CI is above 0; reversed if below 0; "
             "not reproduced if the 90% CI lies inside (−m, +m) with m = 0.25 × the noise cost "
             "(global, LAMB, σ* − 0) at that depth; else inconclusive. Claim 3 is the Welch interval of "
             "g(16) − g(4), g = mean d of claim 1 (dim vs global, LAMB), with m = the smaller of the two "
             "depths' margins. MDE = smallest effect detected with 80% power (two-sided, α 0.05) at the "
             "observed sd and n. Pairs needed: at the observed mean and sd, for the 95% CI to exclude 0 "
             "(sign) or the 90% CI to fit inside ±m (equivalence). CER is primary; WER is reported with "
             "the same rule as a secondary metric. The three claims are reported separately; no "
             "multiple-comparison correction is applied.", ""]
    for name, title in (("cer", "CER (primary)"), ("wer", "WER (secondary)")):
        sel = [r for r in rows if r.metric == name and r.level == "σ*"]
        lines += [f"### {title}", "", head, sep]
        for r in sel:
            n, mean, sd, ci95, ci90, fav = _stat_cols(r)
            small = " (effect smaller than m)" if _within(r) else ""
            lines.append(f"| {r.claim}. {r.label} | {r.depth} | {name.upper()} | {n} | {mean} | {sd} | {ci95} | "
                         f"{ci90} | {_f(r.margin)} | **{r.verdict}**{small} | {_f(r.mde)} | {_needed(r)} | "
                         f"{fav} | {len(r.codes)}{' ⚠' if len(r.codes) > 1 else ''} |")
            if r.diverged:
                lines.append(f"| ↳ {r.diverged} diverged pair(s) (non-finite CER) left out of the statistics |"
                             + " |" * 13)
        lines.append("")
        lines += code_flag(set().union(*(r.codes for r in sel)) if sel else set(), parts)
    return lines


def _within(r: ClaimRow) -> bool:
    """A reproduced/reversed effect whose 90% CI is also inside ±m (real but small)."""
    s = r.summary
    if r.margin is None or s is None or r.verdict not in ("reproduced", "reversed"):
        return False
    return -r.margin < s.ci90[0] and s.ci90[1] < r.margin


def against_section(rows: list[ClaimRow]) -> list[str]:
    """Every effect whose direction is against the paper (v1 left a small CER effect for global
    unreported): significant ones and leanings, at every level."""
    lines = ["## Effects against the paper's direction", "",
             "Rows whose mean d is negative (the paper's loser did better), at every level; "
             "\"significant\" = 95% CI below 0.", ""]
    hits = []
    for r in rows:
        s = r.summary
        mean = s.mean if isinstance(s, Paired) else s.diff if isinstance(s, Welch) else None
        if mean is None or mean >= 0:
            continue
        sig = s.ci95[1] < 0  # type: ignore[union-attr]
        fav = f", {s.favour[1]}/{s.n} pairs against" if isinstance(s, Paired) else ""
        hits.append(f"- {r.claim}. {r.label}, {r.depth} blocks, {r.level}, {r.metric.upper()}: "
                    f"d = {mean:+.2f} points, 95% CI {_ci(s.ci95)}{fav} — "  # type: ignore[union-attr]
                    f"{'**significant**' if sig else 'not significant'}")
    return lines + (hits or ["None so far."]) + [""]


def secondary_section(rows: list[ClaimRow]) -> list[str]:
    lines = ["## The same differences at σ_pe and without noise (statistics only)", "",
             "| claim | blocks | level | metric | n | mean d | sd | 95% CI | 90% CI | pairs for/against |",
             "|---" * 10 + "|"]
    for r in rows:
        if r.level != "σ*":
            lines.append(f"| {r.claim}. {r.label} | {r.depth} | {r.level} | {r.metric.upper()} | "
                         + " | ".join(_stat_cols(r)) + " |")
    return lines + [""]


def later_section(study: Study, cells: Cells, parts: Mapping[str, Mapping[str, str]]) -> list[str]:
    p = study.protocol
    depth, s = p.main_depth, cells.sigma_star
    hashes: set[str] = set()
    lines = ["## Later questions (σ*, LAMB, main depth)", "",
             "Cohort size S and local steps (one factor at a time; the other at the protocol's value, "
             f"S = {p.cohort_size}, {p.local_steps} local steps): eval CER % per clipping mode and the paired "
             "d = CER(global) − CER(dim).", "",
             "| setting | global CER % | dim CER % | d mean [95% CI] | n |", "|---|---|---|---|---|"]
    settings = ([(f"S = {x}", {"cohort": x}) for x in sorted({*p.cohort_sizes, p.cohort_size})]
                + [(f"{x} local steps", {"local": x}) for x in sorted({*p.local_steps_grid, p.local_steps})])
    for label, setting in settings:
        # the protocol's own value is the main cells' (stored as None)
        cohort = setting.get("cohort")
        local = setting.get("local")
        cohort = None if cohort == p.cohort_size else cohort
        local = None if local == p.local_steps else local
        g = cells.get(depth, "global", "lamb", s, cohort=cohort, local=local)
        d = cells.get(depth, "dim", "lamb", s, cohort=cohort, local=local)
        hashes |= _hashes(g, d)
        _, diffs = pair(g, d, "cer")
        ps = paired(diffs)
        lines.append(f"| {label} | {_mean(g)} | {_mean(d)} | "
                     f"{f'{ps.mean:+.2f} {_ci(ps.ci95)}' if ps else '–'} | {len(diffs)} |")
    lines += ["", "Adaptive clipping (target quantile 0.5, η 1, count noise std S/20 per layer) against the "
              "fixed bound C: d = CER(fixed) − CER(adaptive), positive = adaptive better.", "",
              "| mode | start | adaptive CER % | fixed CER % | d mean [95% CI] | n |", "|---|---|---|---|---|---|"]
    for clip, base in (("adaptive-global", "global"), ("adaptive-dim", "dim")):
        for start in p.adaptive_starts:
            a = cells.get(depth, clip, "lamb", s, start=start, lr_arm=(base, "lamb"))
            f = cells.get(depth, base, "lamb", s)
            hashes |= _hashes(a, f)
            _, diffs = pair(f, a, "cer")
            ps = paired(diffs)
            lines.append(f"| {CLIP_LABEL[clip]} | C×{start:g} | {_mean(a)} | {_mean(f)} | "
                         f"{f'{ps.mean:+.2f} {_ci(ps.ci95)}' if ps else '–'} | {len(diffs)} |")
    return lines + [""] + code_flag(hashes, parts)


def _hashes(*groups: Mapping[int, Mapping[str, Any]]) -> set[str]:
    return {r.get("code", {}).get("hash", "?") for g in groups for r in g.values()}


def _mean(cells: Mapping[int, Any]) -> str:
    if not cells:
        return "–"
    v = values(cells, "cer")
    return f"{statistics.fmean(v):.2f} (n={len(v)})"


def diagnostics_section(study: Study, out: Path) -> list[str]:
    norms, fid = _load(out / "update_norms.json"), _load(out / "fidelity.json")
    lines = ["## Diagnostics: per-layer update norms and clipping fidelity", ""]
    if not norms and not fid:
        return lines + ["Not measured yet (`python benchmarks/asr_privacy_utility.py norms fidelity`).", ""]
    lines += ["Real client updates from each depth's seed model (per-layer dim clipping, LAMB, no noise, "
              "seed 0; before clipping). Relative per-element RMS = (‖Δ_h‖/√d_h)/(‖Δ‖/√D): under global "
              "clipping plus noise a tensor's signal-to-noise ratio is proportional to it; per-layer dim "
              "clipping makes it 1 for every clipped tensor.", "",
              "| blocks | model | clients | mean update norm / C | relative RMS: min, median, max | span |"
              " tensors below 0.1 |", "|---|---|---|---|---|---|---|"]
    for depth, n in sorted(norms.items(), key=lambda kv: int(kv[0])):
        rel = [a["relative_rms"] for a in n["layers"]]
        model = (f"diagnostic ({study.protocol.diag_seed_steps} LARS steps, seed CER {100 * n['seed_cer']:.1f}%)"
                 if n.get("diagnostic_only") else f"study seed model (CER {100 * n['seed_cer']:.1f}%)")
        lines.append(f"| {depth} | {model} | {n['clients']} | {n['mean_total_norm'] / n['clip_bound']:.3g} | "
                     f"{min(rel):.3g}, {statistics.median(rel):.3g}, {max(rel):.3g} | ×{n['relative_rms_span']:.3g} | "
                     f"{sum(r < 0.1 for r in rel)}/{len(rel)} |")
    lines.append("")
    if fid:
        lines += ["Clipping fidelity: cosine between the clipped, noised cohort mean and the unclipped mean "
                  "(1 = direction kept, 0 = noise), and the mean factor by which clipping shrinks an update.", ""]
        for depth, f in sorted(fid.items(), key=lambda kv: int(kv[0])):
            types = ["all", *f["types"]]
            lines += [f"{depth} blocks ({f['users']} users, {f['draws']} noise draws):", "",
                      "| clipping | σ_DP | shrink factor | " + " | ".join(types) + " |", "|---" * (len(types) + 3) + "|"]
            lines += [f"| {r['clip']} | {r['sigma_dp']:g} | {r['mean_norm_factor']:.3g} | "
                      + " | ".join(f"{r[t]:.3f}" for t in types) + " |" for r in f["rows"]]
            lines.append("")
    return lines


# --------------------------------------------------------------------------- the report
def write_report(study: Study, out: Path) -> Path:
    """``out/README.md`` (and the plots) from the finished cells of ``study``."""
    records = load_cells(out)
    sigma_star = read_sigma_star(study, out)
    cells = Cells(study, records, sigma_star)
    seeds = _load(out / "seed_models.json")
    statuses = {d: depth_status(cells, d, seeds.get(str(d))) for d in study.protocol.depths}
    rows = claim_rows(cells, statuses)
    parts = {r["code"]["hash"]: r["code"]["parts"] for r in cells.current if "code" in r}
    wall = sum(r["total_s"] for r in cells.current)
    versions: dict[str, list[dict[str, Any]]] = {}
    for r in cells.current:
        versions.setdefault(r.get("code", {}).get("hash", "?"), []).append(r)
    lines = [f"# ASR privacy–utility study, protocol v{PROTOCOL_VERSION}", "",
             "Generated by `python benchmarks/asr_privacy_utility.py report` from the cells in `cells/` "
             "(one JSON per finished cell). The analysis follows the pre-registered plan "
             "[PLAN.md](PLAN.md), written before any v2 cell; protocol v1's cells and report "
             "(`../cells/`, `../README.md`) are never mixed in.", "",
             "## Status", "",
             f"{len(cells.current)} cells of this protocol finished ({cells.stale} other cells in `cells/` "
             f"not used: another protocol, version or seed model); cell wall time in all {wall / 3600:.2f} h, "
             f"mean {wall / max(1, len(cells.current)):.0f} s per cell (one thread each).", "",
             "Protocol (shared by every cell):", "", "```", json.dumps(study.protocol.key_dict()), "```", "",
             "| code hash | git commit | uncommitted changes | cells | machines |", "|---|---|---|---|---|"]
    for h, rs in sorted(versions.items(), key=lambda kv: -len(kv[1])):
        commits = sorted({str(r["code"].get("commit"))[:10] for r in rs if "code" in r})
        dirty = sorted({str(r["code"].get("dirty")) for r in rs if "code" in r})
        machines = sorted({r["machine"]["description"] for r in rs})
        lines.append(f"| {h} | {', '.join(commits)} | {', '.join(dirty)} | {len(rs)} | {'; '.join(machines)} |")
    lines.append("")
    lines += verdicts_section(rows)
    lines += seeds_section(study, statuses, seeds)
    lines += pilot_section(study, cells, out)
    lines += eps_section(study, cells, out)
    lines += sweeps_section(study, cells, parts)
    lines += results_section(study, cells, parts)
    lines += claims_section(rows, parts)
    lines += against_section(rows)
    lines += secondary_section(rows)
    lines += later_section(study, cells, parts)
    lines += diagnostics_section(study, out)
    plots = make_plots(study, cells, statuses, out)
    if plots:
        lines += ["## Plots", ""] + [f"![{q.stem}]({q.name})" for q in plots] + [""]
    conclusions = out / "conclusions.md"
    if conclusions.is_file():
        lines += [conclusions.read_text()]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    _write_json(out / "claims.json", [
        {"claim": r.claim, "label": r.label, "depth": r.depth, "level": r.level, "metric": r.metric,
         "seeds": r.seeds, "diffs": r.diffs, "margin": r.margin, "verdict": r.verdict, "mde": r.mde,
         "summary": None if r.summary is None else r.summary.__dict__,
         "needed": None if r.needed is None else r.needed.__dict__, "code_versions": sorted(r.codes)}
        for r in rows])
    return path
