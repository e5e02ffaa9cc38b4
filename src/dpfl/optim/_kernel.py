"""A small C kernel for the fused LAMB step, built once per machine with the system C compiler.

LAMB needs the norm of each tensor's Adam direction ``r_h`` *before* it can update ``θ_h``, and no
eager torch operation computes ``‖m̂/(√v̂+eps) + λθ‖`` without materializing the direction. This
kernel does one tensor's whole step in one call: a pass that updates the moments and accumulates
``Σr²`` and ``Σθ²`` in float64, the trust ratio, and the parameter update pass, which runs while
the tensor is still in the CPU cache (see
``_lamb_fused``). A second function tests a tensor for NaN/inf in one read pass.

The C source is about 90 lines, compiled with ``$CC`` (else ``cc``/``gcc``/``clang``) into a
per-user cache directory (``$DPFL_KERNEL_DIR``, else ``$XDG_CACHE_HOME/dpfl`` or ``~/.cache/dpfl``)
keyed by a hash of the source, flags and compiler, and loaded with ``ctypes``. It links the
OpenMP runtime that torch has already loaded (same ``libgomp.so.1`` soname), so it uses torch's
threads and ``torch.set_num_threads``. Where no compiler is found or the build fails,
``load`` returns None and ``unavailable_reason`` says why; callers fall back to the
``foreach`` path (or raise for an explicit ``fused=True``).
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

# s[0..11] = beta1, 1-beta1, beta2, 1-beta2, 1/(1-beta1^t), 1/sqrt(1-beta2^t), eps, wd, sign, lr,
# trust (0 or 1), trust_clip (+inf: none); out[0..2] = sum r^2, sum theta^2, the trust ratio.
# Each thread owns one slice of the tensor. Pass 1 reads theta, g, m, v, stores the new moments and
# sums the slice's squares in double; the threads combine the sums in a fixed order and one computes
# the ratio; pass 2 reads theta, m, v (12 of pass 1's 16 bytes per element) and writes theta,
# walking the slice backwards chunk by chunk so that it starts on the data pass 1 touched last
# (still in cache). The caller validates everything before the call: the kernel never fails.
# The finiteness test splits the tensor between the threads and reads each thread's part as four
# interleaved streams (measured ~10% faster than one stream here: a pure read is bound by the
# reads each core keeps in flight, not by the memory bus).
# No -ffast-math: NaN/inf must propagate.
_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#define DPFL_CHUNK 4096
#define DPFL_MAX_THREADS 256
#define DPFL_DIRECTION(i, T, SQRT)                                                         \
    T gi = g[i] * sg;                                                                    \
    T mi = m[i] * b1 + gi * c1;                                                          \
    T vi = v[i] * b2 + gi * gi * c2;                                                     \
    T ri = (mi * ib1) / (SQRT(vi) * ib2 + eps) + wd * p[i];
#define DPFL_LAMB_STEP(T, NAME, SQRT)                                                      \
void NAME(T* p, const T* g, T* m, T* v, int64_t n, const double* s, double* out) {       \
  const T b1 = (T)s[0], c1 = (T)s[1], b2 = (T)s[2], c2 = (T)s[3];                        \
  const T ib1 = (T)s[4], ib2 = (T)s[5], eps = (T)s[6], wd = (T)s[7], sg = (T)s[8];        \
  const int trust = s[10] != 0.0;                                                        \
  double part_r[DPFL_MAX_THREADS], part_p[DPFL_MAX_THREADS];                             \
  double sum_r = 0.0, sum_p = 0.0, ratio = 1.0;                                          \
  _Pragma("omp parallel if(n >= 65536)")                                                 \
  {                                                                                      \
    int t = 0, nt = 1;                                                                   \
    DPFL_THREAD_IDS                                                                      \
    if (nt > DPFL_MAX_THREADS) nt = DPFL_MAX_THREADS; /* threads beyond it idle */       \
    int64_t per = ((n + nt - 1) / nt + 15) / 16 * 16; /* 64-byte slices for float */      \
    int64_t lo = t < nt && t * per < n ? t * per : n;                                    \
    int64_t hi = lo + per < n ? lo + per : n;                                            \
    if (trust) { /* new moments stored: all validation was done before the call */       \
      double sr = 0.0, sp = 0.0;                                                         \
      _Pragma("omp simd reduction(+:sr,sp)")                                             \
      for (int64_t i = lo; i < hi; i++) {                                                \
        DPFL_DIRECTION(i, T, SQRT)                                                       \
        m[i] = mi;                                                                       \
        v[i] = vi;                                                                       \
        double rd = (double)ri, pd = (double)p[i];                                       \
        sr += rd * rd;                                                                   \
        sp += pd * pd;                                                                   \
      }                                                                                  \
      if (t < nt) {                                                                      \
        part_r[t] = sr;                                                                  \
        part_p[t] = sp;                                                                  \
      }                                                                                  \
      _Pragma("omp barrier")                                                             \
      _Pragma("omp single")                                                              \
      {                                                                                  \
        for (int k = 0; k < nt; k++) {                                                   \
          sum_r += part_r[k];                                                            \
          sum_p += part_p[k];                                                            \
        }                                                                                \
        double un = sqrt(sum_r), wn = sqrt(sum_p);                                       \
        ratio = (wn > 0.0 && un > 0.0) ? wn / un : 1.0; /* as dpfl.optim.trust_ratio */  \
        if (ratio > s[11]) ratio = s[11];                                                \
      }                                                                                  \
    }                                                                                    \
    const T step = (T)(s[9] * ratio);                                                    \
    for (int64_t e = hi; e > lo; e -= DPFL_CHUNK) { /* backwards: cached data first */   \
      int64_t b = e - DPFL_CHUNK > lo ? e - DPFL_CHUNK : lo;                             \
      if (trust) {                                                                       \
        _Pragma("omp simd")                                                              \
        for (int64_t i = b; i < e; i++) {                                                \
          T ri = (m[i] * ib1) / (SQRT(v[i]) * ib2 + eps) + wd * p[i];                    \
          p[i] = p[i] - step * ri;                                                       \
        }                                                                                \
      } else {                                                                           \
        _Pragma("omp simd")                                                              \
        for (int64_t i = b; i < e; i++) {                                                \
          DPFL_DIRECTION(i, T, SQRT)                                                     \
          m[i] = mi;                                                                     \
          v[i] = vi;                                                                     \
          p[i] = p[i] - step * ri;                                                       \
        }                                                                                \
      }                                                                                  \
    }                                                                                    \
  }                                                                                      \
  out[0] = sum_r;                                                                        \
  out[1] = sum_p;                                                                        \
  out[2] = ratio;                                                                        \
}                                                                                        \
int NAME##_finite(const T* x, int64_t n) {                                               \
  T z = 0; /* x * 0 is NaN exactly where x is NaN or infinite */                         \
  _Pragma("omp parallel reduction(+:z) if(n >= 65536)")                                  \
  {                                                                                      \
    int t = 0, nt = 1;                                                                   \
    DPFL_THREAD_IDS                                                                      \
    int64_t per = (n + nt - 1) / nt;                                                     \
    int64_t lo = t * per < n ? t * per : n, hi = lo + per < n ? lo + per : n;            \
    /* four read streams per thread: more reads in flight than one stream */             \
    int64_t len = (hi - lo) / 4 / 64 * 64;                                               \
    const T* q = x + lo;                                                                 \
    T z0 = 0, z1 = 0, z2 = 0, z3 = 0;                                                    \
    for (int64_t j = 0; j < len; j += 64) {                                              \
      _Pragma("omp simd reduction(+:z0,z1,z2,z3)")                                       \
      for (int k = 0; k < 64; k++) {                                                     \
        z0 += q[j + k] * (T)0;                                                           \
        z1 += q[len + j + k] * (T)0;                                                     \
        z2 += q[2 * len + j + k] * (T)0;                                                 \
        z3 += q[3 * len + j + k] * (T)0;                                                 \
      }                                                                                  \
    }                                                                                    \
    for (int64_t i = lo + 4 * len; i < hi; i++) z0 += x[i] * (T)0;                       \
    z += (z0 + z1) + (z2 + z3);                                                          \
  }                                                                                      \
  return z == (T)0;                                                                      \
}
/* x /= d in place (IEEE division, as torch's div_); returns 1 iff every quotient is finite. */
#define DPFL_DIV_FINITE(T, NAME)                                                         \
int NAME(T* x, int64_t n, double d) {                                                    \
  const T dd = (T)d;                                                                     \
  T z = 0;                                                                               \
  _Pragma("omp parallel for simd reduction(+:z) schedule(static) if(n >= 65536)")        \
  for (int64_t i = 0; i < n; i++) {                                                      \
    T y = x[i] / dd;                                                                     \
    x[i] = y;                                                                            \
    z += y * (T)0;                                                                       \
  }                                                                                      \
  return z == (T)0;                                                                      \
}
DPFL_DIV_FINITE(float, dpfl_div_finite_f32)
DPFL_DIV_FINITE(double, dpfl_div_finite_f64)
#ifdef _OPENMP
#define DPFL_THREAD_IDS t = omp_get_thread_num(); nt = omp_get_num_threads();
#else
#define DPFL_THREAD_IDS
#endif
DPFL_LAMB_STEP(float, dpfl_lamb_step_f32, sqrtf)
DPFL_LAMB_STEP(double, dpfl_lamb_step_f64, sqrt)
"""

_VERSION = "5"


class Kernel:
    """The loaded kernel: one fused LAMB step per tensor, and a finiteness test (float32/64)."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._step: dict[torch.dtype, Any] = {}
        self._finite: dict[torch.dtype, Any] = {}
        names = ((torch.float32, "dpfl_lamb_step_f32"), (torch.float64, "dpfl_lamb_step_f64"))
        for dtype, name in names:
            step = getattr(lib, name)
            step.restype = None
            step.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_void_p] * 2
            self._step[dtype] = step
            finite = getattr(lib, f"{name}_finite")
            finite.restype = ctypes.c_int
            finite.argtypes = [ctypes.c_void_p, ctypes.c_int64]
            self._finite[dtype] = finite
        self._div: dict[torch.dtype, Any] = {}
        for dtype, name in ((torch.float32, "dpfl_div_finite_f32"), (torch.float64, "dpfl_div_finite_f64")):
            div = getattr(lib, name)
            div.restype = ctypes.c_int
            div.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_double]
            self._div[dtype] = div

    def lamb_step(self, p: Tensor, g: Tensor, m: Tensor, v: Tensor, scalars: int, out: int) -> None:
        """One LAMB step of one contiguous CPU tensor, in place on ``p``, ``m`` and ``v``.

        ``p, g, m, v`` must be contiguous, on CPU, of one dtype (float32 or float64) and size.
        ``scalars`` is the address of 12 contiguous float64 values and ``out`` of 3 (see
        ``_SOURCE``); the caller keeps both alive. ``g`` is not written.
        """
        self._step[p.dtype](
            p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel(), scalars, out
        )

    def div_finite_(self, x: Tensor, divisor: float) -> bool:
        """``x /= divisor`` in place on a contiguous float32/float64 CPU tensor (the same IEEE
        quotients as ``torch.Tensor.div_``); returns whether every quotient is finite, found in
        the same pass, so a finite result costs no second read."""
        return bool(self._div[x.dtype](x.data_ptr(), x.numel(), float(divisor)))

    def all_finite(self, x: Tensor) -> bool:
        """Whether the contiguous float32/float64 CPU tensor ``x`` holds no NaN or infinity."""
        return bool(self._finite[x.dtype](x.data_ptr(), x.numel()))


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
    """Why ``load`` returns None (compiler missing, build error...), or None if it works."""
    result = _load()
    return None if isinstance(result, Kernel) else result


def reset() -> None:
    """Forget the cached build result (tests use it after changing ``$CC``/the cache dir)."""
    _load.cache_clear()
