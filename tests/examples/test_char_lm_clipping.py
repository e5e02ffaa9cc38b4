"""The char-level LM clipping study runs end to end in ``--quick`` mode and resumes from its cells."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tests._scripts.study import run_quick_study

_run = functools.partial(run_quick_study, "char_lm_clipping.py")


def test_quick_study_writes_cells_report_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "lm"
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    clip_cells = {(r["cell"]["clip"], r["cell"]["sigma_dp"]) for r in records if r["group"] == "clip"}
    assert clip_cells == {("global", 0.0), ("dim", 0.0), ("global", 1e-2), ("dim", 1e-2)}
    for r in records:
        assert 0 < r["bpc"] < 10 and r["fraction_clipped"] is not None
    assert (out / "bpc_vs_sigma.png").stat().st_size > 0
    report = (out / "README.md").read_text()
    assert "| 0.01 |" in report and "per-layer dim" in report

    before = {p.name: p.read_text() for p in (out / "cells").glob("*.json")}
    proc = _run(out, "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bits/char" not in proc.stdout  # every cell was already done: nothing re-ran
    assert {p.name: p.read_text() for p in (out / "cells").glob("*.json")} == before
