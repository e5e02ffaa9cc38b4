"""Run a study script from ``benchmarks/`` in ``--quick`` mode in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_quick_study(script: str, out: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """``python benchmarks/<script> --quick --out <out> [args]`` on one thread, headless plots."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
               OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )
