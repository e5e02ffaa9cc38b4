"""A full disk and odd lock files give clear errors and leave nothing held (issue 21, point 18).

Guarantees: ``DirectoryLock.acquire`` either holds the lock or holds nothing (so the same process
can retry once the cause is fixed); a ``.lock`` that is a directory is named as such; a checkpoint
write that runs out of space raises ``CheckpointError`` naming the file and the full disk, leaves
the previous checkpoint intact and no temporary file behind.

The full disk is real: a 1 MiB tmpfs mounted for the test and filled up (needs root and
``mount``; skipped elsewhere).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dpfl.simulation._lock import LOCK_FILE, DirectoryLock
from dpfl.simulation.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs), unmounted after the test."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to make a real small filesystem")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path) -> Path:
    """Write a filler file until the filesystem refuses more; return it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass  # ENOSPC: the disk is full
    finally:
        os.close(fd)
    return filler


def test_a_lock_that_cannot_write_its_holder_line_is_released(small_disk: Path) -> None:
    ckpt = small_disk / "ckpt"
    ckpt.mkdir()
    filler = _fill(small_disk)
    lock = DirectoryLock(ckpt)
    with pytest.raises(CheckpointError, match=rf"{ckpt / LOCK_FILE}.*no space left"):
        lock.acquire()
    filler.unlink()  # space again: the same process retries and gets the lock
    with DirectoryLock(ckpt):
        assert "pid" in (ckpt / LOCK_FILE).read_text()


def test_a_lock_file_that_is_a_directory_is_named(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).mkdir()
    with pytest.raises(CheckpointError, match=rf"{tmp_path / LOCK_FILE}: is a directory"):
        DirectoryLock(tmp_path).acquire()


def test_a_checkpoint_on_a_full_disk_names_the_file_and_the_cause(small_disk: Path) -> None:
    target = small_disk / "ckpt" / "checkpoint.pt"
    save_checkpoint(target, {"round": 1, "w": torch.ones(8)})
    with pytest.raises(CheckpointError, match=rf"{target}: writing the checkpoint failed .*no space"):
        save_checkpoint(target, {"round": 2, "w": torch.zeros(2**20)})  # 4 MiB on a 1 MiB disk
    assert load_checkpoint(target)["round"] == 1  # the previous checkpoint is intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["checkpoint.pt"]  # no temporary
