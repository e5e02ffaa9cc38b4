"""Empirical privacy auditing: one-shot canary estimation of a run, mechanism lower bounds.

* :class:`CanaryAudit` — insert ``k`` random canary clients into a DP-FedAvg run and estimate
  the ε that the cosine attack achieves (Andrew et al., ICLR 2024); :func:`estimate_from_cosines`
  re-estimates from saved cosines.
* :func:`audit_gaussian_mechanism`, :func:`audit_aggregator` — canary in/out trials of a release
  with a threshold test and Clopper–Pearson intervals: an ε lower bound with stated confidence
  (:class:`ThresholdAudit`, :class:`AuditBound`).
* :func:`gaussian_epsilon`, :func:`gaussian_delta` — the exact (ε, δ) curve of μ-GDP.

An empirical ε is what one attack achieves, not a guarantee; an honest implementation keeps it
below the accountant's ε, and an estimate above it means a bug. See ``docs/audit.md``.

References:
    Andrew et al., "One-shot Empirical Privacy Estimation for Federated Learning", arXiv 2302.03098.
    Jagielski, Ullman & Oprea, arXiv 2006.07709; Dong, Roth & Su, arXiv 1905.02383.
"""

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
