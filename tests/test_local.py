"""Tests for dpfl.simulation.local.train_local."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dpfl.simulation.local import NonFiniteLossError, train_local


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)).to(dtype)


def batches(n: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 5, generator=g, dtype=dtype), torch.randint(0, 3, (6,), generator=g))
        for _ in range(n)
    ]


def ce(model, batch) -> torch.Tensor:  # type: ignore[no-untyped-def]
    x, y = batch
    return F.cross_entropy(model(x), y)


def hand_sgd(model: nn.Module, schedule: list, lr: float, clip: float | None) -> dict:
    """The reference: torch.optim.SGD + clip_grad_norm_ on a deep copy."""
    work = copy.deepcopy(model)
    work.train()
    opt = torch.optim.SGD(work.parameters(), lr=lr)
    for batch in schedule:
        opt.zero_grad()
        ce(work, batch).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(work.parameters(), clip)
        opt.step()
    server = dict(model.named_parameters())
    return {n: p.detach() - server[n].detach() for n, p in work.named_parameters()}


def assert_updates_close(a: dict, b: dict, rtol: float = 1e-10) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("clip", [None, 1e-2, 1.0])
def test_steps_match_hand_written_sgd(clip: float | None) -> None:
    model, data = mlp(), batches(2)
    got = train_local(model, data, ce, lr=0.3, steps=5, max_grad_norm=clip)
    # steps cycle over the user's batches: b0 b1 b0 b1 b0
    want = hand_sgd(model, [data[i % 2] for i in range(5)], 0.3, clip)
    assert_updates_close(got, want)


def test_epochs_match_hand_written_sgd() -> None:
    model, data = mlp(), batches(3)
    got = train_local(model, data, ce, lr=0.1, epochs=2, max_grad_norm=0.5)
    assert_updates_close(got, hand_sgd(model, data * 2, 0.1, 0.5))
    # default: one epoch
    got1 = train_local(model, data, ce, lr=0.1, max_grad_norm=0.5)
    assert_updates_close(got1, hand_sgd(model, data, 0.1, 0.5))


def test_one_shot_iterator_is_cycled() -> None:
    model, data = mlp(), batches(2)
    got = train_local(model, iter(data), ce, lr=0.1, steps=4)
    assert_updates_close(got, hand_sgd(model, data * 2, 0.1, 1.0))


def test_server_model_untouched() -> None:
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).double()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    update = train_local(model, batches(2), ce, lr=0.5, steps=3)
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert not model.training and not any(m.training for m in model.modules())
    # the update is new memory, not aliasing the server parameters
    params = dict(model.named_parameters())
    assert all(update[k].data_ptr() != params[k].data_ptr() for k in update)
    assert any(update[k].abs().sum() > 0 for k in update)


def test_only_trainable_parameters_are_returned_and_trained() -> None:
    model = mlp()
    model[0].weight.requires_grad_(False)
    update = train_local(model, batches(1), ce, lr=0.1, steps=2)
    assert set(update) == {"0.bias", "3.weight", "3.bias"}


@given(
    bound=st.floats(1e-4, 10.0),
    lr=st.floats(1e-3, 1.0),
    seed=st.integers(0, 1000),
)
def test_one_step_update_norm_is_at_most_lr_times_clip(bound: float, lr: float, seed: int) -> None:
    model, data = mlp(seed), batches(1, seed)
    update = train_local(model, data, ce, lr=lr, steps=1, max_grad_norm=bound)
    norm = torch.linalg.vector_norm(torch.cat([u.flatten() for u in update.values()]))
    assert norm <= lr * bound * (1 + 1e-9)
    unclipped = train_local(model, data, ce, lr=lr, steps=1, max_grad_norm=None)
    unorm = torch.linalg.vector_norm(torch.cat([u.flatten() for u in unclipped.values()]))
    # clipping is a no-op below the bound and a rescale to (almost) exactly the bound above it
    expected = min(unorm.item(), lr * bound * unorm.item() / (unorm.item() + lr * 1e-6))
    assert norm.item() == pytest.approx(expected, rel=1e-9)


def test_scratch_module_gives_same_result_and_is_reused() -> None:
    model, data = mlp(), batches(2)
    scratch = copy.deepcopy(model)
    with torch.no_grad():
        for p in scratch.parameters():
            p.add_(5.0)  # stale contents must be overwritten
    a = train_local(model, data, ce, lr=0.2, steps=3, scratch=scratch)
    b = train_local(model, data, ce, lr=0.2, steps=3)
    assert_updates_close(a, b, rtol=0)
    with pytest.raises(ValueError, match="scratch"):
        train_local(model, data, ce, lr=0.2, steps=3, scratch=nn.Linear(5, 3).double())
    with pytest.raises(ValueError, match="scratch"):
        train_local(model, data, ce, lr=0.2, steps=3, scratch=model)


def test_dropout_uses_generator_and_leaves_global_rng_alone() -> None:
    model, data = mlp(dropout=0.5), batches(2)
    state = torch.get_rng_state()
    a = train_local(model, data, ce, lr=0.3, steps=4, generator=torch.Generator().manual_seed(5))
    b = train_local(model, data, ce, lr=0.3, steps=4, generator=torch.Generator().manual_seed(5))
    c = train_local(model, data, ce, lr=0.3, steps=4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), state)
    assert_updates_close(a, b, rtol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # one generator shared by consecutive users gives them different randomness
    g = torch.Generator().manual_seed(5)
    u1 = train_local(model, data, ce, lr=0.3, steps=4, generator=g)
    u2 = train_local(model, data, ce, lr=0.3, steps=4, generator=g)
    assert any(not torch.equal(u1[k], u2[k]) for k in u1)


def test_user_without_data_is_named() -> None:
    with pytest.raises(ValueError, match="'carol' has no data"):
        train_local(mlp(), [], ce, lr=0.1, steps=3, user_id="carol")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_names_user_and_step(bad: float) -> None:
    calls = []

    def loss_fn(model, batch):  # type: ignore[no-untyped-def]
        calls.append(1)
        loss = ce(model, batch)
        return loss * bad if len(calls) == 3 else loss

    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"user 'dave'.*step 2") as info:
        train_local(model, batches(2), loss_fn, lr=0.1, steps=5, user_id="dave")
    assert info.value.user_id == "dave" and info.value.step == 2
    assert isinstance(info.value, ValueError)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_loss_must_be_scalar() -> None:
    with pytest.raises(TypeError, match="scalar"):
        train_local(
            mlp(),
            batches(1),
            lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
            lr=0.1,
            steps=1,
        )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": 0.0, "steps": 1}, "lr"),
        ({"lr": -1.0, "steps": 1}, "lr"),
        ({"lr": 0.1, "steps": 0}, "steps"),
        ({"lr": 0.1, "epochs": 0}, "epochs"),
        ({"lr": 0.1, "steps": 2, "epochs": 1}, "steps or epochs"),
        ({"lr": 0.1, "steps": 1, "max_grad_norm": 0.0}, "max_grad_norm"),
    ],
)
def test_bad_options_raise_value_error(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        train_local(mlp(), batches(1), ce, **kwargs)


def test_model_without_trainable_parameters() -> None:
    model = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        train_local(model, batches(1), ce, lr=0.1, steps=1)


def test_runs_inside_no_grad_context() -> None:
    model, data = mlp(), batches(2)
    with torch.no_grad():
        got = train_local(model, data, ce, lr=0.3, steps=3)
    assert_updates_close(got, hand_sgd(model, [data[0], data[1], data[0]], 0.3, 1.0))


def test_single_tensor_instead_of_batches_is_rejected() -> None:
    model = nn.Linear(5, 1).double()
    with pytest.raises(TypeError, match="iterable of batches"):
        train_local(model, torch.zeros(4, 5), lambda m, b: m(b).sum(), lr=0.1, steps=1)


def _linear_loss(model, batch) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``c · Σ w + ‖b‖²``: autograd returns the weight's gradient as an expanded, stride-0 tensor."""
    return 3.0 * model.weight.sum() + (model.bias**2).sum()


@pytest.mark.parametrize("clip", [None, 0.1, 1.0])
def test_expanded_stride_zero_gradients_are_clipped_like_torch(clip: float | None) -> None:
    """Issue 21 p6: a gradient that autograd hands back as an expanded view (stride 0, one memory
    location for every element) is clipped and applied like ``clip_grad_norm_`` + SGD, instead of
    crashing the in-place clip; the server model is untouched."""
    model = nn.Linear(4, 3).double()
    grad = torch.autograd.grad(_linear_loss(model, None), [model.weight])[0]
    assert 0 in grad.stride()  # the case under test: an overlapping gradient
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = train_local(model, [None], _linear_loss, lr=0.2, steps=3, max_grad_norm=clip)
    work = copy.deepcopy(model)
    opt = torch.optim.SGD(work.parameters(), lr=0.2)
    for _ in range(3):
        opt.zero_grad()
        _linear_loss(work, None).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(work.parameters(), clip)
        opt.step()
    want = {n: p.detach() - before[n] for n, p in work.named_parameters()}
    assert_updates_close(got, want)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
