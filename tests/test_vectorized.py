"""Tests for dpfl.simulation.vectorized: vectorized cohort training against the sequential loop."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpfl.simulation.local import NonFiniteLossError, train_local
from dpfl.simulation.vectorized import (
    VectorizationError,
    VectorizationFallbackWarning,
    train_cohort_vectorized,
)

REL_TOL = 1e-5  # per-user relative error of the whole update, float32


class TinyTransformer(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def make_conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(4 * 6, 3)
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (make_mlp, (6,)),
    "conv": (make_conv, (2, 6)),
    "transformer": (TinyTransformer, (5, 4)),
}


def cohort_data(
    num_users: int, shape: tuple[int, ...], *, nbatches: Callable[[int], int] = lambda u: 2
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(123)
    return [
        [
            (torch.randn(4, *shape, generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(nbatches(u))
        ]
        for u in range(num_users)
    ]


def ce(model, batch) -> torch.Tensor:  # type: ignore[no-untyped-def]
    x, y = batch
    return F.cross_entropy(model(x), y)


def rel_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a])
    ref = torch.cat([b[k].flatten() for k in b])
    return float(diff.norm() / ref.norm())


def sequential(model: nn.Module, cohort: list, **kw) -> list[dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    return [train_local(model, b, ce, **kw) for b in cohort]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("clip", [1.0, None])
def test_vectorized_matches_sequential(name: str, clip: float | None) -> None:
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make()
    # users with different numbers of batches: step s uses batch s % n_u for every user
    cohort = cohort_data(5, shape, nbatches=lambda u: 1 + u % 3)
    kw = {"lr": 0.2, "steps": 4, "max_grad_norm": clip}
    vec = train_cohort_vectorized(model, cohort, ce, fallback=False, **kw)
    seq = sequential(model, cohort, **kw)
    assert len(vec) == len(seq)
    for v, s in zip(vec, seq, strict=True):
        assert rel_error(v, s) <= REL_TOL
    # the clip actually bites in this setting (otherwise the clip=1.0 case tests nothing)
    if clip is not None:
        unclipped = train_cohort_vectorized(
            model, cohort, ce, fallback=False, lr=0.2, steps=4, max_grad_norm=1e-3
        )
        assert rel_error(unclipped[0], vec[0]) > 1e-2


def test_server_model_untouched_and_mode_restored() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_cohort_vectorized(model, cohort_data(3, (5, 4)), ce, lr=0.5, steps=2, fallback=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_dropout_users_differ_reproducibly_and_global_rng_untouched() -> None:
    torch.manual_seed(0)
    model = TinyTransformer(dropout=0.3)
    same = cohort_data(1, (5, 4))[0]
    cohort = [same] * 4  # identical data: only the dropout masks can make users differ
    state = torch.get_rng_state()
    a = train_cohort_vectorized(
        model,
        cohort,
        ce,
        lr=0.3,
        steps=3,
        generator=torch.Generator().manual_seed(1),
        fallback=False,
    )
    b = train_cohort_vectorized(
        model,
        cohort,
        ce,
        lr=0.3,
        steps=3,
        generator=torch.Generator().manual_seed(1),
        fallback=False,
    )
    assert torch.equal(torch.get_rng_state(), state)
    for u in range(4):
        assert all(torch.equal(a[u][k], b[u][k]) for k in a[u])
    for u in range(1, 4):
        assert rel_error(a[u], a[0]) > 1e-4


def test_per_user_generators_drive_the_fallback_like_train_local() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 3))
    cohort = cohort_data(3, (6,))
    cohort[1] = [(torch.randn(7, 6), torch.randint(0, 3, (7,)))]  # ragged: forces the fallback
    with pytest.warns(VectorizationFallbackWarning):
        vec = train_cohort_vectorized(
            model,
            cohort,
            ce,
            lr=0.3,
            steps=3,
            generator=[torch.Generator().manual_seed(10 + u) for u in range(3)],
        )
    for u in range(3):
        ref = train_local(
            model, cohort[u], ce, lr=0.3, steps=3, generator=torch.Generator().manual_seed(10 + u)
        )
        assert all(torch.equal(vec[u][k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match="generator"):
        train_cohort_vectorized(model, cohort, ce, lr=0.3, steps=3, generator=[torch.Generator()])


def test_fallback_on_different_batch_shapes_matches_sequential() -> None:
    torch.manual_seed(0)
    model = make_mlp()
    cohort = cohort_data(3, (6,))
    cohort[2] = [(torch.randn(9, 6), torch.randint(0, 3, (9,)))]
    with pytest.warns(VectorizationFallbackWarning, match="shapes"):
        vec = train_cohort_vectorized(model, cohort, ce, lr=0.2, steps=3)
    seq = sequential(model, cohort, lr=0.2, steps=3)
    for v, s in zip(vec, seq, strict=True):
        assert all(torch.equal(v[k], s[k]) for k in s)
    with pytest.raises(VectorizationError, match="shapes"):
        train_cohort_vectorized(model, cohort, ce, lr=0.2, steps=3, fallback=False)


def test_fallback_on_unvectorizable_model_batchnorm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    cohort = cohort_data(3, (6,))
    with pytest.warns(VectorizationFallbackWarning):
        vec = train_cohort_vectorized(model, cohort, ce, lr=0.2, steps=2)
    seq = sequential(model, cohort, lr=0.2, steps=2)
    for v, s in zip(vec, seq, strict=True):
        assert rel_error(v, s) <= REL_TOL


def test_loss_fn_reading_parameters_falls_back_with_clear_message() -> None:
    model = make_mlp()

    def loss_with_penalty(m, batch):  # type: ignore[no-untyped-def]
        return ce(m, batch) + 1e-3 * sum(p.pow(2).sum() for p in m.parameters())

    cohort = cohort_data(2, (6,))
    with pytest.raises(VectorizationError, match="may only call the model"):
        train_cohort_vectorized(model, cohort, loss_with_penalty, lr=0.1, steps=2, fallback=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vec = train_cohort_vectorized(model, cohort, loss_with_penalty, lr=0.1, steps=2)
    assert any(issubclass(w.category, VectorizationFallbackWarning) for w in caught)
    ref = train_local(model, cohort[1], loss_with_penalty, lr=0.1, steps=2)
    assert all(torch.equal(vec[1][k], ref[k]) for k in ref)


def test_user_without_data_and_non_finite_loss_are_named() -> None:
    model = make_mlp()
    cohort = cohort_data(3, (6,))
    with pytest.raises(ValueError, match="'bob' has no data"):
        train_cohort_vectorized(
            model, [cohort[0], []], ce, lr=0.1, steps=2, user_ids=["amy", "bob"]
        )
    bad = [(torch.full((4, 6), float("nan")), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(NonFiniteLossError, match="user 'cy'.*step 0") as info:
        train_cohort_vectorized(
            model, [cohort[0], cohort[1], bad], ce, lr=0.1, steps=2, user_ids=["amy", "bob", "cy"]
        )
    assert info.value.user_id == "cy"


def test_empty_cohort_and_bad_options() -> None:
    model = make_mlp()
    assert train_cohort_vectorized(model, [], ce, lr=0.1, steps=1) == []
    cohort = cohort_data(2, (6,))
    with pytest.raises(ValueError, match="lr"):
        train_cohort_vectorized(model, cohort, ce, lr=0.0, steps=1)
    with pytest.raises(ValueError, match="steps"):
        train_cohort_vectorized(model, cohort, ce, lr=0.1, steps=0)
    with pytest.raises(ValueError, match="user_ids"):
        train_cohort_vectorized(model, cohort, ce, lr=0.1, steps=1, user_ids=["a"])


def test_chunked_cohort_matches_one_pass_and_no_grad_context_is_fine() -> None:
    torch.manual_seed(0)
    model = make_conv()
    cohort = cohort_data(5, (2, 6))
    full = train_cohort_vectorized(model, cohort, ce, lr=0.2, steps=3, fallback=False)
    with torch.no_grad():  # callers may hold a no-grad context (e.g. around evaluation)
        chunked = train_cohort_vectorized(
            model, cohort, ce, lr=0.2, steps=3, fallback=False, chunk_size=2
        )
    assert len(chunked) == 5
    for a, b in zip(full, chunked, strict=True):
        assert rel_error(b, a) <= REL_TOL
    with pytest.raises(ValueError, match="chunk_size"):
        train_cohort_vectorized(model, cohort, ce, lr=0.2, steps=3, chunk_size=0)
    with pytest.raises(TypeError, match="sequence of batches"):
        train_cohort_vectorized(model, [torch.zeros(4, 6)], ce, lr=0.1, steps=1)


class MaskedMean(nn.Module):
    """Masked mean pooling over a padded sequence: padding changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(x)) * mask[..., None]
        return self.head(h.sum(1) / mask.sum(1, keepdim=True))


def masked_ce(model, batch) -> torch.Tensor:  # type: ignore[no-untyped-def]
    x, mask, y = batch
    return F.cross_entropy(model(x, mask), y)


def pad_to_longest(batches: list) -> list:  # type: ignore[type-arg]
    n = max(x.shape[1] for x, _, _ in batches)
    return [(F.pad(x, (0, 0, 0, n - x.shape[1])), F.pad(m, (0, n - m.shape[1])), y)
            for x, m, y in batches]


def ragged_cohort(num_users: int) -> list[list[tuple[torch.Tensor, ...]]]:
    """User u's sequences are 3 + u + s long at its batch s: no two users' batches stack."""
    g = torch.Generator().manual_seed(5)
    return [
        [
            (torch.randn(4, 3 + u + s, 4, generator=g), torch.ones(4, 3 + u + s),
             torch.randint(0, 3, (4,), generator=g))
            for s in range(2)
        ]
        for u in range(num_users)
    ]


def test_align_makes_ragged_batches_stack_and_matches_the_unpadded_loop() -> None:
    torch.manual_seed(0)
    model = MaskedMean()
    cohort = ragged_cohort(4)
    kw = {"lr": 0.3, "steps": 3, "max_grad_norm": 1.0}
    with pytest.raises(VectorizationError, match="shapes"):
        train_cohort_vectorized(model, cohort, masked_ce, fallback=False, **kw)
    vec = train_cohort_vectorized(model, cohort, masked_ce, fallback=False, align=pad_to_longest,
                                  **kw)
    seq = [train_local(model, b, masked_ce, **kw) for b in cohort]  # unpadded batches
    for v, s in zip(vec, seq, strict=True):
        assert rel_error(v, s) <= REL_TOL


def test_align_that_breaks_its_contract_raises_instead_of_falling_back() -> None:
    model, cohort = MaskedMean(), ragged_cohort(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", VectorizationFallbackWarning)
        with pytest.raises(ValueError, match="align returned 2 batches for 3 users"):
            train_cohort_vectorized(model, cohort, masked_ce, lr=0.1, steps=1,
                                    align=lambda b: pad_to_longest(b)[:2])
    with pytest.raises(TypeError, match="align must be callable"):
        train_cohort_vectorized(model, cohort, masked_ce, lr=0.1, steps=1, align=3)  # type: ignore[arg-type]
