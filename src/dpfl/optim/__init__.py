"""Server optimizers with layer-wise normalization: LAMB, LARS, layer-wise Adam, server step.

References:
    Pelikan et al., arXiv 2310.00098; You et al., arXiv 1904.00962 (LAMB);
    You et al., arXiv 1708.03888 (LARS).
"""

from dpfl.optim._trust import NonFiniteGradientError, trust_ratio, trust_ratio_groups
from dpfl.optim.lamb import LAMB, layerwise_adam
from dpfl.optim.lars import LARS
from dpfl.optim.server import server_step

__all__ = [
    "LAMB",
    "LARS",
    "NonFiniteGradientError",
    "layerwise_adam",
    "server_step",
    "trust_ratio",
    "trust_ratio_groups",
]
