"""The run directory of an ASR run: chosen and checked before any work, claimed at training.

:func:`plan_run_directory` decides where a run writes (a new timestamped folder, the latest run
for ``--resume``, or ``--output-dir``) and refuses what cannot work, without touching the disk.
:func:`claim_run_directory` is called when training is about to start: only then does the run
create its folder, remove what ``--overwrite`` replaces, and write ``run.json``. A run refused
before that (bad data, a cohort larger than the population, ``--strict``) leaves nothing that
blocks the same command once the problem is fixed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from examples.asr.cli import UserError

__all__ = ["RUN_FILES", "RunDirectory", "claim_run_directory", "plan_run_directory"]

RUN_FILES = ("seed_model.pt", "results.json", "results.md", "fl_no_noise.jsonl", "fl_dp.jsonl",
             "fl_dp_other_clip.jsonl", "ckpt_fl_no_noise", "ckpt_fl_dp", "ckpt_fl_dp_other_clip",
             "run.json")
"""What a run writes into its folder; a folder holding any of them holds a run."""


@dataclass(frozen=True)
class RunDirectory:
    """Where a run writes, as planned before any work.

    Attributes:
        path: the folder.
        fresh: a new timestamped folder chosen here (another name is picked at claim time if a
            run started meanwhile took this one).
        replace: the earlier run's files that ``--overwrite`` removes at claim time.
    """

    path: Path
    fresh: bool = False
    replace: tuple[str, ...] = ()


def _held(folder: Path) -> list[str]:
    return [name for name in RUN_FILES if (folder / name).exists()]


def plan_run_directory(args: argparse.Namespace) -> RunDirectory:
    """Choose and check the run directory; nothing is written.

    Raises:
        UserError: if ``--output-dir`` holds a run and neither ``--resume`` nor ``--overwrite``
            is given, or ``--resume`` finds no run to continue (under the default folder, or in
            ``--output-dir``: a mistyped folder is not silently a new run).
    """
    base = Path("runs/asr-quick" if args.quick else "runs/asr")
    out: Path | None = args.output_dir
    if out is None:
        if args.resume:
            earlier = sorted(p for p in base.glob("*") if p.is_dir() and _held(p))
            if not earlier:
                raise UserError(f"--resume: no earlier run under {base}/; run without --resume "
                                "first, or give --output-dir")
            return RunDirectory(earlier[-1])
        return RunDirectory(_timestamped(base), fresh=True)
    held = _held(out)
    if args.resume and not held:
        what = "does not exist" if not out.exists() else "holds no run"
        raise UserError(f"--resume: {out} {what} (none of run.json, seed_model.pt, ckpt_*/); "
                        "check the folder, or run without --resume to start a new run there")
    if held and not (args.resume or args.overwrite):
        raise UserError(f"{out} already holds a run ({', '.join(held[:3])}); pass --resume to "
                        "continue it, --overwrite to replace it, or choose another --output-dir")
    return RunDirectory(out, replace=tuple(held) if args.overwrite else ())


def _timestamped(base: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, n = base / stamp, 1
    while out.exists():
        n += 1
        out = base / f"{stamp}-{n}"
    return out


def claim_run_directory(plan: RunDirectory) -> Path:
    """Create the run directory as training starts: remove what ``--overwrite`` replaces, create
    the folder, write ``run.json`` (command line and start time); return the folder."""
    out = plan.path
    if plan.fresh:  # claim a new folder atomically: another run may have taken the name
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                out.mkdir()
                break
            except FileExistsError:
                out = _timestamped(out.parent)
    for name in plan.replace:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(
        {"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1) + "\n")
    return out
