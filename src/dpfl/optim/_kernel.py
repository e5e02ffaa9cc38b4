"""A small C kernel for the fused LAMB step, built once per machine with the system C compiler.

LAMB needs the norm of each tensor's Adam direction ``r_h`` *before* it can update ``θ_h``, and no
eager torch operation computes ``‖m̂/(√v̂+eps) + λθ‖`` without materializing the direction. The fused
path therefore makes one read-only pass per tensor with this kernel (new moments computed in
registers, never stored; ``Σr²`` and ``Σθ²`` accumulated in float64), checks the norms, and then
applies torch's own fused AdamW kernel with the per-tensor learning rate ``lr·φ_h``.

The C source is about 40 lines, compiled with ``$CC`` (else ``cc``/``gcc``/``clang``) into a
per-user cache directory (``$DPFL_KERNEL_DIR``, else ``$XDG_CACHE_HOME/dpfl`` or ``~/.cache/dpfl``)
keyed by a hash of the source, flags and compiler, and loaded with :mod:`ctypes`. It links the
OpenMP runtime that torch has already loaded, so it uses torch's threads. Where no compiler is found
or the build fails, :func:`load` returns None and :func:`unavailable_reason` says why; callers fall
back to the ``foreach`` path (or raise for an explicit ``fused=True``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["Kernel", "load", "unavailable_reason"]

# s[0..8] = beta1, 1-beta1, beta2, 1-beta2, 1/(1-beta1^t), 1/sqrt(1-beta2^t), eps, wd, sign.
# The moments are updated in the tensor's own precision, in the same order as torch's fused Adam
# kernel; only the squares are accumulated in double. No -ffast-math: NaN/inf must propagate.
_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#define LAMB_SUMS(T, NAME, SQRT)                                                          \
void NAME(const T* p, const T* g, const T* m, const T* v, int64_t n, const double* s,    \
          double* out) {                                                                 \
  const T b1 = (T)s[0], c1 = (T)s[1], b2 = (T)s[2], c2 = (T)s[3];                        \
  const T ib1 = (T)s[4], ib2 = (T)s[5], eps = (T)s[6], wd = (T)s[7], sg = (T)s[8];        \
  double sr = 0.0, sp = 0.0;                                                             \
  _Pragma("omp parallel for simd reduction(+:sr,sp) schedule(static) if(n >= 65536)")   \
  for (int64_t i = 0; i < n; i++) {                                                      \
    T gi = g[i] * sg;                                                                    \
    T mi = m[i] * b1 + gi * c1;                                                          \
    T vi = v[i] * b2 + gi * gi * c2;                                                     \
    T ri = (mi * ib1) / (SQRT(vi) * ib2 + eps) + wd * p[i];                              \
    double rd = (double)ri, pd = (double)p[i];                                           \
    sr += rd * rd;                                                                       \
    sp += pd * pd;                                                                       \
  }                                                                                      \
  out[0] = sr;                                                                           \
  out[1] = sp;                                                                           \
}
LAMB_SUMS(float, dpfl_lamb_sums_f32, sqrtf)
LAMB_SUMS(double, dpfl_lamb_sums_f64, sqrt)
"""

_VERSION = "1"


class Kernel:
    """The loaded kernel: per-tensor ``(Σr², Σθ²)`` for float32 and float64 tensors."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._fns: dict[torch.dtype, Any] = {}
        names = ((torch.float32, "dpfl_lamb_sums_f32"), (torch.float64, "dpfl_lamb_sums_f64"))
        for dtype, name in names:
            fn = getattr(lib, name)
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_void_p] * 2
            self._fns[dtype] = fn

    def lamb_sums(
        self, p: Tensor, g: Tensor, m: Tensor, v: Tensor, scalars: Tensor, out: Tensor
    ) -> None:
        """Write ``(Σr², Σθ²)`` of one contiguous CPU tensor into the 2 float64s of ``out``.

        ``p, g, m, v`` must be contiguous, on CPU, of one dtype (float32 or float64) and size;
        ``scalars`` is a contiguous float64 row of 9 values (see ``_SOURCE``). Nothing is written
        except ``out``.
        """
        self._fns[p.dtype](
            p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel(),
            scalars.data_ptr(), out.data_ptr(),
        )  # fmt: skip


SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _isa_flags() -> list[str]:
    """Vector ISA flags for what torch detected on this CPU (never more than it found)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith("AVX512"):
        return ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma"]
    if cap.startswith("AVX2"):
        return ["-mavx2", "-mfma"]
    return []


def _cache_dir() -> Path:
    if os.environ.get("DPFL_KERNEL_DIR"):
        return Path(os.environ["DPFL_KERNEL_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dpfl" / "kernels"


def _private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) and refuse it unless this user owns it and others can't write."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise OSError(f"kernel cache directory {path} is owned by another user")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(f"kernel cache directory {path} is writable by other users")
    return path


def _compiler() -> str:
    explicit = os.environ.get("CC")
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise OSError(f"C compiler {explicit!r} (from $CC) not found")
        return found
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found is not None:
            return found
    raise OSError("no C compiler found (looked for $CC, cc, gcc, clang)")


def _compile(cc: str, src: Path, out: Path, flags: list[str]) -> None:
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    cmd = [cc, "-O3", "-fno-math-errno", "-fPIC", "-shared", *flags, str(src), "-o", str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise OSError(f"running {cc} failed: {err}") from err
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise OSError(f"{' '.join(cmd)} exited with {proc.returncode}: {' / '.join(tail)}")
    os.replace(tmp, out)  # atomic: concurrent builders never load a half-written file


def _build() -> Kernel:
    cc = _compiler()
    isa = _isa_flags()
    key = hashlib.sha256(
        "\0".join([_VERSION, _SOURCE, cc, " ".join(isa), platform.machine()]).encode()
    ).hexdigest()[:16]
    folder = _private_dir(_cache_dir())
    lib_path = folder / f"lamb_{key}.so"
    if not lib_path.exists():
        src = folder / f"lamb_{key}.c"
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".c", delete=False) as fh:
            fh.write(_SOURCE)
        os.replace(fh.name, src)
        try:
            _compile(cc, src, lib_path, [*isa, "-fopenmp"])
        except OSError:
            _compile(cc, src, lib_path, isa)  # no OpenMP support: a single-threaded kernel
    try:
        return Kernel(ctypes.CDLL(str(lib_path)), lib_path)
    except (OSError, AttributeError) as err:
        raise OSError(f"loading {lib_path} failed: {err}") from err


@functools.lru_cache(maxsize=1)
def _load() -> Kernel | str:
    try:
        return _build()
    except OSError as err:
        return str(err)


def load() -> Kernel | None:
    """The kernel, built on first use; None if it cannot be built here (see the reason)."""
    result = _load()
    return result if isinstance(result, Kernel) else None


def unavailable_reason() -> str | None:
    """Why :func:`load` returns None (compiler missing, build error...), or None if it works."""
    result = _load()
    return None if isinstance(result, Kernel) else result


def reset() -> None:
    """Forget the cached build result (tests use it after changing ``$CC``/the cache dir)."""
    _load.cache_clear()
