"""server_step: sign convention, validation before any change, grad restoration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpfl.optim import LAMB, LARS, server_step
from tests.test_optim import LAMB_PATHS


def _model() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _update(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


def _snapshot(model, opt):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        repr(opt.state_dict()),
    )


def test_sgd_lr1_applies_update():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = _update(model)
    delta_copy = {k: v.clone() for k, v in delta.items()}
    server_step(torch.optim.SGD(model.parameters(), lr=1.0), model, delta)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n] + delta[n])
        assert p.grad is None
    for k in delta:
        assert torch.equal(delta[k], delta_copy[k])  # the update is not mutated


def test_mapping_input_dtype_cast_and_matches_manual_step():
    model_a, model_b = _model(), _model()
    opt_a = LAMB(model_a.parameters(), lr=0.01)
    opt_b = LAMB(model_b.parameters(), lr=0.01)
    for seed in range(3):
        delta = _update(model_a, seed)
        server_step(
            opt_a, dict(model_a.named_parameters()), {k: v.double() for k, v in delta.items()}
        )
        for n, p in model_b.named_parameters():
            p.grad = -delta[n]
        opt_b.step()
        opt_b.zero_grad(set_to_none=True)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_existing_grads_restored_and_only_named_params_step():
    model = _model()
    extra = nn.Parameter(torch.ones(2))
    extra.grad = torch.full((2,), 5.0)
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    saved_grad = model[0].weight.grad
    opt = torch.optim.SGD([*model.parameters(), extra], lr=1.0)
    server_step(opt, model, _update(model))
    assert model[0].weight.grad is saved_grad
    assert torch.equal(extra.detach(), torch.ones(2))  # not in named params: untouched
    assert torch.equal(extra.grad, torch.full((2,), 5.0))


def test_frozen_params_excluded():
    model = _model()
    model[1].weight.requires_grad_(False)
    frozen = model[1].weight.detach().clone()
    delta = {n: v for n, v in _update(model).items() if n != "1.weight"}
    server_step(torch.optim.SGD(model.parameters(), lr=1.0), model, delta)
    assert torch.equal(model[1].weight, frozen)
    with pytest.raises(ValueError, match=r"'1\.weight'"):
        server_step(torch.optim.SGD(model.parameters(), lr=1.0), model, _update(model))


def _bad_updates(model):
    good = _update(model)
    missing = {k: v for k, v in good.items() if k != "2.bias"}
    extra = {**good, "3.weight": torch.zeros(2)}
    shape = {**good, "0.weight": torch.zeros(3, 4)}
    nonfinite = {**good, "1.bias": torch.tensor([0.0, float("nan"), 0.0, 0.0])}
    return [(missing, "2.bias"), (extra, "3.weight"), (shape, "0.weight"), (nonfinite, "1.bias")]


@pytest.mark.parametrize("path", LAMB_PATHS)
@pytest.mark.parametrize("case", range(4))
def test_bad_update_raises_naming_key_and_changes_nothing(case, path):
    model = _model()
    opt = LAMB(model.parameters(), lr=0.01, **path)
    server_step(opt, model, _update(model, 7))  # populate optimizer state first
    model[2].weight.grad = torch.ones_like(model[2].weight)
    before = _snapshot(model, opt)
    bad, key = _bad_updates(model)[case]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        server_step(opt, model, bad)
    after = _snapshot(model, opt)
    assert [g["maximize"] for g in opt.param_groups] == [False]
    for n in before[0]:
        assert torch.equal(before[0][n], after[0][n])
        assert (before[1][n] is None) == (after[1][n] is None)
        if before[1][n] is not None:
            assert torch.equal(before[1][n], after[1][n])
    assert before[2] == after[2]


def test_param_not_managed_by_optimizer_and_bad_types():
    model = _model()
    opt = torch.optim.SGD(model[0].parameters(), lr=1.0)
    with pytest.raises(ValueError, match="optimizer"):
        server_step(opt, model, _update(model))
    with pytest.raises(TypeError, match="named_params"):
        server_step(opt, [1, 2], {})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="update"):
        server_step(opt, model[0], [torch.zeros(1)])  # type: ignore[arg-type]


def test_huge_but_finite_update_is_accepted():
    """The finite check must not confuse a norm overflow with a NaN/inf entry."""
    model = nn.Linear(2, 1)
    delta = {n: torch.full_like(p, 3e38) for n, p in model.named_parameters()}
    assert not torch.isfinite(torch.linalg.vector_norm(delta["weight"]))
    server_step(torch.optim.SGD(model.parameters(), lr=1.0), model, delta)
    assert torch.isfinite(model.weight).all()


@pytest.mark.parametrize(
    ("dtype", "key"),
    [(torch.int64, "0.bias"), (torch.bool, "2.weight"), (torch.complex64, "1.weight")],
)
def test_non_float_update_is_a_type_error_naming_the_key(dtype, key):
    """An int64 (bool, complex) update used to be cast silently to the parameter's dtype."""
    model = _model()
    opt = LAMB(model.parameters(), lr=0.01)
    server_step(opt, model, _update(model, 7))
    before = _snapshot(model, opt)
    bad = _update(model)
    bad[key] = torch.ones(bad[key].shape, dtype=dtype)
    with pytest.raises(TypeError, match=rf"update\['{key.replace('.', '[.]')}'\].*{dtype}"):
        server_step(opt, model, bad)
    after = _snapshot(model, opt)
    for n in before[0]:
        assert torch.equal(before[0][n], after[0][n])
    assert before[2] == after[2]


def _optimizers():
    lambs = [
        pytest.param(
            lambda ps, path=p.values[0]: LAMB(ps, lr=0.01, **path), id=f"LAMB-{p.id}", marks=p.marks
        )
        for p in LAMB_PATHS
    ]
    return [
        *lambs,
        pytest.param(lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True), id="Adam-fused"),
        pytest.param(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), id="SGD"),
        pytest.param(lambda ps: LARS(ps, lr=0.1), id="LARS"),
    ]


@pytest.mark.parametrize("make", _optimizers())
def test_step_equals_manual_step_and_uses_the_update_uncopied(make):
    """server_step == ``grad = −Δ; step()``; optimizers with ``maximize`` get Δ itself as grad."""
    model_a, model_b = _model(), _model()
    opt_a, opt_b = make(list(model_a.parameters())), make(list(model_b.parameters()))
    has_flag = "maximize" in opt_a.param_groups[0]
    seen = []
    opt_a.register_step_pre_hook(
        lambda o, args, kwargs: seen.append(
            [(p.grad.data_ptr(), g.get("maximize")) for g in o.param_groups for p in g["params"]]
        )
    )
    for seed in range(3):
        delta = _update(model_a, seed)
        delta_copy = {k: v.clone() for k, v in delta.items()}
        server_step(opt_a, model_a, delta)
        for n, p in model_b.named_parameters():
            p.grad = -delta[n]
        opt_b.step()
        opt_b.zero_grad(set_to_none=True)
        if has_flag:  # no copy: the gradient was the update tensor, with maximize flipped
            ptrs = [delta[n].data_ptr() for n, _ in model_a.named_parameters()]
            assert seen[-1] == [(ptr, True) for ptr in ptrs]
            assert [g["maximize"] for g in opt_a.param_groups] == [False]
        for k in delta:
            assert torch.equal(delta[k], delta_copy[k])
        for p in model_a.parameters():
            assert p.grad is None
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_group_that_already_maximizes_is_flipped_and_restored():
    model_a, model_b = _model(), _model()
    opt_a = torch.optim.Adam(model_a.parameters(), lr=0.01, maximize=True)
    opt_b = torch.optim.Adam(model_b.parameters(), lr=0.01, maximize=True)
    delta = _update(model_a)
    server_step(opt_a, model_a, delta)
    for n, p in model_b.named_parameters():
        p.grad = -delta[n]
    opt_b.step()
    assert opt_a.param_groups[0]["maximize"] is True
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


class _DecayingLAMB(LAMB):
    """A subclass whose step(closure) knows nothing of check_finite (as in examples/asr)."""

    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            group["lr"] *= 0.5
        return loss


class _MyAdam(torch.optim.Adam):
    pass


def test_subclasses_keep_the_check_and_the_no_copy_path():
    model = _model()
    opt = _DecayingLAMB(model.parameters(), lr=0.01)
    server_step(opt, model, _update(model, 7))
    assert opt.param_groups[0]["lr"] == 0.005
    before = _snapshot(model, opt)
    bad = {**_update(model), "2.bias": torch.tensor([float("inf"), 0.0])}
    with pytest.raises(ValueError, match=r"update\['2\.bias'\] contains NaN or infinite"):
        server_step(opt, model, bad)
    assert before[2] == _snapshot(model, opt)[2]  # lr not decayed, state unchanged
    adam = _MyAdam(model.parameters(), lr=0.01)
    delta = _update(model)
    seen = []
    adam.register_step_pre_hook(
        lambda o, a, k: seen.append(model[0].weight.grad.data_ptr() == delta["0.weight"].data_ptr())
    )
    server_step(adam, model, delta)
    assert seen == [True]
