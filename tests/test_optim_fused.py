"""LAMB's opt-in fused path: agreement across paths, maximize, check_finite, a machine without a
compiler, and the OpenMP/serial builds kept apart."""

from __future__ import annotations

import copy
import io
import os
import warnings

import pytest
import torch

from dpfl.optim import (
    LAMB,
    NonFiniteGradientError,
    _kernel,
    _lamb_fused,
    layerwise_adam,
    trust_ratio,
)
from tests.test_optim import (
    KERNEL_CACHE,
    LAMB_PATHS,
    NO_KERNEL,
    _grad_sequence,
    _initial_params,
    _ref_lamb,
    _run,
)

needs_kernel = pytest.mark.skipif(NO_KERNEL is not None, reason=str(NO_KERNEL))
FUSED = {"fused": True, "cache_dir": KERNEL_CACHE}
KW = dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.02, trust_clip=5.0)


def _set_grads(params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = g


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (FUSED, {"fused": False, "foreach": True}),
        ({"fused": False, "foreach": True}, FUSED),
        (FUSED, {"fused": False, "foreach": False}),
    ],
    ids=["fused->foreach", "foreach->fused", "fused->reference"],
)
@needs_kernel
def test_state_dict_round_trip_across_paths(first, second):
    """State saved on one path continues on another and still matches the float64 reference."""
    params = [p.clone().requires_grad_() for p in _initial_params()]
    opt = LAMB(params, lr=0.05, **KW, **first)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    grads = _grad_sequence()
    lrs = []
    for gs in grads[:5]:
        lrs.append(opt.param_groups[0]["lr"])
        _set_grads(params, gs)
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = LAMB(params2, lr=0.05, **KW, **second)
    sched2 = torch.optim.lr_scheduler.ExponentialLR(opt2, 0.9)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.param_groups[0]["fused"] == first.get("fused")  # groups come from the save...
    for group in opt2.param_groups:  # ...so choose the path for the rest of the run here
        group.update({k: v for k, v in second.items() if k != "cache_dir"})
    for gs in grads[5:]:
        lrs.append(opt2.param_groups[0]["lr"])
        _set_grads(params2, gs)
        opt2.step()
        sched2.step()
    want = _ref_lamb(lrs, KW["betas"], KW["eps"], KW["weight_decay"], True, KW["trust_clip"])
    for g, w in zip(params2, want, strict=True):
        torch.testing.assert_close(g.detach(), w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", LAMB_PATHS)
def test_maximize_steps_along_the_gradient(path):
    """maximize=True with gradient −g is the float64 reference run on g."""
    got, lrs = _run(lambda ps: _Negated(LAMB(ps, lr=0.05, maximize=True, **KW, **path), ps))
    want = _ref_lamb(lrs, KW["betas"], KW["eps"], KW["weight_decay"], True, KW["trust_clip"])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


class _Negated:
    """Wraps an optimizer so that ``step`` sees ``−grad`` (restoring ``grad`` afterwards)."""

    def __init__(self, opt, params):
        self.opt, self.params, self.param_groups = opt, params, opt.param_groups

    def step(self):
        saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None if p.grad is None else -p.grad
        self.opt.step()
        for p, g in zip(self.params, saved, strict=True):
            p.grad = g


def _two_group_setup(path):
    gen = torch.Generator().manual_seed(5)
    a = [torch.randn(3, 4, generator=gen).requires_grad_(), torch.randn(5, generator=gen)]
    b = [torch.randn(6, generator=gen).requires_grad_()]
    a[1].requires_grad_()
    opt = LAMB([{"params": a}, {"params": b, "trust_ratio": False}], lr=0.1, **path)
    return gen, a + b, opt


@pytest.mark.parametrize("path", LAMB_PATHS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(("where", "fresh"), [(1, False), (2, False), (0, True)])
def test_check_finite_raises_before_any_change(path, bad, where, fresh):
    """A NaN/inf gradient in any group raises naming it; params and state stay as they were."""
    gen, params, opt = _two_group_setup(path)
    if not fresh:
        _set_grads(params, [torch.randn(p.shape, generator=gen) for p in params])
        opt.step()
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    grads[where].view(-1)[1] = bad
    _set_grads(params, grads)
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict())
    with pytest.raises(NonFiniteGradientError, match="NaN or infinite") as info:
        opt.step(check_finite=True)
    assert info.value.param is params[where]
    assert isinstance(info.value, ValueError)
    for x, y in zip(params, before, strict=True):
        assert torch.equal(x.detach(), y)
    state_after = opt.state_dict()
    assert state_after["state"].keys() == state_before["state"].keys()
    for k, st in state_before["state"].items():
        assert st["step"] == state_after["state"][k]["step"]
        assert torch.equal(st["exp_avg"], state_after["state"][k]["exp_avg"])
        assert torch.equal(st["exp_avg_sq"], state_after["state"][k]["exp_avg_sq"])
    grads[where].view(-1)[1] = 0.0  # once repaired, the step goes through
    opt.step(check_finite=True)
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("path", LAMB_PATHS)
def test_check_finite_accepts_huge_finite_gradients(path):
    """Squares of 3e38 overflow float32, but the gradient is finite: no error."""
    _, params, opt = _two_group_setup(path)
    _set_grads(params, [torch.full(p.shape, 3e38) for p in params])
    opt.step(check_finite=True)
    assert all(torch.isfinite(p).all() for p in params)


@needs_kernel
def test_fused_handles_empty_and_single_element_tensors():
    def run(kwargs):
        ps = [torch.zeros(0).requires_grad_(), torch.ones(1).requires_grad_()]
        opt = layerwise_adam(ps, lr=0.1, **kwargs)
        for step in range(3):
            ps[0].grad, ps[1].grad = torch.zeros(0), torch.full((1,), float(step) - 1)
            opt.step()
        return [p.detach() for p in ps]

    for x, y in zip(run(FUSED), run({"fused": False, "foreach": False}), strict=True):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: [torch.zeros(3, dtype=torch.float16, requires_grad=True)], "float16"),
        (lambda: [torch.zeros(3, 4).t().requires_grad_()], "contiguous"),
    ],
    ids=["float16", "non-contiguous"],
)
@needs_kernel
def test_fused_true_raises_where_unsupported(make, match):
    with pytest.raises(RuntimeError, match=match):
        LAMB(make(), lr=0.1, **FUSED)
    params = make()
    opt = LAMB(params, lr=0.1)  # fused=None: the foreach path, no error
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert not torch.equal(params[0].detach(), torch.zeros_like(params[0]))


def test_fused_option_validation():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="fused=True and foreach=True"):
        LAMB(p, lr=0.1, fused=True, foreach=True)
    with pytest.raises(TypeError, match="fused"):
        LAMB(p, lr=0.1, fused="yes")
    with pytest.raises(TypeError, match="maximize"):
        LAMB(p, lr=0.1, maximize=1)


@pytest.fixture
def no_compiler(tmp_path, monkeypatch):
    """A process where the kernel cannot be built: $CC names a missing compiler, empty cache."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DPFL_CACHE", str(tmp_path / "cache"))
    _kernel.reset()
    yield
    monkeypatch.undo()
    _kernel.reset()


def test_without_compiler_fused_true_raises_and_the_default_never_needs_one(no_compiler):
    with pytest.raises(_kernel.KernelError, match="no-such-cc"):
        _kernel.load()
    with pytest.raises(RuntimeError, match="fused kernel.*no-such-cc"):
        LAMB([torch.zeros(2, requires_grad=True)], lr=0.1, fused=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the default is not a fallback
        auto, _ = _run(lambda ps: LAMB(ps, lr=0.01, weight_decay=0.01), dtype=torch.float32)
    fast, _ = _run(
        lambda ps: LAMB(ps, lr=0.01, weight_decay=0.01, foreach=True), dtype=torch.float32
    )
    for x, y in zip(auto, fast, strict=True):
        assert torch.equal(x, y)


@needs_kernel
def test_kernel_builds_into_a_private_cache_dir(tmp_path):
    kernel = _kernel.load(tmp_path / "k")
    assert kernel.path.parent == tmp_path / "k" / "kernels"
    assert (tmp_path / "k" / "kernels").stat().st_mode & 0o077 == 0
    shared = tmp_path / "shared"
    (shared / "kernels").mkdir(parents=True)
    os.chmod(shared / "kernels", 0o777)
    with pytest.raises(_kernel.KernelError, match="writable by other users"):
        _kernel.load(shared)


@needs_kernel
def test_fused_guards_the_kernel_against_bad_state():
    """The C kernel reads raw memory: a wrong-shaped state raises, a strided one is made dense."""
    p = torch.randn(4, 3).requires_grad_()
    q = p.detach().clone().requires_grad_()
    opt = LAMB([p], lr=0.1, **FUSED)
    ref = LAMB([q], lr=0.1, fused=False, foreach=False)
    for o, t in ((opt, p), (ref, q)):
        t.grad = torch.ones(4, 3)
        o.step()
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].t().contiguous().t()  # same values, strided
    opt.step()
    ref.step()
    torch.testing.assert_close(p, q)
    opt.state[p]["exp_avg_sq"] = torch.zeros(5)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match=r"exp_avg_sq of parameter 0 .* shape \(5,\)"):
        opt.step()
    assert torch.equal(p.detach(), before)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def num_threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("maximize", [False, True])
def test_fused_matches_reference_on_tensors_split_across_threads(num_threads, maximize):
    """Tensors of >= 65,536 elements are split between threads, each slice updated backwards in
    chunks; sizes that are no multiple of the slice alignment or the chunk must still match."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(2 * 65536 + 13,), (301, 703), (3,)]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[10.0**k * torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
             for k in (-2, 1, 0)]  # fmt: skip

    def run(path):
        ps = [p.clone().requires_grad_() for p in init]
        opt = LAMB(ps, lr=0.05, maximize=maximize, **KW, **path)
        for gs in grads:
            _set_grads(ps, gs)
            opt.step()
        return ps, opt

    got, opt = run(FUSED)
    want, ref = run({"fused": False, "foreach": False})
    for p, q in zip(got, want, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"])
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])


@needs_kernel
@pytest.mark.parametrize("clip", [None, 0.5])
def test_fused_kernel_ratio_is_trust_ratio_of_its_sums(num_threads, clip):
    """The ratio the C kernel computes is dpfl.optim.trust_ratio of the float64 norms, zero-norm
    fallbacks and clip included, and its sums are those of the float64 direction."""
    gen = torch.Generator().manual_seed(3)
    n = 70001
    params = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(4)]
    params[1].zero_()  # ‖θ‖ = 0
    grads = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(4)]
    grads[2].zero_()  # fresh state and g = 0: ‖r‖ = λ‖θ‖ with λ = 0 here, so 0
    grads[3].mul_(1e-4)
    before = [p.clone() for p in params]
    exp_avgs = [torch.zeros(n, dtype=torch.float64) for _ in range(4)]
    exp_avg_sqs = [torch.zeros(n, dtype=torch.float64) for _ in range(4)]
    group = {"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0, "lr": 0.1,
             "trust_ratio": True, "trust_clip": clip, "maximize": False}  # fmt: skip
    out = _lamb_fused.step(_kernel.load(KERNEL_CACHE), params, grads, exp_avgs, exp_avg_sqs, [1] * 4, group)
    for i in range(4):
        m, v = 0.1 * grads[i], 0.001 * grads[i] ** 2
        r = (m / 0.1) / ((v / 0.001).sqrt() + 1e-6)
        torch.testing.assert_close(out[i, 0], (r * r).sum(), rtol=1e-12, atol=0.0)
        torch.testing.assert_close(out[i, 1], (before[i] ** 2).sum(), rtol=1e-12, atol=0.0)
    want = trust_ratio(out[:, 1].sqrt(), out[:, 0].sqrt(), trust_clip=clip)
    assert torch.equal(out[:, 2], want)
    assert out[1, 2] == out[2, 2] == min(1.0, clip or 1.0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_finiteness_pass_finds_every_position(num_threads, dtype):
    kernel = _kernel.load(KERNEL_CACHE)
    n = 3 * 65536 + 5
    for where in (0, n // 2 + 1, n - 1):
        for bad in (float("nan"), float("inf"), -float("inf")):
            x = torch.ones(n, dtype=dtype)
            x[where] = bad
            assert _lamb_fused.first_non_finite(kernel, [torch.ones(4, dtype=dtype), x]) == 1
    huge = torch.full((n,), torch.finfo(dtype).max, dtype=dtype)
    assert _lamb_fused.first_non_finite(kernel, [huge, torch.zeros(0, dtype=dtype)]) is None


@needs_kernel
def test_kernel_builds_without_openmp_and_never_caches_that_as_the_threaded_one(
    tmp_path, monkeypatch, num_threads
):
    """A compiler without OpenMP (e.g. Apple clang) still builds a working, single-threaded
    kernel; that serial build is its own cache entry, so once OpenMP works (same compiler path,
    next process) the threaded kernel is built and used instead of the serial one."""
    real = _kernel._compiler()
    refuse = tmp_path / "refuse-openmp"
    refuse.touch()
    wrapper = tmp_path / "cc"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ -e "{refuse}" ]; then for a in "$@"; do\n'
        '  [ "$a" = -fopenmp ] && { echo "unsupported: -fopenmp" >&2; exit 1; }\n'
        "done; fi\n"
        f'exec "{real}" "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    cache = tmp_path / "cache"
    _kernel.reset()
    try:
        kernel = _kernel.load(cache)
        assert not kernel.openmp and "_serial." in kernel.path.name
        gen = torch.Generator().manual_seed(2)
        init = torch.randn(100_003, generator=gen, dtype=torch.float64)
        grads = [torch.randn(100_003, generator=gen, dtype=torch.float64) for _ in range(3)]
        results = []
        for path in ({"fused": True, "cache_dir": cache}, {"fused": False, "foreach": False}):
            p = init.clone().requires_grad_()
            opt = LAMB([p], lr=0.05, **KW, **path)
            for g in grads:
                p.grad = g
                opt.step()
            results.append(p.detach())
        torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)
        refuse.unlink()  # OpenMP works now: a new process must not settle for the serial build
        _kernel.reset()
        threaded = _kernel.load(cache)
        assert threaded.openmp and "_openmp." in threaded.path.name
    finally:
        monkeypatch.undo()
        _kernel.reset()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_finiteness_pass_finds_every_read_stream_boundary(num_threads, dtype):
    """Each thread reads its part as four streams of whole 64-element blocks plus a remainder:
    a NaN/inf next to any stream or part boundary, or in the remainder, is found."""
    kernel = _kernel.load(KERNEL_CACHE)
    for n in (65536 + 1, 4 * 65536 + 300, 1000):
        threads = num_threads if n >= 65536 else 1  # as the kernel splits the tensor
        per = -(-n // threads)
        parts = [min(t * per, n) for t in range(threads + 1)]
        edges = {0, n - 1, *parts[1:-1]}
        for lo, hi in zip(parts[:-1], parts[1:], strict=True):
            block = (hi - lo) // 4 // 64 * 64
            edges |= {lo + k * block + d for k in range(1, 5) for d in (-1, 0, 1)}
        x = torch.ones(n, dtype=dtype)
        for where in sorted(e for e in edges if 0 <= e < n):
            for bad in (float("nan"), -float("inf")):
                x[where] = bad
                assert not kernel.all_finite(x), (n, where)
                x[where] = 1.0
        assert kernel.all_finite(x)
