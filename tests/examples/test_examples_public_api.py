"""``examples/`` uses only dpfl's public API (what a user of the installed package can import)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import dpfl

ROOT = Path(__file__).resolve().parents[2]
PUBLIC_MODULES = {"dpfl"} | {f"dpfl.{name}" for name in dpfl.__all__ if name != "__version__"
                             and importlib.util.find_spec(f"dpfl.{name}") is not None}


def _dpfl_imports(path: Path) -> list[tuple[int, str, str | None]]:
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "dpfl":
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names
                      if alias.name.split(".")[0] == "dpfl"]
    return found


def test_public_modules_are_the_subpackages_dpfl_exports() -> None:
    assert {"dpfl.accounting", "dpfl.simulation", "dpfl.optim"} <= PUBLIC_MODULES
    assert not any(m.split(".")[-1].startswith("_") for m in PUBLIC_MODULES)


def test_examples_import_dpfl_only_through_public_names() -> None:
    bad = []
    files = sorted((ROOT / "examples").rglob("*.py"))
    assert len(files) > 5
    for path in files:
        for line, module, name in _dpfl_imports(path):
            where = f"{path.relative_to(ROOT)}:{line}: "
            if module not in PUBLIC_MODULES:
                bad.append(where + f"{module} is not a public module ({sorted(PUBLIC_MODULES)})")
            elif name is not None and name not in importlib.import_module(module).__all__:
                bad.append(where + f"{module}.{name} is not in {module}.__all__")
    assert not bad, "\n".join(bad)
