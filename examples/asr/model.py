"""CTC transformer acoustic model of the paper, with named size configurations.

Architecture (paper, section 5): a 1-D convolution front-end (80 log-mel channels to ``2 d``,
kernel 7, stride 3) followed by a GLU (to ``d``), sinusoidal positions, a stack of pre-LayerNorm
transformer blocks (fused bias-free q/k/v in-projection, bias-free out-projection, ReLU MLP,
dropout and LayerDrop), a final LayerNorm and a linear CTC head over characters.

Every block holds exactly eight parameter tensors (``in_proj``, ``out_proj``, ``fc1``, ``fc2``
weights and two LayerNorms), so the ``paper`` configuration has 294 tensors and 255,800,862
parameters, matching the per-layer clipping granularity of the paper's model.

Randomness: dropout and LayerDrop draw from the ``generator`` passed to :meth:`forward`; with
none they use torch's default generator (as ``nn.Dropout`` does). Evaluation mode is
deterministic.

Vectorization: without LayerDrop (the ``small`` and ``tiny`` configurations) the forward has no
data-dependent control flow, so ``torch.func.vmap`` can run many users' copies of the model at
once (dpfl's vectorized cohort training); LayerDrop's per-block skip is such a branch.

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv:2310.00098, section 5.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from examples.asr.checks import require_int, require_probability

__all__ = ["CONFIGS", "CTCTransformer", "ModelConfig", "ctc_loss", "get_config", "output_lengths"]


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of :class:`CTCTransformer`.

    Attributes:
        n_mels: input feature channels.
        d_model: transformer width; the convolution emits ``2 * d_model`` channels before the GLU.
        n_heads: attention heads (must divide ``d_model``).
        d_ff: hidden width of the ReLU MLP.
        n_layers: transformer blocks.
        vocab_size: CTC output classes including the blank.
        conv_kernel: front-end kernel size (odd).
        conv_stride: front-end stride (time down-sampling factor).
        dropout: dropout probability on attention/MLP outputs and after the front-end.
        layerdrop: probability of skipping a whole block in training.
    """

    n_mels: int = 80
    d_model: int = 768
    n_heads: int = 4
    d_ff: int = 3072
    n_layers: int = 36
    vocab_size: int = 30
    conv_kernel: int = 7
    conv_stride: int = 3
    dropout: float = 0.3
    layerdrop: float = 0.3

    def __post_init__(self) -> None:
        for name in ("n_mels", "d_model", "n_heads", "d_ff", "n_layers", "conv_kernel", "conv_stride"):
            require_int(name, getattr(self, name), minimum=1)
        require_int("vocab_size", self.vocab_size, minimum=2)
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd, got {self.conv_kernel}")
        for name in ("dropout", "layerdrop"):
            require_probability(name, getattr(self, name), low_open=False, high_open=True)

    def to_dict(self) -> dict[str, int | float]:
        """Plain-dict form for JSON logs and checkpoints."""
        return asdict(self)


CONFIGS: dict[str, ModelConfig] = {
    # The paper's model: about 255.8M parameters in 294 tensors.
    "paper": ModelConfig(),
    # Default of the example: trains on two CPU cores in minutes (about 1.5M parameters).
    "small": ModelConfig(d_model=160, n_heads=4, d_ff=640, n_layers=4, dropout=0.1, layerdrop=0.0),
    # For tests and smoke runs.
    "tiny": ModelConfig(d_model=64, n_heads=2, d_ff=128, n_layers=2, dropout=0.0, layerdrop=0.0),
}


def get_config(name: str, **overrides: int | float) -> ModelConfig:
    """Return the named configuration, optionally with some fields replaced.

    Raises:
        ValueError: if ``name`` is unknown or an override is invalid.

    Examples:
        >>> get_config("paper").n_layers
        36
        >>> get_config("small", dropout=0.0).dropout
        0.0
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(CONFIGS)}")
    return replace(CONFIGS[name], **overrides)  # type: ignore[arg-type]


def output_lengths(lengths: Tensor, config: ModelConfig) -> Tensor:
    """Number of encoder frames produced for inputs of ``lengths`` frames."""
    pad = config.conv_kernel // 2
    return torch.div(lengths + 2 * pad - config.conv_kernel, config.conv_stride, rounding_mode="floor") + 1


def _sinusoids(length: int, dim: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    table = torch.zeros(length, dim, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table.to(dtype)


def _dropout(x: Tensor, p: float, training: bool, generator: torch.Generator | None) -> Tensor:
    if not training or p == 0.0:
        return x
    if generator is None:
        return F.dropout(x, p, training=True)
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


class Block(nn.Module):
    """Pre-LayerNorm transformer block with bias-free linears (eight parameter tensors)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.ln1 = nn.LayerNorm(d)
        self.in_proj = nn.Linear(d, 3 * d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.d_ff, bias=False)
        self.fc2 = nn.Linear(config.d_ff, d, bias=False)

    def forward(
        self, x: Tensor, key_mask: Tensor | None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Apply the block to ``(batch, frames, d)``; ``key_mask`` is ``(batch, 1, 1, frames)``."""
        b, t, d = x.shape
        h = self.n_heads
        q, k, v = self.in_proj(self.ln1(x)).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        a = self.out_proj(a.transpose(1, 2).reshape(b, t, d))
        x = x + _dropout(a, self.dropout, self.training, generator)
        m = self.fc2(_dropout(F.relu(self.fc1(self.ln2(x))), self.dropout, self.training, generator))
        return x + _dropout(m, self.dropout, self.training, generator)


class CTCTransformer(nn.Module):
    """Convolution + transformer encoder with a character CTC head.

    Args:
        config: a :class:`ModelConfig` (see :data:`CONFIGS`).

    Examples:
        >>> model = CTCTransformer(get_config("tiny")).eval()
        >>> log_probs, lengths = model(torch.randn(2, 50, 80), torch.tensor([50, 31]))
        >>> tuple(log_probs.shape), lengths.tolist()
        ((2, 17, 30), [17, 11])

    References:
        arXiv:2310.00098, section 5 (model) and appendix (hyper-parameters).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.conv = nn.Conv1d(
            config.n_mels,
            2 * config.d_model,
            config.conv_kernel,
            stride=config.conv_stride,
            padding=config.conv_kernel // 2,
        )
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_ln = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size)

    def forward(
        self,
        features: Tensor,
        lengths: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Compute CTC log-probabilities.

        Args:
            features: ``(batch, frames, n_mels)`` padded log-mel features.
            lengths: ``(batch,)`` valid frames per utterance; None means all frames are valid.
            generator: source of dropout/LayerDrop randomness in training mode.

        Returns:
            ``(log_probs, out_lengths)``: ``(batch, out_frames, vocab)`` log-softmax scores and
            the number of valid output frames per utterance.

        Raises:
            ValueError: if ``features`` is not ``(batch, frames, n_mels)``.
        """
        cfg = self.config
        if features.dim() != 3 or features.shape[-1] != cfg.n_mels:
            raise ValueError(
                f"features must be (batch, frames, {cfg.n_mels}), got {tuple(features.shape)}"
            )
        b, t, _ = features.shape
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=features.device)
        out_len = output_lengths(lengths.to(features.device), cfg)
        x = F.glu(self.conv(features.transpose(1, 2)), dim=1).transpose(1, 2)
        t_out = x.shape[1]
        x = x + _sinusoids(t_out, cfg.d_model, device=x.device, dtype=x.dtype)
        x = _dropout(x, cfg.dropout, self.training, generator)
        # Always a mask, never a data-dependent branch on it: the forward stays traceable by
        # torch.func.vmap (vectorized cohort training); an all-true mask changes nothing.
        key_mask = (torch.arange(t_out, device=x.device)[None, :] < out_len[:, None])[:, None, None, :]
        if self.training and cfg.layerdrop > 0:
            draws = torch.rand(len(self.blocks), generator=generator, device=x.device).tolist()
        else:
            draws = [1.0] * len(self.blocks)
        for block, u in zip(self.blocks, draws, strict=True):
            if u >= cfg.layerdrop:
                x = block(x, key_mask, generator)
        return F.log_softmax(self.head(self.final_ln(x)), dim=-1), out_len


def ctc_loss(
    log_probs: Tensor, out_lengths: Tensor, targets: Tensor, target_lengths: Tensor,
    weights: Tensor | None = None,
) -> Tensor:
    """CTC loss averaged over utterances (each utterance's loss is a sum over its frames).

    Args:
        log_probs: ``(batch, frames, vocab)`` output of :class:`CTCTransformer`.
        out_lengths: ``(batch,)`` valid output frames.
        targets: ``(batch, max_target)`` padded symbol indices (no blanks).
        target_lengths: ``(batch,)`` target lengths.
        weights: optional ``(batch,)`` utterance weights: the loss is then
            ``sum(w_i * loss_i) / sum(w_i)``, so rows of weight 0 (batch padding) count for
            nothing; ``None`` weighs every utterance 1.

    Returns:
        A scalar loss; infeasible alignments (target longer than output) contribute zero.
    """
    args = (log_probs.transpose(0, 1).float(), targets, out_lengths, target_lengths)
    if weights is None:
        return F.ctc_loss(*args, blank=0, reduction="sum", zero_infinity=True) / log_probs.shape[0]
    per_utterance = F.ctc_loss(*args, blank=0, reduction="none", zero_infinity=True)
    w = weights.to(per_utterance.dtype)
    return (per_utterance * w).sum() / w.sum()
