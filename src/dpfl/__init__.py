"""dpfl: differential-privacy federated-learning primitives for PyTorch.

The top level re-exports the names most programs need; each is documented on the page of the
module it lives in:

- [`dpfl.clip`][dpfl.clip]: [`GlobalClip`][dpfl.clip.GlobalClip],
  [`PerLayerClip`][dpfl.clip.PerLayerClip];
- [`dpfl.adaptive_clip`][dpfl.adaptive_clip]:
  [`AdaptiveClip`][dpfl.adaptive_clip.AdaptiveClip] (global or per-layer adaptive bounds);
- [`dpfl.noise`][dpfl.noise]: [`GaussianMechanism`][dpfl.noise.GaussianMechanism];
- [`dpfl.aggregate`][dpfl.aggregate]: [`DPAggregator`][dpfl.aggregate.DPAggregator];
- [`dpfl.query`][dpfl.query]: [`GaussianSumQuery`][dpfl.query.GaussianSumQuery],
  [`AdaptiveClipQuery`][dpfl.query.AdaptiveClipQuery] (clipping, noise and the event charged);
- [`dpfl.accounting`][dpfl.accounting]: [`RDPAccountant`][dpfl.accounting.RDPAccountant],
  [`PLDAccountant`][dpfl.accounting.PLDAccountant], calibration, extrapolation;
- [`dpfl.optim`][dpfl.optim]: [`LAMB`][dpfl.optim.LAMB], [`LARS`][dpfl.optim.LARS],
  [`layerwise_adam`][dpfl.optim.layerwise_adam], [`server_step`][dpfl.optim.server_step];
- [`dpfl.simulation`][dpfl.simulation]: samplers, local and vectorized training, the round
  loop, checkpoints;
- [`dpfl.audit`][dpfl.audit]: empirical privacy (canary in/out lower bounds, one-shot canary
  estimation);
- every exception dpfl raises derives from [`DPFLError`][dpfl.DPFLError].

Names are imported lazily, so ``import dpfl`` and ``import dpfl.accounting`` do not import
torch. ``dpfl.__version__`` is the version string; ``dpfl --version`` prints it.

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv 2310.00098.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0.dev0"

_EXPORTS: dict[str, str] = {
    "DPFLError": "dpfl._errors",
    "NonFiniteUpdateError": "dpfl.clip",
    "NonFiniteGradientError": "dpfl.optim",
    "NonFiniteLossError": "dpfl.simulation",
    "CheckpointError": "dpfl.simulation",
    "DistributedError": "dpfl.simulation",
    "VectorizationError": "dpfl.simulation",
    "PLDTooLargeError": "dpfl.accounting",
    "ReleaseEventError": "dpfl.query",
    "ClipStats": "dpfl.clip",
    "GlobalClip": "dpfl.clip",
    "PerLayerClip": "dpfl.clip",
    "AdaptiveClip": "dpfl.adaptive_clip",
    "GaussianMechanism": "dpfl.noise",
    "DPAggregator": "dpfl.aggregate",
    "ReleaseStats": "dpfl.aggregate",
    "BudgetExceededError": "dpfl.accounting",
    "Extrapolation": "dpfl.accounting",
    "FixedCohortRound": "dpfl.accounting",
    "PLDAccountant": "dpfl.accounting",
    "PoissonRound": "dpfl.accounting",
    "PrivacyBudget": "dpfl.accounting",
    "RDPAccountant": "dpfl.accounting",
    "calibrate_noise_multiplier": "dpfl.accounting",
    "extrapolate": "dpfl.accounting",
    "LAMB": "dpfl.optim",
    "LARS": "dpfl.optim",
    "layerwise_adam": "dpfl.optim",
    "server_step": "dpfl.optim",
}
_SUBMODULES = (
    "accounting",
    "adaptive_clip",
    "aggregate",
    "audit",
    "clip",
    "noise",
    "optim",
    "query",
    "simulation",
)

__all__ = [
    "__version__",
    "DPFLError",
    "NonFiniteUpdateError",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "CheckpointError",
    "DistributedError",
    "VectorizationError",
    "PLDTooLargeError",
    "ReleaseEventError",
    "ClipStats",
    "GlobalClip",
    "PerLayerClip",
    "AdaptiveClip",
    "GaussianMechanism",
    "DPAggregator",
    "ReleaseStats",
    "BudgetExceededError",
    "Extrapolation",
    "FixedCohortRound",
    "PLDAccountant",
    "PoissonRound",
    "PrivacyBudget",
    "RDPAccountant",
    "calibrate_noise_multiplier",
    "extrapolate",
    "LAMB",
    "LARS",
    "layerwise_adam",
    "server_step",
    "accounting",
    "adaptive_clip",
    "aggregate",
    "audit",
    "clip",
    "noise",
    "optim",
    "query",
    "simulation",
]

if TYPE_CHECKING:
    from dpfl import (
        accounting,
        adaptive_clip,
        aggregate,
        audit,
        clip,
        noise,
        optim,
        query,
        simulation,
    )
    from dpfl._errors import DPFLError
    from dpfl.accounting import (
        BudgetExceededError,
        Extrapolation,
        FixedCohortRound,
        PLDAccountant,
        PLDTooLargeError,
        PoissonRound,
        PrivacyBudget,
        RDPAccountant,
        calibrate_noise_multiplier,
        extrapolate,
    )
    from dpfl.adaptive_clip import AdaptiveClip
    from dpfl.aggregate import DPAggregator, ReleaseStats
    from dpfl.clip import ClipStats, GlobalClip, NonFiniteUpdateError, PerLayerClip
    from dpfl.noise import GaussianMechanism
    from dpfl.optim import LAMB, LARS, NonFiniteGradientError, layerwise_adam, server_step
    from dpfl.query import ReleaseEventError
    from dpfl.simulation import (
        CheckpointError,
        DistributedError,
        NonFiniteLossError,
        VectorizationError,
    )


assert set(__all__) == {"__version__", *_EXPORTS, *_SUBMODULES}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"dpfl.{name}")
    else:
        raise AttributeError(f"module 'dpfl' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
