"""Batching, CTC loss, central (seed) training with LARS, and greedy-decoding evaluation.

The federated half of the pipeline lives in :mod:`examples.asr.federated`; both consume the
:class:`Batch` objects built here. A batch is plain data (padded features, lengths, padded targets,
target lengths and the reference transcripts), so it can be handed unchanged to dpfl's local
trainer as one user's data.

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv:2310.00098, section 5 (seed
    model trained centrally with LARS, CTC loss averaged over utterances, greedy decoding).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpfl.optim import LARS
from examples.asr.checks import require_int, require_non_negative, require_positive
from examples.asr.model import ctc_loss
from examples.asr.text import CharTokenizer, ErrorRates, error_rates, greedy_decode

__all__ = [
    "Augment",
    "Batch",
    "BatchTensors",
    "align_batches",
    "batch_loss",
    "collate",
    "evaluate",
    "make_batches",
    "train_central",
]

Augment = Callable[[Tensor, torch.Generator], Tensor]
"""``augment(features, generator) -> features`` applied to one ``(frames, n_mels)`` utterance."""


@dataclass(frozen=True)
class Batch:
    """A padded mini-batch of utterances.

    Attributes:
        features: ``(batch, frames, n_mels)`` float features, zero-padded.
        lengths: ``(batch,)`` valid frames per utterance.
        targets: ``(batch, max_len)`` symbol indices, zero-padded.
        target_lengths: ``(batch,)`` target lengths.
        texts: the normalised reference transcripts.
    """

    features: Tensor
    lengths: Tensor
    targets: Tensor
    target_lengths: Tensor
    texts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def tensors(self) -> BatchTensors:
        """The tensors of the batch (what training needs), every utterance of weight 1."""
        return BatchTensors(self.features, self.lengths, self.targets, self.target_lengths,
                            torch.ones(len(self.lengths)))


class BatchTensors(NamedTuple):
    """A training batch of tensors only (no transcripts), for vectorized cohort training.

    The fields of :class:`Batch` without ``texts``, plus ``weights`` ``(batch,)``: 1 for an
    utterance, 0 for a padding row that :func:`align_batches` added (it counts for nothing in
    :func:`batch_loss`). A ``NamedTuple`` is a pytree, so ``torch.func`` can stack it.
    """

    features: Tensor
    lengths: Tensor
    targets: Tensor
    target_lengths: Tensor
    weights: Tensor


def align_batches(batches: Sequence[BatchTensors]) -> list[BatchTensors]:
    """Pad several users' batches of one local step to common shapes, changing no loss.

    Features are zero-padded to the most frames and targets to the longest target (the model
    masks frames past ``lengths`` and CTC reads ``target_lengths``, so neither changes any
    utterance's loss); a batch with fewer utterances than the largest gets rows of weight 0
    (all-valid zero features, an empty target), which :func:`batch_loss` ignores. This is the
    ``align`` of ``dpfl.simulation.LocalTraining`` for vectorized cohort training.

    Raises:
        TypeError: if a batch is not a :class:`BatchTensors` (see :meth:`Batch.tensors`).
    """
    for i, b in enumerate(batches):
        if not isinstance(b, BatchTensors):
            raise TypeError(f"batches[{i}] must be a BatchTensors (Batch.tensors()), "
                            f"got {type(b).__name__}")
    if not batches:
        return []
    frames = max(b.features.shape[1] for b in batches)
    symbols = max(b.targets.shape[1] for b in batches)
    rows = max(b.features.shape[0] for b in batches)
    out = []
    for b in batches:
        extra = rows - b.features.shape[0]
        out.append(BatchTensors(
            F.pad(b.features, (0, 0, 0, frames - b.features.shape[1], 0, extra)),
            torch.cat([b.lengths, b.lengths.new_full((extra,), frames)]),
            F.pad(b.targets, (0, symbols - b.targets.shape[1], 0, extra)),
            torch.cat([b.target_lengths, b.target_lengths.new_zeros(extra)]),
            torch.cat([b.weights, b.weights.new_zeros(extra)])))
    return out


def collate(features: Sequence[Tensor], texts: Sequence[str], tokenizer: CharTokenizer) -> Batch:
    """Pad a list of ``(frames, n_mels)`` utterances and encode their transcripts.

    Raises:
        ValueError: if the lists are empty or of different lengths, or a feature tensor is not
            two-dimensional with the same number of channels as the others.
    """
    if len(features) != len(texts) or not features:
        raise ValueError(
            f"features ({len(features)}) and texts ({len(texts)}) must be non-empty and equally long"
        )
    n_mels = features[0].shape[-1]
    for i, f in enumerate(features):
        if f.dim() != 2 or f.shape[1] != n_mels:
            raise ValueError(f"features[{i}] must be (frames, {n_mels}), got {tuple(f.shape)}")
    encoded = [torch.tensor(tokenizer.encode(t), dtype=torch.long) for t in texts]
    lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
    padded = torch.zeros(len(features), int(lengths.max()), n_mels, dtype=torch.float32)
    for i, f in enumerate(features):
        padded[i, : f.shape[0]] = f
    target_lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
    targets = torch.zeros(len(encoded), max(1, int(target_lengths.max())), dtype=torch.long)
    for i, e in enumerate(encoded):
        targets[i, : len(e)] = e
    norm = tuple(tokenizer.decode(e) for e in encoded)
    return Batch(padded, lengths, targets, target_lengths, norm)


def make_batches(
    features: Sequence[Tensor],
    texts: Sequence[str],
    tokenizer: CharTokenizer,
    *,
    batch_size: int,
    seed: int | None = None,
) -> list[Batch]:
    """Group utterances of similar length into batches of at most ``batch_size``.

    Utterances are sorted by length (less padding, faster steps) and cut into batches; with a
    ``seed`` the order of the batches is then shuffled (the sort itself is deterministic).

    Args:
        features: ``(frames, n_mels)`` tensors.
        texts: transcripts, same order.
        tokenizer: encodes the transcripts.
        batch_size: largest batch.
        seed: shuffles the batch order when given; ``None`` keeps them sorted by length.

    Returns:
        The batches.
    """
    batch_size = require_int("batch_size", batch_size, minimum=1)
    if len(features) != len(texts):
        raise ValueError(f"features ({len(features)}) and texts ({len(texts)}) differ in length")
    order = sorted(range(len(features)), key=lambda i: int(features[i].shape[0]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=g).tolist()]
    return [collate([features[i] for i in c], [texts[i] for i in c], tokenizer) for c in chunks]


def batch_loss(
    model: nn.Module,
    batch: Batch | BatchTensors,
    *,
    augment: Augment | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """CTC loss of ``model`` on ``batch``, averaged over utterances.

    This is the ``loss_fn(model, batch)`` handed to dpfl's local trainer (``augment`` and
    ``generator`` bound with :func:`functools.partial` when SpecAugment is wanted). Without
    ``augment`` it only calls the model and does tensor maths, so it vectorizes over users
    (``torch.func``) on :class:`BatchTensors`.

    Args:
        model: a :class:`~examples.asr.model.CTCTransformer`.
        batch: a :class:`Batch`, or a :class:`BatchTensors` (weighted mean over utterances).
        augment: optional per-utterance augmentation applied to the valid frames only.
        generator: randomness for ``augment`` and the model's dropout; None uses torch's RNG
            (which dpfl's local trainer seeds per user in an isolated block).
    """
    features = batch.features
    if augment is not None:
        if generator is None:  # inside dpfl's local trainer: torch's RNG is seeded per user
            seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator().manual_seed(seed)
        features = features.clone()
        for i, n in enumerate(batch.lengths.tolist()):
            features[i, :n] = augment(features[i, :n], generator)
    if isinstance(batch, BatchTensors):  # the model may be a torch.func proxy: no parameters
        log_probs, out_lengths = model(features, batch.lengths, generator=generator)
        with warnings.catch_warnings():  # under vmap, CTC loops over users (a small share)
            warnings.filterwarnings("ignore", message="There is a performance drop")
            return ctc_loss(log_probs, out_lengths, batch.targets, batch.target_lengths,
                            batch.weights)
    device = _device_of(model)
    log_probs, out_lengths = model(features.to(device), batch.lengths.to(device), generator=generator)
    return ctc_loss(
        log_probs, out_lengths, batch.targets.to(device), batch.target_lengths.to(device)
    )


def _device_of(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (batches live on the CPU and are moved there)."""
    return next(model.parameters()).device


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_central(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    steps: int,
    lr: float,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    max_grad_norm: float | None = None,
    augment: Augment | None = None,
    seed: int | None = None,
    progress: bool = False,
    callback: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the seed model centrally with LARS (the paper's central optimizer), in place.

    The learning rate warms up linearly over ``warmup_steps`` and then follows a cosine decay to
    zero at ``steps``. Batches are visited in a fresh random order every epoch.

    Args:
        model: the model, trained in place (left in eval mode on return).
        batches: training batches.
        steps: optimizer steps.
        lr: peak LARS learning rate (LARS scales it per layer by
            ``trust_coefficient * ||w|| / ||g||``).
        momentum: LARS momentum (paper: 0.9).
        trust_coefficient: LARS trust coefficient (paper: 0.001).
        weight_decay: LARS weight decay.
        warmup_steps: linear warm-up steps.
        max_grad_norm: optional global gradient-norm clip before the LARS step.
        augment: optional per-utterance augmentation (SpecAugment).
        seed: seeds batch order, augmentation and dropout; None draws from OS entropy.
        progress: show a tqdm progress bar.
        callback: ``callback(step, loss)`` after every step (e.g. logging).

    Returns:
        The training loss of every step.

    Raises:
        ValueError: on invalid arguments (nothing is trained).
    """
    steps = require_int("steps", steps, minimum=0)
    lr = require_positive("lr", lr)
    warmup_steps = require_int("warmup_steps", warmup_steps, minimum=0)
    require_non_negative("weight_decay", weight_decay)
    if not batches:
        raise ValueError("batches must contain at least one batch")
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    # Biases and LayerNorm parameters (1-D) start at zero or one and have no meaningful trust
    # ratio at step 0 (LARS then falls back to the raw, huge, global LR): they get plain momentum
    # SGD at lr * trust_coefficient instead, the step size LARS gives matrices per unit of norm.
    groups = [
        {"params": [p for p in params if p.dim() > 1], "base_lr": lr},
        {
            "params": [p for p in params if p.dim() <= 1],
            "base_lr": lr * trust_coefficient,
            "trust_ratio": False,
            "weight_decay": 0.0,
        },
    ]
    optimizer = LARS(
        [g for g in groups if g["params"]],
        lr,
        momentum=momentum,
        trust_coefficient=trust_coefficient,
        weight_decay=weight_decay,
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="seed training (LARS)", unit="step", leave=False)
    losses: list[float] = []
    model.train()
    order: list[int] = []
    try:
        for step in range(steps):
            if not order:
                order = torch.randperm(len(batches), generator=generator).tolist()
            batch = batches[order.pop()]
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * _schedule(step, steps, warmup_steps)
            loss = batch_loss(model, batch, augment=augment, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if callback is not None:
                callback(step, losses[-1])
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    return losses


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Sequence[Batch], tokenizer: CharTokenizer
) -> tuple[ErrorRates, list[str]]:
    """Greedy-decode ``batches`` and score them against their transcripts.

    Args:
        model: the acoustic model (put in eval mode; its previous mode is restored).
        batches: evaluation batches.
        tokenizer: maps model outputs to characters.

    Returns:
        ``(rates, hypotheses)``: WER/CER over all utterances and the decoded strings in batch order.
    """
    was_training = model.training
    model.eval()
    refs: list[str] = []
    hyps: list[str] = []
    try:
        for batch in batches:
            device = _device_of(model)
            log_probs, out_lengths = model(batch.features.to(device), batch.lengths.to(device))
            hyps.extend(greedy_decode(log_probs, out_lengths, tokenizer))
            refs.extend(batch.texts)
    finally:
        model.train(was_training)
    return error_rates(refs, hyps), hyps

