"""The knobs of [`run_rounds`][dpfl.simulation.run_rounds], grouped by concern into frozen
dataclasses.

* [`LocalTraining`][dpfl.simulation.LocalTraining]: what each sampled user does (local SGD learning
  rate, steps or epochs, per-step gradient clip, vectorized cohorts).
* [`Privacy`][dpfl.simulation.Privacy]: the DP mechanism and its ledger (clipper, noise multiplier,
  accountant, δ, noise seed and mode, what to do with non-finite updates).
* [`Checkpointing`][dpfl.simulation.Checkpointing]: where and how often the run state is saved, and
  whether to resume.
* [`Logging`][dpfl.simulation.Logging]: the JSON-lines log, the progress display, and the opt-in for
  statistics that are not covered by the DP guarantee.
* [`Evaluation`][dpfl.simulation.Evaluation]: a model-evaluation hook and its cadence.

Each class validates its own fields when it is built (``ValueError``/``TypeError`` naming the
field), so a bad setting fails before any training starts.

Examples:
    The paper's recipe (arXiv 2310.00098, section 5) in a few lines::

        result = run_rounds(
            model, dataset, loss_fn,
            sampler=PoissonSampler(dataset.user_ids(), sample_rate=1024 / 34753),
            server_optimizer=LAMB(model.parameters(), lr=0.002), rounds=2000,
            local=LocalTraining(lr=0.2, steps=10),
            privacy=Privacy(PerLayerClip(0.01, allocation="dim"), noise_multiplier=0.6144,
                            accountant=RDPAccountant(), delta=1e-9),
            checkpointing=Checkpointing("ckpt", resume=True),
            logging=Logging("rounds.jsonl"),
        )

References:
    Pelikan et al., *Enabling Differentially Private Federated Learning for Speech Recognition*,
    arXiv 2310.00098.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from os import PathLike
from typing import Any

from torch import nn

from dpfl._checks import require_int, require_non_negative, require_positive, require_probability

__all__ = [
    "Checkpointing",
    "Evaluation",
    "LocalTraining",
    "Logging",
    "Privacy",
    "SeededNoiseWarning",
]


def _set(obj: object, name: str, value: object) -> None:
    """Store a normalised field value on a frozen dataclass (e.g. ``2.0`` steps -> ``2``)."""
    object.__setattr__(obj, name, value)


def _require_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _require_path(name: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, (str, PathLike)) or (isinstance(value, str) and not value):
        what = "a path (str or os.PathLike)" + (" or None" if optional else "")
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")


def _require_methods(name: str, obj: object, methods: tuple[str, ...], what: str) -> None:
    missing = [m for m in methods if not callable(getattr(obj, m, None))]
    if missing:
        raise TypeError(f"{name} must be {what}; {type(obj).__name__} lacks {missing}")


@dataclass(frozen=True)
class LocalTraining:
    """Local training of each sampled user ([`train_local`][dpfl.simulation.train_local]).

    Attributes:
        lr: Local SGD learning rate (> 0).
        steps: Local steps per user; give exactly one of ``steps`` and ``epochs``.
        epochs: Local epochs per user (not with ``vectorized``).
        max_grad_norm: Per-step gradient-norm clip (``None``: off). This bounds the optimisation,
            not the privacy: the user-level bound is the clipper's.
        vectorized: Train each cohort with
            [`train_cohort_vectorized`][dpfl.simulation.train_cohort_vectorized].
        align: With ``vectorized``: ``align(batches) -> batches``, given the users' batches of
            one local step (one per user, cohort order), returns them with equal structures,
            shapes and dtypes so that they stack (e.g. sequences padded to a common length). It
            must not change any user's loss; see ``train_cohort_vectorized``.

    Raises:
        ValueError: If ``lr`` is not > 0, both or neither of ``steps``/``epochs`` is given,
            ``vectorized`` is combined with ``epochs``, ``align`` is given without
            ``vectorized``, or a count or norm is out of range.
        TypeError: If ``align`` is neither callable nor ``None``.
    """

    lr: float
    steps: int | None = None
    epochs: int | None = None
    max_grad_norm: float | None = 1.0
    vectorized: bool = False
    align: Callable[[list[Any]], list[Any]] | None = None

    def __post_init__(self) -> None:
        _set(self, "lr", require_positive("LocalTraining.lr", self.lr))
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("LocalTraining: give exactly one of steps and epochs")
        if self.steps is not None:
            _set(self, "steps", require_int("LocalTraining.steps", self.steps, minimum=1))
        if self.epochs is not None:
            _set(self, "epochs", require_int("LocalTraining.epochs", self.epochs, minimum=1))
        if self.max_grad_norm is not None:
            mgn = require_positive("LocalTraining.max_grad_norm", self.max_grad_norm)
            _set(self, "max_grad_norm", mgn)
        _require_bool("LocalTraining.vectorized", self.vectorized)
        if self.vectorized and self.steps is None:
            raise ValueError(
                "LocalTraining: vectorized=True needs steps (train_cohort_vectorized has no epochs)"
            )
        if self.align is not None:
            if not callable(self.align):
                raise TypeError(
                    f"LocalTraining.align must be callable or None, got {type(self.align).__name__}"
                )
            if not self.vectorized:
                raise ValueError(
                    "LocalTraining: align only applies to vectorized=True (the sequential loop "
                    "trains each user on its own batches)"
                )


class SeededNoiseWarning(UserWarning):
    """A run draws its noise from a seed (``Privacy(noise_seed=...)``): a simulation.

    Anyone who knows the seed (or holds a checkpoint) can reproduce and subtract the noise, and
    two runs with one seed add identical noise, so the difference of their releases has no noise
    at all, although the ledger charges them as independent runs. ``run_rounds`` warns at the
    start of every seeded run (not on resume); silence it in simulations with
    ``warnings.simplefilter("ignore", SeededNoiseWarning)``.
    """


@dataclass(frozen=True)
class Privacy:
    """The DP mechanism of each round and the ledger it is charged to.

    Attributes:
        clipper: [`GlobalClip`][dpfl.clip.GlobalClip], [`PerLayerClip`][dpfl.clip.PerLayerClip] or
            [`AdaptiveClip`][dpfl.adaptive_clip.AdaptiveClip]; its ``sensitivity`` C bounds one
            user's contribution to the sum (adaptive: the bound of the round, checkpointed).
        noise_multiplier: z; the noise std on the sum is ``z * clipper.sensitivity``. With an
            ``AdaptiveClip`` this is the update's share: each round is charged as one Gaussian
            of ``z_eff⁻² = z⁻² + z_b⁻²`` (``z_b = clipper.count_noise_multiplier``); get ``z``
            for a target ``z_eff`` from
            [`split_noise_multiplier`][dpfl.accounting.split_noise_multiplier].
        accountant: [`RDPAccountant`][dpfl.accounting.RDPAccountant] or ``PLDAccountant`` whose
            adjacency matches the sampler; charged in place. Give it a ``budget`` to stop before a
            round that would exceed it.
        delta: The δ at which ε is reported, in (0, 1).
        noise_seed: Seed of the noise generator, for **simulations only**; ``None`` (the default)
            draws the noise from OS entropy. Anyone who knows the seed can reproduce and subtract
            the noise, and two runs with the same noise seed add identical noise, so the
            difference of their releases carries no noise at all and their ε do not compose as
            separate runs (a [`SeededNoiseWarning`][dpfl.simulation.SeededNoiseWarning] says so at
            the start of every seeded run). Within one run each release's noise is keyed on its journal charge, so a round
            re-run after a crash gets fresh noise.
        secure_noise: Hardened, unseeded noise ([`GaussianMechanism`][dpfl.noise.GaussianMechanism]
            ``secure=True``); needs ``noise_seed=None``.
        drop_nonfinite: Drop users whose update is NaN/inf instead of raising.
        query: Instead of ``clipper``/``noise_multiplier``/``noise_seed``/``secure_noise``: a
            [`DPQuery`][dpfl.query.DPQuery] that owns clipping, noise and the event each release
            is charged as (its ``expected_cohort_size`` must equal the sampler's). Without it the
            run builds [`gaussian_query`][dpfl.query.gaussian_query] from those four fields.

    Raises:
        TypeError: If the clipper or accountant lacks the methods the loop needs.
        ValueError: If ``noise_multiplier`` is negative, ``delta`` is outside (0, 1), the noise
            seed is out of range, ``secure_noise`` is combined with a ``noise_seed``, or
            ``query`` is combined with a clipper or noise setting.
    """

    clipper: Any = None
    noise_multiplier: float | None = None
    accountant: Any = None
    delta: float | None = None
    noise_seed: int | None = None
    secure_noise: bool = False
    drop_nonfinite: bool = False
    query: Any = None

    def __post_init__(self) -> None:
        if self.accountant is None or self.delta is None:
            raise TypeError("Privacy needs accountant= and delta=")
        if self.query is not None:
            self._check_query()
            return
        if self.clipper is None or self.noise_multiplier is None:
            raise TypeError(
                "Privacy needs a clipper and noise_multiplier= (or query=, a dpfl.query.DPQuery)"
            )
        self._check_clipper()
        self._check_common()

    def _check_query(self) -> None:
        from dpfl.query import DPQuery  # noqa: PLC0415 - simulation config stays light

        if not isinstance(self.query, DPQuery):
            raise TypeError(
                f"Privacy.query must be a dpfl.query.DPQuery, got {type(self.query).__name__}"
            )
        given = [
            name
            for name, value, default in (
                ("clipper", self.clipper, None),
                ("noise_multiplier", self.noise_multiplier, None),
                ("noise_seed", self.noise_seed, None),
                ("secure_noise", self.secure_noise, False),
            )
            if value != default
        ]
        if given:
            raise ValueError(
                f"Privacy: query= owns the clipper and the noise; do not also give {given} "
                "(set them on the query)"
            )
        self._check_common()

    def _check_clipper(self) -> None:
        if not isinstance(getattr(self.clipper, "sensitivity", None), float | int):
            raise TypeError(
                "Privacy.clipper must be a GlobalClip, PerLayerClip or AdaptiveClip (with a "
                "sensitivity), got "
                f"{type(self.clipper).__name__}"
            )
        _require_methods(
            "Privacy.clipper",
            self.clipper,
            ("clip_and_accumulate_",),
            "a GlobalClip or PerLayerClip",
        )
        _set(
            self,
            "noise_multiplier",
            require_non_negative("Privacy.noise_multiplier", self.noise_multiplier),
        )
        if self.noise_seed is not None:
            require_int("Privacy.noise_seed", self.noise_seed, minimum=0)
            if self.noise_seed >= 2**63:
                raise ValueError(f"Privacy.noise_seed must be < 2**63, got {self.noise_seed}")
        _require_bool("Privacy.secure_noise", self.secure_noise)
        if self.secure_noise and self.noise_seed is not None:
            raise ValueError(
                "Privacy: secure_noise=True needs noise_seed=None (secure noise comes from the OS "
                "CSPRNG so that nobody holding a seed can reproduce and subtract it)"
            )

    def _check_common(self) -> None:
        _require_methods(
            "Privacy.accountant",
            self.accountant,
            ("add_rounds", "would_exceed", "epsilon", "state_dict", "load_state_dict"),
            "an RDPAccountant or PLDAccountant",
        )
        _set(self, "delta", require_probability("Privacy.delta", self.delta, high_open=True))
        _require_bool("Privacy.drop_nonfinite", self.drop_nonfinite)


@dataclass(frozen=True)
class Checkpointing:
    """Atomic checkpoints of the whole run state, the write-ahead privacy journal, and resume.

    The directory holds ``checkpoint.pt``, the journal ``ledger.jsonl`` (one fsync-ed line per
    charged round, written before the round's noise) and ``.lock``: a run holds an exclusive OS
    lock on it for its lifetime (rank 0 under ``torchrun``), so a second writer is refused.
    See [Operating a run](https://dpfl-dev.github.io/dpfl/operating/) for the resume rules.

    Attributes:
        dir: Directory of ``checkpoint.pt`` (created if needed).
        every: Checkpoint cadence in rounds (a checkpoint is also written after the last round
            and on a budget stop).
        resume: Continue from ``dir/checkpoint.pt`` if it exists (a fresh start otherwise).
            Without ``resume`` an existing checkpoint there is an error (never overwritten).

    Raises:
        TypeError: If ``dir`` is not a path.
        ValueError: If ``every`` is not a positive integer.
    """

    dir: str | PathLike[str]
    every: int = 10
    resume: bool = False

    def __post_init__(self) -> None:
        _require_path("Checkpointing.dir", self.dir, optional=False)
        require_int("Checkpointing.every", self.every, minimum=1)
        _require_bool("Checkpointing.resume", self.resume)


@dataclass(frozen=True)
class Logging:
    """The JSON-lines run log and the progress display.

    Attributes:
        path: JSON-lines log (``None``: no log). A fresh start truncates it; a resume drops the
            lines of rounds after the checkpoint so every round appears once.
        progress: ``None``: a tqdm bar if tqdm is installed and stderr is a terminal, else a plain
            line every ``every`` rounds and whenever 30 s have passed since the last one (output
            piped to a file or a CI log is never silent for long; like a terminal bar, the
            lines show how fast rounds go); ``False``: silent; ``True``: never silent.
        every: Cadence of the plain progress lines, in rounds.
        unsafe_metrics: Also log, print and return statistics computed from the raw cohort
            (realised and dropped user counts, fraction clipped, mean norm, timings). They are
            **not** covered by the DP guarantee; off by default.

    Raises:
        TypeError: If ``path`` is not a path or ``None``, or a flag is not a bool.
        ValueError: If ``every`` is not a positive integer.
    """

    path: str | PathLike[str] | None = None
    progress: bool | None = None
    every: int = 10
    unsafe_metrics: bool = False

    def __post_init__(self) -> None:
        _require_path("Logging.path", self.path, optional=True)
        if self.progress is not None:
            _require_bool("Logging.progress", self.progress)
        require_int("Logging.every", self.every, minimum=1)
        _require_bool("Logging.unsafe_metrics", self.unsafe_metrics)


@dataclass(frozen=True)
class Evaluation:
    """A model-evaluation hook, called on rank 0 after every ``every``-th round.

    Attributes:
        fn: ``fn(model) -> {metric: value}``; the metrics land in the round's record. Whatever it
            computes from the model is post-processing of released values; whatever it computes
            from private data is the caller's responsibility.
        every: Evaluation cadence in rounds.

    Raises:
        TypeError: If ``fn`` is not callable.
        ValueError: If ``every`` is not a positive integer.
    """

    fn: Callable[[nn.Module], Mapping[str, float]]
    every: int = 10

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"Evaluation.fn must be callable, got {type(self.fn).__name__}")
        require_int("Evaluation.every", self.every, minimum=1)
