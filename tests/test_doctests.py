"""Every ``Examples:`` section of every docstring in ``src/dpfl`` runs and prints what it shows.

The examples are run by the standard-library doctest, module by module, in the module's own
namespace (as ``python -m doctest`` and ``pytest --doctest-modules`` would), so an example that
uses a name its module does not define must import it, as a reader copying it would have to.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MODULES = sorted(
    ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
    for path in (SRC / "dpfl").rglob("*.py")
    if path.name != "__main__.py"
)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _examples(module_name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(module_name)
    found = doctest.DocTestFinder(exclude_empty=True).find(module, module_name)
    # Only objects that this module defines (re-exported ones are run with their own module).
    return [t for t in found if t.examples and _defined_in(t, module_name)]


def _defined_in(test: doctest.DocTest, module_name: str) -> bool:
    return test.filename is None or Path(test.filename).resolve() == Path(
        importlib.import_module(module_name).__file__ or ""
    ).resolve()


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name: str) -> None:
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    failures = []
    for test in _examples(module_name):
        runner.run(test, out=failures.append)
    assert not failures, "".join(failures)


def test_the_examples_are_found() -> None:
    """The doctests above are not vacuous: the public modules' examples are collected, and none
    is skipped (an example that cannot run in one process is a fenced block, not a doctest)."""
    counts = {name: sum(len(t.examples) for t in _examples(name)) for name in MODULES}
    documented = [name for name, count in counts.items() if count]
    assert sum(counts.values()) >= 100, counts
    skipped = [f"{t.name}: {e.source.strip()}" for name in MODULES for t in _examples(name)
               for e in t.examples if e.options.get(doctest.SKIP)]
    assert skipped == []
    for name in ("dpfl.clip", "dpfl.noise", "dpfl.aggregate", "dpfl.optim.lamb",
                 "dpfl.accounting.accountants", "dpfl.accounting.events"):
        assert name in documented, f"{name} has no docstring example"
