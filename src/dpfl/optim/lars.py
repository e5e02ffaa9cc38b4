"""LARS: momentum SGD with a per-tensor (layer-wise) adaptive learning rate.

The variant implemented here is the widely used "scaled gradient, heavy-ball momentum" form
(momentum SGD without dampening or Nesterov, applied to the gradient after it has been scaled by the
local learning rate; the global learning rate multiplies the momentum buffer, as in
``torch.optim.SGD``). For each parameter tensor h with gradient g::

    φ_h = trust_coefficient · ‖θ_h‖ / (‖g_h‖ + λ‖θ_h‖ + eps)     (1 when ‖θ_h‖ = 0 or ‖g_h‖ = 0)
    d_h = φ_h · (g_h + λ·θ_h)
    b_h ← μ·b_h + d_h        (b_h = d_h on the first step)
    θ_h ← θ_h − lr · b_h

with ``φ_h = min(φ_h, trust_clip)`` when ``trust_clip`` is set and ``φ_h = 1`` for groups with
``trust_ratio=False`` (plain momentum SGD with L2 weight decay). It differs from Algorithm 1 of
You et al. (2017) only in where the global learning rate enters: the paper's buffer accumulates
``lr·d_h``; here ``lr`` multiplies the buffer, which is identical for a constant learning rate and
differs only while a scheduler changes ``lr``. The zero-norm fallback (ratio 1, the trust
coefficient is then not applied) follows common LARS implementations.

References:
    You, Gitman and Ginsburg, "Large Batch Training of Convolutional Networks",
    arXiv 1708.03888 (LARS). Pelikan et al., arXiv 2310.00098 (the central seed model is trained
    with LARS, momentum 0.9, trust coefficient 0.001).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from dpfl._checks import require_non_negative, require_positive, require_probability
from dpfl.optim._trust import (
    _LayerwiseOptimizer,
    check_lr,
    group_by_device_and_dtype,
    trust_ratio,
    validate_common,
    with_float_lr,
)

__all__ = ["LARS"]


class LARS(_LayerwiseOptimizer):
    """LARS optimizer: momentum SGD with a per-tensor trust ratio.

    Args:
        params: Parameters or parameter groups (dicts may override any option below, including
            ``trust_ratio=False`` to exclude e.g. biases and LayerNorm from the ratio).
        lr: Global learning rate (>= 0): a float, or a one-element Tensor as ``torch.optim``
            accepts (read with ``.item()`` at each step). Works with ``torch.optim.lr_scheduler``.
        momentum: μ in [0, 1). Default 0.9.
        trust_coefficient: Multiplies the ratio ``‖θ‖/(‖g‖+λ‖θ‖+eps)`` (> 0). Default 0.001.
        weight_decay: λ (>= 0), added to the gradient as ``λ·θ``.
        eps: Added to the ratio's denominator (>= 0). Default 1e-8.
        trust_ratio: Apply the per-tensor ratio (default True); False gives momentum SGD.
        trust_clip: If set (> 0), the local learning rate is ``min(φ, trust_clip)``.
        exclude_from_trust: Optional predicate ``param -> bool``; matching tensors go into a
            sibling group with ``trust_ratio=False``.
        foreach: None (default) picks the ``torch._foreach_*`` path when all tensors are dense
            and on CPU/CUDA; True/False forces the fast path or the per-tensor reference path.

    Raises:
        ValueError: If an option is out of range; the message names the option.
        TypeError: If an option has the wrong type.

    Examples:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = LARS(model.parameters(), lr=0.1)
        >>> model(torch.ones(1, 4)).sum().backward()
        >>> opt.step()

    References:
        You et al., arXiv 1708.03888; Pelikan et al., arXiv 2310.00098.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor,
        *,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        trust_ratio: bool = True,
        trust_clip: float | None = None,
        exclude_from_trust: Callable[[Tensor], bool] | None = None,
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "trust_coefficient": trust_coefficient,
            "weight_decay": weight_decay,
            "eps": eps,
            "trust_ratio": trust_ratio,
            "trust_clip": trust_clip,
            "foreach": foreach,
        }
        self._validate_group(defaults)
        super().__init__(params, defaults, exclude_from_trust=exclude_from_trust)

    def _validate_group(self, group: Mapping[str, Any]) -> None:
        check_lr(group["lr"])
        require_probability("momentum", group["momentum"], low_open=False, high_open=True)
        require_positive("trust_coefficient", group["trust_coefficient"])
        require_non_negative("weight_decay", group["weight_decay"])
        require_non_negative("eps", group["eps"])
        validate_common(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Take one LARS step on every parameter that has a ``.grad``.

        Args:
            closure: Optional closure re-evaluating the model and returning the loss.

        Returns:
            The closure's loss, or None.

        Raises:
            RuntimeError: If a gradient is sparse.
        """
        loss = self._evaluate(closure)
        groups = [with_float_lr(g) for g in self.param_groups]  # a Tensor lr: checked up front
        for group in groups:
            params, grads, bufs = [], [], []
            for p, grad in self._params_with_grad(group):
                params.append(p)
                grads.append(grad)
                bufs.append(self.state[p].get("momentum_buffer"))
            if not params:
                continue
            if self._use_foreach(group, params, grads):
                new_bufs = _lars_foreach(params, grads, bufs, group)
            else:
                new_bufs = _lars_single(params, grads, bufs, group)
            if group["momentum"] != 0:
                for p, buf in zip(params, new_bufs, strict=True):
                    self.state[p]["momentum_buffer"] = buf
        return loss


def _local_lr(w_norm: Tensor, g_norm: Tensor, group: Mapping[str, Any]) -> Tensor:
    """φ = tc·‖θ‖/(‖g‖+λ‖θ‖+eps), 1 where either norm is 0, then clipped; ones without ratio."""
    if not group["trust_ratio"]:
        return torch.ones_like(w_norm)
    denom = g_norm + group["weight_decay"] * w_norm + group["eps"]
    return trust_ratio(
        w_norm,
        g_norm,
        coefficient=group["trust_coefficient"],
        denominator=denom,
        trust_clip=group["trust_clip"],
    )


def _lars_single(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor | None],
    group: Mapping[str, Any],
) -> list[Tensor | None]:
    """Reference path: the formula written out per tensor. Returns the momentum buffers."""
    out: list[Tensor | None] = []
    for p, g, buf in zip(params, grads, bufs, strict=True):
        local = _local_lr(torch.linalg.vector_norm(p), torch.linalg.vector_norm(g), group)
        d = g.add(p, alpha=group["weight_decay"]).mul_(local)
        if group["momentum"] != 0:
            buf = d.clone() if buf is None else buf.mul_(group["momentum"]).add_(d)
            d = buf
        p.add_(d, alpha=-group["lr"])
        out.append(buf)
    return out


def _lars_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor | None],
    group: Mapping[str, Any],
) -> list[Tensor | None]:
    """Fast path: ``torch._foreach_*`` per (device, dtype) bucket. Returns the momentum buffers."""
    lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
    out: list[Tensor | None] = list(bufs)
    for idx in group_by_device_and_dtype(params):
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        if group["trust_ratio"]:
            w_norm = torch.stack(torch._foreach_norm(ps)).to(torch.float64)
            g_norm = torch.stack(torch._foreach_norm(gs)).to(torch.float64)
            local = _local_lr(w_norm, g_norm, group)
        else:
            local = torch.ones(len(ps), dtype=torch.float64, device=ps[0].device)
        local = local.to(ps[0].dtype)
        if momentum == 0:
            # θ ← θ·(1 − lr·φ·λ) − lr·φ·g
            if wd != 0:
                torch._foreach_mul_(ps, list((1 - lr * wd * local).unbind()))
            torch._foreach_addcmul_(ps, gs, list((-lr * local).unbind()))
            continue
        bs: list[Tensor] = []
        for i in idx:
            buf = out[i]
            if buf is None:
                buf = torch.zeros_like(params[i], memory_format=torch.preserve_format)
                out[i] = buf
            bs.append(buf)
        torch._foreach_mul_(bs, momentum)
        torch._foreach_addcmul_(bs, gs, list(local.unbind()))
        if wd != 0:
            torch._foreach_addcmul_(bs, ps, list((wd * local).unbind()))
        torch._foreach_add_(ps, bs, alpha=-lr)
    return out
