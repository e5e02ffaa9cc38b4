"""Finiteness of tensors in one read pass: the check the aggregator and the optimizers share.

``first_non_finite`` reads each tensor once (through ``torch._foreach_norm``, one kernel
per device and dtype) and confirms a non-finite norm with an exact ``isfinite`` test, because a
norm also overflows for huge *finite* entries. ``divide_`` is the division of a release by
its fixed denominator followed by that check. Both are plain torch: no compiler, any device.

This module sits on the lowest floor beside ``_checks`` (which stays torch-free so that
[`dpfl.accounting`][dpfl.accounting] imports no torch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["divide_", "first_non_finite", "group_by_device_and_dtype"]


def group_by_device_and_dtype(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by ``(device, dtype)``, in first-seen order."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    return list(buckets.values())


def first_non_finite(tensors: Sequence[Tensor]) -> int | None:
    """Index of the first tensor holding NaN or ±inf, else None (one read pass through norms).

    Integer and boolean tensors are always finite. A norm can overflow for huge finite entries,
    so a non-finite norm is confirmed with an exact ``isfinite`` test of that tensor before it
    is reported.

    Examples:
        >>> first_non_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
        1
        >>> first_non_finite([torch.full((4,), 3e38)]) is None  # the norm overflows, not the data
        True
    """
    bad: list[int] = []
    for idx in group_by_device_and_dtype(tensors):
        bucket = [tensors[i] for i in idx]
        if not bucket[0].is_floating_point() and not bucket[0].is_complex():
            continue
        norms = torch.stack(torch._foreach_norm(bucket)).float()
        if bool(torch.isfinite(norms).all()):
            continue
        for i, norm in zip(idx, norms.tolist(), strict=True):
            if not math.isfinite(norm) and not bool(torch.isfinite(tensors[i]).all()):
                bad.append(i)
    return min(bad) if bad else None


def divide_(tensors: Sequence[Tensor], denominator: float) -> bool:
    """Divide every tensor by ``denominator`` in place; return whether all quotients are finite.

    The quotients are IEEE divisions, bit for bit those of ``Tensor.div_``; the finiteness test
    is ``first_non_finite`` over the results (one extra read pass).

    Examples:
        >>> x = [torch.tensor([2.0, 4.0])]
        >>> divide_(x, 2.0), x[0].tolist()
        (True, [1.0, 2.0])
    """
    with torch.no_grad():
        for idx in group_by_device_and_dtype(tensors):
            torch._foreach_div_([tensors[i] for i in idx], denominator)
    return first_non_finite(tensors) is None
