"""The fused CPU path of :class:`~dpfl.optim.LAMB`: one read-only norm pass, then torch's fused AdamW.

For each tensor h the step is ``θ_h ← θ_h − lr·φ_h·(m̂_h/(√v̂_h+eps) + λθ_h)``. With the per-tensor
learning rate ``lr·φ_h`` this is exactly torch's fused AdamW update (decoupled decay
``θ·(1 − lr·φ_h·λ)``, then ``− lr·φ_h·m̂/(√v̂+eps)``), so the work splits into:

1. :func:`lamb_sums`: a C kernel (:mod:`dpfl.optim._kernel`) reads ``θ, g, m, v`` once and returns
   ``Σr²`` and ``Σθ²`` (float64), computing the new moments in registers without storing them;
2. the caller checks the sums (a non-finite ``Σr²`` means a NaN/inf gradient) before anything
   changes, then :func:`apply` runs ``torch._fused_adamw_`` per tensor with ``lr·φ_h``.

Two passes over memory instead of the ``foreach`` path's dozen, and the finiteness check is free.

References:
    You et al., arXiv 1904.00962 (LAMB); Loshchilov and Hutter, arXiv 1711.05101 (AdamW's
    decoupled weight decay, which is the form LAMB's ``λθ`` term takes here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dpfl.optim._kernel import SUPPORTED_DTYPES, Kernel
from dpfl.optim._trust import trust_ratio

__all__ = ["apply", "lamb_sums", "unsupported"]


def unsupported(params: list[Tensor]) -> str | None:
    """Why the fused kernel cannot run on ``params`` (naming the first culprit), or None."""
    for i, p in enumerate(params):
        if p.device.type != "cpu":
            return f"parameter {i} is on {p.device}; the fused kernel runs on CPU tensors only"
        if p.dtype not in SUPPORTED_DTYPES:
            return f"parameter {i} has dtype {p.dtype}; the fused kernel needs float32 or float64"
        if p.layout != torch.strided or not p.is_contiguous():
            return f"parameter {i} is not a contiguous dense tensor"
    return None


def lamb_sums(
    kernel: Kernel,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    group: Mapping[str, Any],
) -> Tensor:
    """``(Σr², Σθ²)`` per tensor as a ``(len(params), 2)`` float64 tensor; changes nothing.

    ``steps`` are the step counts *after* this step; ``grads`` must be contiguous.
    """
    beta1, beta2 = group["betas"]
    sign = -1.0 if group.get("maximize", False) else 1.0
    rows = [
        [
            beta1,
            1 - beta1,
            beta2,
            1 - beta2,
            1 / (1 - beta1**t),
            1 / math.sqrt(1 - beta2**t),
            group["eps"],
            group["weight_decay"],
            sign,
        ]
        for t in steps
    ]
    scalars = torch.tensor(rows, dtype=torch.float64)
    out = torch.empty(len(params), 2, dtype=torch.float64)
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        kernel.lamb_sums(p, g, m, v, scalars[i], out[i])
    return out


def apply(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    group: Mapping[str, Any],
    sums: Tensor | None,
) -> None:
    """Update moments and parameters with torch's fused AdamW at learning rate ``lr·φ_h``.

    ``sums`` comes from :func:`lamb_sums` (None for a ``trust_ratio=False`` group: φ = 1).
    """
    beta1, beta2 = group["betas"]
    if sums is None:
        ratios = [1.0] * len(params)
    else:
        ratios = trust_ratio(
            sums[:, 1].sqrt(), sums[:, 0].sqrt(), trust_clip=group["trust_clip"]
        ).tolist()
    for p, g, m, v, t, ratio in zip(
        params, grads, exp_avgs, exp_avg_sqs, steps, ratios, strict=True
    ):
        torch._fused_adamw_(
            [p],
            [g],
            [m],
            [v],
            [],
            [torch.tensor(float(t))],
            lr=group["lr"] * ratio,
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            amsgrad=False,
            maximize=bool(group.get("maximize", False)),
        )
