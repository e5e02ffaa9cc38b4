"""The ASR privacy-utility study (protocol v2) runs end to end in ``--quick`` mode and resumes."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests._scripts.study import run_quick_study

_run = functools.partial(run_quick_study, "asr_privacy_utility.py")


def test_quick_study_writes_cells_report_and_plots(tmp_path: Path) -> None:
    """Protocol v2 end to end on the tiny model: pilot -> σ* -> sweeps -> main, secondary and
    later cells at two depths, diagnostics at three, the report with verdicts and plots; every
    cell records its provenance; a second run re-runs nothing."""
    from benchmarks._asr_study.grid import QUICK, plan
    from benchmarks._asr_study.seeds import resolve_study

    out = tmp_path / "study"
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = sorted((out / "cells").glob("*.json"))
    records = [json.loads(p.read_text()) for p in cells]
    assert all(p.stem == r["key"] for p, r in zip(cells, records, strict=True))
    # the plan is complete: every cell it knows is done (pilot, σ*, sweeps, ... all resolved)
    study = resolve_study(QUICK)
    sigma_star = json.loads((out / "sigma_star.json").read_text())["sigma_star"]
    assert sigma_star in QUICK.pilot_sigmas
    done = {r["key"]: r for r in records}
    todo = plan(study, done, sigma_star)
    assert {study.key(c) for c in todo} == set(done)
    groups = {g for c in todo for g in c.groups}
    assert groups == {"pilot", "sweep", "main", "secondary", "cohort", "local", "adaptive"}
    assert {r["cell"]["n_layers"] for r in records} == set(QUICK.depths)
    assert {r["cell"]["clip"] for r in records} == {"global", "dim", "normalize", "adaptive-global", "adaptive-dim"}
    assert sum("main" in c.groups for c in todo) == 6 * 2 + 2 * 2  # arms x seeds per depth
    for r in records:  # housekeeping: version, commit, code hash, machine, seed model
        assert r["protocol_version"] == 2 and study.is_current(r)
        assert len(r["code"]["hash"]) == 16 and set(r["code"]["parts"]) == {
            "src/dpfl", "examples/asr", "benchmarks/_asr_study"}
        assert r["code"]["commit"] is None or len(r["code"]["commit"]) == 40
        assert r["machine"]["torch"] == torch.__version__ and r["machine"]["description"]
        assert r["seed_model"]["seed_id"] == study.seed_ids[r["cell"]["n_layers"]]
        assert 0 <= r["cer"] <= 1.5 and r["eval_utterances"] == QUICK.eval_utterances
    seeds = json.loads((out / "seed_models.json").read_text())
    assert set(seeds) == {str(d) for d in (*QUICK.depths, QUICK.diag_depth)}
    assert seeds[str(QUICK.diag_depth)]["diagnostic_only"]
    norms = json.loads((out / "update_norms.json").read_text())
    assert set(norms) == set(seeds)  # the grid's depths and the diagnostic one
    for name in ("README.md", "claims.json", "fidelity.json", "extrapolated_epsilon.json",
                 "metric_vs_sigma.png", "gap_vs_depth.png", "update_norms.png"):
        assert (out / name).is_file(), name
    report = (out / "README.md").read_text()
    for section in ("## Verdicts", "## Seed models and the gate", "## Pilot and σ*", "## Server learning rates",
                    "## Results per arm", "## Claims (verdicts at σ*)", "## Effects against the paper's direction",
                    "## Later questions", "## Diagnostics", "3. per-layer advantage grows with depth"):
        assert section in report, section
    claims = json.loads((out / "claims.json").read_text())
    assert {c["claim"] for c in claims} == {"1", "2", "3"}

    # Resuming: every cell is already done, so nothing is re-run and nothing changes.
    before = {p.name: p.read_text() for p in cells}
    star = (out / "sigma_star.json").read_text()
    proc = _run(out, "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "] pilot" not in proc.stdout and "] sweep" not in proc.stdout and "] main" not in proc.stdout
    assert {p.name: p.read_text() for p in sorted((out / "cells").glob("*.json"))} == before
    assert (out / "sigma_star.json").read_text() == star
    assert not list((out / "cells").glob(".claim-*"))  # runners leave no claim behind


def test_runners_claim_cells_and_take_over_a_dead_runners_claim(tmp_path: Path) -> None:
    from benchmarks._asr_study.cells import _claim, _claim_unfinished

    assert _claim(tmp_path, "abc")  # first claim wins
    assert not _claim(tmp_path, "abc")  # held by this live process: a second runner skips it
    assert (tmp_path / "cells" / ".claim-abc").read_text() == str(os.getpid())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    (tmp_path / "cells" / ".claim-def").write_text(dead.stdout.strip())
    assert _claim(tmp_path, "def")  # the claimant has exited: its claim is taken over
    (tmp_path / "cells" / "ghi.json").write_text("{}")  # finished by another runner since the plan
    assert not _claim_unfinished(tmp_path, "ghi")
    assert not (tmp_path / "cells" / ".claim-ghi").exists()  # and its claim is not left behind


def test_study_script_runs_beside_another_top_level_benchmarks_package(tmp_path: Path) -> None:
    """An installed distribution may ship its own top-level ``benchmarks`` package (opacus 1.6
    does); the study script must still import the repository's ``benchmarks._asr_study``."""
    foreign = tmp_path / "site" / "benchmarks"
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text("FOREIGN = True\n")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "asr_privacy_utility.py"), "plan", "--quick",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ModuleNotFoundError" not in proc.stderr and "todo " in proc.stdout
