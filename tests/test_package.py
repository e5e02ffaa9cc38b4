"""The top-level package: every advertised name resolves, and importing it stays light."""

import subprocess
import sys

import pytest

import dpfl


@pytest.mark.parametrize("name", sorted(set(dpfl.__all__) - {"__version__"}))
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(dpfl, name) is not None
    assert name in dir(dpfl)


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        dpfl.no_such_name  # noqa: B018


def test_top_level_exports_are_the_module_objects() -> None:
    from dpfl.accounting import RDPAccountant
    from dpfl.clip import PerLayerClip

    assert dpfl.PerLayerClip is PerLayerClip
    assert dpfl.RDPAccountant is RDPAccountant


def test_import_dpfl_and_accounting_do_not_load_torch() -> None:
    code = (
        "import sys, dpfl, dpfl.accounting; "
        "dpfl.RDPAccountant; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
