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

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from dpfl._checks import require_non_negative, require_probability
from dpfl.optim import _kernel, _lamb_fused
from dpfl.optim._trust import (
    NonFiniteGradientError,
    _LayerwiseOptimizer,
    check_lr,
    first_non_finite,
    group_by_device_and_dtype,
    trust_ratio,
    validate_common,
    with_float_lr,
)

__all__ = ["LAMB", "layerwise_adam"]


class LAMB(_LayerwiseOptimizer):
    """LAMB server optimizer: Adam moments, per-tensor trust ratio (layer-wise normalization).

    Args:
        params: Parameters or parameter groups (dicts may override any option below, including
            ``trust_ratio=False`` to exclude e.g. biases and LayerNorm from the ratio).
        lr: Learning rate η (>= 0): a float, or a one-element Tensor as ``torch.optim``
            accepts (read with ``.item()`` at each step). Works with ``torch.optim.lr_scheduler``.
        betas: ``(β1, β2)``, each in [0, 1).
        eps: ξ added to ``√v̂`` (>= 0). Default 1e-6 as in the paper.
        weight_decay: λ, added to the direction before the trust ratio (>= 0).
        trust_ratio: Apply the per-tensor trust ratio (default True). False gives Adam/AdamW.
        trust_clip: If set (> 0), the ratio is clipped to ``min(ratio, trust_clip)``.
        exclude_from_trust: Optional predicate ``param -> bool``; matching tensors of every
            trust-ratio group are moved into a sibling group with ``trust_ratio=False``
            (e.g. ``lambda p: p.ndim <= 1``). For name-based rules use
            [`trust_ratio_groups`][dpfl.optim.trust_ratio_groups].
        maximize: Use ``−g`` as the gradient (as in ``torch.optim.Adam``); default False.
            [`server_step`][dpfl.optim.server_step] sets it to pass the update ``Δ = −g`` without
            copying.
        foreach: With ``fused`` not True: None picks the ``torch._foreach_*`` path when all
            tensors are dense and on CPU/CUDA; True/False forces the ``foreach`` path or the
            per-tensor reference path.
        fused: Opt-in fused CPU path (one C call per tensor: a moment-and-norm pass, then the
            update while the tensor is still in cache). True requires it: every tensor of the
            group must be a contiguous float32/float64 CPU tensor, and the C kernel is compiled
            once with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``; Linux) into
            ``<cache_dir>/kernels`` and loaded only after its owner, mode and SHA-256 are checked
            (see [the kernel's source](https://github.com/dpfl-dev/dpfl/blob/main/src/dpfl/optim/_kernel.py));
            ``RuntimeError`` naming the reason where it cannot run. None (default) and False
            never use it: no compiler ever runs.
        cache_dir: With ``fused=True``, the cache root for the compiled kernel (default
            ``$DPFL_CACHE``, else ``$XDG_CACHE_HOME/dpfl``, else ``~/.cache/dpfl``). It must
            be owned by this user and not writable by others.

    Raises:
        ValueError: If an option is out of range; the message names the option.
        TypeError: If an option has the wrong type.
        RuntimeError: If ``fused=True`` and the fused path cannot run on these parameters or the
            kernel cannot be built or loaded safely.

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
        lr: float | Tensor,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        trust_ratio: bool = True,
        trust_clip: float | None = None,
        exclude_from_trust: Callable[[Tensor], bool] | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._cache_dir = cache_dir  # read by add_param_group, which the base __init__ calls
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "trust_ratio": trust_ratio,
            "trust_clip": trust_clip,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
        }
        self._validate_group(defaults)
        super().__init__(params, defaults, exclude_from_trust=exclude_from_trust)
        self._finite_scope = False

    @contextlib.contextmanager
    def checking_finite(self) -> Iterator[None]:
        """Within the block every [`step`][dpfl.optim.LAMB.step] checks finiteness as with
        ``check_finite=True``.

        [`server_step`][dpfl.optim.server_step] uses it, so a subclass whose ``step(closure)`` calls
        ``super().step(closure)`` keeps the check.

        Examples:
            >>> p = torch.zeros(2, requires_grad=True)
            >>> opt = LAMB([p], lr=0.1)
            >>> p.grad = torch.tensor([1.0, float("nan")])
            >>> with opt.checking_finite():
            ...     opt.step()  # doctest: +IGNORE_EXCEPTION_DETAIL
            Traceback (most recent call last):
            NonFiniteGradientError: ...
        """
        previous = getattr(self, "_finite_scope", False)
        self._finite_scope = True
        try:
            yield
        finally:
            self._finite_scope = previous

    def _validate_group(self, group: Mapping[str, Any]) -> None:
        check_lr(group["lr"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            require_probability(f"betas[{i}]", beta, low_open=False, high_open=True)
        require_non_negative("eps", group["eps"])
        require_non_negative("weight_decay", group["weight_decay"])
        validate_common(group)
        if not isinstance(group["maximize"], bool):
            raise TypeError(f"maximize must be a bool, got {group['maximize']!r}")
        fused = group["fused"]
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be None, True or False, got {fused!r}")
        if fused and group["foreach"]:
            raise ValueError("fused=True and foreach=True cannot both be set; choose one path")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate and register a group; with ``fused=True`` also check that it can run fused
        (building or loading the kernel if this process has not yet).

        Args:
            param_group: A dict with ``"params"`` and any option of the constructor to override.

        Raises:
            ValueError: If an option is out of range (the message names it); no group is added.
            RuntimeError: If ``fused=True`` but the fused path cannot run on these tensors.
        """
        if isinstance(param_group, dict) and {**self.defaults, **param_group}.get("fused"):
            params = param_group["params"]
            params = [params] if isinstance(params, Tensor) else list(params)
            param_group = {**param_group, "params": params}
            problem = _lamb_fused.unsupported(params)
            if problem is not None:
                raise RuntimeError(f"LAMB(fused=True) cannot run: {problem}")
            self._fused_kernel()
        super().add_param_group(param_group)

    def _fused_kernel(self) -> _kernel.Kernel:
        """The C kernel of ``fused=True`` (built on first use; ``RuntimeError`` if it can't be)."""
        try:
            return _kernel.load(getattr(self, "_cache_dir", None))
        except _kernel.KernelError as err:
            raise RuntimeError(f"LAMB(fused=True) cannot run: the fused kernel: {err}") from err

    def _path(
        self, index: int, group: Mapping[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> str:
        """``"fused"``, ``"foreach"`` or ``"single"`` for this group (see the ``fused`` option)."""
        if group.get("fused"):
            problem = _lamb_fused.unsupported(params)
            if problem is not None:
                raise RuntimeError(f"LAMB(fused=True) cannot run on param group {index}: {problem}")
            return "fused"
        return "foreach" if self._use_foreach(group, params, grads) else "single"

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], float] | None = None, *, check_finite: bool = False
    ) -> float | None:
        """Take one LAMB step on every parameter that has a ``.grad``.

        Everything that can fail is checked before any parameter or state changes: sparse
        gradients, a ``fused=True`` group that cannot run fused, and (with ``check_finite``)
        non-finite gradients.

        Args:
            closure: Optional closure re-evaluating the model and returning the loss.
            check_finite: Raise [`NonFiniteGradientError`][dpfl.optim.NonFiniteGradientError] if any
                gradient holds NaN/inf (always on inside
                [`checking_finite`][dpfl.optim.LAMB.checking_finite]). Costs one read pass over the
                gradients, before any tensor changes.

        Returns:
            The closure's loss, or None.

        Raises:
            RuntimeError: If a gradient is sparse, or ``fused=True`` cannot run.
            NonFiniteGradientError: With ``check_finite``, naming the parameter (a ValueError).
        """
        loss = self._evaluate(closure)
        work = []
        for index, raw_group in enumerate(self.param_groups):
            group = with_float_lr(raw_group)  # a Tensor lr is read (and checked) once per step
            pairs = self._params_with_grad(group)
            if pairs:
                params = [p for p, _ in pairs]
                grads = [g for _, g in pairs]
                path = self._path(index, group, params, grads)
                kernel = self._fused_kernel() if path == "fused" else None
                work.append(_GroupStep(index, group, params, grads, path, kernel))
        for item in work:  # read-only phase: new state is created but not yet stored
            item.gather(self.state)
        if check_finite or getattr(self, "_finite_scope", False):
            for item in work:
                item.raise_if_non_finite()
        for item in work:
            item.commit(self.state)
        return loss


class _GroupStep:
    """One parameter group's step, split into a read-only phase and a commit."""

    def __init__(
        self,
        index: int,
        group: Mapping[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        path: str,
        kernel: _kernel.Kernel | None,
    ) -> None:
        self.index, self.group, self.params, self.path = index, group, params, path
        self.kernel = kernel
        if path == "fused":
            grads = [g.to(dtype=p.dtype).contiguous() for p, g in zip(params, grads, strict=True)]
        self.grads = grads
        self.exp_avgs: list[Tensor] = []
        self.exp_avg_sqs: list[Tensor] = []
        self.steps: list[int] = []

    def gather(self, states: Mapping[Tensor, dict[str, Any]]) -> None:
        for i, p in enumerate(self.params):
            state = states.get(p)
            if state:
                m, v = state["exp_avg"], state["exp_avg_sq"]
                self.steps.append(int(state["step"]) + 1)
            else:
                m = torch.zeros_like(p, memory_format=torch.preserve_format)
                v = torch.zeros_like(p, memory_format=torch.preserve_format)
                self.steps.append(1)
            if self.path == "fused":  # the C kernel reads raw memory: check shapes, layouts
                for t, what in ((self.grads[i], "gradient"), (m, "exp_avg"), (v, "exp_avg_sq")):
                    if t.shape != p.shape:
                        raise RuntimeError(
                            f"the {what} of parameter {i} of param group {self.index} has shape "
                            f"{tuple(t.shape)}, the parameter {tuple(p.shape)}"
                        )
                like = {"dtype": p.dtype, "device": p.device}
                m = m.to(**like, memory_format=torch.contiguous_format)  # no copy if it fits
                v = v.to(**like, memory_format=torch.contiguous_format)
            self.exp_avgs.append(m)
            self.exp_avg_sqs.append(v)

    def raise_if_non_finite(self) -> None:
        if self.kernel is not None:
            bad = _lamb_fused.first_non_finite(self.kernel, self.grads)
        else:
            bad = first_non_finite(self.grads)
        if bad is not None:
            p = self.params[bad]
            raise NonFiniteGradientError(
                f"the gradient of parameter {bad} of param group {self.index} (shape "
                f"{tuple(p.shape)}) contains NaN or infinite values; no parameter or optimizer "
                "state was changed",
                p,
            )

    def commit(self, states: dict[Tensor, dict[str, Any]]) -> None:
        for p, m, v, t in zip(
            self.params, self.exp_avgs, self.exp_avg_sqs, self.steps, strict=True
        ):
            state = states[p]
            state["exp_avg"], state["exp_avg_sq"], state["step"] = m, v, t
        args = (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps, self.group)
        if self.kernel is not None:
            _lamb_fused.step(self.kernel, *args)
        elif self.path == "foreach":
            _lamb_foreach(*args)
        else:
            _lamb_single(*args)


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
        if group.get("maximize", False):
            g = -g
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

        if group.get("maximize", False):  # m ← β1·m − (1−β1)·g without a negated copy of g
            torch._foreach_mul_(ms, beta1)
            torch._foreach_add_(ms, gs, alpha=-(1 - beta1))
        else:
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
    lr: float | Tensor,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    trust_clip: float | None = None,
    exclude_from_trust: Callable[[Tensor], bool] | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> LAMB:
    """Layer-wise-normalized Adam: Adam's update rescaled by the per-tensor trust ratio.

    This is a composition, not a new class: it returns [`LAMB`][dpfl.optim.LAMB] with
    ``weight_decay=0`` and ``trust_ratio=True``, i.e. ``θ_h ← θ_h − lr · (‖θ_h‖/‖a_h‖) · a_h`` with
    Adam's direction ``a_h = m̂_h / (√v̂_h + eps)``. Use ``torch.optim.Adam`` as the unnormalized
    baseline.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate (>= 0).
        betas: Adam's ``(β1, β2)``, each in [0, 1).
        eps: Added to ``√v̂`` (>= 0).
        trust_clip: Optional upper bound on the trust ratio.
        exclude_from_trust: Optional predicate ``param -> bool`` excluding tensors from the ratio.
        foreach: Fast-path selection, as in [`LAMB`][dpfl.optim.LAMB].
        fused: The opt-in fused CPU path, as in [`LAMB`][dpfl.optim.LAMB] (only ``True`` uses it).
        cache_dir: The kernel's cache root with ``fused=True``, as in [`LAMB`][dpfl.optim.LAMB].

    Returns:
        A configured [`LAMB`][dpfl.optim.LAMB] optimizer.

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
        fused=fused,
        cache_dir=cache_dir,
    )
