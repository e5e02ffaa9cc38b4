"""The on-disk store of the compiled LAMB kernel: nothing in it runs before it is checked.

Loading a shared library runs its code (constructors first), so the cache directory that holds
the fused kernel (``_kernel``) is treated as hostile until proven otherwise:

* **The directory** is opened once with ``O_NOFOLLOW | O_DIRECTORY`` (a symbolic link as the
  last component is refused) and checked with ``fstat`` on that descriptor: owned by this
  process's effective user, not writable by group or others. Every later access is relative to
  that descriptor (``dir_fd=``), so renaming the path or flipping a symbolic link after the
  check cannot redirect a single read, write or load.
* **Each file** (the build record and the library) is opened with ``O_NOFOLLOW`` relative to the
  directory and checked with ``fstat``: a regular file, owned by this user, not writable by group
  or others.
* **The library's content** is hashed (SHA-256) from the checked descriptor and compared with the
  digest that the build recorded in a JSON record beside it (itself checked as above), so a
  library that was replaced or altered is refused.
* **The load** goes through that same descriptor (``ctypes.CDLL("/proc/self/fd/N")``): what is
  loaded is the file that was checked, whatever the path names by then. The descriptor stays
  open for the life of the process, so no later load can reuse its number (the dynamic loader
  matches libraries by path string first).

Files are written atomically (a temporary name, ``fsync``, then ``rename`` within the directory
descriptor); a library is stored under a name that carries its digest and the record is written
after it, so concurrent builders never leave a record that names another builder's library.

Every refusal raises ``KernelError``, naming the file and what to do. Linux only (it needs
``/proc/self/fd``); elsewhere the store refuses to load anything.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from dpfl._errors import DPFLError

__all__ = ["KernelError", "PrivateStore"]

#: The largest file the store reads back (a record or a library); the kernel is ~30 KB.
MAX_FILE_BYTES = 64 * 2**20

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO planted under a file's name must not block us


class KernelError(DPFLError, OSError):
    """The fused kernel cannot be built, or the cache holding it was refused (message says why).

    An ``OSError`` as before, and a [`DPFLError`][dpfl.DPFLError] like every dpfl error."""


def _check(st: os.stat_result, what: str, path: Path, *, directory: bool) -> None:
    """Refuse ``path`` unless it is of the right type, ours, and not writable by others."""
    if directory and not stat.S_ISDIR(st.st_mode):
        raise KernelError(f"{what} {path} is not a directory")
    if not directory and not stat.S_ISREG(st.st_mode):
        raise KernelError(f"{what} {path} is not a regular file; refusing to load it")
    euid = os.geteuid()
    if st.st_uid != euid:
        raise KernelError(
            f"{what} {path} is owned by uid {st.st_uid}, not by this user (uid {euid}); "
            "refusing it: another user could have written it"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KernelError(
            f"{what} {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
            "refusing it: remove it or use a private cache directory (mode 700)"
        )


class PrivateStore:
    """An open, checked cache directory; every file access goes through its descriptor.

    Args:
        path: The directory; created (mode 700, parents as needed) when missing.

    Raises:
        KernelError: If the platform lacks ``O_NOFOLLOW`` or ``/proc/self/fd``, ``path`` is a
            symbolic link or not a directory, or it is not owned by this user or is writable by
            group or others.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not (_NOFOLLOW and _DIRECTORY and hasattr(os, "geteuid")):
            raise KernelError("the fused kernel needs POSIX O_NOFOLLOW/O_DIRECTORY (Linux)")
        if not os.path.isdir("/proc/self/fd"):
            raise KernelError(
                "the fused kernel is loaded through /proc/self/fd, which this system lacks (Linux)"
            )
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
        except OSError as err:
            if self.path.is_symlink():
                raise KernelError(
                    f"kernel cache directory {self.path} is a symbolic link; refusing it (give "
                    "the real directory)"
                ) from err
            raise KernelError(f"kernel cache directory {self.path} cannot be opened: {err}") from err
        try:
            _check(os.fstat(self.fd), "kernel cache directory", self.path, directory=True)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        """Close the directory descriptor (loaded libraries keep their own)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PrivateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, name: str, what: str) -> int | None:
        """A checked read descriptor of ``name`` in the store, or None when it does not exist."""
        if "/" in name or name in ("", ".", ".."):
            raise KernelError(f"{what} name {name!r} is not a plain file name")
        try:
            fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _NONBLOCK, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise KernelError(
                f"{what} {self.path / name} cannot be opened ({err}); a symbolic link or special "
                "file there is refused: remove it"
            ) from err
        try:
            st = os.fstat(fd)
            _check(st, what, self.path / name, directory=False)
            if st.st_size > MAX_FILE_BYTES:
                raise KernelError(f"{what} {self.path / name} is too large ({st.st_size} bytes)")
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _read(fd: int) -> bytes:
        chunks: list[bytes] = []
        offset = 0
        while True:
            chunk = os.pread(fd, 1 << 20, offset)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            offset += len(chunk)
            if offset > MAX_FILE_BYTES:
                raise KernelError("a kernel cache file grew beyond its size limit while read")

    def read_json(self, name: str, what: str) -> dict[str, Any] | None:
        """The checked JSON object stored as ``name``, or None when there is no such file."""
        fd = self._open(name, what)
        if fd is None:
            return None
        try:
            data = self._read(fd)
        finally:
            os.close(fd)
        try:
            obj = json.loads(data)
        except ValueError as err:
            raise KernelError(f"{what} {self.path / name} is not valid JSON ({err})") from err
        if not isinstance(obj, dict):
            raise KernelError(f"{what} {self.path / name} is not a JSON object")
        return obj

    def write(self, name: str, data: bytes, *, mode: int) -> None:
        """Store ``data`` as ``name`` atomically (temporary file, fsync, rename in the store)."""
        tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
        try:
            fd = os.open(tmp, flags, mode, dir_fd=self.fd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as err:
            try:
                os.unlink(tmp, dir_fd=self.fd)
            except OSError:
                pass
            raise KernelError(f"writing {self.path / name} failed: {err}") from err

    def load_library(self, name: str, sha256: str) -> tuple[ctypes.CDLL, int]:
        """Load the checked library ``name`` if its SHA-256 is ``sha256``; return it and its fd.

        The returned descriptor must stay open for the life of the process (see the module
        docstring).

        Raises:
            KernelError: If the file is missing, fails a check, has another digest, or the
                dynamic loader refuses it.
        """
        fd = self._open(name, "kernel library")
        if fd is None:
            raise KernelError(
                f"kernel library {self.path / name} named by its build record is missing; "
                "delete the record (lamb_*.json) beside it to rebuild"
            )
        try:
            digest = hashlib.sha256(self._read(fd)).hexdigest()
            if not hmac.compare_digest(digest, sha256):
                raise KernelError(
                    f"kernel library {self.path / name} has SHA-256 {digest}, but its build "
                    f"recorded {sha256}: it was replaced or altered after the build; refusing "
                    "to load it (delete it and its record to rebuild)"
                )
            try:
                lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
            except OSError as err:
                raise KernelError(f"loading {self.path / name} failed: {err}") from err
        except BaseException:
            os.close(fd)
            raise
        return lib, fd
