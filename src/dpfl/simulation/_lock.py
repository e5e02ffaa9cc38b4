"""One writer per checkpoint directory: an exclusive OS lock held for a run's lifetime.

Two processes writing one checkpoint directory would interleave their journals and overwrite
each other's checkpoints, so their ledgers would no longer describe what either released.
``DirectoryLock`` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``.lock`` inside the
directory and writes the holder's pid and host into it, so the message to a second writer names
both. The operating system drops the lock when the holder exits or dies (even by SIGKILL), so a
crashed run never leaves a stale lock behind. On platforms without ``fcntl`` the lock is a no-op.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from types import TracebackType

from dpfl.simulation.checkpoint import CheckpointError, write_failure_hint

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
        """Take the lock and write this process's pid and host into it.

        Raises:
            CheckpointError: If another process holds the lock, ``directory`` is not a
                directory, ``.lock`` is not a regular file, or the lock file cannot be opened or
                written (a full disk is named as such). On any error nothing stays held, so the
                same process can retry.
        """
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(
                f"{self.directory}: Checkpointing.dir exists and is not a directory"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_FILE
        if path.is_dir():
            raise CheckpointError(
                f"{path}: is a directory, not dpfl's lock file; remove it (a run keeps nothing "
                "in it) and retry"
            )
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as err:
            raise CheckpointError(
                f"{path}: cannot open the directory's lock file ({err}); "
                f"{write_failure_hint(err, self.directory)}"
            ) from err
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
        line = f"pid {os.getpid()} on host {socket.gethostname()}\n".encode()
        try:
            os.ftruncate(fd, 0)
            if os.pwrite(fd, line, 0) != len(line):
                raise OSError(errno.ENOSPC, "short write of the holder line")
        except OSError as err:
            self._drop(fd)  # never keep a lock this call reports as not taken
            raise CheckpointError(
                f"{path}: cannot write the lock holder line ({err}); "
                f"{write_failure_hint(err, self.directory)}"
            ) from err
        self._fd = fd

    @staticmethod
    def _drop(fd: int) -> None:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def release(self) -> None:
        """Drop the lock (a no-op when it is not held)."""
        if self._fd is not None:
            self._drop(self._fd)
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
