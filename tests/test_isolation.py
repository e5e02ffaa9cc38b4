"""The test suite writes only under the system's temporary directory (tests/conftest.py): the
caches dpfl and its examples would otherwise fill in the user's home (``~/.cache/dpfl``: the
compiled kernel, corpora and features) point there, for this process and its subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TMP = Path(tempfile.gettempdir()).resolve()


@pytest.mark.parametrize("variable", ["DPFL_CACHE", "XDG_CACHE_HOME", "MPLCONFIGDIR"])
def test_every_cache_variable_points_under_the_temporary_directory(variable: str) -> None:
    assert Path(os.environ[variable]).resolve().is_relative_to(TMP)


def test_the_kernel_and_example_caches_resolve_there_in_a_subprocess() -> None:
    code = (
        "from dpfl.optim import _kernel; from examples.asr.corpus import default_cache_dir; "
        "print(_kernel.kernel_dir()); print(default_cache_dir())"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr
    for line in done.stdout.split():
        assert Path(line).resolve().is_relative_to(TMP), line
        assert not Path(line).resolve().is_relative_to(Path.home().resolve()) or str(
            Path.home().resolve()
        ).startswith(str(TMP))


def test_hypothesis_keeps_its_examples_there() -> None:
    from hypothesis import settings

    database = settings().database
    assert Path(database.path).resolve().is_relative_to(TMP)  # type: ignore[attr-defined]
