"""LAMB / LARS / layer-wise Adam against independent float64 loops, state dicts, schedulers, args."""

from __future__ import annotations

import atexit
import io
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from dpfl.optim import LAMB, LARS, _kernel, layerwise_adam, trust_ratio, trust_ratio_groups

# The three LAMB paths. "fused" is opt-in and needs a C compiler once; the tests build it into a
# private temporary cache (never the user's), removed at exit (tests/test_optim_fused.py covers a
# machine without a compiler, tests/test_kernel_security.py the loader's checks).
KERNEL_CACHE = Path(tempfile.mkdtemp(prefix="dpfl-test-kernel-"))
atexit.register(shutil.rmtree, KERNEL_CACHE, True)
try:
    _kernel.load(KERNEL_CACHE)
    NO_KERNEL = None
except _kernel.KernelError as _err:
    NO_KERNEL = f"fused kernel unavailable: {_err}"
FUSED = pytest.param(
    {"fused": True, "cache_dir": KERNEL_CACHE},
    id="fused",
    marks=pytest.mark.skipif(NO_KERNEL is not None, reason=str(NO_KERNEL)),
)
LAMB_PATHS = [FUSED, pytest.param({"fused": False, "foreach": True}, id="foreach")]
LAMB_PATHS.append(pytest.param({"fused": False, "foreach": False}, id="reference"))

SHAPES = [(3, 4), (5,), (2, 3, 2), (4,), (6,), (1,)]
ZERO_PARAM, ZERO_GRAD, SOMETIMES_NONE = 3, 4, 5  # indices with special roles
STEPS = 12


def _initial_params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    params[ZERO_PARAM].zero_()  # ‖θ‖ = 0 at the start: ratio must fall back to 1
    return params


def _grad_sequence() -> list[list[torch.Tensor | None]]:
    """Pseudo-gradients over many steps with scales 1e-3..1e3, a zero tensor and missing grads."""
    gen = torch.Generator().manual_seed(1)
    seq: list[list[torch.Tensor | None]] = []
    for t in range(STEPS):
        scale = 10.0 ** (3 * math.sin(t))
        grads: list[torch.Tensor | None] = [
            scale * torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES
        ]
        grads[ZERO_GRAD] = torch.zeros(SHAPES[ZERO_GRAD], dtype=torch.float64)
        if t % 2 == 1:
            grads[SOMETIMES_NONE] = None  # this tensor's step count falls behind the others
        seq.append(grads)
    return seq


def _norm(x: torch.Tensor) -> float:
    return math.sqrt(sum(float(v) ** 2 for v in x.flatten()))


def _ref_lamb(lrs, betas, eps, wd, trust, clip):
    """Plain float64 LAMB, one tensor at a time, written from the formula (design.md 2.3)."""
    b1, b2 = betas
    theta = _initial_params()
    m = [torch.zeros_like(p) for p in theta]
    v = [torch.zeros_like(p) for p in theta]
    t = [0] * len(theta)
    for lr, grads in zip(lrs, _grad_sequence(), strict=True):
        for h, g in enumerate(grads):
            if g is None:
                continue
            t[h] += 1
            m[h] = b1 * m[h] + (1 - b1) * g
            v[h] = b2 * v[h] + (1 - b2) * g * g
            m_hat = m[h] / (1 - b1 ** t[h])
            v_hat = v[h] / (1 - b2 ** t[h])
            r = m_hat / (torch.sqrt(v_hat) + eps) + wd * theta[h]
            ratio = 1.0
            if trust:
                wn, rn = _norm(theta[h]), _norm(r)
                ratio = wn / rn if wn > 0 and rn > 0 else 1.0
                if clip is not None:
                    ratio = min(ratio, clip)
            theta[h] = theta[h] - lr * ratio * r
    return theta


def _ref_lars(lrs, momentum, tc, wd, eps, trust, clip):
    """Plain float64 LARS (scaled-gradient heavy-ball variant), written from the formula."""
    theta = _initial_params()
    buf: list[torch.Tensor | None] = [None] * len(theta)
    for lr, grads in zip(lrs, _grad_sequence(), strict=True):
        for h, g in enumerate(grads):
            if g is None:
                continue
            local = 1.0
            if trust:
                wn, gn = _norm(theta[h]), _norm(g)
                local = tc * wn / (gn + wd * wn + eps) if wn > 0 and gn > 0 else 1.0
                if clip is not None:
                    local = min(local, clip)
            d = local * (g + wd * theta[h])
            if momentum:
                prev = buf[h]
                buf[h] = d if prev is None else momentum * prev + d
                d = buf[h]
            theta[h] = theta[h] - lr * d
    return theta


def _run(make_opt, *, gamma=None, dtype=torch.float64):
    """Drive an optimizer over the shared gradient sequence; returns params and the LRs used."""
    params = [p.to(dtype).requires_grad_() for p in _initial_params()]
    opt = make_opt(params)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma) if gamma else None
    lrs = []
    for grads in _grad_sequence():
        lrs.append(opt.param_groups[0]["lr"])
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.to(dtype)
        opt.step()
        if sched is not None:
            sched.step()
    return [p.detach() for p in params], lrs


@pytest.mark.parametrize("path", LAMB_PATHS)
@pytest.mark.parametrize(
    ("wd", "trust", "clip", "gamma"),
    [
        (0.0, True, None, 0.9),
        (0.05, True, None, None),
        (0.01, True, 0.7, 0.95),
        (0.02, False, None, None),
        (0.01, True, 1e-3, None),  # the clip binds on every tensor
    ],
)
def test_lamb_matches_float64_loop(path, wd, trust, clip, gamma):
    kw = dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=wd, trust_ratio=trust, trust_clip=clip)
    got, lrs = _run(lambda ps: LAMB(ps, lr=0.05, **path, **kw), gamma=gamma)
    want = _ref_lamb(lrs, kw["betas"], kw["eps"], wd, trust, clip)
    if gamma:
        assert lrs[-1] == pytest.approx(0.05 * gamma ** (STEPS - 1))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    ("momentum", "wd", "trust", "clip", "gamma"),
    [
        (0.9, 0.0, True, None, 0.9),
        (0.9, 0.01, True, 5e-3, None),
        (0.0, 0.01, True, None, None),
        (0.5, 0.1, False, None, 0.95),
    ],
)
def test_lars_matches_float64_loop(foreach, momentum, wd, trust, clip, gamma):
    kw = dict(
        momentum=momentum,
        trust_coefficient=0.01,
        weight_decay=wd,
        eps=1e-8,
        trust_ratio=trust,
        trust_clip=clip,
    )
    got, lrs = _run(lambda ps: LARS(ps, lr=0.5, foreach=foreach, **kw), gamma=gamma)
    want = _ref_lars(lrs, momentum, 0.01, wd, 1e-8, trust, clip)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_foreach_float32_close_to_reference(cls):
    a, _ = _run(lambda ps: cls(ps, lr=0.01, weight_decay=0.01, foreach=True), dtype=torch.float32)
    b, _ = _run(lambda ps: cls(ps, lr=0.01, weight_decay=0.01, foreach=False), dtype=torch.float32)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", [FUSED])
def test_fused_float32_close_to_float64_reference(path):
    a, lrs = _run(lambda ps: LAMB(ps, lr=0.01, weight_decay=0.01, **path), dtype=torch.float32)
    want = _ref_lamb(lrs, (0.9, 0.999), 1e-6, 0.01, True, None)
    for x, w in zip(a, want, strict=True):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x.double(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("cls", "path"),
    [(LARS, {"foreach": True}), (LAMB, {"foreach": True, "fused": False}), (LAMB, FUSED.values[0])],
    ids=["LARS-foreach", "LAMB-foreach", "LAMB-fused"],
)
def test_mixed_dtypes_in_one_group(cls, path):
    """The fast paths handle float32 and float64 in one group; results match the reference."""
    if path.get("fused") and NO_KERNEL is not None:
        pytest.skip(NO_KERNEL)

    def run(kwargs):
        gen = torch.Generator().manual_seed(3)
        ps = [
            torch.randn(4, generator=gen, dtype=dt).requires_grad_()
            for dt in (torch.float32, torch.float64, torch.float32)
        ]
        opt = cls(ps, lr=0.1, **kwargs)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(4, generator=gen, dtype=p.dtype)
            opt.step()
        return ps

    for x, y in zip(run(path), run({"foreach": False}), strict=True):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("path", LAMB_PATHS)
def test_lamb_without_trust_ratio_is_adam(path):
    got, _ = _run(lambda ps: LAMB(ps, lr=0.01, eps=1e-7, trust_ratio=False, **path))
    adam, _ = _run(lambda ps: torch.optim.Adam(ps, lr=0.01, eps=1e-7, foreach=True))
    for x, y in zip(got, adam, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_layerwise_adam_is_lamb_without_weight_decay():
    opt = layerwise_adam([torch.zeros(2, requires_grad=True)], lr=0.1, trust_clip=2.0)
    assert isinstance(opt, LAMB)
    assert opt.defaults["weight_decay"] == 0.0 and opt.defaults["trust_ratio"]
    got, lrs = _run(lambda ps: layerwise_adam(ps, lr=0.02))
    want = _ref_lamb(lrs, (0.9, 0.999), 1e-6, 0.0, True, None)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_exclude_from_trust_predicate_and_groups_helper(cls):
    def run(make):
        torch.manual_seed(0)  # only for model init; the optimizers themselves use no RNG
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
        opt = make(model)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            opt.step()
        return opt, [p.detach().clone() for p in model.parameters()]

    opt_a, a = run(lambda m: cls(m.parameters(), lr=0.1, exclude_from_trust=lambda p: p.ndim <= 1))
    opt_b, b = run(
        lambda m: cls(trust_ratio_groups(m.named_parameters(), lambda n, p: p.ndim <= 1), lr=0.1)
    )
    opt_c, c = run(lambda m: cls(m.parameters(), lr=0.1))
    assert [g["trust_ratio"] for g in opt_a.param_groups] == [True, False]
    assert [len(g["params"]) for g in opt_a.param_groups] == [1, 3]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)
    assert not torch.allclose(a[1], c[1])  # the bias moved differently without the ratio
    torch.testing.assert_close(a[0], c[0])  # the weight kept its ratio


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: LAMB(ps, lr=0.01, weight_decay=0.01, trust_clip=3.0),
        lambda ps: LARS(ps, lr=0.1, weight_decay=0.01),
    ],
)
def test_state_dict_round_trip_continues_identically(make):
    params = [p.float().requires_grad_() for p in _initial_params()]
    opt = make(params)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    grads = _grad_sequence()

    def step(o, s, ps, gs):
        for p, g in zip(ps, gs, strict=True):
            p.grad = None if g is None else g.float()
        o.step()
        s.step()

    for gs in grads[:5]:
        step(opt, sched, params, gs)
    buf = io.BytesIO()
    torch.save(
        {
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "params": [p.detach() for p in params],
        },
        buf,
    )
    buf.seek(0)
    saved = torch.load(buf)
    params2 = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = make(params2)
    sched2 = torch.optim.lr_scheduler.ExponentialLR(opt2, 0.9)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    for gs in grads[5:]:
        step(opt, sched, params, gs)
        step(opt2, sched2, params2, gs)
    for x, y in zip(params, params2, strict=True):
        assert torch.equal(x, y)
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (LAMB, {"lr": -1.0}, "lr"),
        (LAMB, {"lr": float("nan")}, "lr"),
        (LAMB, {"betas": (1.0, 0.9)}, r"betas\[0\]"),
        (LAMB, {"betas": (0.9, -0.1)}, r"betas\[1\]"),
        (LAMB, {"betas": (0.9,)}, "betas"),
        (LAMB, {"eps": -1e-8}, "eps"),
        (LAMB, {"weight_decay": -0.1}, "weight_decay"),
        (LAMB, {"trust_clip": 0.0}, "trust_clip"),
        (LARS, {"lr": -0.1}, "lr"),
        (LARS, {"momentum": 1.0}, "momentum"),
        (LARS, {"trust_coefficient": 0.0}, "trust_coefficient"),
        (LARS, {"weight_decay": float("inf")}, "weight_decay"),
        (LARS, {"eps": -1.0}, "eps"),
        (LARS, {"trust_clip": -2.0}, "trust_clip"),
    ],
)
def test_invalid_arguments_name_the_argument(cls, kwargs, name):
    args = {"lr": 0.1, **kwargs}
    lr = args.pop("lr")
    with pytest.raises(ValueError, match=name):
        cls([torch.zeros(2, requires_grad=True)], lr, **args)


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_bad_param_group_raises_and_leaves_optimizer_unchanged(cls):
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        cls([{"params": [p], "lr": -1.0}], 0.1)
    opt = cls([p], 0.1, exclude_from_trust=lambda t: True)
    with pytest.raises(ValueError, match="trust_clip"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "trust_clip": 0.0})
    with pytest.raises(TypeError, match="trust_ratio"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "trust_ratio": 1})
    with pytest.raises(TypeError, match="exclude_from_trust"):
        cls([p], 0.1, exclude_from_trust="bias")
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["trust_ratio"] is False


def test_trust_ratio_kernel_edge_cases():
    w = torch.tensor([2.0, 0.0, 3.0, 0.0, 1.0])
    u = torch.tensor([4.0, 5.0, 0.0, 0.0, 0.1])
    torch.testing.assert_close(trust_ratio(w, u), torch.tensor([0.5, 1.0, 1.0, 1.0, 10.0]))
    torch.testing.assert_close(
        trust_ratio(w, u, trust_clip=0.8), torch.tensor([0.5, 0.8, 0.8, 0.8, 0.8])
    )


def test_sparse_gradients_rejected():
    p = torch.zeros(3, requires_grad=True)
    for cls in (LAMB, LARS):
        p.grad = torch.zeros(3).to_sparse()
        with pytest.raises(RuntimeError, match="sparse"):
            cls([p], 0.1).step()


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_default_picks_fastest_path_on_cpu(cls):
    """The defaults on dense CPU tensors run the foreach kernel, bit for bit (never the opt-in
    fused path)."""
    fastest = {"foreach": True}
    auto, _ = _run(lambda ps: cls(ps, lr=0.01, weight_decay=0.01), dtype=torch.float32)
    fast, _ = _run(lambda ps: cls(ps, lr=0.01, weight_decay=0.01, **fastest), dtype=torch.float32)
    for x, y in zip(auto, fast, strict=True):
        assert torch.equal(x, y)


# A Tensor learning rate, as torch.optim accepts (a scheduler updates it in place): every path
# steps exactly as with the same float, also while a scheduler changes it.
def _same_with_tensor_lr(make):
    with_float, _ = _run(lambda ps: make(ps, 0.05), gamma=0.9, dtype=torch.float32)
    lr = torch.tensor(0.05, dtype=torch.float64)  # float64: the scheduler computes as with floats
    with_tensor, lrs = _run(lambda ps: make(ps, lr), gamma=0.9, dtype=torch.float32)
    assert all(isinstance(lr, torch.Tensor) for lr in lrs)  # the scheduler kept it a Tensor
    for a, b in zip(with_float, with_tensor, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("path", LAMB_PATHS)
def test_lamb_tensor_lr_steps_as_the_float(path):
    _same_with_tensor_lr(lambda ps, lr: LAMB(ps, lr=lr, weight_decay=0.01, **path))


@pytest.mark.parametrize("foreach", [True, False])
def test_lars_tensor_lr_steps_as_the_float(foreach):
    _same_with_tensor_lr(lambda ps, lr: LARS(ps, lr=lr, momentum=0.9, foreach=foreach))


def test_layerwise_adam_tensor_lr_steps_as_the_float():
    _same_with_tensor_lr(lambda ps, lr: layerwise_adam(ps, lr=lr))


@pytest.mark.parametrize("cls", [LAMB, LARS])
@pytest.mark.parametrize(
    "bad", [torch.tensor([0.1, 0.2]), torch.tensor(-0.1), torch.tensor(float("nan")), torch.tensor(1)]
)
def test_bad_tensor_lr_is_refused_naming_lr(cls, bad):
    with pytest.raises((ValueError, TypeError), match="lr"):
        cls([torch.zeros(2, requires_grad=True)], lr=bad)


def test_a_tensor_lr_made_negative_later_is_refused_before_any_change():
    p = torch.ones(3, requires_grad=True)
    lr = torch.tensor(0.1)
    opt = LAMB([p], lr=lr, fused=False)
    p.grad = torch.ones(3)
    lr.fill_(-1.0)
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and not opt.state
