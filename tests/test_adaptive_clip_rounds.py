"""Adaptive clipping in the round loop: charging, logging, checkpoint and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpfl.accounting import PoissonRound
from dpfl.adaptive_clip import AdaptiveClip
from dpfl.clip import GlobalClip, PerLayerClip
from dpfl.simulation.checkpoint import CheckpointError
from tests.test_rounds import DELTA, Q, Z, accountant, call, params, setup

ZB = 4.0


def adaptive(per_layer: bool, **kw) -> AdaptiveClip:
    base = PerLayerClip(0.5, allocation="dim") if per_layer else GlobalClip(0.5)
    return AdaptiveClip(base, count_noise_multiplier=kw.pop("zb", ZB), **kw)


@pytest.mark.parametrize("per_layer", [False, True])
def test_rounds_are_charged_at_the_effective_multiplier_and_bounds_logged(
    tmp_path: Path, per_layer: bool
) -> None:
    kw = setup()
    clipper = adaptive(per_layer)
    result = call(kw, rounds=4, clipper=clipper, log_path=tmp_path / "log.jsonl")
    spec = PoissonRound(noise_multiplier=Z, sample_rate=Q, count_noise_multiplier=ZB)
    assert kw["accountant"].ledger == [(spec, 4)]
    reference = accountant()
    reference.add_rounds(spec, 4)
    assert result.epsilon == pytest.approx(reference.epsilon(DELTA), rel=1e-12)
    bounds = [r.clip_bound for r in result.records]
    assert bounds[0] == pytest.approx(0.5) and len(set(bounds)) == 4  # the bound adapts
    assert clipper.step == 4
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    logged = [e for e in lines if e["event"] == "round"]
    assert [e["clip_bound"] for e in logged] == bounds
    assert ("layer_bounds" in logged[0]) == per_layer
    if per_layer:
        assert sum(b * b for b in logged[-1]["layer_bounds"].values()) == pytest.approx(
            bounds[-1] ** 2
        )


@pytest.mark.parametrize("per_layer", [False, True])
def test_resume_restores_the_bounds_and_equals_the_uninterrupted_run(
    tmp_path: Path, per_layer: bool
) -> None:
    full = setup()
    full_result = call(full, rounds=5, clipper=adaptive(per_layer), checkpoint_dir=tmp_path / "a")
    part = setup()
    call(part, rounds=3, clipper=adaptive(per_layer), checkpoint_dir=tmp_path / "b")
    again = setup()
    fresh = adaptive(per_layer)  # starts from the initial bound: the checkpoint must move it
    resumed = call(again, rounds=5, clipper=fresh, checkpoint_dir=tmp_path / "b", resume=True)
    assert resumed.resumed_from == 3 and fresh.step == 5
    assert [r.clip_bound for r in resumed.records] == [
        r.clip_bound for r in full_result.records[3:]
    ]
    for k, v in params(full["model"]).items():
        assert torch.equal(v, again["model"].state_dict()[k]), k


def test_resume_with_another_adaptive_configuration_is_refused(tmp_path: Path) -> None:
    call(setup(), rounds=1, clipper=adaptive(True), checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="clipper_config"):
        call(
            setup(),
            rounds=2,
            clipper=adaptive(True, target_quantile=0.7),
            checkpoint_dir=tmp_path,
            resume=True,
        )
    with pytest.raises(CheckpointError, match="count_noise_multiplier"):
        call(
            setup(), rounds=2, clipper=adaptive(True, zb=8.0), checkpoint_dir=tmp_path, resume=True
        )
    with pytest.raises(CheckpointError, match="clipper"):
        call(setup(), rounds=2, clipper=PerLayerClip(0.5), checkpoint_dir=tmp_path, resume=True)


def test_canary_audit_with_an_adaptive_clipper_is_refused() -> None:
    from dpfl.audit.canary import CanaryAudit

    with pytest.raises(ValueError, match="AdaptiveClip"):
        call(setup(), rounds=1, clipper=adaptive(False), audit=CanaryAudit(num_canaries=2, seed=0))
