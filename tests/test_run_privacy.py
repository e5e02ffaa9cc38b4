"""Privacy of the round loop across crashes and resumes (design.md §6, "every release charged").

* write-ahead accounting: whatever point a real process is killed at, the ledger after resuming
  holds at least as many rounds as noised models left the process;
* resume keeps the caller's budget and refuses a checkpoint written with other privacy settings;
* unseeded noise is not reproducible from a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from scipy import stats as sps

from dpfl.accounting import REPLACE_ONE, PLDAccountant, PrivacyBudget, RDPAccountant
from dpfl.clip import GlobalClip, PerLayerClip
from dpfl.simulation import FixedCohortSampler, PoissonSampler, SeededNoiseWarning
from dpfl.simulation.checkpoint import CheckpointError, load_checkpoint
from tests._scripts.tiny_fl import ORDERS, make_dataset, run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "_scripts" / "tiny_fl.py"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    "OMP_NUM_THREADS": "1",
}
NOISE = {
    "seeded": {"noise_seed": 4321},
    "entropy": {"noise_seed": None},
    "secure": {"secure_noise": True},
}


def releases(out: Path) -> int:
    """Noised models observed by the runs in ``out`` (one line per eval, across restarts)."""
    path = out / "progress.txt"
    return len(path.read_text().split()) if path.exists() else 0


def start(out: Path, rounds: int, noise: str, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, str(SCRIPT), str(out), "--rounds", str(rounds), "--noise", noise]
    return subprocess.Popen(
        [*cmd, "--checkpoint-every", "3", *extra],
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.parametrize("noise", ["seeded", "secure"])
def test_killed_after_a_release_then_resumed_charges_every_release(
    tmp_path: Path, noise: str
) -> None:
    """SIGKILL between a release and its checkpoint: releases never outnumber ledger rounds."""
    rounds = 8
    k = random.Random(os.getpid()).randint(1, rounds - 1)  # in the messages below
    proc = start(tmp_path, rounds, noise, "--kill-at", str(k))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, (k, output)
    assert releases(tmp_path) == k
    model, accountant, result = run(tmp_path, rounds=rounds, resume=True, **NOISE[noise])
    assert result.rounds_completed == rounds
    last_checkpoint = ((k - 1) // 3) * 3  # killed inside round k, before its checkpoint
    assert releases(tmp_path) == k + rounds - last_checkpoint, k
    assert accountant.rounds >= releases(tmp_path), (k, accountant.rounds, releases(tmp_path))
    # Rounds re-run after the checkpoint are charged again (conservative, never fewer).
    assert accountant.rounds == rounds + k - last_checkpoint, k


@pytest.mark.slow
@pytest.mark.parametrize("noise", ["seeded", "secure"])
def test_killed_at_a_random_instant_charges_every_release(tmp_path: Path, noise: str) -> None:
    """SIGKILL at a random instant (any phase), twice, then resume: ledger >= releases."""
    rounds, rng = 9, random.Random(os.getpid())
    for _attempt in range(2):
        proc = start(tmp_path, rounds, noise, "--slow", "0.15", "--resume")
        try:
            deadline = time.monotonic() + 60
            target = releases(tmp_path) + rng.randint(1, 3)
            while time.monotonic() < deadline and proc.poll() is None:
                if releases(tmp_path) >= target:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
            assert proc.stdout is not None
            proc.stdout.close()
    _model, accountant, result = run(tmp_path, rounds=rounds, resume=True, **NOISE[noise])
    assert result.rounds_completed == rounds
    assert accountant.rounds >= releases(tmp_path) >= rounds


def test_crash_after_a_release_is_charged_in_process(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, rounds=6, checkpoint_every=3, crash_at=5)
    journal = tmp_path / "ckpt" / "ledger.jsonl"
    charges = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [c["charge"] for c in charges] == [1, 2, 3, 4, 5]
    assert [c["round"] for c in charges] == [1, 2, 3, 4, 5]
    assert load_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")["charges"] == 3
    _model, accountant, result = run(tmp_path, rounds=6, checkpoint_every=3, resume=True)
    assert result.resumed_from == 3
    assert accountant.rounds == 8  # rounds 4 and 5 released twice, round 6 once
    assert [json.loads(line)["round"] for line in journal.read_text().splitlines()] == [
        1,
        2,
        3,
        4,
        5,
        4,
        5,
        6,
    ]


def test_crash_before_the_first_checkpoint_is_charged(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, rounds=4, checkpoint_every=3, crash_at=2)
    assert not (tmp_path / "ckpt" / "checkpoint.pt").exists()
    with pytest.raises(ValueError, match="resume=True"):
        run(tmp_path, rounds=4, checkpoint_every=3)  # a fresh run would drop the 2 charges
    _model, accountant, result = run(tmp_path, rounds=4, checkpoint_every=3, resume=True)
    assert result.resumed_from is None and accountant.rounds == 6


def _released(out: Path) -> list[torch.Tensor]:
    """The parameters of every release observed in ``out`` (``releases.jsonl``), in order."""
    lines = (out / "releases.jsonl").read_text().splitlines()
    return [torch.tensor(json.loads(line)["params"], dtype=torch.float64) for line in lines]


def test_a_seeded_round_released_twice_draws_fresh_noise(tmp_path: Path) -> None:
    """Seeded noise; SIGKILL after round 1 is released and before its checkpoint; the users'
    data changes; the resumed run releases round 1 again, charged again (charge 2).

    Guarantee: two releases never share noise (each release's noise is keyed on its journal
    charge, not its round), so the difference of the two releases is the users' noiseless
    difference *plus* the difference of two independent noises. Server SGD at lr 1 makes a
    release ``θ0 + (sum + noise) / S``; noiseless runs (z = 0) give the noiseless releases.
    Before the fix the residual was 0 to float rounding (both releases drew release 0's noise);
    now it has std ``√2 · z C / S`` (0.118 here), checked on its 58 coordinates (χ² bounds
    with false-alarm rate below 1e-8).
    """
    out = tmp_path / "run"
    sgd = {"optimizer_cls": torch.optim.SGD, "server_lr": 1.0}
    proc = start(out, 2, "seeded", "--kill-at", "1", "--server-sgd", "--record-releases")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, output
    run(out, rounds=1, resume=True, data_seed=1, record_releases=True, **sgd)
    first, again = _released(out)
    journal = (out / "ckpt" / "ledger.jsonl").read_text().splitlines()
    charges = [json.loads(x)["charge"] for x in journal]
    assert charges == [1, 2]  # round 1, released twice, charged twice
    noiseless = [
        run(
            tmp_path / f"z0-{d}",
            rounds=1,
            noise_multiplier=0.0,
            data_seed=d,
            record_releases=True,
            **sgd,
        )
        and _released(tmp_path / f"z0-{d}")[0]
        for d in (0, 1)
    ]
    data_difference = noiseless[1] - noiseless[0]
    assert data_difference.abs().max() > 1e-3  # the data did change between the releases
    residual = (again - first) - data_difference  # = (noise_2 - noise_1) / S
    z, bound, cohort = 1.0, 0.5, 6.0  # tiny_fl: GlobalClip(0.5), 12 users at rate 0.5
    std = math.sqrt(2.0) * z * bound / cohort
    n = residual.numel()
    chi2 = float((residual**2).sum()) / std**2
    assert sps.chi2.ppf(1e-8, n) < chi2 < sps.chi2.ppf(1 - 1e-8, n), (chi2, n)


def test_every_seeded_run_warns_that_one_seed_twice_leaks_the_difference(tmp_path: Path) -> None:
    """Two runs with one noise_seed add identical noise while the ledger charges them as
    independent: every fresh seeded run warns (SeededNoiseWarning, naming the seed; its log
    header records ``noise_seeded``); a resumed run and an unseeded one do not."""
    for name in ("a", "b"):
        with pytest.warns(
            SeededNoiseWarning,
            match=r"noise_seed=4321: seeded noise is for "
            r"simulations only.*two runs with one noise_seed.*difference",
        ):
            run(tmp_path / name, rounds=1)
    start = json.loads((tmp_path / "a" / "log.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["config"]["noise_seeded"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error", SeededNoiseWarning)
        run(tmp_path / "a", rounds=2, resume=True)
        run(tmp_path / "c", rounds=1, noise_seed=None)


def test_resume_with_a_budget_over_a_checkpoint_without_one_is_refused(tmp_path: Path) -> None:
    run(tmp_path, rounds=2)
    with pytest.raises(CheckpointError, match=r"budget: checkpoint None, this run \{'epsilon': 4"):
        run(tmp_path, rounds=4, resume=True, budget=4.0)


def test_resume_keeps_the_callers_budget(tmp_path: Path) -> None:
    run(tmp_path, rounds=2, budget=50.0)
    _model, accountant, result = run(tmp_path, rounds=3, resume=True, budget=50.0)
    assert accountant.budget == PrivacyBudget(50.0, 1e-5) and result.rounds_completed == 3
    with pytest.raises(CheckpointError, match="budget"):
        run(tmp_path, rounds=4, resume=True, budget=60.0)


@pytest.mark.parametrize(
    "changed",
    [
        PerLayerClip(0.5, normalize=True),
        PerLayerClip(0.5, allocation="uniform"),
    ],
    ids=["normalize", "allocation"],
)
def test_resume_refuses_a_changed_clipper_configuration(tmp_path: Path, changed: object) -> None:
    run(tmp_path, rounds=1, clipper=PerLayerClip(0.5))
    with pytest.raises(CheckpointError, match="clipper"):
        run(tmp_path, rounds=2, resume=True, clipper=changed)


def test_resume_refuses_a_changed_noise_mode(tmp_path: Path) -> None:
    run(tmp_path, rounds=1, noise_seed=None)
    with pytest.raises(CheckpointError, match="secure_noise"):
        run(tmp_path, rounds=2, resume=True, secure_noise=True)


def _changed_setting(name: str) -> dict[str, object]:
    """Keyword arguments of ``run`` that change one privacy-relevant setting of the tiny run."""
    users = make_dataset().user_ids()
    return {
        "noise_multiplier": {"noise_multiplier": 1.1},
        "sensitivity": {"clipper": GlobalClip(0.6)},
        "sampling_rate": {"sampler": PoissonSampler(users, 0.4, seed=11)},
        "adjacency": {
            "sampler": FixedCohortSampler(users, 6, seed=11),
            "accountant": RDPAccountant(adjacency=REPLACE_ONE, orders=ORDERS),
        },
        "accountant_kind": {"accountant": PLDAccountant()},
        "budget": {"budget": 50.0},
    }[name]


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        ("noise_multiplier", "noise_multiplier"),
        ("sensitivity", "sensitivity"),
        ("sampling_rate", "round_spec.sample_rate"),
        ("adjacency", "adjacency"),
        ("accountant_kind", "accountant"),
        ("budget", "budget"),
    ],
)
def test_resume_refuses_each_changed_privacy_setting(
    tmp_path: Path, changed: str, named: str
) -> None:
    """Every setting the guarantee depends on is part of the resume check, named in the error,
    and a refused resume changes neither the checkpoint nor the journal."""
    run(tmp_path, rounds=2)
    ckpt, journal = tmp_path / "ckpt" / "checkpoint.pt", tmp_path / "ckpt" / "ledger.jsonl"
    before = (ckpt.read_bytes(), journal.read_bytes())
    with pytest.raises(CheckpointError, match=rf"{named}: checkpoint "):
        run(tmp_path, rounds=3, resume=True, **_changed_setting(changed))
    assert (ckpt.read_bytes(), journal.read_bytes()) == before


def test_unseeded_noise_is_not_reproducible_from_a_checkpoint(tmp_path: Path) -> None:
    run(tmp_path / "a", rounds=2, noise_seed=None)
    state = load_checkpoint(tmp_path / "a" / "ckpt" / "checkpoint.pt")
    assert "mechanism" not in state["query"] and state["noise_seed"] is None
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a = run(tmp_path / "a", rounds=3, resume=True, noise_seed=None)[0].state_dict()
    b = run(tmp_path / "b", rounds=3, resume=True, noise_seed=None)[0].state_dict()
    assert all(not torch.equal(a[k], b[k]) for k in a if k.endswith("weight"))


def test_seeded_noise_is_restored_from_a_checkpoint(tmp_path: Path) -> None:
    run(tmp_path / "a", rounds=2)
    state = load_checkpoint(tmp_path / "a" / "ckpt" / "checkpoint.pt")
    assert "generator" in state["query"]["mechanism"] and state["noise_seed"] == 4321


def _layer_of(name: str) -> str:
    return name.split(".")[0]


def test_resume_compares_structured_configs_not_reprs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 23 p2: resume compares each component's versioned config(), never repr() text nor
    a digest of bytecode, so a resume under another Python minor version (other bytecode of the
    same layers= function) or a dpfl whose repr changed still works."""
    run(tmp_path, rounds=1, clipper=PerLayerClip(0.5, layers=_layer_of))
    # Another repr and another bytecode for the same function (module + qualname unchanged):
    monkeypatch.setattr(PerLayerClip, "__repr__", lambda self: f"PerLayerClip@{id(self)}")
    monkeypatch.setattr(GlobalClip, "__repr__", lambda self: f"GlobalClip@{id(self)}")

    def _layer_of_recompiled(name: str) -> str:
        head, _, _ = name.partition(".")  # same result, other code object
        return head

    _layer_of_recompiled.__qualname__ = _layer_of.__qualname__
    _layer_of_recompiled.__module__ = _layer_of.__module__
    result = run(
        tmp_path, rounds=2, resume=True, clipper=PerLayerClip(0.5, layers=_layer_of_recompiled)
    )[2]
    assert result.resumed_from == 1 and result.rounds_completed == 2


def test_resume_names_the_changed_clipper_setting(tmp_path: Path) -> None:
    """A changed setting inside a component's config is named by its path and both values."""
    run(tmp_path, rounds=1, clipper=PerLayerClip(0.5, layers=_layer_of))
    with pytest.raises(
        CheckpointError, match=r"clipper_config\.normalize: checkpoint False, this run True"
    ):
        run(
            tmp_path,
            rounds=2,
            resume=True,
            clipper=PerLayerClip(0.5, layers=_layer_of, normalize=True),
        )
    with pytest.raises(
        CheckpointError, match=r"clipper_config\.layers: checkpoint '[\w.]*_layer_of'"
    ):
        run(tmp_path, rounds=2, resume=True, clipper=PerLayerClip(0.5, layers=str.lower))
