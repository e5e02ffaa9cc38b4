"""Shared pytest configuration: caches under the temporary directory, hypothesis profiles sized
for a 2-core CI machine.

The test suite writes only under the system's temporary directory: dpfl's cache root
(``DPFL_CACHE``: the ASR corpora and features, the opt-in LAMB kernel), every XDG-aware cache,
matplotlib's and hypothesis' example database point into one folder there, kept between
sessions so the kernel is compiled and the corpora are generated once per machine.
Subprocesses inherit the environment. Tests that need an empty cache use their own ``tmp_path``.
"""

import os
import tempfile
from pathlib import Path

_uid = os.getuid() if hasattr(os, "getuid") else 0
TEST_CACHE = Path(tempfile.gettempdir()) / f"dpfl-test-cache-{_uid}"
for _variable, _sub in (
    ("DPFL_CACHE", "dpfl"),
    ("XDG_CACHE_HOME", "xdg"),
    ("MPLCONFIGDIR", "matplotlib"),
):
    os.environ[_variable] = str(TEST_CACHE / _sub)

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

_EXAMPLES = DirectoryBasedExampleDatabase(str(TEST_CACHE / "hypothesis"))

settings.register_profile(
    "ci",
    database=_EXAMPLES,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev",
    database=_EXAMPLES,
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# Tests run several workers on a 2-core machine: keep torch from oversubscribing the cores.
torch.set_num_threads(1)


def pytest_configure(config):  # type: ignore[no-untyped-def]
    """Register the ``slow`` mark (tests over ~10 s; deselect with ``-m "not slow"``)."""
    config.addinivalue_line("markers", "slow: a test that takes more than ~10 s")
