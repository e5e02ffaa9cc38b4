"""Write-ahead privacy journal: every round is charged durably *before* its noised result exists.

A checkpoint is written every few rounds, but a noised model leaves the process every round
(through the model, a callback, the log). If the process dies after releasing round t and
before the checkpoint of round t, the checkpoint's ledger lacks round t, and the resumed run
releases round t again. The journal closes that gap: [`run_rounds`][dpfl.simulation.run_rounds]
appends one line per charge to ``ledger.jsonl`` in the checkpoint directory and ``fsync``-s it
immediately before it adds the noise::

    {"charge": 7, "round": 7, "spec": {"kind": "poisson", ...}}

Each checkpoint records how many charges its ledger holds (``"charges"``); on resume the journal's
charges beyond that number are added to the restored accountant. A round re-run after a crash is
therefore charged again, and its noise is keyed on its charge index (``charge - 1`` is the
release index of the noise generator), so it draws fresh noise also when the noise is seeded:
two releases with independent noise, two charges. (Identical noise twice would leak the
difference of the two releases with no noise at all, which charging twice does not cover.) A
charge is never withdrawn, not even when its round fails afterwards.

A line torn by a crash during its own write is ignored: the process died before the release it
announces. Any other damage (a malformed line in the middle, a gap in the charge numbers, fewer
charges than the checkpoint records) raises [`CheckpointError`][dpfl.simulation.CheckpointError].

References:
    design.md §6 ("every release charged"); Pelikan et al., arXiv 2310.00098 (user-level DP over
    a sequence of rounds).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpfl.simulation.checkpoint import CheckpointError

__all__ = [
    "JOURNAL_FILE",
    "Charge",
    "LedgerJournal",
    "charge_journal",
    "check_charges",
    "sweep_temporaries",
    "verify_ledger",
]

#: Name of the journal file inside ``Checkpointing.dir``.
JOURNAL_FILE = "ledger.jsonl"


@dataclass(frozen=True)
class Charge:
    """One journal line: the ``charge``-th charge (1-based), made for round ``round``."""

    charge: int
    round: int
    spec: dict[str, Any]


class LedgerJournal:
    """The append-only, fsync-ed journal of charges in a checkpoint directory.

    Args:
        path: The journal file (``ledger.jsonl``).
        writable: Whether this process appends to it (rank 0); other ranks only read.
    """

    def __init__(self, path: str | os.PathLike[str], *, writable: bool) -> None:
        self.path = Path(path)
        self.writable = writable
        self.charges: list[Charge] = []

    @property
    def count(self) -> int:
        """Number of charges recorded (the index of the last one)."""
        return len(self.charges)

    def load(self) -> list[Charge]:
        """Read and check the journal (empty when the file does not exist); return its charges.

        Raises:
            CheckpointError: A malformed line other than a torn last line, or charge numbers that
                do not run 1, 2, 3, ...
        """
        self.charges = []
        if not self.path.exists():
            return []
        lines = self.path.read_bytes().split(b"\n")
        torn_tail = lines[-1] != b""  # a complete journal ends with a newline
        for number, raw in enumerate(lines[:-1] if not torn_tail else lines, start=1):
            last = number == len(lines) and torn_tail
            try:
                entry = json.loads(raw)
                charge = Charge(int(entry["charge"]), int(entry["round"]), dict(entry["spec"]))
            except (ValueError, KeyError, TypeError) as exc:
                if last:
                    break  # torn by a crash during its own write: its release never happened
                raise CheckpointError(
                    f"{self.path}: line {number} is not a journal entry ({exc}); the privacy "
                    "journal is damaged, so the ledger cannot be reconstructed"
                ) from exc
            if charge.charge != len(self.charges) + 1:
                raise CheckpointError(
                    f"{self.path}: line {number} holds charge {charge.charge}, expected "
                    f"{len(self.charges) + 1}; the privacy journal was edited or mixed"
                )
            self.charges.append(charge)
        if torn_tail and self.writable:
            self._rewrite()  # drop the torn line so the next append starts on a fresh line
        return list(self.charges)

    def append(self, round_index: int, spec: Mapping[str, Any]) -> None:
        """Record one charge durably (write, flush, fsync) before its release."""
        charge = Charge(self.count + 1, round_index, dict(spec))
        if self.writable:
            line = json.dumps({"charge": charge.charge, "round": round_index, "spec": charge.spec})
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.charges.append(charge)

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for c in self.charges:
                f.write(json.dumps({"charge": c.charge, "round": c.round, "spec": c.spec}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def verify_ledger(path: Path, state: Mapping[str, Any], journal_count: int) -> int:
    """Check a checkpoint's ledger against its round index and the journal; return its charges.

    Raises:
        CheckpointError: A ledger with fewer rounds than the round index, or a journal with fewer
            charges than the checkpoint records (shrunk, replaced or from another run).
    """
    charges = state.get("charges")
    if not isinstance(charges, int) or isinstance(charges, bool) or charges < 0:
        raise CheckpointError(f"{path}: invalid or missing journal charge count {charges!r}")
    if journal_count < charges:
        raise CheckpointError(
            f"{path}: the checkpoint's ledger holds {charges} journal charges but "
            f"{JOURNAL_FILE} beside it holds {journal_count}; the privacy journal was shrunk, "
            "deleted or replaced, so the releases since the checkpoint cannot be accounted"
        )
    round_index = state.get("round")
    try:
        ledger = state["accountant"]["ledger"]
        rounds = sum(int(entry["count"]) for entry in ledger)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed accountant state ({exc})") from exc
    if isinstance(round_index, int) and rounds < round_index:
        raise CheckpointError(
            f"{path}: the stored ledger holds {rounds} rounds but the checkpoint is at round "
            f"{round_index}; the ledger was shrunk or the round index moved"
        )
    if isinstance(round_index, int) and charges < round_index:
        raise CheckpointError(
            f"{path}: the checkpoint is at round {round_index} but records only {charges} "
            "journal charges; every round is charged at least once"
        )
    return charges


def check_charges(path: Path, charges: list[Charge], spec: Mapping[str, Any]) -> None:
    """Raise unless every charge in ``charges`` is of the run's round ``spec``.

    The journal's charges beyond a checkpoint are added to the ledger as recorded; one whose spec
    differs from the run's (e.g. noise multiplier 50 in a run at 1) would be charged as something
    the run never released, so it is refused, naming the charge and the fields that differ.

    Raises:
        CheckpointError: Naming the first differing charge, its round and every differing field.
    """
    for charge in charges:
        if charge.spec != dict(spec):
            keys = list(spec) + [k for k in charge.spec if k not in spec]
            diffs = [
                f"{k}: journal {charge.spec.get(k, '<absent>')!r}, this run "
                f"{spec.get(k, '<absent>')!r}"
                for k in keys
                if charge.spec.get(k, "<absent>") != spec.get(k, "<absent>")
            ]
            raise CheckpointError(
                f"{path}: charge {charge.charge} (round {charge.round}) is not of this run's round "
                f"spec ({'; '.join(diffs)}); the journal was edited or belongs to another run, "
                "so the releases since the checkpoint cannot be accounted; resume with the run's "
                "own journal and settings"
            )


def charge_journal(accountant: Any, charges: list[Charge]) -> None:
    """Add the journal's ``charges`` to ``accountant`` (no budget check: they were released)."""
    state = accountant.state_dict()
    extra = [{"round": c.spec, "count": 1} for c in charges]
    try:
        accountant.load_state_dict({**state, "ledger": [*state["ledger"], *extra]})
    except ValueError as exc:
        raise CheckpointError(
            f"the privacy journal holds charges this accountant cannot take: {exc}"
        ) from exc


def sweep_temporaries(checkpoint: Path) -> None:
    """Remove the temporary files that a crash during an atomic write of ``checkpoint`` (see
    [`save_checkpoint`][dpfl.simulation.save_checkpoint]) or of the journal beside it left behind.
    Call it under the directory's lock."""
    for pattern in (f".{checkpoint.name}.*.tmp", f".{JOURNAL_FILE}.tmp"):
        for leftover in checkpoint.parent.glob(pattern):
            leftover.unlink(missing_ok=True)
