"""The torchrun tutorial's ``train.py`` is complete: copied out of the page, it trains with two
real ``torch.distributed`` gloo ranks started by torchrun, and the same command with more rounds,
run again in the same folder, resumes from the first run's checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_docs import DOCS, page_file

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "train.py", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="gloo over localhost on POSIX")
def test_train_py_runs_on_two_gloo_ranks_and_resumes(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(page_file(DOCS / "tutorials" / "scale.md", "train.py"))
    first = _torchrun(tmp_path, "4")
    assert "2 ranks: 4 rounds (resumed from 0), epsilon = " in first
    second = _torchrun(tmp_path, "6")
    assert "2 ranks: 6 rounds (resumed from 4), epsilon = " in second
    rounds = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds if r.get("event") == "round"] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "ckpt").is_dir()
