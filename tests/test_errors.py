"""One base for every dpfl exception: ``except dpfl.DPFLError`` catches whatever dpfl raises on
purpose, while each error keeps the built-in base it always had (``except ValueError`` code keeps
working). Every error class is exported from the top level.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import dpfl
from dpfl.accounting import PrivacyBudget, RDPAccountant

# name -> the built-in it subclassed before DPFLError existed (must not change).
BUILTIN_BASE = {
    "BudgetExceededError": RuntimeError,
    "CheckpointError": ValueError,
    "DistributedError": RuntimeError,
    "NonFiniteGradientError": ValueError,
    "NonFiniteLossError": ValueError,
    "NonFiniteUpdateError": ValueError,
    "PLDTooLargeError": ValueError,
    "ReleaseEventError": RuntimeError,
    "VectorizationError": RuntimeError,
}
PUBLIC_MODULES = ["dpfl.clip", "dpfl.adaptive_clip", "dpfl.noise", "dpfl.aggregate", "dpfl.optim",
                  "dpfl.accounting", "dpfl.simulation", "dpfl.audit", "dpfl.query"]


def _public_exceptions() -> dict[str, type[BaseException]]:
    import importlib

    found: dict[str, type[BaseException]] = {}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) and issubclass(obj, Exception) and not issubclass(obj, Warning):
                found[name] = obj
    return found


def test_every_public_exception_is_a_dpfl_error_and_keeps_its_builtin_base() -> None:
    found = _public_exceptions()
    assert set(found) == set(BUILTIN_BASE), "a new public exception: add it to BUILTIN_BASE"
    for name, cls in found.items():
        assert issubclass(cls, dpfl.DPFLError), name
        assert issubclass(cls, BUILTIN_BASE[name]), name


@pytest.mark.parametrize("name", sorted(BUILTIN_BASE))
def test_every_exception_is_exported_from_the_top_level(name: str) -> None:
    assert name in dpfl.__all__
    assert getattr(dpfl, name) is _public_exceptions()[name]


def test_dpfl_error_catches_a_real_budget_refusal() -> None:
    accountant = RDPAccountant(budget=PrivacyBudget(epsilon=1.0, delta=1e-5))
    with pytest.raises(dpfl.DPFLError) as info:
        accountant.add_rounds(dpfl.PoissonRound(noise_multiplier=0.5, sample_rate=0.5), 1000)
    assert isinstance(info.value, RuntimeError)
    assert accountant.rounds == 0


def test_dpfl_error_catches_a_real_non_finite_update() -> None:
    import torch

    with pytest.raises(dpfl.DPFLError) as info:
        dpfl.GlobalClip(1.0).clip({"w": torch.tensor([1.0, float("nan")])})
    assert isinstance(info.value, ValueError) and info.value.tensor == "w"


def test_the_error_base_keeps_import_dpfl_torch_free() -> None:
    code = "import sys, dpfl; dpfl.DPFLError; dpfl.BudgetExceededError; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_kernel_error_is_a_dpfl_error_and_an_os_error(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The opt-in fused kernel's errors (a missing compiler, a refused cache) are caught by
    ``except DPFLError`` like every other dpfl error, and by ``except OSError`` as before."""
    from dpfl import DPFLError
    from dpfl.optim import _kernel

    monkeypatch.setenv("CC", "/nonexistent/dpfl-test-cc")
    for caught in (DPFLError, OSError):
        with pytest.raises(caught, match=r"\$CC"):
            _kernel._compiler()
