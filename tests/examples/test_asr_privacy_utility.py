"""The ASR privacy-utility study runs end to end in ``--quick`` mode and resumes from its cells."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

from tests._scripts.study import run_quick_study

_run = functools.partial(run_quick_study, "asr_privacy_utility.py")


def test_quick_study_writes_cells_report_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "study"
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = sorted((out / "cells").glob("*.json"))
    assert len(cells) == 4  # the 2x2 subset: {global, dim} x {no noise, noise}
    records = [json.loads(p.read_text()) for p in cells]
    assert {(r["cell"]["clip"], r["cell"]["sigma_dp"] > 0) for r in records} == {
        ("global", False), ("global", True), ("dim", False), ("dim", True)}
    assert all(p.stem == r["key"] for p, r in zip(cells, records, strict=True))
    for name in ("README.md", "update_norms.json", "speed.json", "seed_models.json",
                 "extrapolated_epsilon.json", "wer_vs_sigma.png", "update_norms.png"):
        assert (out / name).is_file(), name
    report = (out / "README.md").read_text()
    assert "Clipping mode vs σ_DP" in report and "Per-layer update norms" in report

    # Resuming: every cell is already done, so nothing is re-run and the cells are unchanged.
    before = {p.name: p.read_text() for p in cells}
    proc = _run(out, "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "] clip:" not in proc.stdout  # no cell was run again
    assert {p.name: p.read_text() for p in sorted((out / "cells").glob("*.json"))} == before
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
