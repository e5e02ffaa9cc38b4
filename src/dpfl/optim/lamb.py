"""LAMB: Adam moments with a per-tensor trust ratio, and the layer-wise-normalized Adam recipe.

For each parameter tensor h with pseudo-gradient g (t = step count of that tensor)::

    m ← β1·m + (1−β1)·g            v ← β2·v + (1−β2)·g²
    m̂ = m / (1−β1^t)               v̂ = v / (1−β2^t)
    r_h = m̂ / (√v̂ + eps) + λ·θ_h
    θ_h ← θ_h − lr · φ_h · r_h,     φ_h = ‖θ_h‖ / ‖r_h‖   (1 when either norm is 0)

with ``φ_h = min(φ_h, trust_clip)`` when ``trust_clip`` is set, and ``φ_h = 1`` for groups with
``trust_ratio=False`` (then LAMB is Adam with decoupled, AdamW-style weight decay; with
``weight_decay=0`` it is exactly Adam). The step norm of a trust-ratio tensor is ``lr·‖θ_h‖``
whatever the scale of g: this is what makes the optimizer robust to the DP noise scale and clipping
bound on the server.

References:
    You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
    arXiv 1904.00962 (LAMB). Pelikan et al., arXiv 2310.00098 (LAMB as the DP-FL server
    optimizer: β1 0.9, β2 0.999, eps 1e-6, λ 0, exponential LR decay).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from dpfl._checks import require_non_negative, require_probability
from dpfl.optim._trust import (
    _LayerwiseOptimizer,
    group_by_device_and_dtype,
    trust_ratio,
    validate_common,
)

__all__ = ["LAMB", "layerwise_adam"]


class LAMB(_LayerwiseOptimizer):
    """LAMB server optimizer: Adam moments, per-tensor trust ratio (layer-wise normalization).

    Args:
        params: Parameters or parameter groups (dicts may override any option below, including
            ``trust_ratio=False`` to exclude e.g. biases and LayerNorm from the ratio).
        lr: Learning rate η (>= 0). Works with ``torch.optim.lr_scheduler``.
        betas: ``(β1, β2)``, each in [0, 1).
        eps: ξ added to ``√v̂`` (>= 0). Default 1e-6 as in the paper.
        weight_decay: λ, added to the direction before the trust ratio (>= 0).
        trust_ratio: Apply the per-tensor trust ratio (default True). False gives Adam/AdamW.
        trust_clip: If set (> 0), the ratio is clipped to ``min(ratio, trust_clip)``.
        exclude_from_trust: Optional predicate ``param -> bool``; matching tensors of every
            trust-ratio group are moved into a sibling group with ``trust_ratio=False``
            (e.g. ``lambda p: p.ndim <= 1``). For name-based rules use
            :func:`~dpfl.optim.trust_ratio_groups`.
        foreach: None (default) picks the ``torch._foreach_*`` path when all tensors are dense
            and on CPU/CUDA; True/False forces the fast path or the per-tensor reference path.

    Raises:
        ValueError: If an option is out of range; the message names the option.
        TypeError: If an option has the wrong type.

    Examples:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = LAMB(model.parameters(), lr=0.002)
        >>> model(torch.ones(1, 4)).sum().backward()
        >>> opt.step()

    References:
        You et al., arXiv 1904.00962; Pelikan et al., arXiv 2310.00098.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        trust_ratio: bool = True,
        trust_clip: float | None = None,
        exclude_from_trust: Callable[[Tensor], bool] | None = None,
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "trust_ratio": trust_ratio,
            "trust_clip": trust_clip,
            "foreach": foreach,
        }
        self._validate_group(defaults)
        super().__init__(params, defaults, exclude_from_trust=exclude_from_trust)

    def _validate_group(self, group: Mapping[str, Any]) -> None:
        require_non_negative("lr", group["lr"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            require_probability(f"betas[{i}]", beta, low_open=False, high_open=True)
        require_non_negative("eps", group["eps"])
        require_non_negative("weight_decay", group["weight_decay"])
        validate_common(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Take one LAMB step on every parameter that has a ``.grad``.

        Args:
            closure: Optional closure re-evaluating the model and returning the loss.

        Returns:
            The closure's loss, or None.

        Raises:
            RuntimeError: If a gradient is sparse.
        """
        loss = self._evaluate(closure)
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p, grad in self._params_with_grad(group):
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                grads.append(grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(int(state["step"]))
            if not params:
                continue
            kernel = _lamb_foreach if self._use_foreach(group, params, grads) else _lamb_single
            kernel(params, grads, exp_avgs, exp_avg_sqs, steps, group)
        return loss


def _lamb_single(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    group: Mapping[str, Any],
) -> None:
    """Reference path: the formula written out per tensor."""
    beta1, beta2 = group["betas"]
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        r = m_hat / (v_hat.sqrt() + group["eps"])
        if group["weight_decay"] != 0:
            r.add_(p, alpha=group["weight_decay"])
        if group["trust_ratio"]:
            ratio = trust_ratio(
                torch.linalg.vector_norm(p),
                torch.linalg.vector_norm(r),
                trust_clip=group["trust_clip"],
            )
            r.mul_(ratio)
        p.add_(r, alpha=-group["lr"])


def _lamb_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    group: Mapping[str, Any],
) -> None:
    """Fast path: ``torch._foreach_*`` per (device, dtype) bucket, few passes over memory.

    Bias corrections are folded into scalars: with ``c = √(1−β2^t) / (1−β1^t)``,
    ``m̂/(√v̂+eps) = c · m/(√v + eps·√(1−β2^t))``. The unscaled direction ``u`` is built in one
    temporary; ``r = c·(u + (λ/c)·θ)``, so ``‖r‖ = c·‖u + (λ/c)·θ‖`` and the final update is one
    ``addcmul_`` with a per-tensor scalar ``−lr·φ·c``.
    """
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    for idx in group_by_device_and_dtype(params):
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        ms = [exp_avgs[i] for i in idx]
        vs = [exp_avg_sqs[i] for i in idx]
        bc1 = [1 - beta1 ** steps[i] for i in idx]
        bc2_sqrt = [math.sqrt(1 - beta2 ** steps[i]) for i in idx]
        scale = [b2 / b1 for b1, b2 in zip(bc1, bc2_sqrt, strict=True)]  # c per tensor

        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        u = torch._foreach_sqrt(vs)
        torch._foreach_add_(u, [eps * b for b in bc2_sqrt])
        torch._foreach_reciprocal_(u)
        torch._foreach_mul_(u, ms)  # u = m / (√v + eps·√bc2)
        if wd != 0:
            wd_scale = torch.tensor([wd / c for c in scale], dtype=ps[0].dtype, device=ps[0].device)
            torch._foreach_addcmul_(u, ps, list(wd_scale.unbind()))
        device = ps[0].device
        c_vec = torch.tensor(scale, dtype=torch.float64, device=device)
        if group["trust_ratio"]:
            w_norm = torch.stack(torch._foreach_norm(ps)).to(torch.float64)
            u_norm = torch.stack(torch._foreach_norm(u)).to(torch.float64)
            ratio = trust_ratio(w_norm, c_vec * u_norm, trust_clip=group["trust_clip"])
            step_scale = (-lr) * ratio * c_vec
        else:
            step_scale = (-lr) * c_vec
        torch._foreach_addcmul_(ps, u, list(step_scale.to(ps[0].dtype).unbind()))


def layerwise_adam(
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    lr: float,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    trust_clip: float | None = None,
    exclude_from_trust: Callable[[Tensor], bool] | None = None,
    foreach: bool | None = None,
) -> LAMB:
    """Layer-wise-normalized Adam: Adam's update rescaled by the per-tensor trust ratio.

    This is a composition, not a new class: it returns :class:`LAMB` with ``weight_decay=0`` and
    ``trust_ratio=True``, i.e. ``θ_h ← θ_h − lr · (‖θ_h‖/‖a_h‖) · a_h`` with Adam's direction
    ``a_h = m̂_h / (√v̂_h + eps)``. Use ``torch.optim.Adam`` as the unnormalized baseline.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate (>= 0).
        betas: Adam's ``(β1, β2)``, each in [0, 1).
        eps: Added to ``√v̂`` (>= 0).
        trust_clip: Optional upper bound on the trust ratio.
        exclude_from_trust: Optional predicate ``param -> bool`` excluding tensors from the ratio.
        foreach: Fast-path selection, as in :class:`LAMB`.

    Returns:
        A configured :class:`LAMB` optimizer.

    Raises:
        ValueError: If an option is out of range (the message names it).

    Examples:
        >>> opt = layerwise_adam(torch.nn.Linear(3, 1).parameters(), lr=1e-3)
        >>> opt.defaults["weight_decay"], opt.defaults["trust_ratio"]
        (0.0, True)

    References:
        Pelikan et al., arXiv 2310.00098 (layer-wise normalizing Adam on the server).
    """
    return LAMB(
        params,
        lr,
        betas=betas,
        eps=eps,
        weight_decay=0.0,
        trust_ratio=True,
        trust_clip=trust_clip,
        exclude_from_trust=exclude_from_trust,
        foreach=foreach,
    )
