"""The documentation cannot rot: public names are documented, API pages exist, snippets run.

* Every name in the ``__all__`` of a public module that is a class or a function has a docstring,
  and so do the public methods and properties that dpfl itself defines on public classes.
* Every public module has an API reference page (``docs/api/<module>.md``) rendered by
  mkdocstrings from those docstrings.
* Every ```python block of the home page, the tutorials and the migration guide runs, in page order, in one
  namespace per page (inside a temporary directory); every ``$ dpfl ...`` line of a ```console
  block runs through the CLI with exit code 0, and the output lines shown under it must appear in
  what it prints. A block with a ``title="file.py"`` is a file of the page, not a snippet: its
  own test runs it (``tests/test_docs_torchrun.py`` for the torchrun tutorial's ``train.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PUBLIC_MODULES = [
    "dpfl",
    "dpfl.clip",
    "dpfl.adaptive_clip",
    "dpfl.noise",
    "dpfl.aggregate",
    "dpfl.query",
    "dpfl.optim",
    "dpfl.accounting",
    "dpfl.simulation",
    "dpfl.audit",
    "dpfl.cli",
]
RUNNABLE_PAGES = [
    DOCS / "index.md",
    *sorted((DOCS / "tutorials").glob("*.md")),
    DOCS / "migration.md",
]
_FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _undocumented(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not (obj.__doc__ or "").strip():
            missing.append(f"{module_name}.{name}")
        if not inspect.isclass(obj):
            continue
        for attr, member in vars(obj).items():
            if attr.startswith("_") or not (obj.__module__ or "").startswith("dpfl"):
                continue
            target = member.fget if isinstance(member, property) else member
            if isinstance(target, (staticmethod, classmethod)):
                target = target.__func__
            if inspect.isfunction(target) and not (target.__doc__ or "").strip():
                missing.append(f"{module_name}.{name}.{attr}")
    return missing


def test_every_public_module_is_listed() -> None:
    """A new top-level module or package of ``src/dpfl`` (no leading underscore) is public: it
    must join ``PUBLIC_MODULES`` and so get an API page and the docstring check."""
    found = {"dpfl"} | {
        f"dpfl.{p.stem if p.is_file() else p.name}"
        for p in (ROOT / "src" / "dpfl").iterdir()
        if not p.name.startswith("_")
        and ((p.is_file() and p.suffix == ".py") or (p / "__init__.py").is_file())
    }
    assert sorted(found - set(PUBLIC_MODULES)) == []
    assert sorted(set(PUBLIC_MODULES) - found) == []


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_has_a_docstring(module_name: str) -> None:
    assert _undocumented(module_name) == []


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_module_has_an_api_page(module_name: str) -> None:
    short = "dpfl" if module_name == "dpfl" else module_name.split(".", 1)[1]
    page = DOCS / "api" / f"{short}.md"
    assert page.is_file(), f"no API page {page.relative_to(ROOT)} for {module_name}"
    assert f"::: {module_name}" in page.read_text(encoding="utf-8")


def _blocks(page: Path) -> list[tuple[str, str]]:
    return [
        (m.group(1), m.group(3))
        for m in _FENCE.finditer(page.read_text(encoding="utf-8"))
        if "title=" not in m.group(2)
    ]


def page_file(page: Path, name: str) -> str:
    """The text of the block of ``page`` titled ``name`` (```python title="name")."""
    for m in _FENCE.finditer(page.read_text(encoding="utf-8")):
        if re.search(rf'title="{re.escape(name)}"', m.group(2)):
            return m.group(3)
    raise AssertionError(f"{page.name} has no block titled {name!r}")


def _run_console(block: str) -> None:
    from dpfl.cli import main

    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.startswith("$ dpfl "):
            continue
        shown = []
        while i < len(lines) and not lines[i].startswith("$ "):
            shown.append(lines[i].strip())
            i += 1
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(shlex.split(line[len("$ dpfl ") :]))
        assert code in (0, None), f"{line!r} exited with {code}"
        printed = out.getvalue()
        for expected in filter(None, shown):
            assert expected in printed, f"{line!r}: shown line {expected!r} not in output"


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=lambda p: p.name)
def test_documentation_snippets_run(page: Path, tmp_path: Path) -> None:
    """The page's snippets run in a folder outside the repository, and run again in the same
    folder (a reader re-runs a tutorial after a change; leftovers must not break it)."""
    blocks = _blocks(page)
    assert any(lang == "python" for lang, _ in blocks), f"{page.name} has no python snippet"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for _ in range(2):
            namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
            for lang, code in blocks:
                if lang == "python":
                    exec(compile(code, f"{page.name}", "exec"), namespace)  # noqa: S102
                elif lang == "console":
                    _run_console(code)
    finally:
        os.chdir(cwd)


def test_the_docstring_check_flags_an_undocumented_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    module = types.ModuleType("dpfl._undocumented_probe")

    def documented() -> None:
        """Has a docstring."""

    def bare() -> None:
        pass

    class Public:
        """Documented class with an undocumented public method."""

        def method(self) -> None:
            pass

    Public.__module__ = module.__name__
    module.documented, module.bare, module.Public = documented, bare, Public  # type: ignore[attr-defined]
    module.__all__ = ["documented", "bare", "Public"]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    assert _undocumented(module.__name__) == [
        "dpfl._undocumented_probe.bare",
        "dpfl._undocumented_probe.Public.method",
    ]


@pytest.mark.parametrize("page", ["privacy.md", "audit.md"])
def test_math_is_rendered_by_the_site_configuration(page: str) -> None:
    """The formulas of the privacy contract and the audit page go through the site's Markdown
    extensions (arithmatex) to MathJax: display math becomes an ``arithmatex`` block."""
    markdown = pytest.importorskip("markdown")
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    names, options = [], {}
    for entry in config["markdown_extensions"]:
        name, opts = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        names.append(name)
        if opts:
            options[name] = opts
    assert any("mathjax" in js for js in config["extra_javascript"])
    html = markdown.markdown(
        (DOCS / page).read_text(encoding="utf-8"), extensions=names, extension_configs=options
    )
    assert '<div class="arithmatex">' in html, f"{page} has no rendered display math"


def test_own_data_says_clearly_that_it_needs_a_checkout(tmp_path: Path) -> None:
    """Copied out of the repository (only the installed package importable), the own-data
    tutorial stops with a message naming what is missing, not a bare ModuleNotFoundError."""
    import subprocess
    import sys

    pytest.importorskip("soundfile")
    script = "\n".join(code for lang, code in _blocks(DOCS / "tutorials" / "own_data.md")
                       if lang == "python")
    (tmp_path / "own_data.py").write_text(script, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}  # the package, not the checkout
    done = subprocess.run([sys.executable, "own_data.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "needs a dpfl checkout" in done.stderr and "PYTHONPATH" in done.stderr
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])  # with the checkout
    again = subprocess.run([sys.executable, "own_data.py"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 users" in again.stdout
