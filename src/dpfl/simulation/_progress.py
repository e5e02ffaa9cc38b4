"""Reporting for the round loop: round records, run result, JSON-lines log, progress display.

[`RoundRecord`][dpfl.simulation.RoundRecord] and [`RunResult`][dpfl.simulation.RunResult] live in
the public ``dpfl.simulation.records``; ``RunLog`` writes one JSON object per line and repairs the
log when a run resumes from a checkpoint; ``Progress`` shows a tqdm bar on terminals and plain
lines elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from dpfl.simulation.records import RoundRecord, RunResult, StopReason

__all__ = [
    "UNSAFE_WARNING",
    "Progress",
    "RoundRecord",
    "RunLog",
    "RunResult",
    "StopReason",
    "evaluate",
]


#: What the log header, stderr and the docs say when ``Logging(unsafe_metrics=True)``.
UNSAFE_WARNING = (
    "unsafe_metrics=True: this log holds statistics of the raw cohort (realised and dropped user "
    "counts, fraction clipped, mean update norm, per-round timings). They are NOT covered by the "
    "differential-privacy guarantee: do not publish them."
)


def evaluate(record: RoundRecord, eval_fn: Callable[[Any], Any], model: Any) -> RoundRecord:
    """Run ``eval_fn(model)`` and return ``record`` with its metrics and ``eval`` timing added.

    Raises:
        TypeError: If ``eval_fn`` does not return a mapping of numbers.
    """
    clock = time.perf_counter()
    metrics = eval_fn(model)
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"eval_fn must return a mapping metric -> number, got {type(metrics).__name__}"
        )
    values = {str(k): float(v) for k, v in metrics.items()}
    timings = record.timings
    if timings is not None:  # unsafe metrics on: time the evaluation too
        timings = {**timings, "eval": time.perf_counter() - clock}
    return RoundRecord(**{**asdict(record), "timings": timings, "eval": values})


_QUIET_S = 30.0  # longest silence of the plain progress lines (output piped to a file or log)


class Progress:
    """Show round progress on ``stream`` (stderr by default).

    Args:
        total: Total number of rounds of the run.
        initial: Rounds already done (restored from a checkpoint).
        enabled: ``None``: a tqdm bar if tqdm is installed and ``stream`` is a terminal, else a
            plain line every ``every`` rounds; ``True``: the same choice but never silent;
            ``False``: nothing.
        every: Cadence of the plain lines, in rounds.
        stream: Where to write.
        unsafe: Show the realised cohort size and per-round times (and tqdm's rate), which are
            not covered by the DP guarantee; by default only the round and ε are shown.
    """

    def __init__(
        self,
        total: int,
        initial: int,
        *,
        enabled: bool | None,
        every: int,
        stream: TextIO | None = None,
        unsafe: bool = False,
    ) -> None:
        self._unsafe = unsafe
        self._stream = stream if stream is not None else sys.stderr
        self._total = total
        self._every = every
        self._enabled = enabled is not False
        self._bar: Any = None
        self._clock: Callable[[], float] = time.monotonic
        self._last_line = self._clock()
        if self._enabled and _isatty(self._stream):
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is optional
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(
                    total=total,
                    initial=initial,
                    unit="round",
                    file=self._stream,
                    dynamic_ncols=True,
                    # no elapsed time or rate: they recover per-round times (cohort-dependent)
                    bar_format=None if unsafe else "{l_bar}{bar}| {n_fmt}/{total_fmt}{postfix}",
                )

    def update(
        self,
        round_index: int,
        *,
        epsilon: float,
        num_users: int | None = None,
        time_s: float | None = None,
    ) -> None:
        """Report that round ``round_index`` (1-based) finished.

        ``num_users`` and ``time_s`` are shown only when the display was built ``unsafe``.
        """
        if not self._enabled:
            return
        show = self._unsafe and num_users is not None and time_s is not None
        if self._bar is not None:
            self._bar.update(1)
            extra = {"users": num_users} if show else {}
            self._bar.set_postfix(**extra, eps=f"{epsilon:.3g}", refresh=False)
        elif (
            round_index % self._every == 0
            or round_index == self._total
            or self._clock() - self._last_line >= _QUIET_S
        ):
            line = f"dpfl: round {round_index}/{self._total}  epsilon {epsilon:.4g}"
            if show:
                line += f"  users {num_users}  {time_s:.3f}s/round"
            print(line, file=self._stream, flush=True)
            self._last_line = self._clock()

    def message(self, text: str) -> None:
        """Print a one-off line (e.g. the stop reason) without breaking the bar."""
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.write(f"dpfl: {text}", file=self._stream)
        else:
            print(f"dpfl: {text}", file=self._stream, flush=True)

    def close(self) -> None:
        """Close the bar (if any)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _jsonable(obj: Any) -> Any:
    """Make ``obj`` strict JSON: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


class RunLog:
    """The JSON-lines run log: one object per line, each with ``"event"`` and ``"round"``.

    Args:
        path: The log file, or ``None`` for no log (every method is then a no-op).
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else Path(path)

    def begin(
        self, start: int, *, world_size: int, config: dict[str, Any], unsafe: bool = False
    ) -> None:
        """Open the log of a run starting after round ``start`` (0: fresh, else a resume).

        A fresh run empties the log and writes a ``start`` event with the configuration; a
        resumed run drops the events after round ``start`` (see ``truncate_after``) and writes
        a ``resume`` event. Both say whether unsafe metrics follow, with a warning if they do.
        """
        header: dict[str, Any] = {"world_size": world_size, "unsafe_metrics": unsafe}
        if unsafe:
            header["warning"] = UNSAFE_WARNING
        if start > 0:
            self.truncate_after(start)
            self.write({"event": "resume", "round": start, **header})
        else:
            self.reset()
            self.write({"event": "start", "round": 0, **header, "config": config})

    def reset(self) -> None:
        """Start an empty log (a fresh run)."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def write(self, event: dict[str, Any]) -> None:
        """Append one event as a line and flush it."""
        if self.path is None:
            return
        line = json.dumps(_jsonable(event), allow_nan=False)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def last_round(self) -> int | None:
        """The highest round with an ``"event": "round"`` line in the log (``None``: none, or no log)."""
        if self.path is None or not self.path.is_file():
            return None
        last = None
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
                if event.get("event") == "round":
                    last = max(int(event["round"]), last if last is not None else 0)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a partial last line of a killed process
        return last

    def truncate_after(self, round_index: int) -> None:
        """Keep only the events of rounds <= ``round_index`` (dropping its stale ``stop`` event).

        Used on resume from the checkpoint of round ``round_index``: events written after that
        checkpoint (and a partial last line of a killed process) are removed, atomically, so each
        round appears exactly once in the final log.
        """
        if self.path is None or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
                r = int(event["round"])
            except (ValueError, KeyError, TypeError):
                continue
            if r < round_index or (r == round_index and event.get("event") != "stop"):
                kept.append(line + "\n")
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
