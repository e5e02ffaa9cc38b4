"""Scale invariance of the per-layer trust ratio (hypothesis).

With layer-wise normalization the step of every tensor has norm ``lr·‖θ_h‖`` whatever the scale of
the pseudo-gradient, so neither the DP noise level nor the clipping bound C sets the server step.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpfl.optim import LAMB, LARS, layerwise_adam

# The step norm is measured as ‖θ_new − θ_old‖ in float64 with |θ| ~ 1: cancellation leaves an
# absolute error of order 1e-16, so tiny steps (down to ~1e-10) are compared to a relative 1e-6.
TOL, ABS_TOL = 1e-6, 1e-14

shapes = st.lists(
    st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4
)


def _setup(shape_list, seed, scale_exp):
    gen = torch.Generator().manual_seed(seed)
    params = [
        (torch.randn(s, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
        for s in shape_list
    ]
    scale = 10.0**scale_exp
    grads = [
        [scale * torch.randn(s, generator=gen, dtype=torch.float64) for s in shape_list]
        for _ in range(3)
    ]
    return params, grads


def _step_norms(opt, params, grads):
    """Apply each gradient set; yield (‖θ before‖, ‖step‖) per tensor per step."""
    for gs in grads:
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, gs, strict=True):
            p.grad = g
        opt.step()
        for b, p in zip(before, params, strict=True):
            yield float(b.norm()), float((p.detach() - b).norm())


@pytest.mark.parametrize("foreach", [True, False])
@given(
    shape_list=shapes,
    seed=st.integers(0, 2**16),
    scale_exp=st.floats(-8, 8),
    lr=st.floats(1e-4, 0.5),
    wd=st.sampled_from([0.0, 1e-2]),
)
def test_lamb_step_norm_is_lr_times_weight_norm(foreach, shape_list, seed, scale_exp, lr, wd):
    params, grads = _setup(shape_list, seed, scale_exp)
    opt = LAMB(params, lr, weight_decay=wd, foreach=foreach)
    for w_norm, s_norm in _step_norms(opt, params, grads):
        assert s_norm == pytest.approx(lr * w_norm, rel=TOL, abs=ABS_TOL)


@given(
    shape_list=shapes,
    seed=st.integers(0, 2**16),
    scale_exp=st.floats(-8, 8),
    lr=st.floats(1e-4, 0.5),
    clip=st.floats(1e-3, 10.0),
)
def test_clipped_ratio_step_norm(shape_list, seed, scale_exp, lr, clip):
    """With ``trust_clip`` the first step is ``lr·min(‖θ‖, clip·‖r‖)``, r = g/(|g|+eps)."""
    params, grads = _setup(shape_list, seed, scale_exp)
    eps = 1e-6
    opt = layerwise_adam(params, lr, eps=eps, trust_clip=clip)
    r_norms = [float((g / (g.abs() + eps)).norm()) for g in grads[0]]
    got = list(_step_norms(opt, params, grads[:1]))
    for (w_norm, s_norm), r_norm in zip(got, r_norms, strict=True):
        assert s_norm == pytest.approx(lr * min(w_norm, clip * r_norm), rel=TOL, abs=ABS_TOL)
        assert s_norm <= lr * clip * r_norm * (1 + TOL) + ABS_TOL


@pytest.mark.parametrize("foreach", [True, False])
@given(
    shape_list=shapes,
    seed=st.integers(0, 2**16),
    scale_exp=st.floats(-8, 8),
    lr=st.floats(1e-4, 0.5),
    tc=st.floats(1e-4, 1.0),
)
def test_lars_step_norm_is_scale_invariant(foreach, shape_list, seed, scale_exp, lr, tc):
    """LARS (no momentum, no decay, eps=0): every step has norm ``lr·tc·‖θ‖``."""
    params, grads = _setup(shape_list, seed, scale_exp)
    opt = LARS(params, lr, momentum=0.0, trust_coefficient=tc, eps=0.0, foreach=foreach)
    for w_norm, s_norm in _step_norms(opt, params, grads):
        assert s_norm == pytest.approx(lr * tc * w_norm, rel=TOL, abs=ABS_TOL)
        assert math.isfinite(s_norm)
