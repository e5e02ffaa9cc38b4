"""What a release stands on: a version that is not 0.1.0 and is reported by the package, the CLI
and ``python -m dpfl`` alike; complete package metadata; links that work off the repository
(README on the package index, the site under a sub-path); a site that works offline.

Guarantee: a user holding a wheel can tell which noise and clipping code they have (the version
policy in CHANGELOG.md ties every privacy-relevant change to a new minor version).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

import dpfl
from dpfl.cli import main

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
REPO_URL = PYPROJECT["project"].get("urls", {}).get("Repository", "https://github.com/")
# PEP 440 public version: N.N.N with optional pre/dev suffix.
_VERSION = re.compile(r"^\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?$")


def test_version_is_past_the_release_whose_noise_is_not_covered() -> None:
    """0.1.0's noise was truncated at 5.77σ (CHANGELOG, Privacy): the code with the new sampler
    must not carry that version."""
    assert _VERSION.match(dpfl.__version__), dpfl.__version__
    assert tuple(int(x) for x in dpfl.__version__.split(".")[:2]) >= (0, 2)


def test_version_has_one_source_and_a_changelog_entry() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dpfl.__version__"}
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"`{dpfl.__version__}`" in changelog, "CHANGELOG must say which version [Unreleased] is"


def test_version_policy_makes_privacy_changes_a_minor_bump() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    policy = changelog.split("## Version policy", 1)[1].split("\n## ", 1)[0]
    assert "Semantic Versioning" in policy
    assert "at least a minor" in policy and "**Privacy**" in policy


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dpfl {dpfl.__version__}"


def test_python_dash_m_dpfl_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dpfl", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dpfl {dpfl.__version__}"
    bad = subprocess.run(
        [sys.executable, "-m", "dpfl", "privacy", "epsilon"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--noise-multiplier" in bad.stderr


def test_metadata_is_complete() -> None:
    project = PYPROJECT["project"]
    assert set(project["urls"]) >= {"Homepage", "Documentation", "Repository", "Issues", "Changelog"}
    assert all(url.startswith("https://") for url in project["urls"].values())
    classifiers = project["classifiers"]
    assert any(c.startswith("Development Status :: ") for c in classifiers)
    assert "Programming Language :: Python :: 3 :: Only" in classifiers
    low = int(project["requires-python"].removeprefix(">=3."))
    versions = {int(c.rsplit(".", 1)[1]) for c in classifiers
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert min(versions) == low, "the oldest classifier must be requires-python's"
    assert project["keywords"]


def test_site_config_names_the_repository_and_site_url() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
    assert config["repo_url"] == REPO_URL
    assert config["site_url"] == PYPROJECT["project"]["urls"]["Documentation"]


def test_readme_links_and_images_are_absolute() -> None:
    """README is the package index's project page: relative links and images are broken there."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    targets += re.findall(r"""(?:src|href)=["']([^"']+)""", readme)
    relative = [t for t in targets if not re.match(r"https?://|#", t)]
    assert relative == []
    for target in targets:
        if REPO_URL.split("://")[1].split("/")[0] in target:  # repository links: same repository
            assert target.startswith(REPO_URL + "/") or target == REPO_URL, target


def test_site_loads_no_script_from_a_cdn() -> None:
    """MathJax is served with the site (docs/javascripts/vendor), so formulas render offline."""
    yaml = pytest.importorskip("yaml")
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
    scripts = config["extra_javascript"]
    assert not [s for s in scripts if re.match(r"https?://", s)]
    mathjax = [s for s in scripts if "tex-" in s and s.endswith(".js")]
    assert mathjax and all((ROOT / "docs" / s).is_file() for s in mathjax)


def test_site_dir_is_ignored_by_git() -> None:
    lines = (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    assert "site/" in lines or "/site/" in lines


def _source_copy(dest: Path) -> Path:
    """The files a fresh clone has (tracked ones; everything but build output without git)."""
    import shutil

    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout:
        for name in listed.stdout.splitlines():
            if (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
    else:  # an unpacked sdist
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".venv", "site", "build", "dist", "*.egg-info", "__pycache__", "runs", "cache"))
    return dest


def test_the_sdist_carries_what_its_tests_need(tmp_path: Path) -> None:
    """Built from a copy of the tree (nothing is written into the checkout), the sdist holds the
    test suite's conftest files, helper scripts, example tests, the examples and benchmark
    scripts they run and the docs they read; not the benchmark results."""
    import tarfile

    pytest.importorskip("build")
    src = _source_copy(tmp_path / "src")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check",
         "--outdir", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    assert sdist.name == f"dpfl-{dpfl.__version__}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {
        "tests/conftest.py", "tests/_scripts/tiny_fl.py", "tests/examples/conftest.py",
        "tests/test_docs.py", "examples/asr_librispeech.py", "examples/quickstart.py",
        "benchmarks/accounting.py", "docs/index.md", "docs/tutorials/scale.md", "mkdocs.yml",
        "CHANGELOG.md", "src/dpfl/__init__.py", "src/dpfl/py.typed",
    }
    assert needed - names == set()
    assert not [n for n in names if n.startswith("benchmarks/results/") or "__pycache__" in n]
