"""Tests for dpfl.clip: clipping invariants as hypothesis properties, float64 reference, errors.

All norms in the checks are computed in float64. The only tolerance in the invariant checks is
none at all (``<= bound``); comparisons against the float64 reference allow the derived safety
margin (at most :data:`MAX_MARGIN`, about 1.6e-5 relative, by which a scale factor is shrunk; see
:mod:`dpfl._clip_kernels`) plus output rounding. Long tensors are covered by ``test_clip_long.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpfl._clip_kernels import ROW, U32, margin, output_roundoff, precise_error
from dpfl.clip import ClipStats, GlobalClip, NonFiniteUpdateError, PerLayerClip

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# log10 magnitude range such that values stay finite (and mostly normal) in each dtype.
EXP_RANGE = {torch.float16: (-7, 4), torch.bfloat16: (-30, 30)}
EXP_RANGE.update({torch.float32: (-30, 30), torch.float64: (-30, 30)})


@st.composite
def tensors(draw, dtypes=tuple(DTYPES)):
    dtype = draw(st.sampled_from(dtypes))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    lo, hi = EXP_RANGE[dtype]
    kind = draw(st.sampled_from(["uniform", "mixed", "zero"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "zero":
        x = torch.zeros(shape, dtype=torch.float64)
    elif kind == "uniform":
        x = x * 10.0 ** draw(st.integers(lo, hi))
    else:
        x = x * 10.0 ** torch.randint(lo, hi + 1, shape, generator=gen).to(torch.float64)
    return x.to(dtype)


@st.composite
def updates(draw, dtypes=tuple(DTYPES), min_size=1):  # an empty update is refused (own test)
    n = draw(st.integers(min_size, 5))
    return {f"m{i // 2}.t{i}": draw(tensors(dtypes)) for i in range(n)}


# Largest margin for updates of up to 10^6 elements per layer: the float32 row pass's error bound.
MAX_MARGIN = margin((ROW + 4) * U32 + 1e-9, output_roundoff(torch.float32), precise_error(10**6))

bounds = st.integers(-30, 30).map(lambda e: 10.0**e) | st.floats(1e-3, 1e3)


def norm64(tensors_) -> float:
    return math.sqrt(math.fsum(float(t.double().pow(2).sum()) for t in tensors_))


def layer_norms64(update, layers=None) -> dict[str, float]:
    groups: dict[str, list[torch.Tensor]] = {}
    for name, t in update.items():
        groups.setdefault(name if layers is None else layers(name), []).append(t)
    return {h: norm64(ts) for h, ts in groups.items()}


def by_module(name: str) -> str:
    return name.split(".")[0]


clippers = st.one_of(
    bounds.map(GlobalClip),
    st.builds(
        PerLayerClip,
        bounds,
        allocation=st.sampled_from(["uniform", "dim"]),
        layers=st.sampled_from([None, by_module]),
        normalize=st.booleans(),
    ),
)


def check_within(clipper, out, stats) -> None:
    """Assert the privacy invariant: total <= bound and each layer <= its bound (float64).

    In normalize mode an update whose global norm is within the bound is left untouched (the
    reference code's behaviour), so the per-layer bounds only hold when it was rescaled.
    """
    assert norm64(out.values()) <= clipper.bound
    if isinstance(clipper, PerLayerClip) and (stats.clipped or not clipper.normalize):
        layer_bounds = clipper.layer_bounds(out)
        for h, n in layer_norms64(out, clipper.layers).items():
            assert n <= layer_bounds[h], (h, n, layer_bounds[h])


@given(clippers, updates())
def test_clip_output_within_bounds_and_input_untouched(clipper, update):
    before = {k: v.clone() for k, v in update.items()}
    out, stats = clipper.clip(update)
    check_within(clipper, out, stats)
    assert isinstance(stats, ClipStats)
    assert list(out) == list(update)
    for k, v in update.items():
        assert torch.equal(v, before[k]) and out[k].dtype == v.dtype and out[k].shape == v.shape
    assert math.isclose(stats.norm, norm64(update.values()), rel_tol=1e-5)


@given(clippers, updates())
def test_clip_in_place_matches_clip(clipper, update):
    out, stats = clipper.clip(update)
    stats_ = clipper.clip_(update)
    assert stats_ == stats
    for k in out:
        assert torch.equal(update[k], out[k])


@given(clippers, updates())
def test_clipping_is_idempotent(clipper, update):
    once, _ = clipper.clip(update)
    twice, stats = clipper.clip(once)
    assert not stats.clipped or clipper.normalize
    for k in once:
        assert torch.equal(once[k], twice[k])


@given(updates(), st.floats(1.0 + 1e-9, 100.0))
def test_update_within_global_bound_is_unchanged(update, factor):
    n = norm64(update.values())
    clipper = GlobalClip(n * factor if n > 0 else 1.0)
    out, stats = clipper.clip(update)
    assert not stats.clipped
    for k in update:
        assert torch.equal(out[k], update[k])


@given(updates(), st.floats(1.0 + 1e-9, 100.0), st.booleans())
def test_update_within_layer_bounds_is_unchanged(update, factor, normalize):
    norms = layer_norms64(update, by_module)
    if not norms:
        return
    explicit = {h: (n * factor if n > 0 else 1.0) for h, n in norms.items()}
    clipper = PerLayerClip.from_layer_bounds(explicit, layers=by_module, normalize=normalize)
    out, stats = clipper.clip(update)
    assert not stats.clipped
    for k in update:
        assert torch.equal(out[k], update[k])


@given(st.floats(1e-2, 1e4), st.sampled_from(["uniform", "dim"]), updates(min_size=1))
def test_normalize_mode_bounds_the_total_and_each_layer_only_when_rescaled(
    bound, allocation, update
):
    """What ``normalize=True`` guarantees, exactly (docs/privacy.md, "sensitivity"): the total
    is <= C always, which is the sensitivity the noise is calibrated to; an update whose total
    exceeds C is rescaled and then every layer is <= C_h; any other update is returned unchanged,
    so its layers are bounded by the total (<= C), not by C_h."""
    clipper = PerLayerClip(bound, allocation=allocation, normalize=True)
    out, stats = clipper.clip(update)
    assert norm64(out.values()) <= bound
    layer_bounds = clipper.layer_bounds(update)
    norms = layer_norms64(out)
    if stats.clipped:
        assert all(n <= layer_bounds[h] for h, n in norms.items()), norms
    else:
        assert all(torch.equal(out[k], update[k]) for k in update)
        assert all(n <= bound for n in norms.values())


def test_normalize_mode_leaves_a_layer_far_above_its_own_bound():
    """The witness: 100 layers (C_h = C/10), all of an update within C in one layer: returned
    as it is, 9 C_h in that layer. (docs/privacy.md once said every layer stays <= C_h "also
    with normalize=True"; the audit of issue 21 measured layers up to 754 C_h.)"""
    clipper = PerLayerClip(1.0, allocation="uniform", normalize=True)
    update = {f"t{i}": torch.zeros(4) for i in range(100)}
    update["t0"] = torch.full((4,), 0.45)  # norm 0.9 <= C = 1
    out, stats = clipper.clip(update)
    assert not stats.clipped and torch.equal(out["t0"], update["t0"])
    assert norm64([out["t0"]]) == pytest.approx(9 * clipper.layer_bounds(update)["t0"])


@given(
    bounds,
    st.sampled_from(["uniform", "dim"]),
    st.lists(st.integers(0, 50), min_size=1, max_size=8),
)
def test_layer_bounds_square_sum_to_bound(bound, allocation, sizes):
    update = {f"t{i}": torch.zeros(d) for i, d in enumerate(sizes)}
    lb = PerLayerClip(bound, allocation=allocation).layer_bounds(update)
    assert set(lb) == set(update)
    assert math.isclose(math.fsum(b * b for b in lb.values()), bound * bound, rel_tol=1e-12)
    if allocation == "dim" and sum(sizes) > 0:
        for i, d in enumerate(sizes):
            assert math.isclose(lb[f"t{i}"], bound * math.sqrt(d / sum(sizes)), rel_tol=1e-12)
    else:
        assert all(math.isclose(b, bound / math.sqrt(len(sizes))) for b in lb.values())


@given(
    st.floats(1e-2, 1e4),
    st.sampled_from(["uniform", "dim"]),
    updates(min_size=1),
)
def test_normalize_mode_sets_layer_norms_to_their_bounds(bound, allocation, update):
    """Tolerance: MAX_MARGIN plus two ulps of the output dtype (rounding toward zero)."""
    clipper = PerLayerClip(bound, allocation=allocation, normalize=True)
    out, stats = clipper.clip(update)
    before = norm64(update.values())
    check_within(clipper, out, stats)
    layer_bounds = clipper.layer_bounds(update)
    if before <= bound:
        assert not stats.clipped
        return
    assert stats.clipped
    for h, n_in in layer_norms64(update).items():
        n_out = norm64([out[h]])
        if n_in == 0:
            assert n_out == 0
        else:
            tol = MAX_MARGIN + 2 * torch.finfo(update[h].dtype).eps
            assert abs(n_out - layer_bounds[h]) <= tol * layer_bounds[h] + 1e-6, (h, n_out)


def reference_clip(update, clipper):
    """Float64 per-tensor reference: min-clip (or normalize) with exact norms, no margin."""
    names = list(update)
    x64 = {k: v.double() for k, v in update.items()}
    layers = getattr(clipper, "layers", None)
    if isinstance(clipper, GlobalClip):
        layer_of = dict.fromkeys(names, "__all__")
        lb = {"__all__": clipper.bound}
    else:
        layer_of = {k: (k if layers is None else layers(k)) for k in names}
        lb = clipper.layer_bounds(update)
    norms = {h: norm64([x64[k] for k in names if layer_of[k] == h]) for h in lb}
    total = norm64(x64.values())
    if getattr(clipper, "normalize", False):
        scale = {
            h: (lb[h] / n if total > clipper.bound and n > 0 else 1.0) for h, n in norms.items()
        }
    else:
        scale = {h: min(1.0, lb[h] / n) if n > 0 else 1.0 for h, n in norms.items()}
    return {k: x64[k] * scale[layer_of[k]] for k in names}, norms


@given(clippers, updates(dtypes=(torch.float32, torch.float64)))
def test_foreach_path_matches_float64_reference(clipper, update):
    """rtol 1e-4 covers MAX_MARGIN (1.6e-5) and float32 norm/rounding error."""
    out, stats = clipper.clip(update)
    ref, ref_norms = reference_clip(update, clipper)
    for k in update:
        assert torch.allclose(out[k].double(), ref[k], rtol=1e-4, atol=1e-40), k
    for h, n in ref_norms.items():
        assert math.isclose(stats.layer_norms[h], n, rel_tol=1e-5), h
    acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in update.items()}
    assert clipper.clip_and_accumulate_(update, acc) == stats
    for k in update:
        assert torch.allclose(acc[k], ref[k], rtol=1e-4, atol=1e-40), k


@given(clippers, updates(min_size=1), st.data())
def test_non_finite_values_raise_naming_the_tensor(clipper, update, data):
    name = data.draw(st.sampled_from([k for k, v in update.items() if v.numel() > 0] or [None]))
    if name is None:
        return
    bad = data.draw(st.sampled_from([math.inf, -math.inf, math.nan]))
    update[name].view(-1)[data.draw(st.integers(0, update[name].numel() - 1))] = bad
    before = {k: v.clone() for k, v in update.items()}
    acc = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in update.items()}
    for call in (clipper.clip, clipper.clip_, lambda u: clipper.clip_and_accumulate_(u, acc)):
        with pytest.raises(ValueError, match=name) as info:
            call(update)
        assert isinstance(info.value, NonFiniteUpdateError) and info.value.tensor == name
    for k in update:
        assert torch.equal(update[k].isnan(), before[k].isnan())
        assert torch.equal(update[k].nan_to_num(), before[k].nan_to_num())
        assert not acc[k].any()


def test_zero_and_zero_size_updates():
    for clipper in (GlobalClip(1.0), PerLayerClip(1.0), PerLayerClip(1.0, normalize=True)):
        zeros = {"a": torch.zeros(3), "b": torch.zeros(0)}
        out, stats = clipper.clip(zeros)
        assert not stats.clipped and stats.norm == 0.0
        assert all(torch.equal(out[k], zeros[k]) for k in zeros)


def test_infinite_bound_never_clips():
    update = {"a": torch.full((4,), 1e30), "b": torch.ones(2)}
    for clipper in (
        GlobalClip(math.inf),
        PerLayerClip(math.inf),
        PerLayerClip(math.inf, allocation="uniform"),
    ):
        out, stats = clipper.clip(update)
        assert clipper.sensitivity == math.inf and not stats.clipped
        assert all(torch.equal(out[k], update[k]) for k in update)


def test_global_clip_scales_to_bound():
    out, stats = GlobalClip(1.0).clip({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
    assert stats.norm == 5.0 and stats.clipped and stats.layer_norms == {"__all__": 5.0}
    assert math.isclose(norm64(out.values()), 1.0, rel_tol=MAX_MARGIN)
    assert math.isclose(float(out["a"]) / float(out["b"]), 0.75, rel_tol=1e-6)


def test_per_layer_grouping_by_callable():
    update = {"l1.weight": torch.ones(3), "l1.bias": torch.ones(1), "l2.weight": torch.ones(4)}
    clipper = PerLayerClip(2.0, allocation="dim", layers=by_module)
    lb = clipper.layer_bounds(update)
    assert set(lb) == {"l1", "l2"} and math.isclose(lb["l1"], lb["l2"])
    _, stats = clipper.clip(update)
    assert set(stats.layer_norms) == {"l1", "l2"} and stats.clipped
    assert all(math.isclose(n, 2.0, rel_tol=1e-6) for n in stats.layer_norms.values())


def test_explicit_bounds_validated_and_from_layer_bounds():
    clipper = PerLayerClip(5.0, allocation={"a": 3.0, "b": 4.0})
    assert clipper.layer_bounds({"a": torch.ones(1), "b": torch.ones(1)}) == {"a": 3.0, "b": 4.0}
    with pytest.raises(ValueError, match=r"sum\(C_h\^2\) = 25.0 vs bound\^2 = 36.0"):
        PerLayerClip(6.0, allocation={"a": 3.0, "b": 4.0})
    with pytest.raises(ValueError, match=r"allocation\['b'\]"):
        PerLayerClip(5.0, allocation={"a": 3.0, "b": -4.0})
    built = PerLayerClip.from_layer_bounds({"a": 3.0, "b": 4.0})
    assert built.bound == 5.0 and built.sensitivity == 5.0
    with pytest.raises(ValueError, match=r"layers without a bound \['c'\]"):
        built.clip({"a": torch.ones(1), "b": torch.ones(1), "c": torch.ones(1)})
    with pytest.raises(ValueError, match=r"without a tensor in the update \['b'\]"):
        built.clip({"a": torch.ones(1)})


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_invalid_bound_names_parameter(bad):
    for make in (GlobalClip, PerLayerClip):
        with pytest.raises(ValueError, match="bound"):
            make(bad)


def test_invalid_inputs_name_the_culprit():
    with pytest.raises(ValueError, match="allocation"):
        PerLayerClip(1.0, allocation="layerwise")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'w'"):
        GlobalClip(1.0).clip({"w": torch.ones(2, dtype=torch.int64)})
    with pytest.raises(ValueError, match="accumulator has no entry for update tensor 'w'"):
        GlobalClip(1.0).clip_and_accumulate_({"w": torch.ones(2)}, {})
    with pytest.raises(ValueError, match="'w' has shape"):
        GlobalClip(1.0).clip_and_accumulate_({"w": torch.ones(2)}, {"w": torch.zeros(3)})


_LAYERS_SCRIPT = """
import json
from dpfl.clip import PerLayerClip
from dpfl.adaptive_clip import AdaptiveClip

def by_module(name):
    return name.split(".")[0]

def by_parent(name):
    return name.rsplit(".", 1)[0]

print(json.dumps(PerLayerClip(1.0, layers=by_module).config()))
print(json.dumps(PerLayerClip(1.0, layers=by_parent).config()))
print(json.dumps(PerLayerClip(1.0, layers=lambda name: name).config()))
print(json.dumps(AdaptiveClip(PerLayerClip(1.0, layers=by_module), count_noise_multiplier=1.0).config()))
print(repr(PerLayerClip(1.0, layers=by_module)))
"""


def test_a_layers_function_has_the_same_config_in_every_process() -> None:
    """The config() is the clipper's configuration in checkpoints: a resume in a new process with
    the same ``layers=`` function must match it (an object address would not), and a function of
    another name must not. Functions are named by module and qualified name only (issue 23: no
    digest of bytecode, which changes between Python versions), so every lambda of a module is
    ``<lambda>``: give a resumable run a named function."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.run([sys.executable, "-c", _LAYERS_SCRIPT], env=env, capture_output=True,
                           text=True, check=True).stdout.splitlines() for _ in range(2)]
    assert runs[0] == runs[1]
    assert len(runs[0]) == 5 and " at 0x" not in "".join(runs[0])
    configs = [json.loads(line) for line in runs[0][:4]]
    assert [c["layers"] for c in configs[:3]] == [
        "__main__.by_module", "__main__.by_parent", "__main__.<lambda>"
    ]
    assert configs[3]["clipper"] == configs[0] and configs[0]["version"] == 1
    assert "layers=__main__.by_module" in runs[0][4]


@pytest.mark.parametrize("clipper", [GlobalClip(1.0), PerLayerClip(1.0)], ids=["global", "per-layer"])
def test_an_empty_update_is_refused_by_every_entry_point(clipper) -> None:  # type: ignore[no-untyped-def]
    """Issue 21 p19: ``clip({})`` used to return ``{}`` with norm 0, silently; an empty update is
    a caller's mistake (no model), refused with a ValueError that names it."""
    for call in (lambda: clipper.clip({}), lambda: clipper.clip_({}),
                 lambda: clipper.clip_and_accumulate_({}, {})):  # fmt: skip
        with pytest.raises(ValueError, match="update is empty"):
            call()
