"""Tests of the ASR pipeline: FL glue (noise resolution, optimizers, clippers) and `--quick` run."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Hashable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpfl.accounting import epsilon_for
from dpfl.clip import GlobalClip, PerLayerClip
from dpfl.optim import LAMB
from dpfl.simulation import InMemoryFederatedDataset, VectorizationFallbackWarning
from examples.asr.federated import (
    FederatedConfig,
    make_clipper,
    make_server_optimizer,
    resolve_noise,
    run_federated,
)
from examples.asr.model import CTCTransformer, get_config
from examples.asr.text import CharTokenizer
from examples.asr.train import make_batches

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "asr_librispeech.py"


@given(
    st.floats(1e-6, 1e-1), st.integers(1, 5000), st.sampled_from(["noise_multiplier", "sigma_dp"])
)
def test_noise_parameterisations_agree(value: float, cohort: int, which: str) -> None:
    """z = σ_DP · S whichever of the two is given."""
    z, sigma = resolve_noise(
        noise_multiplier=value if which == "noise_multiplier" else None,
        sigma_dp=value if which == "sigma_dp" else None,
        target_epsilon=None,
        cohort_size=cohort,
        population=10 * cohort,
        rounds=10,
        delta=1e-6,
    )
    assert math.isclose(z, sigma * cohort, rel_tol=1e-12)
    assert math.isclose(z if which == "noise_multiplier" else sigma, value, rel_tol=1e-12)


def test_target_epsilon_is_calibrated_one_sided() -> None:
    z, sigma = resolve_noise(
        noise_multiplier=None,
        sigma_dp=None,
        target_epsilon=5.0,
        cohort_size=20,
        population=400,
        rounds=30,
        delta=1e-6,
    )
    assert z > 0 and math.isclose(sigma, z / 20)
    assert epsilon_for(z, 20 / 400, 30, 1e-6) <= 5.0 * (1 + 1e-9)
    assert epsilon_for(0.95 * z, 20 / 400, 30, 1e-6) > 5.0


def test_noise_options_are_mutually_exclusive_and_default_to_no_noise() -> None:
    with pytest.raises(ValueError, match="at most one"):
        resolve_noise(
            noise_multiplier=1.0,
            sigma_dp=1e-3,
            target_epsilon=None,
            cohort_size=10,
            population=100,
            rounds=5,
            delta=1e-6,
        )
    assert resolve_noise(
        noise_multiplier=None,
        sigma_dp=None,
        target_epsilon=None,
        cohort_size=10,
        population=100,
        rounds=5,
        delta=1e-6,
    ) == (0.0, 0.0)


def test_server_optimizer_decays_its_learning_rate_and_keeps_it_in_state_dict() -> None:
    model = torch.nn.Linear(3, 2)
    opt = make_server_optimizer(model, "lamb", lr=0.01, lr_decay=0.5)
    assert isinstance(opt, LAMB)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)
    fresh = make_server_optimizer(model, "lamb", lr=0.01, lr_decay=0.5)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.00125)
    for name in ("adam", "sgd"):
        assert make_server_optimizer(model, name, lr=0.1).param_groups[0]["lr_decay"] == 1.0
    with pytest.raises(ValueError, match="lr_decay"):
        make_server_optimizer(model, "lamb", lr=0.1, lr_decay=1.5)
    with pytest.raises(ValueError, match="server optimizer"):
        make_server_optimizer(model, "rmsprop", lr=0.1)  # type: ignore[arg-type]


def test_clipper_choice() -> None:
    assert isinstance(make_clipper("global", 0.5), GlobalClip)
    clipper = make_clipper("per-layer", 0.5, allocation="uniform")
    assert isinstance(clipper, PerLayerClip) and clipper.allocation == "uniform"
    with pytest.raises(ValueError, match="clip"):
        make_clipper("per-user", 0.5)  # type: ignore[arg-type]


def test_federated_round_with_dp_changes_the_model_and_spends_epsilon(tmp_path: Path) -> None:
    """Two DP-FedAvg rounds on random-feature users through dpfl's round loop."""
    tok = CharTokenizer()
    g = torch.Generator().manual_seed(0)
    users: dict[Hashable, Any] = {
        f"u{i}": make_batches(
            [torch.randn(40, 80, generator=g) for _ in range(2)], ["ab c", "d e"], tok, batch_size=1
        )
        for i in range(6)
    }
    torch.manual_seed(0)
    model = CTCTransformer(get_config("tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = FederatedConfig(
        rounds=2,
        cohort_size=3,
        local_steps=2,
        local_lr=0.05,
        clip_bound=0.1,
        noise_multiplier=0.5,
        server_lr=0.01,
        seed=1,
    )
    result = run_federated(
        model,
        InMemoryFederatedDataset(users),
        config,
        log_path=tmp_path / "log.jsonl",
        progress=False,
    )
    assert result.rounds_completed == 2
    assert 0 < result.epsilon < math.inf
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sum(x.get("event") == "round" for x in lines) == 2


#: Round-record fields that depend on the realised cohort (off unless unsafe_metrics=True).
UNSAFE = ("num_users", "num_dropped", "fraction_clipped", "mean_norm", "time_s", "timings")
SAFE_ROUND_KEYS = {"event", "round", "epsilon", "delta", "eval", "clip_bound", "layer_bounds"}


def assert_no_cohort_statistics_and_noise_named(out: Path, printed: str) -> None:
    """Issue 9: the example's logs, results and console carry no realised-cohort statistics by
    default, and its table says which DP noise was used (unseeded here)."""
    for name in ("fl_no_noise", "fl_dp", "fl_dp_other_clip"):
        events = [json.loads(x) for x in (out / f"{name}.jsonl").read_text().splitlines()]
        assert events[0]["event"] == "start" and events[0]["unsafe_metrics"] is False
        assert "warning" not in events[0]
        for event in events:
            assert not set(UNSAFE) & set(event), (name, event)
            if event["event"] == "round":
                assert set(event) <= SAFE_ROUND_KEYS, (name, event)
    results = json.loads((out / "results.json").read_text())
    for name in ("fl_dp", "fl_dp_other_clip"):
        assert not {"num_users", "num_dropped", "records", "time_s"} & set(results[name]), name
        assert results[name]["noise_seed"] is None and results[name]["secure_noise"] is False
        assert results[name]["noise"].startswith("OS entropy")
    # Issue 21.4: one rule, no timing from any stage (the no-noise stage samples the same
    # cohorts as the DP stage), neither recorded nor printed
    assert "wall_time_s" not in results
    assert not any("time_s" in results[name] for name in ("fl_no_noise", "fl_dp", "fl_dp_other_clip"))
    assert "LARS steps in" not in printed and "s incl. corpus" not in printed
    assert "DP noise: OS entropy (unseeded)" in (out / "results.md").read_text()
    assert "wall time not recorded" in (out / "results.md").read_text()
    assert "NOT covered" not in printed
    rounds = [line for line in printed.replace("\r", "\n").splitlines() if "dpfl: round" in line]
    assert rounds and all(re.fullmatch(r"dpfl: round \d+/\d+  epsilon \S+", r) for r in rounds)


def test_vectorized_federated_run_matches_the_sequential_one() -> None:
    """`FederatedConfig(vectorized=True)` trains each cohort at once (ragged users: frames,
    targets and utterance counts differ) without falling back, to the same model as the loop."""
    tok = CharTokenizer()
    g = torch.Generator().manual_seed(0)
    texts = ["ab c", "d e", "hello", "x"]
    users: dict[Hashable, Any] = {
        f"u{i}": make_batches([torch.randn(30 + 7 * i + 3 * j, 80, generator=g) for j in range(2 + i % 3)],
                              texts[: 2 + i % 3], tok, batch_size=2)
        for i in range(6)
    }
    config = FederatedConfig(rounds=2, cohort_size=4, local_steps=3, local_lr=0.05,
                             clip_bound=0.1, noise_multiplier=0.5, noise_seed=3, server_lr=0.01,
                             seed=1)
    models = []
    for vectorized in (False, True):
        torch.manual_seed(0)
        model = CTCTransformer(get_config("tiny"))  # no dropout: the two must agree
        with warnings.catch_warnings():
            warnings.simplefilter("error", VectorizationFallbackWarning)
            run_federated(model, InMemoryFederatedDataset(users),
                          replace(config, vectorized=vectorized), progress=False)
        models.append(model.state_dict())
    for k, v in models[0].items():
        torch.testing.assert_close(models[1][k], v, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("extra", [["--model", "paper"], ["--specaugment", "small"]])
def test_vectorized_is_refused_where_vmap_cannot_trace_before_any_work(extra: list[str]) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--vectorized", *extra], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "--vectorized needs a model without LayerDrop" in proc.stderr


def test_resuming_a_decaying_server_lr_raises_no_false_alarm(tmp_path: Path) -> None:
    """The decayed server LR in a checkpoint is the schedule, not a changed setting: resuming the
    same configuration warns of nothing; another initial LR is still reported."""
    tok = CharTokenizer()
    g = torch.Generator().manual_seed(0)
    users: dict[Hashable, Any] = {
        f"u{i}": make_batches([torch.randn(30 + 5 * i, 80, generator=g)], ["ab"], tok, batch_size=1)
        for i in range(4)
    }
    config = FederatedConfig(rounds=2, cohort_size=2, local_steps=1, local_lr=0.05, clip_bound=0.1,
                             noise_multiplier=0.5, server_lr=0.01, server_lr_decay=0.5, seed=1)
    model = CTCTransformer(get_config("tiny"))
    run_federated(model, InMemoryFederatedDataset(users), config, checkpoint_dir=tmp_path / "c",
                  progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run_federated(model, InMemoryFederatedDataset(users), replace(config, rounds=3),
                      checkpoint_dir=tmp_path / "c", resume=True, progress=False)
    with pytest.warns(RuntimeWarning, match="learning rate"):
        run_federated(model, InMemoryFederatedDataset(users), replace(config, rounds=4, server_lr=0.1),
                      checkpoint_dir=tmp_path / "c", resume=True, progress=False)


def test_quick_pipeline_end_to_end(tmp_path: Path) -> None:
    """`--quick` generates its corpus, trains, fine-tunes with and without DP, writes the table;
    `--canaries K` prints the empirical ε of each DP stage beside the proven one."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--threads",
            "1",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--output-dir",
            str(out),
            "--canaries",
            "20",
            "--vectorized",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for name in ("seed", "fl_no_noise", "fl_dp"):
        assert math.isfinite(results[name]["wer"]) and results[name]["wer"] >= 0
        assert 0 <= results[name]["cer"]
    assert results["fl_no_noise"]["epsilon"] == "inf"
    assert 0 < results["fl_dp"]["epsilon"] < math.inf
    assert 0 < results["extrapolated"]["epsilon"] < results["fl_dp"]["epsilon"]
    assert results["fl_dp"]["noise_multiplier"] == pytest.approx(
        results["fl_dp"]["sigma_dp"] * results["fl_dp"]["cohort_size"]
    )
    # The paper's comparison: the same noise with global clipping next to per-layer clipping.
    other = results["fl_dp_other_clip"]
    assert (results["fl_dp"]["clip"], other["clip"]) == ("per-layer", "global")
    assert all(results[n]["vectorized"] for n in ("fl_no_noise", "fl_dp", "fl_dp_other_clip"))
    assert other["noise_multiplier"] == results["fl_dp"]["noise_multiplier"] > 0
    assert other["epsilon"] == pytest.approx(results["fl_dp"]["epsilon"])
    # docs/asr.md names every round log and the fields of a round line: keep them in step
    docs = (Path(__file__).resolve().parents[2] / "docs" / "asr.md").read_text()
    assert sorted(p.name for p in out.glob("*.jsonl")) == sorted(
        f"{n}.jsonl" for n in ("fl_no_noise", "fl_dp", "fl_dp_other_clip"))
    for log in out.glob("*.jsonl"):
        assert f"`{log.name}`" in docs, log.name
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        assert {k for r in lines if r.get("event") == "round" for k in r} == {
            "event", "round", "epsilon", "delta", "eval"}
    for field in ("`round`", "`epsilon`", "`delta`", "`eval`"):
        assert field in docs
    for name in ("fl_no_noise", "fl_dp", "fl_dp_other_clip"):
        rounds = [json.loads(x) for x in (out / f"{name}.jsonl").read_text().splitlines()]
        assert sum(r.get("event") == "round" for r in rounds) == results[name]["rounds"] > 0
    assert (out / "seed_model.pt").is_file()
    assert_no_cohort_statistics_and_noise_named(out, proc.stdout + proc.stderr)
    assert "C=0.01 global" in proc.stdout
    assert "FL + DP" in proc.stdout and "seed model" in proc.stdout
    assert (out / "results.md").read_text().strip() in proc.stdout
    # --canaries: a one-shot estimate for each DP stage (none without noise), printed beside the
    # proven ε, in results.json and in the table; the canaries charge nothing.
    assert "audit" not in results["fl_no_noise"]
    for name in ("fl_dp", "fl_dp_other_clip"):
        audit = results[name]["audit"]
        assert audit["num_canaries"] == 20 and audit["rounds_observed"] == results[name]["rounds"]
        assert 0 <= audit["empirical_epsilon"] <= results[name]["epsilon"]
        assert (f"{name}: empirical ε {audit['empirical_epsilon']:.3g} (20 canaries, one-shot "
                f"estimate) vs proven ε {results[name]['epsilon']:.4g}") in proc.stdout
    assert "20 canaries)" in (out / "results.md").read_text()


def test_accountant_matches_the_sampling_that_is_run() -> None:
    """Fixed cohorts need a replace-one RDP accountant; PLD cannot account them."""
    from dpfl.accounting import FixedCohortRound, PoissonRound
    from examples.asr.federated import make_accountant

    fixed = make_accountant("rdp", sampling="fixed")
    fixed.add_rounds(FixedCohortRound(noise_multiplier=1.0, cohort_size=10, population=400))
    assert 0 < fixed.epsilon(1e-6) < float("inf")
    make_accountant("pld").add_rounds(PoissonRound(noise_multiplier=1.0, sample_rate=0.025))
    with pytest.raises(ValueError, match="replace-one"):
        make_accountant("pld", sampling="fixed")


def test_cli_rejects_fixed_sampling_with_pld_before_any_work() -> None:
    from examples.asr_librispeech import main

    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--sampling", "fixed", "--accountant", "pld"])
    assert exc.value.code == 2


def _quick_argv(cache: Path, out: Path, *extra: str) -> list[str]:
    """A --quick run pinned to 4 DP rounds and a short seed stage (presets may change)."""
    return [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--workers", "1",
            "--cache-dir", str(cache), "--output-dir", str(out), "--no-compare-clip",
            "--seed-steps", "20", "--rounds", "4", "--cohort-size", "4", "--noise-seed", "0",
            *extra]


def _kill_after_a_dp_checkpoint(argv: list[str], cwd: Path, env: dict[str, str],
                                ckpt: Path, rounds: int) -> int:
    """Run ``argv`` and SIGKILL it right after a mid-stage checkpoint of the DP stage (the
    process is stopped while the checkpoint and the journal are read, so the kill falls between
    the checkpoint of round t and the charge of round t + 1); return t."""
    from dpfl.simulation.checkpoint import load_checkpoint

    with open(cwd / "killed.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            if (ckpt / "checkpoint.pt").exists():
                os.kill(proc.pid, signal.SIGSTOP)
                state = load_checkpoint(ckpt / "checkpoint.pt")
                journal = (ckpt / "ledger.jsonl").read_bytes()
                charges = journal.count(b"\n") if journal.endswith(b"\n") else -1
                if 1 <= state["round"] < rounds and charges == state["charges"]:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return int(state["round"])
                os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    raise AssertionError(f"the DP stage wrote no checkpoint before its last round "
                         f"(exit status {proc.returncode}): a kill there re-charges the stage")


@pytest.mark.slow
def test_killed_dp_stage_resumes_charging_only_the_rounds_it_releases(
        quick_cache: Path, tmp_path: Path) -> None:
    """Issue 21.13: the DP stage checkpoints every round, so a run SIGKILLed after a checkpoint
    and resumed charges each round once: ε, the journal and (noise seeded) the scores equal an
    uninterrupted run's. Before, a stage checkpointed every min(10, T) rounds and a kill inside
    it re-ran and re-charged the whole stage (6 or 8 charges for 4 rounds)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = subprocess.run(_quick_argv(quick_cache, whole, "--unsafe-metrics"), cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LARS steps in" in proc.stdout  # timings only with --unsafe-metrics (issue 21.4)
    at = _kill_after_a_dp_checkpoint(_quick_argv(quick_cache, killed), tmp_path, env,
                                     killed / "ckpt_fl_dp", rounds=4)
    assert not (killed / "results.json").exists()
    proc = subprocess.run([*_quick_argv(quick_cache, killed), "--resume"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "seed model: reusing" in proc.stdout
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, killed))
    assert "wall_time_s" in a and all("time_s" in a[n] for n in ("fl_no_noise", "fl_dp"))
    assert "wall_time_s" not in b and not any("time_s" in b[n] for n in ("fl_no_noise", "fl_dp"))
    assert b["fl_dp"]["epsilon"] == a["fl_dp"]["epsilon"], f"killed after round {at}"
    journal = [json.loads(x) for x in (killed / "ckpt_fl_dp" / "ledger.jsonl").read_text().splitlines()]
    assert [c["round"] for c in journal] == [1, 2, 3, 4]
    for name in ("fl_no_noise", "fl_dp"):  # seeded noise: the same run, bit for bit
        assert (b[name]["wer"], b[name]["cer"]) == (a[name]["wer"], a[name]["cer"]), name
    logged = [json.loads(x) for x in (killed / "fl_dp.jsonl").read_text().splitlines()]
    assert [e["round"] for e in logged if e["event"] == "round"] == [1, 2, 3, 4]
