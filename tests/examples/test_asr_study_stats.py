"""The study's statistics and plan (protocol v2, PLAN.md), on constructed numbers: no training.

Guarantees: the verdict rule turns paired differences into reproduced / reversed / not
reproduced / inconclusive exactly as the pre-registered plan states; the confidence intervals,
power and Welch intervals are the textbook ones (checked against scipy); σ* is chosen by the
pilot rule and written once; LR sweeps extend until the chosen LR is interior (at most twice);
main cells run seed-major; a depth whose seed model fails the gate gets no cells and no verdict.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats as st

from benchmarks._asr_study.cells import fix_sigma_star, read_sigma_star
from benchmarks._asr_study.claims import Cells, claim_rows, depth_status
from benchmarks._asr_study.grid import (
    FULL,
    PROTOCOL_VERSION,
    Cell,
    Protocol,
    Study,
    plan,
    sweep_lrs,
    sweep_result,
)
from benchmarks._asr_study.report import write_report
from benchmarks._asr_study.stats import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    REVERSED,
    half_width,
    min_detectable_effect,
    paired,
    sample_size,
    verdict,
    welch,
)

# --------------------------------------------------------------------------- statistics
D = [1.2, 0.4, 2.1, -0.3, 1.5, 0.9, 1.1, 0.2]


def test_paired_intervals_are_the_t_intervals() -> None:
    s = paired([1.0, 2.0, 3.0])
    assert s is not None
    assert (s.n, s.mean, s.sd) == (3, 2.0, 1.0)
    # t_{0.975, 2} = 4.302653: 2 ± 4.302653 / √3
    assert s.ci95 == pytest.approx((-0.4841377, 4.4841377), abs=1e-6)
    s = paired(D)
    assert s is not None
    for level, ci in ((0.95, s.ci95), (0.90, s.ci90)):
        ref = st.ttest_1samp(D, 0.0).confidence_interval(level)
        assert ci == pytest.approx((ref.low, ref.high), rel=1e-12)
    assert s.favour == (7, 1)
    assert paired([1.0]) is None and paired([1.0, math.inf]) is None


@pytest.mark.parametrize(("diffs", "margin", "expected"), [
    ([2.0, 2.5, 1.5, 2.2, 1.8, 2.1, 2.4, 1.9], 1.25, REPRODUCED),
    ([-2.0, -2.5, -1.5, -2.2, -1.8, -2.1, -2.4, -1.9], 1.25, REVERSED),  # e.g. global better
    ([0.1, -0.1, 0.05, -0.05, 0.0, 0.08, -0.08, 0.02], 1.25, NOT_REPRODUCED),
    ([3.0, -2.0, 4.0, -3.0, 2.5, -1.0, 0.5, -2.0], 1.25, INCONCLUSIVE),
    # a real but small effect: the rule's order makes it "reproduced" (reported as below m)
    ([0.30, 0.31, 0.29, 0.30, 0.32, 0.28, 0.30, 0.31], 1.25, REPRODUCED),
    # without a margin (no noise cost yet) equivalence cannot be shown
    ([0.1, -0.1, 0.05, -0.05, 0.0, 0.08, -0.08, 0.02], None, INCONCLUSIVE),
    # the 90% CI pokes out of ±m: not equivalence
    ([1.0, -0.2, 1.1, -0.3, 0.9, 0.0, 1.2, -0.4], 0.6, INCONCLUSIVE),
])
def test_verdict_rule(diffs: list[float], margin: float | None, expected: str) -> None:
    s = paired(diffs)
    assert verdict(s, margin) == expected
    assert s is not None
    if expected == NOT_REPRODUCED:
        assert s.ci95[0] < 0 < s.ci95[1] and -margin < s.ci90[0] and s.ci90[1] < margin  # type: ignore[operator]
    if expected == INCONCLUSIVE and margin == 0.6:
        assert s.ci95[0] < 0 < s.ci95[1] and s.ci90[1] > margin


def test_power_is_the_plans_formula_and_gives_80_percent() -> None:
    mde = min_detectable_effect(1.0, 8)
    assert mde == pytest.approx((st.t.ppf(0.975, 7) + st.t.ppf(0.8, 7)) / math.sqrt(8), rel=1e-12)
    assert mde == pytest.approx(1.152815, abs=1e-6)
    assert min_detectable_effect(2.0, 8) == pytest.approx(2 * mde)
    for n in (8, 16):  # exact power of the paired t test at that effect (noncentral t): ≈ 0.8
        t = st.t.ppf(0.975, n - 1)
        nc = min_detectable_effect(1.0, n) * math.sqrt(n)
        assert st.nct.sf(t, n - 1, nc) + st.nct.cdf(-t, n - 1, nc) == pytest.approx(0.8, abs=0.005)


def test_sample_size_that_would_decide() -> None:
    s = paired([0.5 + x for x in (-1.0, 1.0, -0.5, 0.5, 0.0, 1.2, -1.2, 0.0)])
    assert s is not None and verdict(s, 1.0) == INCONCLUSIVE
    need = sample_size(s, 1.0)
    # sign: the first n whose 95% half-width at the observed sd is below |mean|
    assert half_width(s.sd, need.sign, 0.95) < abs(s.mean) <= half_width(s.sd, need.sign - 1, 0.95)  # type: ignore[arg-type,operator]
    # equivalence: the first n whose 90% CI at the observed mean fits inside ±m
    room = 1.0 - abs(s.mean)
    assert half_width(s.sd, need.equivalence, 0.90) < room <= half_width(s.sd, need.equivalence - 1, 0.90)  # type: ignore[arg-type,operator]
    assert need.decide == min(need.sign, need.equivalence)  # type: ignore[type-var]
    assert 10 < need.sign < 40 and need.equivalence < need.sign  # type: ignore[operator]
    assert sample_size(s, 0.4).equivalence is None  # |mean| ≥ m: equivalence unreachable


def test_welch_interval_is_scipys() -> None:
    a = [0.2, -0.5, 0.9, 0.1, 0.4, -0.2, 0.3, 0.0]
    b = [1.5, 0.4, 2.2, 1.0, 0.7, 1.9, 1.2, 0.8]
    w = welch(a, b)
    assert w is not None
    ref = st.ttest_ind(b, a, equal_var=False)
    assert w.diff == pytest.approx(sum(b) / 8 - sum(a) / 8)
    assert w.df == pytest.approx(ref.df, rel=1e-12)
    for level, ci in ((0.95, w.ci95), (0.90, w.ci90)):
        r = ref.confidence_interval(level)
        assert ci == pytest.approx((r.low, r.high), rel=1e-12)


# --------------------------------------------------------------------------- plan and σ*
STUDY = Study(FULL, {4: "seed-4", 16: "seed-16", 36: "seed-36"},
              {4: 554_718, 16: 1_886_430, 36: 4_105_950}, {4: 38, 16: 134, 36: 294})


def _rec(cell: Cell, cer: float, wer: float | None = None, code: str = "c0") -> dict:
    return {"key": STUDY.key(cell), "protocol_version": PROTOCOL_VERSION, "protocol": FULL.key_dict(),
            "cell": cell.config(), "groups": list(cell.groups), "cer": cer,
            "wer": cer * 4 if wer is None else wer, "total_s": 100.0,
            "code": {"hash": code, "parts": {"src/dpfl": code, "examples/asr": "e", "benchmarks/_asr_study": "b"},
                     "commit": "abc", "dirty": False},
            "machine": {"description": "test"}}


def _done(*recs: dict) -> dict[str, dict]:
    return {r["key"]: r for r in recs}


PILOT_CER = {0.0: 0.100, 1e-3: 0.105, 3e-3: 0.120, 1e-2: 0.146, 3e-2: 0.250}  # costs 0.5, 2, 4.6, 15


def test_sigma_star_is_chosen_by_the_pilot_and_written_once(tmp_path: Path) -> None:
    assert STUDY.sigma_pe(4) == 6.44e-5 and STUDY.sigma_pe(16) == 3.49e-5  # σ_pe·√D = 0.048
    pilot = plan(STUDY, {}, None)
    assert [(c.clip, c.optimizer, c.seed, c.server_lr, c.n_layers) for c in pilot] == [("global", "lamb", 0, 0.005, 4)] * 5
    assert [c.sigma_dp for c in pilot] == [0.0, 1e-3, 3e-3, 1e-2, 3e-2]  # nothing else before σ*
    done = _done(*(_rec(c, PILOT_CER[c.sigma_dp]) for c in pilot[:4]))
    assert fix_sigma_star(STUDY, done, tmp_path) is None  # pilot unfinished
    done = _done(*(_rec(c, PILOT_CER[c.sigma_dp]) for c in pilot))
    assert fix_sigma_star(STUDY, done, tmp_path) == 1e-2  # cost 4.6 is closest to 5
    blob = json.loads((tmp_path / "sigma_star.json").read_text())
    assert blob["cost_points"] == pytest.approx(4.6) and blob["protocol_version"] == 2
    # other pilot numbers later (e.g. recomputed cells) do not change σ*
    changed = _done(*(_rec(c, {**PILOT_CER, 3e-3: 0.15}[c.sigma_dp]) for c in pilot))
    assert fix_sigma_star(STUDY, changed, tmp_path) == 1e-2
    assert json.loads((tmp_path / "sigma_star.json").read_text()) == blob
    # a file of another protocol is refused
    other = Study(Protocol(rounds=13), STUDY.seed_ids, STUDY.params, STUDY.tensors)
    with pytest.raises(ValueError, match="another protocol"):
        read_sigma_star(other, tmp_path)


def test_lr_sweep_extends_until_the_choice_is_interior() -> None:
    arm, s = ("global", "lamb"), 1e-2
    cer = {0.002: 0.30, 0.005: 0.25, 0.0125: 0.20, 0.0313: 0.18, 0.0784: 0.19}
    done: dict[str, dict] = {}
    assert sweep_lrs(STUDY, done, arm, 4, s) == [0.002, 0.005, 0.0125]
    for lr in (0.002, 0.005, 0.0125):
        done |= _done(*(_rec(Cell(*arm, s, seed, lr, 4), cer[lr] + 0.01 * seed) for seed in (0, 1)))
    assert sweep_lrs(STUDY, done, arm, 4, s) == [0.002, 0.005, 0.0125, 0.0313]  # best at the top end
    assert sweep_result(STUDY, done, arm, 4, s)["chosen"] is None  # the extension is unfinished
    done |= _done(*(_rec(Cell(*arm, s, seed, 0.0313, 4), cer[0.0313]) for seed in (0, 1)))
    assert sweep_lrs(STUDY, done, arm, 4, s)[-1] == 0.0784  # still best at the end: second extension
    done |= _done(*(_rec(Cell(*arm, s, seed, 0.0784, 4), cer[0.0784]) for seed in (0, 1)))
    r = sweep_result(STUDY, done, arm, 4, s)
    assert r["lrs"] == [0.002, 0.005, 0.0125, 0.0313, 0.0784] and r["chosen"] == 0.0313 and r["interior"]
    # never more than two extensions: a monotone sweep ends at the boundary and says so
    mono = {lr: 1.0 / lr for lr in (0.002, 0.005, 0.0125, 0.0313, 0.0784)}
    done = _done(*(_rec(Cell(*arm, s, seed, lr, 4), mono[lr] / 1000) for lr in mono for seed in (0, 1)))
    r = sweep_result(STUDY, done, arm, 4, s)
    assert len(r["lrs"]) == 5 and r["chosen"] == 0.0784 and not r["interior"]


def _finished_sweeps(sigma: float, cer=lambda c: 0.2) -> dict[str, dict]:  # noqa: ANN001
    """Every arm's sweep done at both depths, the middle LR best by 0.1 (no extension)."""
    done: dict[str, dict] = {}
    for depth in FULL.depths:
        for clip, opt in FULL.arms(depth):
            lrs = FULL.lr_values(opt)
            for i, lr in enumerate(lrs):
                cells = [Cell(clip, opt, sigma, seed, lr, depth) for seed in FULL.sweep_seeds]
                done |= _done(*(_rec(c, cer(c) + 0.1 * abs(i - 1)) for c in cells))
    return done


def test_plan_order_main_cells_seed_major_and_gate() -> None:
    pilot = plan(STUDY, {}, None)
    done = _done(*(_rec(c, PILOT_CER[c.sigma_dp]) for c in pilot)) | _finished_sweeps(1e-2)
    cells = plan(STUDY, done, 1e-2)
    groups = [c.groups[0] for c in cells]
    first = {g: groups.index(g) for g in dict.fromkeys(groups)}
    assert list(first) == ["pilot", "sweep", "main", "secondary", "cohort", "local", "adaptive"]
    main4 = [c for c in cells if "main" in c.groups and c.n_layers == 4]
    assert len(main4) == 6 * 8
    # seeds 0 and 1 at the chosen LR are the sweep's own cells (run first); the rest seed-major
    assert sorted(c.seed for c in main4 if "sweep" in c.groups) == [0] * 6 + [1] * 6
    assert [c.seed for c in main4 if c.groups == ("main",)] == [s for s in range(2, 8) for _ in range(6)]
    assert {c.server_lr for c in main4 if c.optimizer == "lamb"} == {0.005}
    assert {c.server_lr for c in main4 if c.optimizer == "adam"} == {1e-3}
    main16 = [c for c in cells if "main" in c.groups and c.n_layers == 16]
    assert len(main16) == 16 and {(c.clip, c.optimizer) for c in main16} == {("global", "lamb"), ("dim", "lamb")}
    assert cells.index(main16[0]) > cells.index(main4[-1])  # 16 blocks after the 4-block cells
    sec4 = [c for c in cells if c.groups == ("secondary",) and c.n_layers == 4]
    assert {c.sigma_dp for c in sec4} == {6.44e-5, 0.0} and {c.seed for c in sec4} == {0, 1, 2, 3}
    sec16 = [c for c in cells if "secondary" in c.groups and c.n_layers == 16]
    assert {c.sigma_dp for c in sec16} == {0.0} and {c.seed for c in sec16} == {0, 1}
    later = [c for c in cells if c.groups[0] in ("cohort", "local", "adaptive")]
    assert len(later) == 4 * (2 * 5 + 2 * 2) and all(c.sigma_dp == 1e-2 and c.n_layers == 4 for c in later)
    # the gate: a failing 16-block seed model removes its cells; a failing main depth, all
    assert not [c for c in plan(STUDY, done, 1e-2, {16}) if c.n_layers == 16]
    assert plan(STUDY, done, 1e-2, {4}) == []
    # keys: the seed model's identity and the protocol version are part of every key
    c = main4[0]
    assert STUDY.key(c) != Study(FULL, {**STUDY.seed_ids, 4: "other"}, STUDY.params, STUDY.tensors).key(c)


def test_claims_report_reversed_effect_gate_and_mixed_code(tmp_path: Path) -> None:
    """Global clipping better by 0.3 CER points on every seed at 4 blocks (the v1 pattern):
    reported as *reversed* and listed among the effects against the paper; the 16-block model
    fails the gate: no verdict; cells from two code versions are flagged."""
    s = 1e-2

    def cer(c: Cell) -> float:
        extra = 0.003 if c.clip in ("dim", "normalize") else 0.0  # global better by 0.3 points
        return 0.05 + 0.002 * c.seed + (0.05 if c.sigma_dp == s else 0.0) + extra

    done = _finished_sweeps(s, cer)
    for c in plan(STUDY, done, s):
        if STUDY.key(c) not in done:
            done |= _done(_rec(c, cer(c), code="c1" if c.seed == 7 else "c0"))
    recs = list(done.values())
    (tmp_path / "cells").mkdir()
    for r in recs:
        (tmp_path / "cells" / f"{r['key']}.json").write_text(json.dumps(r))
    (tmp_path / "sigma_star.json").write_text(json.dumps({
        "sigma_star": s, "protocol_version": 2, "protocol": FULL.key_dict(), "pilot": [], "cost_points": 4.6}))
    seeds = {"4": {"seed_id": "seed-4", "eval_cer": 0.10, "eval_wer": 0.40, "sha256": "a" * 64,
                   "source": "shipped", "checkpoint": "x.pt"},
             "16": {"seed_id": "seed-16", "eval_cer": 0.20, "eval_wer": 0.60, "sha256": "b" * 64,
                    "source": "shipped", "checkpoint": "y.pt"}}
    (tmp_path / "seed_models.json").write_text(json.dumps(seeds))
    view = Cells(STUDY, recs, s)
    statuses = {d: depth_status(view, d, seeds[str(d)]) for d in (4, 16)}
    assert statuses[4].no_verdict is None
    # noise cost at 4 blocks: CER(global, LAMB, σ*) − CER(global, LAMB, 0) = 5 points; m = 1.25
    assert statuses[4].noise_cost["cer"] == pytest.approx(5.0 + 0.2 * (3.5 - 1.5))
    assert statuses[4].margin["cer"] == pytest.approx(0.25 * statuses[4].noise_cost["cer"])  # type: ignore[operator]
    assert statuses[16].no_verdict.startswith("no verdict (model does not work)")  # type: ignore[union-attr]
    rows = {(x.label, x.depth, x.metric): x for x in claim_rows(view, statuses) if x.level == "σ*"}
    row = rows[("per-layer dim beats global (LAMB)", 4, "cer")]
    assert row.diffs == pytest.approx([-0.3] * 8) and row.verdict == REVERSED
    assert row.codes == {"c0", "c1"}
    assert rows[("LAMB beats Adam (global clipping)", 4, "cer")].verdict == NOT_REPRODUCED  # d = 0 exactly
    assert rows[("per-layer dim beats global (LAMB)", 16, "cer")].verdict.startswith("no verdict")
    report = write_report(STUDY, tmp_path).read_text()
    assert "**reversed**" in report and "no verdict (model does not work)" in report
    assert "per-layer dim beats global (LAMB), 4 blocks, σ*, CER: d = -0.30 points" in report
    assert "**significant**" in report
    # every table holding seed 7 is flagged (claims, results); the sweeps (seeds 0 and 1) are not
    assert report.count("come from 2 code versions (c0, c1; differing: src/dpfl)") >= 4
    sweeps = report[report.index("## Server learning rates"):report.index("## Results per arm")]
    assert "code versions" not in sweeps


# --------------------------------------------------------------------------- provenance and seeds
def test_code_hash_tracks_each_part(tmp_path: Path) -> None:
    from benchmarks._asr_study.provenance import CODE_PARTS, source_hashes

    for i, part in enumerate(CODE_PARTS):
        (tmp_path / part / "sub").mkdir(parents=True)
        (tmp_path / part / "sub" / f"m{i}.py").write_text(f"X = {i}\n")
        (tmp_path / part / "notes.txt").write_text("not code")
    before = source_hashes(tmp_path)
    (tmp_path / "benchmarks/_asr_study/notes.txt").write_text("changed, but not a .py file")
    assert source_hashes(tmp_path) == before
    (tmp_path / "benchmarks/_asr_study/sub/m2.py").write_text("X = 3\n")
    after = source_hashes(tmp_path)
    assert after["all"] != before["all"] and after["benchmarks/_asr_study"] != before["benchmarks/_asr_study"]
    assert after["src/dpfl"] == before["src/dpfl"] and after["examples/asr"] == before["examples/asr"]


def test_study_loads_the_shipped_seed_checkpoint_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a checkpoint the depth's seed is "trained here"; once a checkpoint of the same
    recipe is shipped, the study loads it (checked), and its cells get new keys, so cells of the
    two models never mix; a changed checkpoint file is refused."""
    import torch

    from benchmarks._asr_study import seeds
    from benchmarks._asr_study.grid import QUICK
    from examples.asr import seed as seed_mod
    from examples.asr.corpus import CORPUS_FORMAT
    from examples.asr.model import CTCTransformer
    from examples.asr.text import CharTokenizer
    from examples.asr.train import make_batches

    recipe = seeds.seed_recipe(QUICK, 2)
    monkeypatch.setattr(seed_mod, "CHECKPOINTS", tmp_path / "checkpoints")
    monkeypatch.setitem(seed_mod.RECIPES, "study-quick-2", recipe)
    monkeypatch.setattr(seeds, "_LOADED", {})
    trained = seeds.resolve_study(QUICK)
    assert trained.seed_ids[2] == f"trained:{seeds.recipe_hash(recipe)}"
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = CTCTransformer(recipe.model_config())
    seed_mod.save_seed(seed_mod.shipped_path("study-quick-2"), model,
                       {"recipe": recipe.to_dict(), "corpus_format": CORPUS_FORMAT, "scores": {}})
    shipped = seeds.resolve_study(QUICK)
    assert shipped.seed_ids[2].startswith("shipped:study-quick-2:")
    cell = Cell("global", "lamb", 0.0, 0, 0.02, 2)
    assert shipped.key(cell) != trained.key(cell)
    batches = make_batches([torch.randn(120, 80)], ["hello world"], CharTokenizer(), batch_size=1)
    loaded, entry = seeds.seed_model(shipped, 2, batches, tmp_path / "out")
    assert entry["source"] == "shipped" and entry["seed_id"] == shipped.seed_ids[2]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True))
    assert json.loads((tmp_path / "out" / "seed_models.json").read_text())["2"]["sha256"] == entry["sha256"]
    path = seed_mod.shipped_path("study-quick-2")
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="SHA-256"):
        seeds.resolve_study(QUICK)
