"""The migration guide cannot rot: every peer-library name it cites exists, with the keyword
arguments it names, in the peer as installed.

Each peer is checked where it can be imported and skipped (not passed) where it cannot:
dp_accounting is a core dependency, so its names are checked on every run; Opacus, pfl, Flower,
TF Privacy and TensorFlow Federated wherever they are installed beside dpfl (none is in dpfl's
extras: pfl pins an older dp-accounting, and Opacus installs a top-level ``benchmarks`` package
of its own). Every cited name must also appear on the page,
so a row removed from the page is removed here too.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from pathlib import Path

import pytest

PAGE = (Path(__file__).resolve().parents[1] / "docs" / "migration.md").read_text(encoding="utf-8")

# peer (its import name) -> {dotted name -> keyword arguments the page names}
CITED: dict[str, dict[str, tuple[str, ...]]] = {
    "opacus": {
        "opacus.PrivacyEngine.make_private": (
            "noise_multiplier", "max_grad_norm", "clipping"),
        "opacus.PrivacyEngine.make_private_with_epsilon": (
            "target_epsilon", "target_delta", "epochs", "clipping"),
        "opacus.accountants.utils.get_noise_multiplier": (
            "target_epsilon", "target_delta", "sample_rate", "epochs", "steps", "accountant",
            "epsilon_tolerance"),
        "opacus.optimizers.AdaClipDPOptimizer": (
            "noise_multiplier", "target_unclipped_quantile", "clipbound_learning_rate",
            "unclipped_num_std", "min_clipbound", "max_clipbound", "max_grad_norm"),
        "opacus.accountants.RDPAccountant": (),
        "opacus.accountants.PRVAccountant": (),
        "opacus.accountants.GaussianAccountant": (),
    },
    "pfl": {
        "pfl.privacy.GaussianMechanism": ("clipping_bound", "relative_noise_stddev"),
        "pfl.privacy.CentrallyAppliedPrivacyMechanism": (),
        "pfl.privacy.PLDPrivacyAccountant": (),
        "pfl.privacy.RDPPrivacyAccountant": (),
        "pfl.privacy.PRVPrivacyAccountant": (),
        "pfl.privacy.adaptive_clipping.AdaptiveClippingGaussianMechanism": (
            "make_gaussian_mechanism", "initial_clipping_bound",
            "clipping_indicator_noise_stddev", "adaptive_clipping_norm_quantile",
            "log_space_step_size"),
    },
    "flwr": {
        "flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping": (
            "strategy", "noise_multiplier", "clipping_norm", "num_sampled_clients", "accountant"),
        "flwr.serverapp.strategy.DifferentialPrivacyClientSideFixedClipping": ("accountant",),
        "flwr.serverapp.strategy.DifferentialPrivacyServerSideAdaptiveClipping": (
            "strategy", "noise_multiplier", "num_sampled_clients", "initial_clipping_norm",
            "target_clipped_quantile", "clip_norm_lr", "clipped_count_stddev"),
        "flwr.serverapp.strategy.DifferentialPrivacyClientSideAdaptiveClipping": (),
        "flwr.clientapp.mod.fixedclipping_mod": (),
        "flwr.clientapp.mod.adaptiveclipping_mod": (),
        "flwr.serverapp.RdpAccountant": (),
        "flwr.serverapp.PrivacyConfig": (
            "target_delta", "population_size", "neighboring_relation", "sampling_method"),
        "flwr.serverapp.SamplingMethod.NO_AMPLIFICATION": (),
    },
    "tensorflow_privacy": {
        "tensorflow_privacy.GaussianSumQuery": ("l2_norm_clip", "stddev"),
        "tensorflow_privacy.QuantileAdaptiveClipSumQuery": (
            "initial_l2_norm_clip", "noise_multiplier", "target_unclipped_quantile",
            "learning_rate", "clipped_count_stddev", "expected_num_records"),
        "tensorflow_privacy.compute_dp_sgd_privacy_statement": (),
    },
    "tensorflow_federated": {
        "tensorflow_federated.aggregators.DifferentiallyPrivateFactory.gaussian_fixed": (
            "noise_multiplier", "clients_per_round", "clip"),
    },
    "dp_accounting": {
        "dp_accounting.GaussianDpEvent": ("noise_multiplier",),
        "dp_accounting.PoissonSampledDpEvent": (),
        "dp_accounting.SampledWithoutReplacementDpEvent": (),
        "dp_accounting.SelfComposedDpEvent": (),
        "dp_accounting.ComposedDpEvent": (),
    },
}


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def _parameters(obj: object) -> set[str]:
    target = obj.__init__ if inspect.isclass(obj) else obj  # type: ignore[misc]
    return set(inspect.signature(target).parameters)


@pytest.mark.parametrize("peer", sorted(CITED))
def test_every_cited_name_exists_with_the_arguments_the_page_names(peer: str) -> None:
    pytest.importorskip(peer, reason=f"{peer} is not installed beside dpfl")
    missing = []
    for dotted, keywords in CITED[peer].items():
        try:
            obj = _resolve(dotted)
        except (AttributeError, ModuleNotFoundError) as err:
            missing.append(f"{dotted}: {err}")
            continue
        if keywords:
            absent = set(keywords) - _parameters(obj)
            if absent:
                missing.append(f"{dotted} has no parameter(s) {sorted(absent)}")
    assert missing == []


def test_every_cited_name_is_on_the_page() -> None:
    for names in CITED.values():
        for dotted in names:
            short = dotted.split(".")[-1]
            assert re.search(rf"`[^`]*\b{re.escape(short)}\b[^`]*`", PAGE), dotted


def test_opacus_calibration_is_one_sided_and_counts_steps_as_the_page_says() -> None:
    """Opacus's ``get_noise_multiplier(steps=...)`` returns a multiplier whose ε (dpfl's RDP of
    the same Poisson-sampled Gaussian, the same maths) meets the target, within its absolute
    ``epsilon_tolerance``; dpfl's calibration meets it too and is within ``rtol`` in z."""
    utils = pytest.importorskip("opacus.accountants.utils")
    from dpfl.accounting import calibrate_noise_multiplier, epsilon_for

    target, delta, q, steps = 3.0, 1e-5, 0.01, 1000
    theirs = utils.get_noise_multiplier(
        target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps
    )
    ours = calibrate_noise_multiplier(target, delta, q, steps)
    eps_theirs = epsilon_for(theirs, q, steps, delta)
    assert target - 0.01 - 1e-3 <= eps_theirs <= target * (1 + 1e-6)
    assert epsilon_for(ours, q, steps, delta) <= target
    assert ours <= theirs * (1 + 1e-3) and math.isclose(ours, theirs, rel_tol=0.01)
