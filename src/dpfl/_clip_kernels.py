"""Norm and scaling kernels with stated error bounds, shared by the clippers in
[`dpfl.clip`][dpfl.clip].

The clippers guarantee that a clipped update, measured exactly, never exceeds its bound, for any
finite input of any length and dtype (float16, bfloat16, float32, float64). That needs norms whose
error is *bounded*, a safety margin *derived* from that bound, and output rounding that the margin
covers. This module provides all three; the derivation follows.

Notation: ``u`` is the unit roundoff of a dtype (``u32 = 2^-24``, ``u64 = 2^-53``). A sum of ``k``
non-negative terms formed by *any* sequence of rounded two-term additions (sequential, pairwise,
SIMD lanes, threads, fused multiply-adds) has relative error at most ``(k - 1) u`` to first order
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §4.2), so the bounds below do
not depend on how torch orders its reductions. All bounds are stated to first order; every one
used in the code is at least twice its first-order value, which covers the second-order terms as
long as each is below ``2^-10`` (true for fewer than ``2^40`` elements per layer).

**Norms** (``tensor_norms`` returns each tensor's norm ``N̂`` and a bound ``e`` with
``|N̂ − N| <= e·N``):

* *float64 pass* (float64 tensors, tensors of fewer than ``SMALL`` elements, row tails and
  non-contiguous tensors): ``torch._foreach_norm(..., dtype=torch.float64)``, which accumulates in
  float64 (the tests check this on 10⁷ elements). For ``n`` elements the sum of squares is off by
  ``(n + 1) u64`` (squares of float16/bfloat16/float32 values are exact in float64; float64 squares
  round once), the square root by ``u64``: ``e = (n + 4) u64``. Float32 and narrower values cannot
  under- or overflow when squared in float64. For float64 tensors, squares below ``2^-1022`` may be
  lost (at most ``2^-1022`` each), which is below ``u64`` of the sum once the computed norm squared
  exceeds ``n · 2^-968``; smaller or non-finite results are recomputed on ``x / max|x|``
  (``e = (n + 8) u64``).
* *float32 row pass* (contiguous float32/float16/bfloat16 tensors of ``SMALL`` or more
  elements): the first ``m·K`` elements (``K = ROW``) are viewed as ``m`` rows of ``K`` and
  ``torch.linalg.vector_norm(rows, dim=1)`` gives each row's norm in float32 (sum of ``K`` squares:
  ``K u32``; square root: ``u32``); the ``m`` row norms square exactly in float64 and are summed by
  the float64 pass (``(m − 1) u64``). Squares below ``2^-126`` may be lost or flushed (at most
  ``2^-126`` per square and per addition), below ``u32`` of the sum once the computed norm squared
  exceeds ``n · 2^-101``; smaller or non-finite results fall back to the float64 pass. So
  ``e = (K + 4) u32 + (m + 4) u64`` (about ``7.9e-6`` for ``K = 128``), for a tensor of any length.
  The remaining ``n − m·K < K`` elements take the float64 pass.
* Parts and layers are combined with ``math.hypot`` (error under one ulp, ``2 u64``, since Python
  3.10): ``e = max(e_parts) + 2 u64``.

**Decision**: a layer with bound ``C`` is kept if ``N̂ (1 + 2e + 4 u64) <= C`` (then ``N <= C``), clipped
if ``N̂ (1 − 2e − 4 u64) > C`` (then ``N > C``), and otherwise its norms are recomputed by the float64
pass (``precise_norms``, ``e_p = (n + 8) u64`` for a layer of ``n`` elements) and decided
again; still undecided (``N`` within about ``n · 2^-52`` of ``C``) it is clipped.

**Scale and output rounding**: the scale ``s = C / N̂ · (1 − μ)`` is formed in float64 (``2 u64``).
An output element is ``y = x · s`` rounded to the output dtype ``o``:

* *native path* (``o`` float32/float64, ``s`` a normal number of ``o`` with ``2^10`` room, and
  ``C <= max_o / 4``, ``C · u_o >= √n · tiny_o`` where ``tiny_o`` is ``o``'s smallest subnormal):
  ``s`` rounds to ``o``, the product rounds, an in-place add to a zero accumulator rounds again:
  ``|y| <= |x s| (1 + 3 u_o) + tiny_o / 2``, and the subnormal term adds at most ``u_o / 2`` of ``C``
  over the layer: ``ρ = 4 u_o``;
* *exact path* (anything else, including all float16/bfloat16 outputs): the product is formed in
  float64 and rounded *toward zero* to ``o`` (subnormal float64 products are stepped toward zero):
  ``|y| <= |x s| (1 + u64)``, ``ρ = u64``.

Hence ``‖y‖ <= C (1 − μ)(1 + e + ρ + 4 u64)`` to first order, and the margin

``μ = 2 (e + ρ + 4 u64) + 4 e_p``   (``margin``)

keeps ``‖y‖ <= C (1 − (e + ρ + 4 u64) − 4 e_p) < C``; the ``4 e_p`` term leaves a clipped update
decidedly inside the bound, so clipping it again keeps it unchanged. For float32 updates
``μ ≈ 1.6e-5`` (the update is clipped to within 0.002% of ``C``); for float64 updates of ``n``
elements ``μ ≈ 6 n u64``. A kept update (scale 1) is copied or added exactly when the output dtype
holds every input value; narrowed to a smaller dtype (e.g. a float64 update into a float32 sum) it
is rounded natively only if ``N̂ (1 + 2e + 4 u64)(1 + 2 u_o) <= C`` (and the subnormal condition
holds), otherwise toward zero, so it cannot round up past ``C``.

Per-layer bounds ``C_h`` are computed from ``C`` with a few roundings (``Σ C_h² = C² (1 ± 8 u64)``);
each clipped layer keeps a slack of at least ``(e + ρ + 4 u64) >= 13 u64`` of ``C_h``, so the whole
update stays within ``C`` as well.

A computed norm that stays non-finite means the tensor holds inf/NaN:
[`NonFiniteUpdateError`][dpfl.clip.NonFiniteUpdateError] names it.

References: Pelikan et al., arXiv 2310.00098 (clipping bounds user-level sensitivity); Higham,
*Accuracy and Stability of Numerical Algorithms* (SIAM, 2002), chapters 2-4 (error of summation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from dpfl._errors import DPFLError

__all__ = [
    "ROW",
    "SMALL",
    "U32",
    "U64",
    "NonFiniteUpdateError",
    "accumulate_scaled_",
    "combine_errors",
    "fast_path_ok",
    "keep_natively",
    "lossless",
    "margin",
    "output_roundoff",
    "precise_error",
    "precise_norms",
    "scale_",
    "scaled_copy",
    "tensor_norms",
]

#: Unit roundoff of float32 and float64.
U32 = 2.0**-24
U64 = 2.0**-53
#: Row length of the float32 row pass: each row's sum of squares has relative error <= ROW * u32.
ROW = 128
#: Tensors with fewer elements are normed by the float64 pass (cheap in absolute terms).
SMALL = 4096

_NATIVE = (torch.float32, torch.float64)
_WIDER = {  # output dtype -> input dtypes it holds exactly
    torch.float64: (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    torch.float32: (torch.float16, torch.bfloat16, torch.float32),
}


class NonFiniteUpdateError(ValueError, DPFLError):
    """A tensor of a model update holds inf or NaN (a ``ValueError``).

    Args:
        tensor: The key of the offending tensor in the update.

    Attributes:
        tensor: The key of the offending tensor in the update.
    """

    def __init__(self, tensor: str) -> None:
        super().__init__(
            f"update tensor {tensor!r} contains non-finite values (inf or NaN); "
            "fix the local training or drop this user (DPAggregator(drop_nonfinite=True))"
        )
        self.tensor = tensor


def _unit(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _scaled_norm64(name: str, x: Tensor) -> tuple[float, float]:
    """Float64 norm of a float64 tensor computed on ``x / max|x|`` (no under/overflow)."""
    lo, hi = torch.aminmax(x.detach().reshape(-1))
    amax = max(-float(lo), float(hi))  # NaN propagates
    if not math.isfinite(amax):
        raise NonFiniteUpdateError(name)
    n = x.numel()
    if amax == 0.0:
        return 0.0, 0.0
    scaled = float(torch.linalg.vector_norm(x.detach() / amax))
    return amax * scaled, (n + 8) * U64


def _float64_pass(parts: Sequence[Tensor]) -> list[float]:
    """Float64-accumulated norms of ``parts`` (one ``torch._foreach_norm`` call)."""
    if not parts:
        return []
    with torch.no_grad():
        return torch.stack(torch._foreach_norm(list(parts), 2, dtype=torch.float64)).tolist()


def _float64_part(name: str, part: Tensor, value: float) -> tuple[float, float] | None:
    """Checked result of the float64 pass on one part: (norm, error) or None to recompute."""
    n = part.numel()
    if part.dtype != torch.float64:
        if not math.isfinite(value):
            raise NonFiniteUpdateError(name)
        return value, (n + 4) * U64
    if not math.isfinite(value) or value * value < n * 2.0**-968:
        return None
    return value, (n + 4) * U64


def tensor_norms(
    names: Sequence[str], tensors: Sequence[Tensor], *, rows: bool = True
) -> tuple[list[float], list[float]]:
    """Return each tensor's L2 norm ``N̂`` and a relative error bound ``e``: ``|N̂ − N| <= e·N``.

    Long float32/float16/bfloat16 tensors take the float32 row pass (``rows=True``), everything
    else the float64 pass; see the module docstring for the bounds.

    Raises:
        NonFiniteUpdateError: if a tensor contains inf or NaN (the message names it).
    """
    k = len(tensors)
    norms, errs = [0.0] * k, [0.0] * k
    parts: list[tuple[int, Tensor]] = []  # float64 pass
    matrices: list[tuple[int, Tensor]] = []  # float32 row pass
    for i, t in enumerate(tensors):
        n = t.numel()
        if n == 0:
            continue
        x = t.detach()
        if rows and t.dtype != torch.float64 and n >= SMALL and x.is_contiguous():
            flat = x.reshape(-1)
            m = n // ROW
            matrices.append((i, flat[: m * ROW].view(m, ROW)))
            if n > m * ROW:
                parts.append((i, flat[m * ROW :]))
        else:
            parts.append((i, x))
    with torch.no_grad():
        row_norms = [
            torch.linalg.vector_norm(v, 2, dim=1, dtype=torch.float32) for _, v in matrices
        ]
    values = _float64_pass([p for _, p in parts] + row_norms)
    pieces: dict[int, list[tuple[float, float]]] = {}
    redo: set[int] = set()
    for (i, part), value in zip(parts, values, strict=False):
        got = _float64_part(names[i], part, value)
        if got is None:
            redo.add(i)
        else:
            pieces.setdefault(i, []).append(got)
    for (i, matrix), value in zip(matrices, values[len(parts) :], strict=True):
        if not math.isfinite(value) or value * value < matrix.numel() * 2.0**-101:
            redo.add(i)  # overflow, NaN, or squares that may have underflowed in float32
        else:
            m = matrix.shape[0]
            pieces.setdefault(i, []).append((value, (ROW + 4) * U32 + (m + 4) * U64))
    for i, found in pieces.items():
        if i not in redo:
            norms[i] = math.hypot(*(norm for norm, _ in found))
            errs[i] = combine_errors([err for _, err in found])
    if redo:
        idx = sorted(redo)
        sub_norms, sub_errs = precise_norms([names[i] for i in idx], [tensors[i] for i in idx])
        for i, norm, err in zip(idx, sub_norms, sub_errs, strict=True):
            norms[i], errs[i] = norm, err
    return norms, errs


def precise_norms(
    names: Sequence[str], tensors: Sequence[Tensor]
) -> tuple[list[float], list[float]]:
    """Norms by the float64 pass only (error ``(n + 8) u64`` at most); see ``tensor_norms``."""
    k = len(tensors)
    norms, errs = [0.0] * k, [0.0] * k
    parts = [(i, t.detach()) for i, t in enumerate(tensors) if t.numel() > 0]
    values = _float64_pass([p for _, p in parts])
    for (i, part), value in zip(parts, values, strict=True):
        got = _float64_part(names[i], part, value)
        norms[i], errs[i] = got if got is not None else _scaled_norm64(names[i], part)
    return norms, errs


def combine_errors(errs: Sequence[float]) -> float:
    """Error bound of ``math.hypot`` over norms with the given bounds (one ulp: ``2 u64``)."""
    if len(errs) <= 1:
        return errs[0] if errs else 0.0
    return max(errs) + 2 * U64


def precise_error(numel: int) -> float:
    """Error bound of ``precise_norms`` for a layer of ``numel`` elements."""
    return (numel + 8) * U64 + 2 * U64


def output_roundoff(dtype: torch.dtype) -> float:
    """Relative rounding ``ρ`` of one scaled output element in ``dtype`` (native or exact path)."""
    return 4 * _unit(dtype) if dtype in _NATIVE else U64


def margin(err: float, rho: float, err_precise: float) -> float:
    """Relative shrink ``μ`` of a scale factor: ``2 (e + ρ + 4 u64) + 4 e_p``."""
    return 2 * (err + rho + 4 * U64) + 4 * err_precise


def lossless(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether every value of ``src`` is exactly representable in ``dst``."""
    return src == dst or src in _WIDER.get(dst, ())


def _bound_fits(dtype: torch.dtype, bound: float, numel: int) -> bool:
    """Whether a layer of bound ``bound`` may be rounded natively to ``dtype``."""
    fi = torch.finfo(dtype)
    smallest_subnormal = fi.smallest_normal * fi.eps
    return bound <= fi.max / 4 and bound * _unit(dtype) >= math.sqrt(numel) * smallest_subnormal


def fast_path_ok(dtype: torch.dtype, scale: float, bound: float, numel: int) -> bool:
    """Whether ``x * scale`` may be rounded natively to ``dtype`` within the margin's ``ρ``."""
    if dtype not in _NATIVE:
        return False
    fi = torch.finfo(dtype)
    in_range = fi.smallest_normal * 2.0**10 <= scale <= fi.max * 2.0**-10
    return in_range and _bound_fits(dtype, bound, numel)


def keep_natively(
    src: torch.dtype, dst: torch.dtype, norm: float, err: float, bound: float, numel: int
) -> bool:
    """Whether a kept update (scale 1) of norm ``N̂`` may be converted to ``dst`` by rounding."""
    if lossless(src, dst) or math.isinf(bound):
        return True
    if dst not in _NATIVE or not _bound_fits(dst, bound, numel):
        return False
    return norm * (1 + 2 * err + 4 * U64) * (1 + 2 * _unit(dst)) <= bound


def _toward_zero(exact: Tensor, dtype: torch.dtype) -> Tensor:
    """Round a float64 tensor to ``dtype`` so that no element's magnitude exceeds ``exact``'s."""
    if dtype == torch.float64:
        # ``exact`` is itself a rounded product: step subnormal results toward zero, so that
        # |result| <= |x * s| (normal results are within u64 of it, which the margin covers).
        sub = (exact != 0) & (exact.abs() < torch.finfo(torch.float64).smallest_normal)
        if bool(sub.any()):
            exact = torch.where(sub, torch.nextafter(exact, torch.zeros_like(exact)), exact)
        return exact
    rounded = exact.to(dtype)
    grew = rounded.to(torch.float64).abs() > exact.abs()
    if bool(grew.any()):
        stepped = torch.nextafter(rounded, torch.zeros_like(rounded))
        rounded = torch.where(grew, stepped, rounded)
    return rounded


def scaled_copy(
    x: Tensor, scale: float, dtype: torch.dtype | None = None, *, exact: bool = False
) -> Tensor:
    """Return ``x * scale`` in ``dtype`` (default ``x.dtype``).

    With ``exact=True`` the product is formed in float64 and rounded toward zero (never larger
    than the exact product); otherwise it is computed natively (the caller checked
    ``fast_path_ok`` or ``keep_natively``).
    """
    dtype = x.dtype if dtype is None else dtype
    x = x.detach()
    if exact:
        product = x.to(torch.float64) if scale == 1.0 else x.to(torch.float64) * scale
        return _toward_zero(product, dtype)
    if scale == 1.0:
        return x.to(dtype, copy=True)
    return x.to(dtype) * scale


def scale_(tensors: Sequence[Tensor], scales: Sequence[float], exact: Sequence[bool]) -> None:
    """Multiply each tensor in place by its scale (one ``_foreach_mul_`` per native scale)."""
    native: dict[float, list[Tensor]] = {}
    with torch.no_grad():
        for t, s, ex in zip(tensors, scales, exact, strict=True):
            if s == 1.0 or t.numel() == 0:
                continue
            if ex:
                t.copy_(scaled_copy(t, s, exact=True))
            else:
                native.setdefault(s, []).append(t)
        for s, group in native.items():
            torch._foreach_mul_(group, s)


def accumulate_scaled_(
    accumulators: Sequence[Tensor],
    tensors: Sequence[Tensor],
    scales: Sequence[float],
    exact: Sequence[bool],
) -> None:
    """``acc += x * s`` for each triple, fused (``add_(x, alpha=s)``) on the native path.

    Tensors sharing a scale are added with one ``torch._foreach_add_`` call, a lone one with the
    fused ``Tensor.add_(x, alpha=s)``; neither materialises a scaled copy of ``x``. The exact path
    adds a float64 product rounded toward zero to the accumulator's dtype.
    """
    groups: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
    with torch.no_grad():
        for acc, x, s, ex in zip(accumulators, tensors, scales, exact, strict=True):
            if x.numel() == 0 or s == 0.0:
                continue
            if ex:
                acc.add_(scaled_copy(x, s, acc.dtype, exact=True))
            else:
                accs, xs = groups.setdefault(s, ([], []))
                accs.append(acc)
                xs.append(x.detach())
        for s, (accs, xs) in groups.items():
            if len(accs) == 1:
                accs[0].add_(xs[0], alpha=s)
            else:
                torch._foreach_add_(accs, xs, alpha=s)
