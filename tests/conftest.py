"""Shared pytest configuration: hypothesis profiles sized for a 2-core CI machine."""

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev",
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
