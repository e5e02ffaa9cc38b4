"""The API reference cannot rot: what mkdocstrings renders is complete and links.

Checked on the objects the reference renders (each public module, every name in its ``__all__``
and their public members), read by griffe as mkdocstrings reads them:

* every one has a docstring, public constants included;
* every parameter of a public function, method or class constructor is named in its docstring
  (``Args:``; a dataclass field may be named under ``Attributes:`` instead);
* no docstring in ``src/dpfl`` uses a Sphinx role (``:class:`X```): mkdocstrings shows those as
  raw text; write a cross-reference ``[`X`][dpfl.module.X]`` instead (``mkdocs build --strict``
  fails if its target does not exist);
* no rendered docstring names a private module (``dpfl.x._y``) or a repository path as plain
  text: the reader of the site or of ``help()`` cannot open either;
* ``docs/api/dpfl.md`` lists every top-level name in a summary table.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_docs import PUBLIC_MODULES  # one list of the public modules

griffe = pytest.importorskip("griffe")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const|ref|term):`")
# A private module: dotted (``dpfl.optim._kernel``), a file name, or the bare name of one of
# dpfl's private modules (``_clip_kernels``).
_PRIVATE_NAMES = sorted(
    {p.stem for p in (SRC / "dpfl").rglob("_*.py") if p.stem != "__init__" and p.stem != "__main__"}
)
PRIVATE_MODULE = re.compile(
    r"\bdpfl(?:\.[A-Za-z]\w*)*\._[a-z]\w*|\b_[a-z]\w*\.py\b|(?<![\w.])(?:"
    + "|".join(map(re.escape, _PRIVATE_NAMES))
    + r")\b"
)
# A repository path outside a link target: "benchmarks/x.py" but not "](https://.../benchmarks/x.py)".
REPO_PATH = re.compile(r"(?<![\w/.:-])(?:src|tests|benchmarks|examples|docs)/[\w./-]*\w")
_SKIP_PARAMS = {"self", "cls"}


def _load() -> griffe.Module:
    return griffe.load(
        "dpfl",
        search_paths=[str(SRC)],
        docstring_parser="google",
        resolve_aliases=True,
        resolve_external=False,
    )


PACKAGE = _load()


def _module(path: str) -> griffe.Module:
    return PACKAGE if path == "dpfl" else PACKAGE[path.split(".", 1)[1]]


def _rendered() -> Iterator[tuple[str, griffe.Object]]:
    """(public path, object) for everything the API pages render, each object once."""
    seen: set[str] = set()

    def walk(path: str, obj: griffe.Object) -> Iterator[tuple[str, griffe.Object]]:
        if obj.canonical_path in seen:
            return
        seen.add(obj.canonical_path)
        yield path, obj
        if obj.is_class:
            for name, member in obj.members.items():
                if not name.startswith("_") and not member.is_alias:
                    yield from walk(f"{path}.{name}", member)

    # Submodules first: an object re-exported by ``dpfl`` is reported under its own page's path.
    for module_path in [*PUBLIC_MODULES[1:], PUBLIC_MODULES[0]]:
        module = _module(module_path)
        yield module_path, module
        for name in module.exports or []:
            if name == "__version__":
                continue
            member = module[name]
            target = member.final_target if member.is_alias else member
            if target.is_module:
                continue
            yield from walk(f"{module_path}.{name}", target)


RENDERED = list(_rendered())


def _documented_names(obj: griffe.Object) -> set[str]:
    names: set[str] = set()
    if obj.docstring is None:
        return names
    for section in obj.docstring.parsed:
        kind = section.kind.value
        if kind in ("parameters", "other parameters", "attributes"):
            names.update(item.name.lstrip("*") for item in section.value)
    return names


def _parameters(obj: griffe.Object) -> list[str]:
    if obj.is_function:
        params = obj.parameters
    elif obj.is_class and "__init__" in obj.all_members:
        params = obj.all_members["__init__"].parameters
    else:
        return []
    return [p.name for p in params if p.name not in _SKIP_PARAMS]


def _undocumented_parameters(path: str, obj: griffe.Object) -> list[str]:
    if obj.is_class:
        init = obj.members.get("__init__")
        if init is None and not _is_dataclass(obj):
            return []  # inherits its constructor (an exception class, a Protocol)
        documented = _documented_names(obj) | (_documented_names(init) if init else set())
    elif obj.is_function:
        documented = _documented_names(obj)
    else:
        return []
    return [f"{path}({name})" for name in _parameters(obj) if name not in documented]


def _is_dataclass(obj: griffe.Object) -> bool:
    return any(str(d.value).split("(")[0].endswith("dataclass") for d in obj.decorators)


def _has_docstring(obj: griffe.Object) -> bool:
    if obj.docstring is not None and obj.docstring.value.strip():
        return True
    # A class attribute (a dataclass field, an instance attribute) may be documented by its
    # class, under ``Attributes:`` (or ``Args:`` for a dataclass field).
    parent = obj.parent
    return bool(obj.is_attribute and parent is not None and parent.is_class
                and obj.name in _documented_names(parent))


def test_every_rendered_object_has_a_docstring() -> None:
    missing = [path for path, obj in RENDERED if not _has_docstring(obj)]
    assert missing == []


def test_every_parameter_of_a_public_callable_is_documented() -> None:
    missing = [name for path, obj in RENDERED for name in _undocumented_parameters(path, obj)]
    assert missing == []


def test_no_docstring_uses_a_sphinx_role() -> None:
    found = []
    for file in sorted((SRC / "dpfl").rglob("*.py")):
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if ROLE.search(line):
                found.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []


def test_rendered_docstrings_name_no_private_module_or_repository_path() -> None:
    found = []
    for path, obj in RENDERED:
        text = obj.docstring.value if obj.docstring else ""
        text = re.sub(r"\]\[[^\]]*\]", "]", text)  # cross-reference targets are not shown
        text = re.sub(r"\]\(https?://[^)]*\)", "]", text)  # nor are link targets
        for pattern in (PRIVATE_MODULE, REPO_PATH):
            found += [f"{path}: {m.group(0)}" for m in pattern.finditer(text)]
    assert found == []


def test_the_top_level_page_has_a_summary_table_of_every_name() -> None:
    import dpfl

    page = (ROOT / "docs" / "api" / "dpfl.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| \[`(\w+)`\]\[([\w.]+)\] \|", page, re.MULTILINE))
    assert sorted(rows) == sorted(set(dpfl.__all__) - {"__version__"})
    for name, target in rows.items():
        assert target.rsplit(".", 1)[-1] == name, f"{name} links to {target}"


def test_the_checks_catch_what_they_claim(tmp_path: Path) -> None:
    """Each check flags a planted fault (so an empty list above means something)."""
    package = tmp_path / "probe"
    package.mkdir()
    (package / "__init__.py").write_text(
        '"""Probe."""\n__all__ = ["f", "C"]\n\n\n'
        "def f(a, b):\n"
        '    """Uses :class:`C` and dpfl.optim._kernel, see benchmarks/x.py.\n\n'
        "    Args:\n        a: documented.\n    \"\"\"\n\n\n"
        "class C:\n"
        '    """A class.\n\n    Args:\n        x: documented.\n    """\n\n'
        "    def __init__(self, x, y):\n        pass\n"
    )
    probe = griffe.load("probe", search_paths=[str(tmp_path)], docstring_parser="google")
    assert _undocumented_parameters("probe.f", probe["f"]) == ["probe.f(b)"]
    assert _undocumented_parameters("probe.C", probe["C"]) == ["probe.C(y)"]
    text = probe["f"].docstring.value
    assert ROLE.search(text) and PRIVATE_MODULE.search(text) and REPO_PATH.search(text)
    assert not REPO_PATH.search("[x](https://github.com/dpfl-dev/dpfl/blob/main/benchmarks/x.py)")
