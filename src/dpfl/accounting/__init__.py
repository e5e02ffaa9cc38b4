"""Privacy accounting for DP federated learning, built on Google's ``dp_accounting``.

Round specifications ([`PoissonRound`][dpfl.accounting.PoissonRound],
[`FixedCohortRound`][dpfl.accounting.FixedCohortRound]), ledger accountants
([`RDPAccountant`][dpfl.accounting.RDPAccountant], [`PLDAccountant`][dpfl.accounting.PLDAccountant])
with an optional [`PrivacyBudget`][dpfl.accounting.PrivacyBudget], noise calibration and population
extrapolation. This package imports neither torch nor model code.

References:
    Pelikan et al., arXiv 2310.00098, section 2.4.
"""

from dpfl.accounting._pld import PLDTooLargeError
from dpfl.accounting.accountants import (
    DEFAULT_VALUE_DISCRETIZATION_INTERVAL,
    PLDAccountant,
    RDPAccountant,
)
from dpfl.accounting.budget import BudgetExceededError, PrivacyBudget
from dpfl.accounting.calibration import calibrate_noise_multiplier, epsilon_for
from dpfl.accounting.ceiling import NOISE_CEILING, ceiling_delta, ledger_ceiling_delta
from dpfl.accounting.events import (
    ADD_OR_REMOVE_ONE,
    NOISE_MULTIPLIER_CAP,
    REPLACE_ONE,
    FixedCohortRound,
    PoissonRound,
    effective_noise_multiplier,
    round_from_dict,
    split_noise_multiplier,
)
from dpfl.accounting.extrapolation import Extrapolation, extrapolate

__all__ = [
    "ADD_OR_REMOVE_ONE",
    "DEFAULT_VALUE_DISCRETIZATION_INTERVAL",
    "NOISE_CEILING",
    "NOISE_MULTIPLIER_CAP",
    "REPLACE_ONE",
    "BudgetExceededError",
    "Extrapolation",
    "FixedCohortRound",
    "PLDAccountant",
    "PLDTooLargeError",
    "PoissonRound",
    "PrivacyBudget",
    "RDPAccountant",
    "calibrate_noise_multiplier",
    "ceiling_delta",
    "effective_noise_multiplier",
    "epsilon_for",
    "extrapolate",
    "ledger_ceiling_delta",
    "round_from_dict",
    "split_noise_multiplier",
]
