"""Numerically robust norm and scaling kernels shared by the clippers in :mod:`dpfl.clip`.

The clippers must guarantee that a clipped update, measured in float64, never exceeds its bound,
for any finite input from 1e-30 to 1e30 in float16, bfloat16, float32 or float64. The kernels here
provide that guarantee while keeping the common case (float32, moderate magnitudes) on the
``torch._foreach_*`` fast path:

* Norms are computed with ``torch._foreach_norm`` in float32 (float64 for float64 tensors). A norm
  that is non-finite, or so small that its squares may have underflowed, is recomputed in float64,
  and if even that overflows, as ``max|x| * ||x / max|x|||``. A norm that stays non-finite means the
  tensor holds inf/NaN: :class:`NonFiniteUpdateError` names it.
* Every scale factor is shrunk by :data:`SAFETY_MARGIN`, which covers the relative error of a
  float32 norm and the rounding of the scaled output. Scales that the output dtype cannot represent
  as a normal number, and float16/bfloat16 outputs, take an exact path instead: the product is
  formed in float64 and rounded *toward zero*, so each output element is no larger than the exact
  product and the output norm cannot exceed the float64 norm of the exact product.

References: Pelikan et al., arXiv 2310.00098 (clipping bounds user-level sensitivity).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "SAFETY_MARGIN",
    "NonFiniteUpdateError",
    "accumulate_scaled_",
    "scale_",
    "scaled_copy",
    "tensor_norms",
]

#: Relative shrink applied to every scale factor < 1 (and to scale-ups in normalize mode). It
#: exceeds the worst relative error of a float32 cascade-summed norm of 2^28 elements (~28 * 2^-24)
#: plus one rounding of the output, so the float64 norm of a clipped update stays <= its bound.
SAFETY_MARGIN = 2.0**-16

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Below these norms (float32 / float64 computation) the squares of the elements may have
# underflowed: recompute robustly in float64.
_SMALL_NORM = {False: 1e-18, True: 1e-140}


class NonFiniteUpdateError(ValueError):
    """A tensor of a model update holds inf or NaN. ``tensor`` is the offending key."""

    def __init__(self, tensor: str) -> None:
        super().__init__(
            f"update tensor {tensor!r} contains non-finite values (inf or NaN); "
            "fix the local training or drop this user (DPAggregator(drop_nonfinite=True))"
        )
        self.tensor = tensor


def _norm64(name: str, x: Tensor) -> float:
    """Float64 L2 norm of ``x``, robust to under/overflow; raises if ``x`` is not finite."""
    if x.numel() == 0:
        return 0.0
    x64 = x.detach().to(torch.float64)
    amax = float(x64.abs().max())  # NaN propagates through max
    if not math.isfinite(amax):
        raise NonFiniteUpdateError(name)
    if amax == 0.0:
        return 0.0
    if 1e-100 < amax < 1e100:
        return float(torch.linalg.vector_norm(x64))
    return amax * float(torch.linalg.vector_norm(x64 / amax))


def tensor_norms(names: Sequence[str], tensors: Sequence[Tensor]) -> list[float]:
    """Return the L2 norm of each tensor as a Python float (float64 accuracy where it matters).

    Raises:
        NonFiniteUpdateError: if a tensor contains inf or NaN (the message names it).
    """
    if not tensors:
        return []
    idx64 = [i for i, t in enumerate(tensors) if t.dtype == torch.float64]
    idx32 = [i for i, t in enumerate(tensors) if t.dtype != torch.float64]
    out = [0.0] * len(tensors)
    for idx, dtype in ((idx64, torch.float64), (idx32, torch.float32)):
        if not idx:
            continue
        with torch.no_grad():
            norms = torch._foreach_norm([tensors[i] for i in idx], 2, dtype=dtype)
            values = torch.stack(norms).tolist()
        for i, v in zip(idx, values, strict=True):
            out[i] = v
    for i, v in enumerate(out):
        small = _SMALL_NORM[tensors[i].dtype == torch.float64]
        if not math.isfinite(v) or v < small:
            out[i] = _norm64(names[i], tensors[i])
    return out


def _fast_ok(dtype: torch.dtype, scale: float) -> bool:
    """Whether ``x * scale`` may be computed natively in ``dtype`` without breaking the bound."""
    if dtype not in (torch.float32, torch.float64):
        return False
    fi = torch.finfo(dtype)
    return fi.tiny * 2.0**10 <= scale <= fi.max * 2.0**-10


def _toward_zero(exact: Tensor, dtype: torch.dtype) -> Tensor:
    """Round a float64 tensor to ``dtype`` so that every element's magnitude does not grow."""
    rounded = exact.to(dtype)
    if dtype == torch.float64:
        return rounded
    grew = rounded.to(torch.float64).abs() > exact.abs()
    if bool(grew.any()):
        stepped = torch.nextafter(rounded, torch.zeros_like(rounded))
        rounded = torch.where(grew, stepped, rounded)
    return rounded


def scaled_copy(x: Tensor, scale: float, dtype: torch.dtype | None = None) -> Tensor:
    """Return ``x * scale`` in ``dtype`` (default ``x.dtype``), never larger than the exact product."""
    dtype = x.dtype if dtype is None else dtype
    if scale == 1.0:
        return x.detach().to(dtype, copy=True)
    if _fast_ok(dtype, scale) and x.dtype in (torch.float32, torch.float64):
        return x.detach().to(dtype) * scale
    return _toward_zero(x.detach().to(torch.float64) * scale, dtype)


def scale_(tensors: Sequence[Tensor], scales: Sequence[float]) -> None:
    """Multiply each tensor in place by its scale (fast foreach path where it is safe)."""
    fast: dict[float, list[Tensor]] = {}
    for t, s in zip(tensors, scales, strict=True):
        if s == 1.0 or t.numel() == 0:
            continue
        if _fast_ok(t.dtype, s):
            fast.setdefault(s, []).append(t)
        else:
            with torch.no_grad():
                t.copy_(scaled_copy(t, s))
    with torch.no_grad():
        for s, group in fast.items():
            torch._foreach_mul_(group, s)


def accumulate_scaled_(
    accumulators: Sequence[Tensor], tensors: Sequence[Tensor], scales: Sequence[float]
) -> None:
    """``acc += x * s`` for each triple, fused (``add_(x, alpha=s)``) where it is safe.

    Tensors sharing a scale are added with one ``torch._foreach_add_`` call; the rest use the
    per-tensor fused ``Tensor.add_(x, alpha=s)``. Neither materialises a scaled copy of ``x``
    except on the exact (float64, round-toward-zero) path for unrepresentable scales.
    """
    groups: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
    with torch.no_grad():
        for acc, x, s in zip(accumulators, tensors, scales, strict=True):
            if x.numel() == 0 or s == 0.0:
                continue
            if s == 1.0 or _fast_ok(acc.dtype, s):
                accs, xs = groups.setdefault(s, ([], []))
                accs.append(acc)
                xs.append(x)
            else:
                acc.add_(scaled_copy(x, s, acc.dtype))
        for s, (accs, xs) in groups.items():
            if len(accs) == 1:
                accs[0].add_(xs[0], alpha=s)
            else:
                torch._foreach_add_(accs, xs, alpha=s)
