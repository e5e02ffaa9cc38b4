"""Every warning dpfl issues points at the caller's line, not into dpfl or torch.

A warning is only useful if it names the line that caused it: ``warnings.warn`` with a fixed
``stacklevel`` points into torch's ``no_grad`` wrapper or dpfl's loop depending on the call path.
Each warning below is triggered through its real call path from this file, and must report
this file as its location.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from dpfl.simulation import VectorizationFallbackWarning, train_cohort_vectorized
from tests._scripts.tiny_fl import run

HERE = str(Path(__file__).resolve())


def _ours(caught: list[warnings.WarningMessage], category: type[Warning]) -> list[str]:
    return [str(Path(w.filename).resolve()) for w in caught if issubclass(w.category, category)]


def _ragged_cohort() -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    return [[(torch.randn(n, 4, generator=gen), torch.randint(2, (n,), generator=gen))]
            for n in (5, 7)]


def test_the_vectorization_fallback_warning_points_at_the_call() -> None:
    model = nn.Linear(4, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_cohort_vectorized(model, _ragged_cohort(),
                                lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
                                lr=0.1, steps=1)
    assert _ours(caught, VectorizationFallbackWarning) == [HERE]


def test_a_resume_warning_points_at_the_run_rounds_call(tmp_path: Path) -> None:
    run(tmp_path, rounds=2, server_lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(tmp_path, rounds=3, resume=True, server_lr=0.02)
    # tiny_fl.run calls run_rounds: the warning names that call, outside dpfl.
    files = _ours(caught, RuntimeWarning)
    assert files and all(f.endswith("tiny_fl.py") for f in files), files


@pytest.mark.parametrize("depth", [0, 3])
def test_the_helper_skips_every_dpfl_and_torch_frame(depth: int) -> None:
    from dpfl._checks import warn_at_caller

    def nested(level: int) -> None:
        if level:
            nested(level - 1)
        else:
            warn_at_caller("probe", UserWarning)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nested(depth)
    assert _ours(caught, UserWarning) == [HERE]
