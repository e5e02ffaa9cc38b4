"""``run_rounds(audit=CanaryAudit(k))``: one-shot empirical privacy of a run (issue: dpfl.audit).

Canaries take part like users (clipped, noised), are charged nothing, and the estimate lands in
the result and the log beside the accountant's ε; the audit state survives a resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dpfl.accounting import RDPAccountant
from dpfl.audit import CanaryAudit
from dpfl.clip import PerLayerClip
from dpfl.optim import LAMB
from dpfl.simulation import (
    Checkpointing,
    InMemoryFederatedDataset,
    LocalTraining,
    Logging,
    PoissonSampler,
    Privacy,
    run_rounds,
)

USERS = 40


def _dataset() -> InMemoryFederatedDataset:
    gen = torch.Generator().manual_seed(0)
    return InMemoryFederatedDataset(
        {u: [(torch.randn(8, 4, generator=gen), torch.randint(2, (8,), generator=gen))]
         for u in range(USERS)}
    )


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


class _ReadLog(InMemoryFederatedDataset):
    """The dataset of :func:`_dataset` that records which users' data the run reads."""

    def __init__(self) -> None:
        super().__init__({u: _dataset().user_data(u) for u in _dataset().user_ids()})
        self.reads: list[object] = []

    def user_data(self, user_id):  # type: ignore[no-untyped-def]
        self.reads.append(user_id)
        return super().user_data(user_id)


def _run(tmp: Path, rounds: int, audit: CanaryAudit | None, *, z: float = 1.0,
         resume: bool = False, sgd: bool = False,
         dataset: InMemoryFederatedDataset | None = None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 2))  # 450 parameters
    dataset = dataset or _dataset()
    accountant = RDPAccountant()
    result = run_rounds(
        model, dataset, _loss,
        sampler=PoissonSampler(dataset.user_ids(), sample_rate=0.25, seed=1),
        server_optimizer=(torch.optim.SGD(model.parameters(), lr=1.0) if sgd
                          else LAMB(model.parameters(), lr=0.01)),
        rounds=rounds,
        local=LocalTraining(lr=0.1, steps=1),
        privacy=Privacy(PerLayerClip(0.1), noise_multiplier=z, accountant=accountant, delta=1e-5),
        seed=0,
        checkpointing=Checkpointing(tmp / "ckpt", every=2, resume=resume),
        logging=Logging(tmp / "log.jsonl", progress=False),
        audit=audit,
    )
    return result, accountant


def test_audit_estimate_is_reported_beside_the_accountant_and_charges_nothing(tmp_path: Path) -> None:
    audit = CanaryAudit(50, seed=3)
    result, accountant = _run(tmp_path, 6, audit)
    assert result.audit is not None and audit.rounds_observed == 6
    empirical = result.audit["empirical_epsilon"]
    assert 0.0 <= empirical <= result.epsilon  # the proof holds for this honest mechanism
    assert accountant.rounds == 6  # canaries are not users: no extra charge
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    logged = [e for e in events if e["event"] == "audit"]
    assert len(logged) == 1 and logged[0]["empirical_epsilon"] == empirical
    # the log line carries the proven ε beside the estimate, as the result does
    assert (logged[0]["epsilon"], logged[0]["delta"]) == (result.epsilon, result.delta)
    assert result.audit["mean_participations"] > 0  # canaries took part with the users' rate


def test_canaries_read_no_user_data_and_leave_the_cohorts_and_the_charge_alone(
    tmp_path: Path,
) -> None:
    """The same run with and without 30 canaries: the real users read (who, in which order) are
    the same, their data is unchanged, and the accountant holds the same ledger and ε: canaries
    draw from their own generator, not the users' sampler, and are not charged."""
    runs = {}
    for k in (0, 30):
        dataset = _ReadLog()
        before = {u: [t.clone() for t in dataset.user_data(u)[0]] for u in dataset.user_ids()}
        dataset.reads.clear()
        audit = CanaryAudit(k, seed=3) if k else None
        result, accountant = _run(tmp_path / str(k), 6, audit, dataset=dataset)
        runs[k] = (list(dataset.reads), accountant.ledger, result.epsilon, result.audit)
        for u, tensors in before.items():
            after = dataset.user_data(u)[0]
            assert all(torch.equal(a, b) for a, b in zip(tensors, after, strict=True))
    assert runs[30][0] == runs[0][0] and len(runs[0][0]) > 0
    assert runs[30][1] == runs[0][1] and runs[30][2] == runs[0][2]
    assert runs[0][3] is None and runs[30][3] is not None


def test_canaries_move_the_model_towards_their_directions(tmp_path: Path) -> None:
    """Without noise the inserted canaries stand out from the unseen directions (power)."""
    audit = CanaryAudit(10, seed=5)
    _run(tmp_path, 6, audit, z=0.0, sgd=True)
    cos = audit.cosines()["final"]
    canary, unseen = torch.tensor(cos["canary"]), torch.tensor(cos["unseen"])
    assert canary.mean() > unseen.mean() + 3 * unseen.std() / len(unseen) ** 0.5


def test_audit_state_survives_a_resume(tmp_path: Path) -> None:
    first = CanaryAudit(10)  # unseeded: the resumed audit adopts the checkpoint's seed
    _run(tmp_path, 4, first)
    resumed = CanaryAudit(10)
    result, _ = _run(tmp_path, 6, resumed, resume=True)
    assert result.resumed_from == 4 and resumed.rounds_observed == 6
    assert resumed.state_dict()["entropy"] == first.state_dict()["entropy"]


def test_audit_of_the_wrong_type_is_rejected_before_any_training(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="CanaryAudit"):
        _run(tmp_path, 2, audit=object())  # type: ignore[arg-type]
    assert not (tmp_path / "ckpt" / "checkpoint.pt").exists()
