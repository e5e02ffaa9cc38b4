"""The C kernel of LAMB's opt-in fused CPU path (``LAMB(fused=True)``), built with the system C compiler.

Nothing here runs unless a caller asks for ``fused=True``: ``LAMB``'s default path and
``DPAggregator`` are plain torch and never start a compiler.

LAMB needs the norm of each tensor's Adam direction ``r_h`` *before* it can update ``θ_h``, and no
eager torch operation computes ``‖m̂/(√v̂+eps) + λθ‖`` without materializing the direction. This
kernel does one tensor's whole step in one call: a pass that updates the moments and accumulates
``Σr²`` and ``Σθ²`` in float64, the trust ratio, and the parameter update pass, which runs while
the tensor is still in the CPU cache (see ``_lamb_fused``). A second function tests
a tensor for NaN/inf in one read pass.

**Build.** The C source (about 80 lines) is compiled with ``$CC`` (else ``cc``/``gcc``/``clang``)
in a fresh private temporary directory, first with ``-fopenmp``; where that fails, without it (a
single-threaded kernel). The two builds are separate entries of the cache (``openmp`` and
``serial``), so a failed OpenMP build is never remembered as the threaded kernel: the next process
tries OpenMP again. The OpenMP build links the runtime that torch has already loaded (same
``libgomp.so.1`` soname), so it uses torch's threads and ``torch.set_num_threads``.

**Cache.** ``<cache_dir>/kernels``, where ``cache_dir`` is the caller's (``LAMB(cache_dir=...)``),
else ``$DPFL_CACHE``, else ``$XDG_CACHE_HOME/dpfl``, else ``~/.cache/dpfl``. Entries are keyed by a
hash of the source, flags, compiler path and machine; each build writes the library under a name
carrying its SHA-256 and a JSON record of that digest beside it.

**Load.** Through ``PrivateStore``: the directory and both files are
opened without following symbolic links and checked (owner, mode, type) on their descriptors, the
library's SHA-256 must equal the recorded one, and the library is loaded through its checked
descriptor. Anything else raises ``KernelError`` naming the file.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpfl.optim._kernel_store import KernelError, PrivateStore

__all__ = ["SUPPORTED_DTYPES", "Kernel", "KernelError", "kernel_dir", "load", "reset"]

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
#ifdef _OPENMP
#define DPFL_THREAD_IDS t = omp_get_thread_num(); nt = omp_get_num_threads();
#else
#define DPFL_THREAD_IDS
#endif
DPFL_LAMB_STEP(float, dpfl_lamb_step_f32, sqrtf)
DPFL_LAMB_STEP(double, dpfl_lamb_step_f64, sqrt)
"""


_VERSION = "6"
_FORMAT = "dpfl.kernel"
_VARIANTS = ("openmp", "serial")
_LIBRARY_NAME = re.compile(r"lamb_[0-9a-f]{16}_(openmp|serial)\.[0-9a-f]{16}\.so")


class Kernel:
    """The loaded kernel: one fused LAMB step per tensor, and a finiteness test (float32/64).

    Attributes:
        path: The library file that was checked and loaded.
        openmp: Whether it is the OpenMP (multi-threaded) build.
    """

    def __init__(self, lib: ctypes.CDLL, path: Path, *, fd: int, openmp: bool) -> None:
        self.path = path
        self.openmp = openmp
        self._fd = fd  # kept open for the life of the process (see dpfl.optim._kernel_store)
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

    def lamb_step(self, p: Tensor, g: Tensor, m: Tensor, v: Tensor, scalars: int, out: int) -> None:
        """One LAMB step of one contiguous CPU tensor, in place on ``p``, ``m`` and ``v``.

        ``p, g, m, v`` must be contiguous, on CPU, of one dtype (float32 or float64) and size.
        ``scalars`` is the address of 12 contiguous float64 values and ``out`` of 3 (see
        ``_SOURCE``); the caller keeps both alive. ``g`` is not written.
        """
        self._step[p.dtype](
            p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel(), scalars, out
        )

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


def kernel_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the kernel is cached: ``<cache_dir>/kernels``.

    ``cache_dir`` defaults to ``$DPFL_CACHE``, else ``$XDG_CACHE_HOME/dpfl``, else
    ``~/.cache/dpfl`` (the root that dpfl's examples use for their caches too).
    """
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get("DPFL_CACHE"):
        root = Path(os.environ["DPFL_CACHE"])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "dpfl"
    return root / "kernels"


def _compiler() -> str:
    explicit = os.environ.get("CC")
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise KernelError(f"C compiler {explicit!r} (from $CC) not found")
        return found
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found is not None:
            return found
    raise KernelError("no C compiler found (looked for $CC, cc, gcc, clang)")


def _compile(cc: str, flags: list[str]) -> bytes:
    """Compile the source in a fresh private temporary directory; return the library's bytes."""
    with tempfile.TemporaryDirectory(prefix="dpfl-kernel-") as tmp:  # mode 700, ours
        src, out = Path(tmp) / "lamb.c", Path(tmp) / "lamb.so"
        src.write_text(_SOURCE)
        cmd = [cc, "-O3", "-fno-math-errno", "-fPIC", "-shared", *flags, str(src), "-o", str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise KernelError(f"running {cc} failed: {err}") from err
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise KernelError(f"{' '.join(cmd)} exited with {proc.returncode}: {' / '.join(tail)}")
        return out.read_bytes()


def _record_name(key: str, variant: str) -> str:
    return f"lamb_{key}_{variant}.json"


def _build(store: PrivateStore, cc: str, key: str, variant: str, flags: list[str]) -> dict[str, Any]:
    """Compile one variant and store it: the library (named by its digest), then its record."""
    data = _compile(cc, flags)
    digest = hashlib.sha256(data).hexdigest()
    library = f"lamb_{key}_{variant}.{digest[:16]}.so"
    store.write(library, data, mode=0o700)
    record = {"format": _FORMAT, "version": _VERSION, "key": key, "variant": variant,
              "library": library, "sha256": digest}  # fmt: skip
    store.write(_record_name(key, variant), json.dumps(record).encode(), mode=0o600)
    return record


def _check_record(record: dict[str, Any], store: PrivateStore, key: str, variant: str) -> None:
    name = store.path / _record_name(key, variant)
    library, digest = record.get("library"), record.get("sha256")
    expected = {"format": _FORMAT, "version": _VERSION, "key": key, "variant": variant}
    wrong = [k for k, v in expected.items() if record.get(k) != v]
    if (wrong or not isinstance(library, str) or not isinstance(digest, str)
            or not re.fullmatch(r"[0-9a-f]{64}", digest) or not _LIBRARY_NAME.fullmatch(library)
            or not library.startswith(f"lamb_{key}_{variant}.{digest[:16]}")):  # fmt: skip
        raise KernelError(
            f"kernel build record {name} is not a valid record of this build (bad fields "
            f"{wrong or ['library', 'sha256']}); refusing it (delete it to rebuild)"
        )


def _load_from(store: PrivateStore) -> Kernel:
    """Load the kernel from an open, checked store, building a variant that is missing.

    The OpenMP variant is preferred; when its build fails the serial one is used (built if
    needed), and the OpenMP build is tried again by the next process.
    """
    cc, isa = _compiler(), _isa_flags()
    key = hashlib.sha256(
        "\0".join([_VERSION, _SOURCE, cc, " ".join(isa), platform.machine()]).encode()
    ).hexdigest()[:16]
    failures: list[str] = []
    for variant in _VARIANTS:
        record = store.read_json(_record_name(key, variant), "kernel build record")
        if record is None:
            flags = [*isa, "-fopenmp"] if variant == "openmp" else isa
            try:
                record = _build(store, cc, key, variant, flags)
            except KernelError as err:
                if variant == "serial":
                    raise KernelError("; ".join([*failures, str(err)])) from err
                failures.append(f"the OpenMP build failed ({err})")
                continue
        _check_record(record, store, key, variant)
        lib, fd = store.load_library(record["library"], record["sha256"])
        try:
            return Kernel(lib, store.path / record["library"], fd=fd, openmp=variant == "openmp")
        except AttributeError as err:
            raise KernelError(f"{store.path / record['library']} lacks a symbol: {err}") from err
    raise AssertionError("unreachable")  # pragma: no cover


_loaded: dict[str, Kernel] = {}


def load(cache_dir: str | os.PathLike[str] | None = None) -> Kernel:
    """The kernel cached in ``kernel_dir`` ``(cache_dir)``, built there on first use.

    A kernel loaded once is reused for that directory for the rest of the process.

    Raises:
        KernelError: (an ``OSError``) if no compiler is found, the build fails, or the cache
            directory or a file in it is refused (the message names it and says what to do).
    """
    folder = kernel_dir(cache_dir)
    kernel = _loaded.get(str(folder))
    if kernel is None:
        with PrivateStore(folder) as store:
            kernel = _load_from(store)
        _loaded[str(folder)] = kernel
    return kernel


def reset() -> None:
    """Forget the loaded kernels (tests use it after changing ``$CC`` or the cache directory)."""
    _loaded.clear()
