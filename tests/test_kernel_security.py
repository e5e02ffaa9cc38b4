"""The opt-in fused kernel's loader refuses every planted or swapped library (issue 21, point 5).

Guarantee: no library runs in the process unless it is the file that this user's build wrote
into a directory that only this user can write, with the SHA-256 that the build recorded, loaded
through the very descriptor that was checked. Each attack of the audit is planted for real: an
"evil" library whose constructor writes a marker file (and whose exported functions answer
wrongly), placed where the loader looks. The marker must never appear. And the default paths
(``LAMB(fused=None)``, ``DPAggregator.release``) never start a compiler at all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from dpfl.optim import LAMB, _kernel
from dpfl.optim._kernel_store import KernelError, PrivateStore
from tests.test_optim import NO_KERNEL

pytestmark = pytest.mark.skipif(NO_KERNEL is not None, reason=str(NO_KERNEL))

ROOT = Path(__file__).resolve().parents[1]

# Exports the kernel's symbols (so a load would "succeed"), each answering wrongly: the finiteness
# test says "not finite" for everything. Its constructor writes the marker named by the env var.
EVIL_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
__attribute__((constructor)) static void planted(void) {
  const char* path = getenv("DPFL_TEST_MARKER");
  if (path) { FILE* f = fopen(path, "w"); if (f) { fputs("planted code ran\n", f); fclose(f); } }
}
void dpfl_lamb_step_f32(void) {}
void dpfl_lamb_step_f64(void) {}
int dpfl_lamb_step_f32_finite(const float* x, int64_t n) { return 0; }
int dpfl_lamb_step_f64_finite(const double* x, int64_t n) { return 0; }
"""


@pytest.fixture(scope="module")
def evil_library(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of the attacker's library (compiled with the same compiler)."""
    folder = tmp_path_factory.mktemp("evil-src")
    (folder / "evil.c").write_text(EVIL_SOURCE)
    cc = _kernel._compiler()
    subprocess.run(
        [cc, "-shared", "-fPIC", str(folder / "evil.c"), "-o", str(folder / "evil.so")], check=True
    )
    return (folder / "evil.so").read_bytes()


@pytest.fixture(scope="module")
def legit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root holding one real build (copied by each test, never loaded from here)."""
    root = tmp_path_factory.mktemp("legit")
    _kernel.load(root)
    return root


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "MARKER"
    monkeypatch.setenv("DPFL_TEST_MARKER", str(path))
    _kernel.reset()
    yield path
    _kernel.reset()


def _copy_store(legit: Path, dest: Path) -> tuple[Path, dict[str, object]]:
    """Copy the legit cache root to ``dest``; return its kernels dir and the build record."""
    shutil.copytree(legit, dest)
    kernels = dest / "kernels"
    (record_path,) = kernels.glob("lamb_*_openmp.json")
    return kernels, json.loads(record_path.read_text())


def _plant(path: Path, data: bytes, mode: int = 0o700) -> None:
    path.write_bytes(data)
    path.chmod(mode)


def test_a_library_replaced_under_its_recorded_name_is_refused(legit, evil_library, marker, tmp_path):
    kernels, record = _copy_store(legit, tmp_path / "cache")
    _plant(kernels / str(record["library"]), evil_library)
    with pytest.raises(KernelError, match=r"SHA-256 .* recorded .*refusing to load it"):
        _kernel.load(tmp_path / "cache")
    assert not marker.exists()


def test_a_library_planted_before_the_first_build_never_runs(legit, evil_library, marker, tmp_path):
    """The audit's attack on an empty cache: the attacker plants a library under the name the
    build will use (its digest is predictable) and under the old loader's name; the build
    replaces the first, ignores the second, and loads only what it built and hashed."""
    _, record = _copy_store(legit, tmp_path / "reference")
    kernels = tmp_path / "cache" / "kernels"
    kernels.mkdir(parents=True, mode=0o700)
    _plant(kernels / str(record["library"]), evil_library)
    _plant(kernels / f"lamb_{record['key']}.so", evil_library)
    kernel = _kernel.load(tmp_path / "cache")
    assert kernel.all_finite(torch.ones(3)) and not marker.exists()


@pytest.mark.parametrize("which", ["library", "record", "directory"])
def test_a_store_writable_by_other_users_is_refused(legit, marker, tmp_path, which):
    kernels, record = _copy_store(legit, tmp_path / "cache")
    target = {
        "library": kernels / str(record["library"]),
        "record": kernels / f"lamb_{record['key']}_openmp.json",
        "directory": kernels,
    }[which]
    target.chmod(0o777 if which == "directory" else 0o666)
    with pytest.raises(KernelError, match="writable by other users"):
        _kernel.load(tmp_path / "cache")
    assert not marker.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another uid")
@pytest.mark.parametrize("which", ["library", "record", "directory"])
def test_a_store_owned_by_another_user_is_refused(legit, marker, tmp_path, which):
    kernels, record = _copy_store(legit, tmp_path / "cache")
    target = {
        "library": kernels / str(record["library"]),
        "record": kernels / f"lamb_{record['key']}_openmp.json",
        "directory": kernels,
    }[which]
    os.chown(target, 65534, 65534)
    with pytest.raises(KernelError, match="owned by uid 65534"):
        _kernel.load(tmp_path / "cache")


def test_a_record_naming_another_file_is_refused(legit, evil_library, marker, tmp_path):
    """A record (ours, mode 600) that names a planted library with that library's true digest
    still fails: a library's name must carry its own digest, and a path is never followed."""
    kernels, record = _copy_store(legit, tmp_path / "cache")
    _plant(kernels / "evil.so", evil_library)
    record_path = kernels / f"lamb_{record['key']}_openmp.json"
    for library in ("evil.so", "../evil.so", str(tmp_path / "evil.so")):
        record_path.write_text(json.dumps({**record, "library": library}))
        with pytest.raises(KernelError, match="not a valid record"):
            _kernel.load(tmp_path / "cache")
    assert not marker.exists()


def test_a_symlink_as_the_cache_directory_is_refused(legit, evil_library, marker, tmp_path):
    """The attacker points the cache path at a store of their own making (their library with a
    matching record): the last component is a symbolic link, so it is never opened."""
    evil, record = _copy_store(legit, tmp_path / "evil")
    lib = evil / str(record["library"])
    _plant(lib, evil_library)
    import hashlib

    digest = hashlib.sha256(evil_library).hexdigest()
    name = f"lamb_{record['key']}_openmp.{digest[:16]}.so"
    lib.rename(evil / name)
    (evil / f"lamb_{record['key']}_openmp.json").write_text(
        json.dumps({**record, "library": name, "sha256": digest})
    )
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "kernels").symlink_to(evil, target_is_directory=True)
    with pytest.raises(KernelError, match="symbolic link"):
        _kernel.load(tmp_path / "cache")
    assert not marker.exists()


def _evil_store(legit: Path, evil_library: bytes, dest: Path) -> Path:
    """A cache root whose store is valid in every respect but holds the attacker's library."""
    import hashlib

    kernels, record = _copy_store(legit, dest)
    (kernels / str(record["library"])).unlink()
    digest = hashlib.sha256(evil_library).hexdigest()
    name = f"lamb_{record['key']}_openmp.{digest[:16]}.so"
    _plant(kernels / name, evil_library)
    (kernels / f"lamb_{record['key']}_openmp.json").write_text(
        json.dumps({**record, "library": name, "sha256": digest})
    )
    return dest


def test_a_directory_swapped_after_its_check_cannot_change_what_loads(
    legit, evil_library, marker, tmp_path
):
    """Between the directory check and the load, the attacker moves the checked directory away
    and puts a link to their own store in its place: every access goes through the checked
    descriptor, so the legitimate library is loaded."""
    shutil.copytree(legit, tmp_path / "cache")
    evil = _evil_store(legit, evil_library, tmp_path / "evil")
    kernels = tmp_path / "cache" / "kernels"
    with PrivateStore(kernels) as store:  # checked here...
        kernels.rename(tmp_path / "moved")
        kernels.symlink_to(evil / "kernels", target_is_directory=True)  # ...swapped here
        kernel = _kernel._load_from(store)  # ...loaded here
    assert kernel.all_finite(torch.ones(3))  # the evil library would answer False
    assert not marker.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the attacker's store a uid")
def test_a_parent_link_flipped_during_loads_never_runs_the_attackers_library(
    legit, evil_library, marker, tmp_path
):
    """The audit's race: a link on the path flips between the user's cache and the attacker's
    (owned by another uid) while the user loads the kernel again and again. Each load either
    gets the legitimate kernel or is refused; the attacker's code never runs."""
    good = tmp_path / "good"
    shutil.copytree(legit, good)
    evil = _evil_store(legit, evil_library, tmp_path / "attacker")
    for path in [evil, *evil.rglob("*")]:
        os.chown(path, 65534, 65534, follow_symlinks=False)
    link = tmp_path / "link"
    link.symlink_to(good)
    stop = threading.Event()

    def flip() -> None:
        targets = (evil, good)
        i = 0
        while not stop.is_set():
            tmp = tmp_path / f"link.{i % 2}"
            tmp.symlink_to(targets[i % 2])
            os.replace(tmp, link)
            i += 1

    flipper = threading.Thread(target=flip)
    flipper.start()
    loaded = refused = 0
    try:
        for _ in range(200):
            _kernel.reset()
            try:
                kernel = _kernel.load(link)
            except KernelError as err:
                assert "owned by uid 65534" in str(err), err
                refused += 1
            else:
                assert kernel.all_finite(torch.ones(3))
                loaded += 1
    finally:
        stop.set()
        flipper.join()
    assert not marker.exists()
    assert loaded + refused == 200


def test_the_default_paths_never_start_a_compiler(tmp_path, monkeypatch):
    """``LAMB`` without ``fused=True`` and ``DPAggregator.release`` run no compiler and create no
    kernel cache, and importing the aggregator imports nothing of ``dpfl.optim``."""
    ran = tmp_path / "compiler-ran"
    spy = tmp_path / "cc"
    spy.write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    spy.chmod(0o755)
    monkeypatch.setenv("CC", str(spy))
    monkeypatch.setenv("DPFL_CACHE", str(tmp_path / "cache"))
    _kernel.reset()
    try:
        from dpfl.aggregate import DPAggregator
        from dpfl.clip import GlobalClip
        from dpfl.noise import GaussianMechanism

        p = torch.zeros(4, requires_grad=True)
        opt = LAMB([p], lr=0.1)
        p.grad = torch.ones(4)
        opt.step()
        agg = DPAggregator(GlobalClip(1.0), GaussianMechanism(1.0, 1.0, seed=0),
                           expected_cohort_size=1)  # fmt: skip
        agg.add({"w": torch.ones(3)})
        agg.release()
    finally:
        _kernel.reset()
    assert not ran.exists() and not (tmp_path / "cache").exists()
    code = "import sys, dpfl.aggregate; print(sorted(m for m in sys.modules if 'optim' in m))"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout  # fmt: skip
    assert "dpfl.optim" not in out, out
