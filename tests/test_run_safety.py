"""Run safety of the round loop (issue 11): one writer per directory, verified resume, sweeping
of crash leftovers, and arguments checked before any training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from dpfl.simulation import PoissonSampler, SeededNoiseWarning
from dpfl.simulation.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tests._scripts.tiny_fl import make_dataset, run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "_scripts" / "tiny_fl.py"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    "OMP_NUM_THREADS": "1",
}


def wait_for(predicate, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.005)
    assert proc.poll() is None, proc.communicate()[0]


def test_a_second_writer_is_refused_naming_the_directory_and_holder(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), str(tmp_path), "--rounds", "40", "--slow", "0.2"]
    proc = subprocess.Popen(
        cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_for(lambda: (tmp_path / "progress.txt").exists(), proc)
        with pytest.raises(CheckpointError, match=rf"{tmp_path / 'ckpt'}.*pid {proc.pid}"):
            run(tmp_path, rounds=40, resume=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
    # The OS dropped the dead holder's lock: the run resumes and finishes.
    result = run(tmp_path, rounds=_last_round(tmp_path) + 1, resume=True)[2]
    assert result.rounds_completed == _last_round(tmp_path)


def _last_round(out: Path) -> int:
    ckpt = out / "ckpt" / "checkpoint.pt"
    return int(load_checkpoint(ckpt)["round"]) if ckpt.exists() else 0


def test_temporaries_of_a_write_killed_midway_are_swept(tmp_path: Path) -> None:
    """SIGKILL a process inside save_checkpoint; the next run removes its temporary file."""
    ckpt = tmp_path / "ckpt"
    code = (
        "import sys, torch\n"
        "from dpfl.simulation.checkpoint import save_checkpoint\n"
        "state = {'model': {'w': torch.zeros(2**25)}}\n"
        "while True:\n"
        f"    save_checkpoint({str(ckpt / 'other.pt')!r}, state)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, cwd=ROOT)
    try:
        wait_for(lambda: any(ckpt.glob(".other.pt.*.tmp")), proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    leftovers = list(ckpt.glob(".other.pt.*.tmp"))
    assert leftovers  # what the crash left behind, renamed as a checkpoint temporary
    for i, leftover in enumerate(leftovers):
        leftover.rename(ckpt / f".checkpoint.pt.crash{i}.tmp")
    run(tmp_path, rounds=1)
    assert not list(ckpt.glob(".checkpoint.pt.*.tmp"))
    assert (ckpt / "checkpoint.pt").exists()


def test_resume_with_fewer_rounds_than_the_checkpoint_is_refused(tmp_path: Path) -> None:
    run(tmp_path, rounds=3)
    with pytest.raises(ValueError, match=r"rounds=2 is below the round .* \(3\)"):
        run(tmp_path, rounds=2, resume=True)


def test_resume_reports_a_changed_server_learning_rate(tmp_path: Path) -> None:
    import json

    run(tmp_path, rounds=1)
    with pytest.warns(RuntimeWarning, match="learning rate"):
        run(tmp_path, rounds=2, resume=True, server_lr=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a scheduler's decayed rate is not a change
        warnings.simplefilter("ignore", SeededNoiseWarning)  # tiny_fl seeds its noise
        run(tmp_path / "s", rounds=2, scheduler=True)
        run(tmp_path / "s", rounds=3, resume=True, scheduler=True)
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "warning" and "learning rate" in e["message"] for e in events)


def test_a_shrunk_ledger_with_a_recomputed_digest_is_refused(tmp_path: Path) -> None:
    run(tmp_path, rounds=3)
    path = tmp_path / "ckpt" / "checkpoint.pt"
    state = load_checkpoint(path)
    state["accountant"]["ledger"][0]["count"] = 1  # ε under-reported by a deliberate edit
    save_checkpoint(path, state)  # ... with a valid digest
    with pytest.raises(CheckpointError, match="ledger holds 1 rounds .* round 3"):
        run(tmp_path, rounds=4, resume=True)


def test_a_deleted_journal_is_refused(tmp_path: Path) -> None:
    run(tmp_path, rounds=2)
    (tmp_path / "ckpt" / "ledger.jsonl").unlink()
    with pytest.raises(CheckpointError, match="journal"):
        run(tmp_path, rounds=3, resume=True)


def test_bad_paths_and_foreign_users_fail_before_training(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="Checkpointing.dir .* not a directory"):
        run(tmp_path, rounds=1, checkpoint_dir=tmp_path / "file")
    (tmp_path / "logdir").mkdir()
    with pytest.raises(ValueError, match="Logging.path .* is a directory"):
        run(tmp_path, rounds=1, log_path=tmp_path / "logdir")
    foreign = PoissonSampler([*make_dataset().user_ids(), "stranger"], 0.5, seed=0)
    with pytest.raises(ValueError, match="'stranger'"):
        run(tmp_path, rounds=1, sampler=foreign)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "log.jsonl").exists()


class _FailingSGD(torch.optim.SGD):
    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        raise RuntimeError("optimizer exploded")


def test_a_failed_server_step_restores_the_sampler_and_keeps_the_charge(tmp_path: Path) -> None:
    from tests._scripts.tiny_fl import make_model

    dataset = make_dataset()
    sampler = PoissonSampler(dataset.user_ids(), 0.5, seed=11)
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="optimizer exploded"):
        run(tmp_path, rounds=2, sampler=sampler, model=model, optimizer_cls=_FailingSGD)
    assert sampler.rounds_sampled == 0  # the next attempt draws the same cohort
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    journal = (tmp_path / "ckpt" / "ledger.jsonl").read_text().splitlines()
    assert len(journal) == 1  # charged before its noise existed: the charge stays


def test_a_log_that_stops_before_the_checkpoint_round_is_refused(tmp_path: Path) -> None:
    import json

    run(tmp_path, rounds=3)
    log = tmp_path / "log.jsonl"
    kept = [line for line in log.read_text().splitlines()
            if json.loads(line).get("round", 0) <= 1]  # the log of rounds 2-3 is gone
    log.write_text("\n".join(kept) + "\n")
    with pytest.raises(CheckpointError, match="round 3 but the log .* up to 1"):
        run(tmp_path, rounds=4, resume=True)


def test_a_checkpoint_path_that_is_a_directory_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


def _journal_lines(out: Path) -> int:
    journal = out / "ckpt" / "ledger.jsonl"
    return len(journal.read_text().splitlines()) if journal.exists() else 0


def test_an_optimizer_over_another_models_parameters_fails_before_any_charge(
    tmp_path: Path,
) -> None:
    """Issue 21 p16: the mismatch is found before training, so no round is charged for it."""
    from dpfl.optim import LAMB
    from tests._scripts.tiny_fl import make_model

    other = make_model(seed=1)

    class ForeignLAMB(LAMB):
        def __init__(self, params, lr):  # type: ignore[no-untyped-def]
            super().__init__(other.parameters(), lr=lr)  # the wrong model's parameters

    with pytest.raises(ValueError, match=r"server_optimizer does not manage .*'0\.weight'"):
        run(tmp_path, rounds=2, optimizer_cls=ForeignLAMB)
    assert _journal_lines(tmp_path) == 0 and not (tmp_path / "log.jsonl").exists()


def test_noise_beyond_float32s_range_fails_before_any_charge(tmp_path: Path) -> None:
    """Issue 21 p16: std 5e37 × the largest draw overflows the float32 sums: refused up front."""
    with pytest.raises(ValueError, match=r"noise std 5e\+37 .* float32"):
        run(tmp_path, rounds=2, noise_multiplier=1e38)
    assert _journal_lines(tmp_path) == 0 and not (tmp_path / "log.jsonl").exists()


def test_an_adaptive_bound_grown_beyond_float32_is_refused_before_its_round_is_charged(
    tmp_path: Path,
) -> None:
    """With a huge count noise a round soon moves the bound to its cap (1e150); the next round's
    noise cannot be represented, and is refused before it is charged (which round first hits the
    cap depends on the seeded noise draws)."""
    from dpfl.adaptive_clip import AdaptiveClip
    from dpfl.clip import GlobalClip

    clipper = AdaptiveClip(GlobalClip(0.5), count_noise_multiplier=1e6)
    with pytest.raises(ValueError, match=r"noise std 1e\+150 .* float32"):
        run(tmp_path, rounds=3, clipper=clipper, noise_seed=3)
    assert clipper.bound == 1e150
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    released = sum(r.get("event") == "round" for r in log)
    assert 1 <= released < 3
    assert _journal_lines(tmp_path) == released  # the refused round was never charged


def test_a_log_without_any_round_line_is_refused_on_resume(tmp_path: Path) -> None:
    """Issue 21 p17a: a log emptied of its round lines (checkpoint at round 3) is refused like a
    truncated one; a log that does not exist yet (another Logging.path) is still accepted."""
    import json

    run(tmp_path, rounds=3)
    log = tmp_path / "log.jsonl"
    kept = [line for line in log.read_text().splitlines() if json.loads(line)["event"] != "round"]
    log.write_text("\n".join(kept) + "\n")
    with pytest.raises(CheckpointError, match="round 3 but the log .* records no round"):
        run(tmp_path, rounds=4, resume=True)
    log.write_text("")
    with pytest.raises(CheckpointError, match="records no round"):
        run(tmp_path, rounds=4, resume=True)
    result = run(tmp_path, rounds=4, resume=True, log_path=tmp_path / "new-log.jsonl")[2]
    assert result.resumed_from == 3


def test_a_journal_charge_of_another_spec_is_refused_naming_the_difference(
    tmp_path: Path,
) -> None:
    """Issue 21 p17b: a charge beyond the checkpoint at z = 50 in a z = 1 run would be charged
    as z = 50 (far less than a z = 1 release costs); it is refused, naming the field."""
    import json

    run(tmp_path, rounds=2)
    journal = tmp_path / "ckpt" / "ledger.jsonl"
    lines = journal.read_text().splitlines()
    last = json.loads(lines[-1])
    forged = {"charge": last["charge"] + 1, "round": 3,
              "spec": {**last["spec"], "noise_multiplier": 50.0}}  # fmt: skip
    journal.write_text("\n".join([*lines, json.dumps(forged)]) + "\n")
    with pytest.raises(
        CheckpointError, match=r"charge 3 \(round 3\).*noise_multiplier: journal 50\.0, this run 1\.0"
    ):
        run(tmp_path, rounds=4, resume=True)
    forged["spec"]["noise_multiplier"] = 1.0  # the run's own spec: charged, and the run goes on
    journal.write_text("\n".join([*lines, json.dumps(forged)]) + "\n")
    _, accountant, result = run(tmp_path, rounds=4, resume=True)
    assert result.rounds_completed == 4 and accountant.rounds == 5  # 4 rounds + the extra charge


def test_resuming_an_audited_run_without_its_audit_is_refused(tmp_path: Path) -> None:
    """Issue 21 p17c: the checkpoint holds a canary audit; resuming without audit= would drop it
    silently, so it is refused, naming the audit."""
    from dpfl.audit import CanaryAudit

    run(tmp_path, rounds=2, audit=CanaryAudit(5, seed=1))
    with pytest.raises(CheckpointError, match=r"audited run .*audit="):
        run(tmp_path, rounds=3, resume=True)
    result = run(tmp_path, rounds=3, resume=True, audit=CanaryAudit(5, seed=1))[2]
    assert result.rounds_completed == 3 and result.audit is not None
