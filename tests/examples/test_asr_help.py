"""``python examples/asr_librispeech.py --help`` answers without importing torch (which takes
tens of seconds on a loaded machine), and lists the same model sizes as the model module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "asr_librispeech.py"


def test_help_prints_usage_without_importing_torch() -> None:
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(SCRIPT)!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    assert stop.code in (0, None), stop.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported for --help'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:") and "--librispeech-root" in done.stdout


def test_the_model_choices_of_the_parser_are_the_model_configs() -> None:
    from examples.asr.cli import MODEL_NAMES
    from examples.asr.model import CONFIGS

    assert tuple(sorted(CONFIGS)) == MODEL_NAMES
