"""Tests for dpfl.audit.canary: one-shot empirical ε of a DP-FedAvg run with canary clients.

The end-to-end tests run a hand-written DP-FedAvg loop built from dpfl's public primitives
(PoissonSampler, DPAggregator with a clipper and a GaussianMechanism, an accountant) with the
hooks a round loop gives :class:`CanaryAudit`. Seeds are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from dpfl.accounting import PLDAccountant, PoissonRound, RDPAccountant
from dpfl.aggregate import DPAggregator
from dpfl.audit import CanaryAudit, canary_update, estimate_from_cosines, gaussian_epsilon
from dpfl.audit._cli import add_audit_parser
from dpfl.clip import GlobalClip, PerLayerClip
from dpfl.noise import GaussianMechanism
from dpfl.simulation import PoissonSampler

DELTA = 1e-5
C = 1.0


def dp_fedavg_with_canaries(
    *,
    noise_multiplier: float,
    accounted_noise_multiplier: float | None = None,
    sample_rate: float,
    rounds: int,
    num_canaries: int = 150,
    population: int = 100,
    dims: tuple[int, ...] = (3000, 1000),
    clipper=None,
    seed: int = 0,
):
    """Run DP-FedAvg on synthetic users with a CanaryAudit; return (estimate, PLD ε).

    The accountant of a real loop is charged every round (one ``add_rounds`` per round, and
    nothing for canaries: they are not users); here the identical ledger is built once per
    setting by :func:`accounted_epsilon` because subsampled RDP/PLD curves take seconds.

    ``noise_multiplier`` is the noise actually added; ``accounted_noise_multiplier`` (default the
    same) is what the accountant is charged with, so a broken run can be simulated.
    """
    z_acc = noise_multiplier if accounted_noise_multiplier is None else accounted_noise_multiplier
    gen = torch.Generator().manual_seed(seed)
    model = {f"layer{i}": torch.zeros(d) for i, d in enumerate(dims)}
    users = [
        {
            k: 2 * C * torch.randn(v.shape, generator=gen) / math.sqrt(sum(dims))
            for k, v in model.items()
        }
        for _ in range(population)
    ]
    clipper = clipper or GlobalClip(C)
    sampler = PoissonSampler(range(population), sample_rate, seed=seed)
    aggregator = DPAggregator(
        clipper,
        GaussianMechanism(noise_multiplier, clipper.sensitivity, seed=seed),
        expected_cohort_size=sampler.expected_cohort_size,
        template=model,
    )
    audit = CanaryAudit(num_canaries, seed=seed + 1)
    audit.begin(model, clipper)  # hook 1: once, before the first round
    for _ in range(rounds):
        for uid in sampler.sample():
            aggregator.add(users[uid])
        for i in audit.sample(sample_rate):  # hook 2: canaries join the cohort, same rate
            aggregator.add(audit.update(i))
        mean, _ = aggregator.release(allow_empty=True)
        before = {k: v.clone() for k, v in model.items()}
        for k in model:  # server step: plain SGD with learning rate 1
            model[k] += mean[k]
        audit.observe(before, model)  # hook 3: every released iterate
    result = audit.result(DELTA)  # hook 4: at the end
    return result, accounted_epsilon(z_acc, sample_rate, rounds, "pld")


@functools.cache
def accounted_epsilon(z: float, q: float, rounds: int, kind: str) -> float:
    acc = PLDAccountant() if kind == "pld" else RDPAccountant()
    acc.add_rounds(PoissonRound(noise_multiplier=z, sample_rate=q), rounds)
    return acc.epsilon(DELTA)


@pytest.fixture(scope="module")
def honest_runs():
    return {
        z: dp_fedavg_with_canaries(noise_multiplier=z, sample_rate=0.2, rounds=20)
        for z in (0.5, 1.0, 1.5)
    }


@pytest.mark.parametrize("z", [0.5, 1.0, 1.5])
def test_estimate_stays_below_the_accountant(honest_runs, z):
    """q = 0.2 over 20 rounds: the cosine attack on the final model sums rounds the canary
    missed, so it stays below what the accountant proves (at z = 1.5 by ~2 standard errors of
    the estimate's μ, more at lower noise; at z >= 2 this attack is nearly optimal and the
    estimate's sampling error can cross the accountant)."""
    result, eps_pld = honest_runs[z]
    assert result.epsilon < eps_pld
    assert result.all_iterates is not None and result.all_iterates.epsilon < eps_pld
    assert result.rounds_observed == 20
    assert result.mean_participations == pytest.approx(0.2 * 20, rel=0.15)


def test_estimate_grows_as_noise_falls(honest_runs):
    finals = [honest_runs[z][0].epsilon for z in (1.5, 1.0, 0.5)]
    assert 0 < finals[0] < finals[1] < finals[2]


def test_halved_noise_is_flagged():
    """Every canary in every round (q = 1), noise half of what is accounted: the estimate
    exceeds the accountant's ε (RDP, the larger), so the audit fails."""
    broken, eps_pld = dp_fedavg_with_canaries(
        noise_multiplier=1.0, accounted_noise_multiplier=2.0, sample_rate=1.0, rounds=4
    )
    eps_rdp = accounted_epsilon(2.0, 1.0, 4, "rdp")
    assert broken.epsilon > eps_rdp >= eps_pld


def test_estimate_is_tight_when_the_attack_is_optimal():
    """With q = 1 and a plain-SGD server, the final model's change is the sum of the releases,
    the optimal statistic: the run is exactly (√T/z)-GDP and the estimate's μ matches it within
    its sampling error (SE ≈ √(2/k) ≈ 0.12; here within 3 SE). So the estimate is not a bound:
    near the truth it can land on either side of the accountant's ε."""
    honest, eps_pld = dp_fedavg_with_canaries(noise_multiplier=2.0, sample_rate=1.0, rounds=4)
    assert eps_pld == pytest.approx(gaussian_epsilon(1.0, DELTA), rel=1e-3)
    assert honest.final.mu == pytest.approx(1.0, abs=3 * math.sqrt(2 / 150))


def test_per_layer_clipper_runs_end_to_end():
    clipper = PerLayerClip(C, allocation="uniform")
    result, eps_pld = dp_fedavg_with_canaries(
        noise_multiplier=1.0, sample_rate=0.2, rounds=10, clipper=clipper, num_canaries=50
    )
    assert 0 < result.epsilon < eps_pld


# --------------------------------------------------------------------------- canary mechanics
TEMPLATE = {"a": torch.zeros(40, 3), "b": torch.zeros(7), "c": torch.zeros(2, dtype=torch.float64)}


@pytest.mark.parametrize(
    "clipper",
    [
        GlobalClip(0.3),
        PerLayerClip(0.3),
        PerLayerClip(0.3, allocation="uniform"),
        PerLayerClip(0.3, layers=lambda n: "ab" if n in "ab" else n),
    ],
    ids=["global", "dim", "uniform", "grouped"],
)
def test_canary_is_a_full_strength_user_the_clipper_leaves_alone(clipper):
    canary = canary_update(TEMPLATE, clipper, torch.Generator().manual_seed(0))
    assert {k: (v.shape, v.dtype) for k, v in canary.items()} == {
        k: (v.shape, v.dtype) for k, v in TEMPLATE.items()
    }
    clipped, stats = clipper.clip(canary)
    assert not stats.clipped
    assert all(torch.equal(clipped[k], canary[k]) for k in canary)
    assert stats.norm == pytest.approx(clipper.sensitivity, rel=1e-5)
    bounds = clipper.layer_bounds(canary)
    for layer, norm in stats.layer_norms.items():
        assert norm == pytest.approx(bounds[layer], rel=1e-5)


def test_updates_are_fixed_and_deterministic_from_the_seed():
    a, b = CanaryAudit(5, seed=7), CanaryAudit(5, seed=7)
    for audit in (a, b):
        audit.begin(TEMPLATE, GlobalClip(1.0))
    assert all(torch.equal(a.update(2)[k], b.update(2)[k]) for k in TEMPLATE)
    assert [a.sample(0.5) for _ in range(5)] == [b.sample(0.5) for _ in range(5)]
    assert all(torch.equal(a.update(2)[k], a.update(2)[k]) for k in TEMPLATE)
    other = CanaryAudit(5, seed=8)
    other.begin(TEMPLATE, GlobalClip(1.0))
    assert not torch.equal(other.update(2)["a"], a.update(2)["a"])
    flat = [torch.cat([v.flatten().double() for v in a.update(i).values()]) for i in range(5)]
    assert abs(float(flat[0] @ flat[1])) < 0.5  # distinct random directions


def test_sampling_rate_matches_the_requested_rate():
    audit = CanaryAudit(100, seed=1)
    audit.begin(TEMPLATE, GlobalClip(1.0))
    counts = sum(len(audit.sample(0.3)) for _ in range(200))
    n, p = 100 * 200, 0.3
    assert abs(counts - n * p) < 5 * math.sqrt(n * p * (1 - p))
    assert audit.sample(0.0) == [] and audit.sample(1.0) == list(range(100))


def _iterates(seed: int, rounds: int):
    g = torch.Generator().manual_seed(seed)
    models = [{k: torch.zeros_like(v) for k, v in TEMPLATE.items()}]
    for _ in range(rounds):
        models.append(
            {k: v + torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in models[-1].items()}
        )
    return models


def test_state_dict_resume_equals_an_uninterrupted_audit():
    models = _iterates(0, 6)
    full = CanaryAudit(6, seed=3)
    full.begin(TEMPLATE, GlobalClip(1.0))
    picks_full = []
    for t in range(6):
        picks_full.append(full.sample(0.5))
        full.observe(models[t], models[t + 1])
    first = CanaryAudit(6, seed=3)
    first.begin(TEMPLATE, GlobalClip(1.0))
    picks = []
    for t in range(3):
        picks.append(first.sample(0.5))
        first.observe(models[t], models[t + 1])
    state = first.state_dict()
    resumed = CanaryAudit(6, seed=3)
    resumed.begin(TEMPLATE, GlobalClip(1.0))
    resumed.load_state_dict(state)
    for t in range(3, 6):
        picks.append(resumed.sample(0.5))
        resumed.observe(models[t], models[t + 1])
    assert picks == picks_full
    assert resumed.cosines() == full.cosines()
    assert resumed.result(DELTA) == full.result(DELTA)


def test_cosines_of_the_total_change_and_the_best_iterate():
    models = _iterates(1, 3)
    audit = CanaryAudit(3, seed=0)
    audit.begin(TEMPLATE, GlobalClip(1.0))
    for t in range(3):
        audit.observe(models[t], models[t + 1])
    cos = audit.cosines()
    u = torch.cat([v.flatten().double() for v in audit.update(1).values()])
    flat = [torch.cat([m[k].flatten().double() for k in TEMPLATE]) for m in models]
    total = flat[-1] - flat[0]
    assert cos["final"]["canary"][1] == pytest.approx(
        float(u @ total / (u.norm() * total.norm())), abs=1e-6
    )
    steps = [
        float(u @ (flat[t + 1] - flat[t]) / (u.norm() * (flat[t + 1] - flat[t]).norm()))
        for t in range(3)
    ]
    assert cos["all_iterates"]["canary"][1] == pytest.approx(max(steps), abs=1e-6)
    assert len(cos["final"]["unseen"]) == 3 and cos["rounds_observed"] == 3


def test_errors_name_the_problem_and_change_nothing():
    with pytest.raises(ValueError, match="num_canaries"):
        CanaryAudit(1)
    audit = CanaryAudit(3, seed=0)
    with pytest.raises(RuntimeError, match="begin"):
        audit.sample(0.5)
    with pytest.raises(ValueError, match="finite clip bound"):
        audit.begin(TEMPLATE, GlobalClip(math.inf))
    audit.begin(TEMPLATE, GlobalClip(1.0))
    with pytest.raises(RuntimeError, match="observe"):
        audit.result(DELTA)
    with pytest.raises(ValueError, match="index"):
        audit.update(3)
    with pytest.raises(ValueError, match="sample_rate"):
        audit.sample(1.5)
    bad = {k: v for k, v in TEMPLATE.items() if k != "b"}
    with pytest.raises(ValueError, match="template"):
        audit.observe(TEMPLATE, bad)
    with pytest.raises(ValueError, match="shape"):
        audit.observe(TEMPLATE, {**TEMPLATE, "b": torch.zeros(8)})
    assert audit.state_dict()["rounds_observed"] == 0 and audit.state_dict()["round"] == 0
    other = CanaryAudit(3, seed=1)
    other.begin(TEMPLATE, GlobalClip(1.0))
    with pytest.raises(ValueError, match="seed"):
        audit.load_state_dict(other.state_dict())


# --------------------------------------------------------------------------- estimation
def test_estimate_from_cosines_fits_two_gaussians():
    canary = np.array([1.0, 2.0, 3.0])  # mean 2, std 1
    unseen = np.array([-1.0, 0.0, 1.0])  # mean 0, std 1
    est = estimate_from_cosines(canary, unseen, delta=DELTA)
    assert est.mu == pytest.approx(2.0)
    assert est.epsilon == pytest.approx(gaussian_epsilon(2.0, DELTA))
    assert (est.canary_mean, est.canary_std, est.unseen_mean, est.unseen_std) == (
        2.0,
        1.0,
        0.0,
        1.0,
    )
    assert estimate_from_cosines(unseen, unseen, delta=DELTA).epsilon == 0.0
    # canaries scoring *lower* than unseen directions are no evidence of leakage
    assert estimate_from_cosines(unseen, canary, delta=DELTA).mu == 0.0
    with pytest.raises(ValueError, match="canary"):
        estimate_from_cosines([1.0], unseen, delta=DELTA)
    with pytest.raises(ValueError, match="unseen"):
        estimate_from_cosines(canary, [0.0, math.nan], delta=DELTA)


def test_estimate_recovers_a_known_gaussian_pair():
    rng = np.random.default_rng(0)
    mu = 1.5
    est = estimate_from_cosines(rng.normal(mu, 1, 20_000), rng.normal(0, 1, 20_000), delta=DELTA)
    assert est.mu == pytest.approx(mu, abs=0.05)  # ~5 standard errors
    assert est.epsilon == pytest.approx(gaussian_epsilon(mu, DELTA), rel=0.05)


# --------------------------------------------------------------------------- CLI
def _cli(argv):
    parser = argparse.ArgumentParser(prog="dpfl")
    add_audit_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result = args.handler(args)
    return result, args.formatter(result)


def test_cli_estimate_from_saved_cosines(tmp_path):
    models = _iterates(2, 4)
    audit = CanaryAudit(10, seed=0)
    audit.begin(TEMPLATE, GlobalClip(1.0))
    for t in range(4):
        audit.observe(models[t], models[t + 1])
    path = tmp_path / "cosines.json"
    path.write_text(json.dumps(audit.cosines()))
    result, text = _cli(["audit", "estimate", "--cosines", str(path), "--delta", "1e-5"])
    expected = audit.result(DELTA)
    assert result["epsilon_final"] == pytest.approx(expected.final.epsilon)
    assert result["epsilon_all_iterates"] == pytest.approx(expected.all_iterates.epsilon)
    assert "empirical epsilon (final model)" in text
    path.write_text("{}")
    with pytest.raises(ValueError, match="final"):
        _cli(["audit", "estimate", "--cosines", str(path), "--delta", "1e-5"])


def test_cli_bound_from_counts():
    result, text = _cli(
        [
            "audit",
            "bound",
            "--false-positives",
            "0",
            "--trials-out",
            "100000",
            "--false-negatives",
            "90000",
            "--trials-in",
            "100000",
            "--delta",
            "1e-5",
        ]
    )
    assert result["epsilon"] == pytest.approx(
        math.log((1 - 1e-5 - result["fnr_upper"]) / result["fpr_upper"])
    )
    assert result["fpr_upper"] == pytest.approx(-math.log(0.025) / 100_000, rel=0.01)
    assert "with confidence 0.95" in text
    with pytest.raises(ValueError, match="argument --false-positives"):
        _cli(
            [
                "audit",
                "bound",
                "--false-positives",
                "-1",
                "--trials-out",
                "10",
                "--false-negatives",
                "1",
                "--trials-in",
                "10",
                "--delta",
                "1e-5",
            ]
        )


def test_cli_parser_and_gdp_maths_do_not_import_torch():
    code = (
        "import sys, dpfl.audit._cli; from dpfl.audit import gaussian_epsilon; "
        "gaussian_epsilon(1.0, 1e-5); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
