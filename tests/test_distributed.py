"""Tests of multi-process runs: 2 gloo ranks on localhost against 1 process, and a dead rank."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dpfl.simulation._lock import DirectoryLock
from dpfl.simulation.distributed import DistContext, init_distributed
from tests._scripts.tiny_fl import run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "_scripts" / "tiny_fl.py"
ROUNDS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(out: Path, world: int, *extra: str) -> list[subprocess.Popen[str]]:
    """Start ``world`` ranks of the tiny training script, as torchrun would (env rendezvous)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
        }
        cmd = [sys.executable, str(SCRIPT), str(out), "--dist", *extra]
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return procs


def finish(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[int, str]]:
    """Wait for every rank (killing stragglers at the deadline); return (returncode, output)."""
    deadline = time.monotonic() + timeout
    results = []
    for p in procs:
        try:
            output, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            output, _ = p.communicate()
            output += "\n<killed by the test: did not exit in time>"
        results.append((p.returncode, output))
    return results


def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    procs = launch(out, 2, "--rounds", str(ROUNDS), "--checkpoint-every", "2", "--unsafe-metrics")
    single = run(tmp_path / "single", rounds=ROUNDS, checkpoint_every=2, unsafe_metrics=True)
    results = finish(procs, timeout=180)
    for rank, (code, output) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{output}"
    models = [torch.load(out / f"rank{r}" / "model.pt", weights_only=True) for r in range(2)]
    ledgers = [json.loads((out / f"rank{r}" / "ledger.json").read_text()) for r in range(2)]
    # Every rank holds the bitwise identical model (identical noise added after the all-reduce).
    for key in models[0]:
        assert torch.equal(models[0][key], models[1][key]), key
    # ... equal to the single-process run up to float summation order.
    for key, value in single[0].state_dict().items():
        torch.testing.assert_close(models[0][key], value, rtol=1e-5, atol=1e-6)
    assert ledgers[0] == ledgers[1] == json.loads(json.dumps(single[1].state_dict()))
    # Only rank 0 writes: each round is logged once, eval ran once per round, one checkpoint.
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["round"] for e in events if e["event"] == "round"] == list(range(1, ROUNDS + 1))
    assert events[0]["world_size"] == 2
    assert (out / "progress.txt").read_text().split() == [str(t) for t in range(1, ROUNDS + 1)]
    assert sorted(os.listdir(out / "ckpt")) == [".lock", "checkpoint.pt", "ledger.jsonl"]
    journal = (out / "ckpt" / "ledger.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in journal] == list(range(1, ROUNDS + 1))
    single_events = [
        json.loads(line) for line in (tmp_path / "single" / "log.jsonl").read_text().splitlines()
    ]
    for e, s in zip(events[1:-1], single_events[1:-1], strict=True):
        assert e["num_users"] == s["num_users"]  # the whole cohort, summed over both ranks
        assert e["mean_norm"] == pytest.approx(s["mean_norm"], rel=1e-5)


def test_a_killed_rank_makes_the_survivor_exit_with_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "dead"
    procs = launch(out, 2, "--rounds", "50", "--slow", "0.05", "--timeout", "60")
    progress = out / "progress.txt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if progress.exists() and len(progress.read_text().split()) >= 2:
            break
        time.sleep(0.02)
    assert all(p.poll() is None for p in procs), finish(procs, 1)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    (code, output), _ = finish(procs, timeout=90)
    waited = time.monotonic() - killed_at
    assert code not in (0, None), output
    assert "DistributedError" in output and "rank 0/2" in output, output
    assert "peer rank probably died" in output, output
    assert waited < 60, f"the survivor needed {waited:.0f}s to notice the dead rank"
    assert "<killed by the test" not in output


@pytest.mark.slow
def test_a_job_refused_by_the_directory_lock_ends_on_every_rank(tmp_path: Path) -> None:
    """A torchrun job into a directory another run holds: rank 0 is refused by the lock and the
    other ranks end at once with an error (no deadlock, no wait for the collective timeout)."""
    out = tmp_path / "held"
    with DirectoryLock(out / "ckpt"):  # the holder: this test process
        procs = launch(out, 2, "--rounds", "3", "--timeout", "900")
        results = finish(procs, timeout=240)
    (code0, output0), (code1, output1) = results
    assert code0 not in (0, None) and "<killed by the test" not in output0, output0
    assert "another run is writing this checkpoint directory" in output0, output0
    assert str(out / "ckpt") in output0 and f"pid {os.getpid()}" in output0, output0
    assert code1 not in (0, None) and "<killed by the test" not in output1, output1
    assert "DistributedError" in output1 and "rank 1/2" in output1, output1
    # The refused job wrote nothing: no log, no journal, no checkpoint.
    assert sorted(os.listdir(out / "ckpt")) == [".lock"] and not (out / "log.jsonl").exists()


def test_init_distributed_without_environment_names_the_variables(monkeypatch: Any) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="RANK.*WORLD_SIZE.*torchrun"):
        init_distributed(backend="gloo")
    with pytest.raises(ValueError, match="timeout_s"):
        init_distributed(timeout_s=0)


def test_shard_deals_the_cohort_round_robin() -> None:
    cohort = list("abcdefg")
    ranks = [
        DistContext(rank=r, world_size=3, device=torch.device("cpu"), timeout_s=1.0)
        for r in range(3)
    ]
    shards = [ctx.shard(cohort) for ctx in ranks]
    assert shards == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    assert sorted(sum(shards, [])) == cohort and ranks[0].is_main and not ranks[1].is_main


def test_single_rank_group_is_bitwise_the_plain_run(tmp_path: Path) -> None:
    """A world of one exercises every collective (flattened by dtype) end to end in-process."""
    import torch.distributed as tdist

    tdist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        ctx = init_distributed(timeout_s=30)
        assert (ctx.rank, ctx.world_size, ctx.device.type) == (0, 1, "cpu")
        mixed = [torch.arange(3.0), torch.ones(2, dtype=torch.float64), torch.full((2, 2), 2.0)]
        copies = [t.clone() for t in mixed]
        ctx.all_reduce_sum_(mixed)
        ctx.broadcast_(mixed)
        assert all(
            torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(mixed, copies, strict=True)
        )
        assert ctx.broadcast_int(12345) == 12345
        ctx.check_same("value", 77)
        dist_run = run(tmp_path / "dist", rounds=2, dist=ctx)
        secure = run(tmp_path / "secure", rounds=2, dist=ctx, secure_noise=True)
    finally:
        tdist.destroy_process_group()
    plain = run(tmp_path / "plain", rounds=2)
    for key, value in plain[0].state_dict().items():
        assert torch.equal(dist_run[0].state_dict()[key], value), key
        assert not torch.equal(secure[0].state_dict()[key], value), key  # fresh, unseeded noise
    assert secure[1].state_dict() == plain[1].state_dict()


def test_two_ranks_with_unseeded_noise_share_the_adaptive_bounds(tmp_path: Path) -> None:
    """Rank 0's noised count moves the bounds; the other rank receives them (broadcast), so both
    clip the next round with the same bounds and hold the same model."""
    out = tmp_path / "dist"
    procs = launch(out, 2, "--rounds", "3", "--noise", "entropy", "--adaptive")
    results = finish(procs, timeout=180)
    for rank, (code, output) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{output}"
    bounds = [json.loads((out / f"rank{r}" / "bounds.json").read_text()) for r in range(2)]
    assert bounds[0] == bounds[1] and len(bounds[0]) == 4
    models = [torch.load(out / f"rank{r}" / "model.pt", weights_only=True) for r in range(2)]
    for key in models[0]:
        assert torch.equal(models[0][key], models[1][key]), key
