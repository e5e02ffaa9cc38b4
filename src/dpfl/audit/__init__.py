"""Empirical privacy auditing: one-shot canary estimation of a run, mechanism lower bounds.

* [`CanaryAudit`][dpfl.audit.CanaryAudit] — insert ``k`` random canary clients into a DP-FedAvg run
  and estimate the ε that the cosine attack achieves (Andrew et al., ICLR 2024);
  [`estimate_from_cosines`][dpfl.audit.estimate_from_cosines] re-estimates from saved cosines.
* [`audit_gaussian_mechanism`][dpfl.audit.audit_gaussian_mechanism],
  [`audit_aggregator`][dpfl.audit.audit_aggregator] — canary in/out trials of a release with a
  threshold test and Clopper–Pearson intervals: an ε lower bound with stated confidence
  ([`ThresholdAudit`][dpfl.audit.ThresholdAudit], [`AuditBound`][dpfl.audit.AuditBound]).
* [`gaussian_epsilon`][dpfl.audit.gaussian_epsilon], [`gaussian_delta`][dpfl.audit.gaussian_delta] —
  the exact (ε, δ) curve of μ-GDP.

An empirical ε is what one attack achieves, not a guarantee; an honest implementation keeps it
below the accountant's ε, and an estimate above it means a bug. See
[Empirical auditing](https://dpfl-dev.github.io/dpfl/audit/).

References:
    Andrew et al., "One-shot Empirical Privacy Estimation for Federated Learning", arXiv 2302.03098.
    Jagielski, Ullman & Oprea, arXiv 2006.07709; Dong, Roth & Su, arXiv 1905.02383.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "AuditBound": "dpfl.audit.bounds",
    "ThresholdAudit": "dpfl.audit.bounds",
    "clopper_pearson_upper": "dpfl.audit.bounds",
    "epsilon_from_rates": "dpfl.audit.bounds",
    "CanaryAudit": "dpfl.audit.canary",
    "CanaryEstimate": "dpfl.audit.canary",
    "CosineEstimate": "dpfl.audit.canary",
    "canary_update": "dpfl.audit.canary",
    "estimate_from_cosines": "dpfl.audit.canary",
    "gaussian_delta": "dpfl.audit.gaussian",
    "gaussian_epsilon": "dpfl.audit.gaussian",
    "NoiseRelease": "dpfl.audit.mechanism",
    "audit_aggregator": "dpfl.audit.mechanism",
    "audit_gaussian_mechanism": "dpfl.audit.mechanism",
    "gaussian_mechanism_trials": "dpfl.audit.mechanism",
    "tail_thresholds": "dpfl.audit.mechanism",
}

if TYPE_CHECKING:
    from dpfl.audit.bounds import (
        AuditBound,
        ThresholdAudit,
        clopper_pearson_upper,
        epsilon_from_rates,
    )
    from dpfl.audit.canary import (
        CanaryAudit,
        CanaryEstimate,
        CosineEstimate,
        canary_update,
        estimate_from_cosines,
    )
    from dpfl.audit.gaussian import gaussian_delta, gaussian_epsilon
    from dpfl.audit.mechanism import (
        NoiseRelease,
        audit_aggregator,
        audit_gaussian_mechanism,
        gaussian_mechanism_trials,
        tail_thresholds,
    )

__all__ = [
    "AuditBound",
    "CanaryAudit",
    "CanaryEstimate",
    "CosineEstimate",
    "NoiseRelease",
    "ThresholdAudit",
    "audit_aggregator",
    "audit_gaussian_mechanism",
    "canary_update",
    "clopper_pearson_upper",
    "epsilon_from_rates",
    "estimate_from_cosines",
    "gaussian_delta",
    "gaussian_epsilon",
    "gaussian_mechanism_trials",
    "tail_thresholds",
]


assert set(__all__) == set(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy: ``dpfl.audit.gaussian`` and the CLI parser stay free of torch until needed.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dpfl.audit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
