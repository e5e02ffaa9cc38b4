"""What computed a cell: the code version (git commit and a hash of the source) and the machine.

The hash covers the source files that determine a cell's result (PLAN.md, "Housekeeping"):
``src/dpfl/**/*.py``, ``examples/asr/**/*.py`` and ``benchmarks/_asr_study/**/*.py``, each part
hashed separately too, so that the report can say *which* part differs between cells of one
table. It is computed once per process, when the study starts: a runner keeps executing the
code it imported, whatever happens to the files later.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from benchmarks._study import machine

CODE_PARTS = ("src/dpfl", "examples/asr", "benchmarks/_asr_study")
"""Directories (relative to the repository root) whose ``*.py`` files determine a cell's result."""


def source_hashes(root: Path, parts: tuple[str, ...] = CODE_PARTS) -> dict[str, str]:
    """SHA-256 (16 hex digits) of each part's ``*.py`` files (relative path and bytes, sorted)
    and of all of them together (``"all"``)."""
    total = hashlib.sha256()
    out: dict[str, str] = {}
    for part in parts:
        h = hashlib.sha256()
        for path in sorted((root / part).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(root).as_posix().encode()
            data = path.read_bytes()
            for x in (rel, b"\0", data, b"\0"):
                h.update(x)
                total.update(x)
        out[part] = h.hexdigest()[:16]
    out["all"] = total.hexdigest()[:16]
    return out


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


@functools.cache
def code_version(root: Path) -> dict[str, Any]:
    """The git commit, whether the hashed parts differ from it, and their hashes (memoized)."""
    hashes = source_hashes(root)
    status = _git(root, "status", "--porcelain", "--", *CODE_PARTS)
    return {"commit": _git(root, "rev-parse", "HEAD"),
            "dirty": None if status is None else bool(status),
            "hash": hashes["all"], "parts": {k: v for k, v in hashes.items() if k != "all"}}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info() -> dict[str, Any]:
    """:func:`benchmarks._study.machine` plus torch version, CPU kernels and CPU model."""
    return {**machine(), "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_model": _cpu_model(), "platform": platform.platform()}
