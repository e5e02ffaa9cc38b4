"""One writer per checkpoint directory: an exclusive OS lock held for a run's lifetime.

Two processes writing one checkpoint directory would interleave their journals and overwrite
each other's checkpoints, so their ledgers would no longer describe what either released.
``DirectoryLock`` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``.lock`` inside the
directory and writes the holder's pid and host into it, so the message to a second writer names
both. The operating system drops the lock when the holder exits or dies (even by SIGKILL), so a
crashed run never leaves a stale lock behind. On platforms without ``fcntl`` the lock is a no-op.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import TracebackType

from dpfl.simulation.checkpoint import CheckpointError

try:  # pragma: no cover - platform dependent
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "DirectoryLock"]

#: Name of the lock file inside ``Checkpointing.dir``.
LOCK_FILE = ".lock"


class DirectoryLock:
    """Exclusive, non-blocking lock on ``directory`` (created if needed); a context manager.

    Raises:
        CheckpointError: If another process holds the lock (names the directory, pid and host),
            or ``directory`` exists and is not a directory.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._fd: int | None = None

    def acquire(self) -> None:
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(
                f"{self.directory}: Checkpointing.dir exists and is not a directory"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CheckpointError(
                    f"{self.directory}: another run is writing this checkpoint directory "
                    f"(lock held by {holder}); wait for it to finish or stop it, or use another "
                    "directory"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
