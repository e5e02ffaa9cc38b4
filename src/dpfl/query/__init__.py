"""DP queries: one object owns the noise that leaves the process and the event it is charged as.

See [`DPQuery`][dpfl.query.DPQuery] for the contract and the
[architecture page](https://dpfl-dev.github.io/dpfl/architecture/) for who owns noise, event and
charge.
"""

from dpfl.query.base import (
    DPQuery,
    Release,
    ReleaseEventError,
    Sampling,
    check_noise_representable,
)
from dpfl.query.gaussian import AdaptiveClipQuery, GaussianSumQuery, gaussian_query

__all__ = [
    "AdaptiveClipQuery",
    "DPQuery",
    "GaussianSumQuery",
    "Release",
    "ReleaseEventError",
    "Sampling",
    "check_noise_representable",
    "gaussian_query",
]
