"""Small helpers shared by the resumable studies in ``benchmarks/`` (cells on disk, seeds, verdicts).

A study is a set of **cells**, each a configuration run once under a fixed protocol; its record
is a small JSON file named by a hash of the cell and the protocol, written atomically, so a study
resumes after interruption and accumulates across sessions.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from examples.asr.report import jsonable  # non-finite floats as JSON can hold them


def machine() -> dict[str, Any]:
    """What ran a cell: architecture, cores, torch version and threads, Python version."""
    return {"description": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                           f"{torch.get_num_threads()} thread(s)", "python": platform.python_version()}


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(obj), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def paired_verdict(diffs: list[float], *, unit: str, threshold: float) -> str:
    """Plain verdict on paired differences (positive supports the claim).

    Reproduced / reversed when the mean difference exceeds both ``threshold`` and two standard
    errors of the mean, in that direction; otherwise "no clear difference". Fewer than two seeds
    give no verdict.
    """
    if not diffs:
        return "not yet measured"
    if len(diffs) < 2:
        return f"not yet measured (one seed: {diffs[0]:+.3g} {unit})"
    m, sd = mean_std(diffs)
    se = sd / math.sqrt(len(diffs))
    text = f"{m:+.3g} ± {sd:.2g} {unit} over {len(diffs)} seeds"
    if m > max(threshold, 2 * se):
        return f"reproduced ({text})"
    if m < -max(threshold, 2 * se):
        return f"reversed ({text})"
    return f"not reproduced: no clear difference ({text})"
