"""The fused CPU path of [`LAMB`][dpfl.optim.LAMB]: one C call per tensor, two passes over it.

For each tensor h the step is ``θ_h ← θ_h − lr·φ_h·r_h`` with ``r_h = m̂_h/(√v̂_h+eps) + λθ_h`` and
``φ_h = ‖θ_h‖/‖r_h‖``, and ``φ_h`` needs the whole of ``r_h`` before any element of ``θ_h`` may
change. The C kernel (``_kernel``) therefore runs, per tensor and in one call:

1. a pass over ``θ, g, m, v`` that stores the new moments and accumulates ``Σr²`` and ``Σθ²`` in
   float64,
2. the trust ratio (the definition of [`trust_ratio`][dpfl.optim.trust_ratio], clip included),
3. the update pass, which reads ``θ, m, v`` and writes ``θ``; it walks each thread's slice
   backwards, so it starts on the data the first pass touched last, which is still in the cache.

Doing both passes of one tensor back to back (rather than all norms, then all updates) is what
makes the second pass cheap: the memory traffic approaches a single Adam step's. The price is
that a tensor is updated before the next one's gradient has been read, so the finiteness check
(``check_finite``) is a separate read-only pass over the gradients (``first_non_finite``)
that runs before any tensor changes. For ``trust_ratio=False`` groups only the update pass runs.

References:
    You et al., arXiv 1904.00962 (LAMB); Loshchilov and Hutter, arXiv 1711.05101 (decoupled
    weight decay, the form LAMB's ``λθ`` term takes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dpfl.optim._kernel import SUPPORTED_DTYPES, Kernel

__all__ = ["first_non_finite", "step", "unsupported"]


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


def first_non_finite(kernel: Kernel, tensors: list[Tensor]) -> int | None:
    """Index of the first tensor holding NaN/inf, else None (one read pass, no allocation).

    ``tensors`` must be contiguous float32/float64 CPU tensors (the fused path's gradients).
    """
    return next((i for i, t in enumerate(tensors) if not kernel.all_finite(t)), None)


def step(
    kernel: Kernel,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    group: Mapping[str, Any],
) -> Tensor:
    """One LAMB step of every tensor, in place on ``params``, ``exp_avgs``, ``exp_avg_sqs``.

    ``steps`` are the step counts *after* this step; every tensor must be contiguous, on CPU,
    of its parameter's dtype and shape ([`LAMB`][dpfl.optim.LAMB] guarantees it).

    Returns:
        A ``(len(params), 3)`` float64 tensor: ``Σr²``, ``Σθ²`` and the trust ratio used per
        tensor (sums 0 and ratio 1 for a ``trust_ratio=False`` group).
    """
    beta1, beta2 = group["betas"]
    clip = group["trust_clip"]
    rows: dict[int, int] = {}
    table: list[list[float]] = []
    for t in steps:
        if t not in rows:
            rows[t] = len(table)
            table.append(
                [
                    beta1,
                    1 - beta1,
                    beta2,
                    1 - beta2,
                    1 / (1 - beta1**t),
                    1 / math.sqrt(1 - beta2**t),
                    group["eps"],
                    group["weight_decay"],
                    -1.0 if group.get("maximize", False) else 1.0,
                    group["lr"],
                    1.0 if group["trust_ratio"] else 0.0,
                    math.inf if clip is None else clip,
                ]
            )
    scalars = torch.tensor(table, dtype=torch.float64)
    out = torch.zeros(len(params), 3, dtype=torch.float64)
    base, row_bytes = scalars.data_ptr(), scalars.stride(0) * scalars.element_size()
    out_base, out_bytes = out.data_ptr(), out.stride(0) * out.element_size()
    for i, (p, g, m, v, t) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True)
    ):
        kernel.lamb_step(p, g, m, v, base + rows[t] * row_bytes, out_base + i * out_bytes)
    return out
