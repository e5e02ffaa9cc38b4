"""Tests of checkpoints: atomic verified files, clear errors, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfl.simulation.checkpoint import (
    CheckpointError,
    check_config,
    load_checkpoint,
    save_checkpoint,
    state_digest,
)
from tests._scripts.tiny_fl import run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "_scripts" / "tiny_fl.py"


def events(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def assert_same_run(
    a: tuple[Any, Any, Any], b: tuple[Any, Any, Any], *, replayed: int | None = 0
) -> None:
    """b's ledger is a's plus ``replayed`` rounds charged twice; b's model is bitwise a's when
    no round was released twice, and differs when one was.

    Write-ahead accounting charges a round before its release, so rounds released after the last
    checkpoint of a crashed process and re-run after resuming are in the ledger twice
    (``replayed=None``: at least a's rounds, number unknown). A re-run round draws fresh noise
    (keyed on its journal charge, never on its round: two releases never share noise), so its
    seeded run no longer equals the uninterrupted one.
    """
    if replayed is None:
        assert b[1].rounds >= a[1].rounds
        replayed = b[1].rounds - a[1].rounds
    assert b[1].rounds == a[1].rounds + replayed
    sa, sb = a[0].state_dict(), b[0].state_dict()
    assert list(sa) == list(sb)
    if replayed == 0:
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
        assert a[1].state_dict() == b[1].state_dict()
    else:  # the re-run rounds' noise is fresh
        assert not all(torch.equal(sa[k], sb[k]) for k in sa if k.endswith("weight"))


# ----------------------------------------------------------------------------- file format
def sample_state() -> dict[str, Any]:
    return {
        "round": 3,
        "model": {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.zeros(0)},
        "meta": {"name": "x", "values": [1, 2.5, None, True], "pair": (1, "a")},
        "gen": torch.Generator().manual_seed(1).get_state(),
    }


def test_roundtrip_is_weights_only_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "d" / "c.pt"
    state = sample_state()
    save_checkpoint(path, state)
    assert os.listdir(path.parent) == ["c.pt"]
    raw = torch.load(path, weights_only=True)  # a plain torch file, safe to load
    assert raw["format"] == "dpfl.checkpoint" and raw["digest"] == state_digest(state)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["meta"] == state["meta"] and loaded["round"] == 3


@settings(max_examples=25)
@given(st.data())
def test_property_any_single_byte_change_is_detected(tmp_path_factory: Any, data: Any) -> None:
    path = tmp_path_factory.mktemp("flip") / "c.pt"
    save_checkpoint(path, sample_state())
    raw = bytearray(path.read_bytes())
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    path.write_bytes(bytes(raw))
    try:
        loaded = load_checkpoint(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
    else:  # a change in unused zip bytes (padding, comments) is harmless: content is intact
        assert state_digest(loaded) == state_digest(sample_state())


def test_truncated_checkpoint_names_file(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, sample_state())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"c\.pt.*corrupt or truncated"):
        load_checkpoint(path)


def test_flipped_tensor_bytes_are_detected_by_the_digest(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, sample_state())
    raw = bytearray(path.read_bytes())
    needle = torch.tensor([7.0]).numpy().tobytes()  # element 7 of model["w"]
    raw[raw.index(needle)] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match its SHA-256 digest"):
        load_checkpoint(path)


def test_foreign_and_garbage_files(tmp_path: Path) -> None:
    garbage, foreign, missing = tmp_path / "g.pt", tmp_path / "f.pt", tmp_path / "m.pt"
    garbage.write_bytes(b"not a checkpoint")
    torch.save({"model": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match=r"g\.pt"):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match=r"f\.pt: not a dpfl checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(missing)


def test_unsupported_content_is_rejected_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, sample_state())
    before = path.read_bytes()
    with pytest.raises(TypeError, match="cannot checkpoint a object"):
        save_checkpoint(path, {"bad": object()})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(path, {"digest": "x"})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["c.pt"]


def test_check_config_lists_every_difference(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="noise_multiplier: checkpoint 1.0, this run 2.0"):
        check_config(
            tmp_path / "c.pt", {"noise_multiplier": 1.0, "a": 1}, {"noise_multiplier": 2.0, "a": 1}
        )
    check_config(tmp_path / "c.pt", {"x": float("nan")}, {"x": float("nan")})


# ----------------------------------------------------------------------------- run-level
def test_resume_in_process_equals_uninterrupted(tmp_path: Path) -> None:
    full = run(tmp_path / "full", rounds=5, checkpoint_every=2, scheduler=True)
    run(tmp_path / "part", rounds=3, checkpoint_every=2, scheduler=True)
    resumed = run(tmp_path / "part", rounds=5, checkpoint_every=2, resume=True, scheduler=True)
    assert resumed[2].resumed_from == 3 and resumed[2].rounds_completed == 5
    assert [r.round for r in resumed[2].records] == [4, 5]
    assert_same_run(full, resumed)
    rounds = [e["round"] for e in events(tmp_path / "part") if e["event"] == "round"]
    assert rounds == [1, 2, 3, 4, 5]


_FULL: dict[int, Any] = {}


@settings(max_examples=10)
@given(rounds=st.integers(2, 5), crash=st.integers(1, 5), every=st.integers(1, 3))
def test_property_crash_after_any_round_then_resume_charges_and_renoises_the_replay(
    tmp_path_factory: Any, rounds: int, crash: int, every: int
) -> None:
    crash = min(crash, rounds)
    if rounds not in _FULL:
        _FULL[rounds] = run(tmp_path_factory.mktemp("full"), rounds=rounds)
    out = tmp_path_factory.mktemp("crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(out, rounds=rounds, checkpoint_every=every, crash_at=crash)
    resumed = run(out, rounds=rounds, checkpoint_every=every, resume=True)
    last_checkpoint = ((crash - 1) // every) * every  # the crash hit round `crash` before its own
    assert_same_run(_FULL[rounds], resumed, replayed=crash - last_checkpoint)
    assert resumed[2].rounds_completed == rounds
    assert [e["round"] for e in events(out) if e["event"] == "round"] == list(range(1, rounds + 1))


def test_existing_checkpoint_without_resume_is_an_error(tmp_path: Path) -> None:
    run(tmp_path, rounds=1)
    with pytest.raises(ValueError, match=r"resume=True"):
        run(tmp_path, rounds=2)


def test_resume_rejects_mismatched_config_and_changes_nothing(tmp_path: Path) -> None:
    run(tmp_path, rounds=1)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt.*noise_multiplier: checkpoint 1\.0"):
        run(tmp_path, rounds=2, resume=True, noise_multiplier=2.0)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt.*vectorized"):
        run(tmp_path, rounds=2, resume=True, vectorized=True)


def test_resume_rejects_a_different_model(tmp_path: Path, monkeypatch: Any) -> None:
    from torch import nn

    import tests._scripts.tiny_fl as tiny

    run(tmp_path, rounds=1)

    def wider(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(tiny.IN, 9), nn.Tanh(), nn.Linear(9, tiny.OUT))

    monkeypatch.setattr(tiny, "make_model", wider)  # the same script with a wider hidden layer
    with pytest.raises(CheckpointError, match=r"different model.*0\.weight: stored \(8, 4\)"):
        run(tmp_path, rounds=2, resume=True)


def test_resume_from_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    run(tmp_path, rounds=1)
    ckpt = tmp_path / "ckpt" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: cannot read"):
        run(tmp_path, rounds=2, resume=True)


def test_resume_after_sigkill_at_a_random_round(tmp_path: Path) -> None:
    """Kill a real training process with SIGKILL after round k, resume: the same model and
    ledger, unless the kill fell between a release and its checkpoint: then the re-run round is
    charged again and drew fresh noise."""
    rounds = 7
    rng = random.Random(os.getpid())
    k = rng.randint(1, rounds - 2)  # reported by the assertion messages below
    out = tmp_path / "killed"
    out.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), "--rounds", str(rounds), "--slow", "0.3"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        progress = out / "progress.txt"
        while time.monotonic() < deadline and proc.poll() is None:
            if progress.exists() and len(progress.read_text().split()) >= k:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))  # land anywhere: eval, log, checkpoint, next round
        assert proc.poll() is None, f"training ended before round {k}: {proc.stdout.read()!r}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    done = len(progress.read_text().split())
    assert k <= done < rounds, (k, done)
    resumed = run(out, rounds=rounds, resume=True)
    full = run(tmp_path / "full", rounds=rounds)
    assert_same_run(full, resumed, replayed=None)
    releases = len(progress.read_text().split())  # noised models observed, both processes
    assert resumed[1].rounds >= releases, (k, resumed[1].rounds, releases)
    journal = (out / "ckpt" / "ledger.jsonl").read_text().splitlines()
    assert len(journal) == resumed[1].rounds
    # Killed inside round k (after its eval) or later: the last checkpoint is k - 1 or newer
    # (none at all when k = 1 died before its first checkpoint: then the run starts over).
    assert (resumed[2].resumed_from or 0) >= k - 1, k
    logged = [e["round"] for e in events(out) if e["event"] == "round"]
    assert logged == list(range(1, rounds + 1)), (k, logged)
