"""Conformance over every diffusers transformer family we can build small (tests/conformance_models.py).

For each supported family: ratio 1.0 equals the dense model over a sampling loop (the CPU
default graph), and a sparse step right after a dense step equals the dense output for
random active sets (with the K/V projections fused into their cache writes, the graph a
CUDA device runs).
For each refused family: the refusal names what the pass cannot handle. The pass has
no per-family code: these families exercise only the generic rules.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance_models import BASE_FAMILY_NAMES, FAMILIES
from ras_compile import RASPolicy, UnsupportedModelError, ras_compile

# family -> (node or op named in the refusal, words of the reason)
REFUSED = {
    "hidream": (None, "torch.export could not capture"),  # MoE dispatch reads expert counts on the host
    # newer classes (conformance_image / _video / _audio)
    "nucleus_moe": ("aten.gather.default", "moves values between image tokens"),  # expert-choice routing: top-k over tokens
    "joyimage_edit": (None, "which no grid rule covers"),  # the reference frame rotated to the front (slice + cat)
    "kandinsky6_sr": ("flex_attention", "flex_attention with a block mask or a score function"),  # NABLA mask
    "wan_animate2": (None, "is a WanAnimate2KVCache object"),  # its reference K/V cache, a Python object
    "stable_audio3_p2": (None, "reaches no scaled_dot_product_attention"),  # patch-1 tokens merged by a reshape
    # plain-PyTorch research DiTs (conformance_plain_*)
    "plain_moe_expert_choice": ("aten.gather.default", "moves values between image tokens"),  # experts pick tokens
    "plain_udit": (None, "reaches no scaled_dot_product_attention"),  # sub-maps folded into the batch by parity
}
SUPPORTED = [name for name in FAMILIES if name not in REFUSED]
# The step cache and stale-token continuation act outside the graph, on the model's output structure:
# they run on the families of conformance_models (tuples, output objects, several output leaves, 1D to
# 5D latents); the newer families' modules run the graph properties only, to keep CI under its limit.
OUTSIDE_THE_GRAPH = [name for name in SUPPORTED if name in BASE_FAMILY_NAMES]
BATCH = 2

_modules: dict[str, tuple] = {}


def _prediction(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):  # plain-PyTorch models return the prediction itself
        return out
    if isinstance(out, dict):  # or a dict of outputs, the prediction first
        return next(iter(out.values()))
    out = out[0] if isinstance(out, tuple) else out.sample
    return torch.stack(out) if isinstance(out, list) else out  # per-sample outputs (Z-Image), as a batch


def _compiled(name: str, ratio: float, fuse: bool | str):
    """One compiled module per family and setting, shared by the examples (capture once)."""
    key = (name, ratio, fuse)
    if key not in _modules:
        family = FAMILIES[name]
        model = family.build(0)
        policy = RASPolicy(sample_ratio=ratio, warmup_steps=1, reset_steps=(3,))
        _modules[key] = (family, model, ras_compile(model, policy, backend=None, latent_arg=family.latent_arg,
                                                    fuse_kv_projection=fuse))
    return _modules[key]


def _euler_step(latent: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """``latent - 0.2 * prediction`` over the dims they share (the prediction may have fewer
    channels than the latent, e.g. ConsisID's conditioning channels, or more, e.g. a learned variance)."""
    if isinstance(latent, list):  # per-sample latents (Z-Image)
        return [_euler_step(x, p) for x, p in zip(latent, prediction.unbind(0))]
    overlap = tuple(slice(0, min(a, b)) for a, b in zip(latent.shape, prediction.shape))
    delta = torch.zeros_like(latent)
    delta[overlap] = prediction[overlap]
    return latent - 0.2 * delta


def _timestep(t0, step: int, steps: int):
    """A monotonic schedule in the family's own timestep convention (int or float, any scale)."""
    scale = 1.0 - step / (steps + 1)
    if isinstance(t0, torch.Tensor):
        return (t0.double() * scale).to(t0.dtype) if t0.is_floating_point() else (t0 * scale).round().to(t0.dtype)
    return t0 * scale


@pytest.mark.parametrize("name", SUPPORTED)
def test_ratio_one_equals_the_dense_model_over_a_loop(name):
    family, model, ras = _compiled(name, 1.0, "auto")  # the CPU default: K/V projections unfused
    kwargs = family.inputs(model, BATCH, 0)
    latent_arg = family.latent_arg
    dense_latent = ras_latent = kwargs[latent_arg]
    t_arg = family.timestep_arg
    t0 = kwargs[t_arg]
    steps = 5
    with torch.no_grad():
        for i in range(steps):
            t = _timestep(t0, i, steps)
            want = _prediction(model(**dict(kwargs, **{latent_arg: dense_latent, t_arg: t})))
            got = _prediction(ras(**dict(kwargs, **{latent_arg: ras_latent, t_arg: t})))
            torch.testing.assert_close(got, want, rtol=family.tolerance[0], atol=family.tolerance[1])
            dense_latent = _euler_step(dense_latent, want)
            ras_latent = _euler_step(ras_latent, got)
    modes = [s.mode for s in ras.ras_controller.stats]
    assert modes == ["dense", "sparse", "sparse", "dense", "sparse"], modes


@pytest.mark.parametrize("name", OUTSIDE_THE_GRAPH)
def test_ratio_one_with_a_step_cache_equals_the_dense_model_with_extrapolated_steps(name):
    """Every output leaf of a predicted step is the line through the last two computed steps' leaves,
    in the model's own output structure; computed steps equal the model."""
    import torch.utils._pytree as pytree

    family = FAMILIES[name]
    model = family.build(0)
    policy = RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=(), step_cache_interval=2)
    ras = ras_compile(model, policy, backend=None, latent_arg=family.latent_arg)
    kwargs = family.inputs(model, BATCH, 0)
    latent_arg, t_arg = family.latent_arg, family.timestep_arg
    latent, t0, steps, computed = kwargs[latent_arg], kwargs[t_arg], 5, []
    with torch.no_grad():
        for i in range(steps):
            call = dict(kwargs, **{latent_arg: latent, t_arg: _timestep(t0, i, steps)})
            got = ras(**call)
            if policy.is_predicted_step(i):
                (s0, a), (s1, b) = computed[-2:]
                want = pytree.tree_map(lambda x, y: y + (y - x) * (i - s1) / (s1 - s0)
                                       if isinstance(y, torch.Tensor) and y.is_floating_point() else y, a, b)
            else:
                want = model(**call)
                computed.append((i, want))
            assert type(got) is type(want)
            got_leaves, want_leaves = pytree.tree_leaves(got), pytree.tree_leaves(want)
            assert len(got_leaves) == len(want_leaves)
            for g, w in zip(got_leaves, want_leaves):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
            latent = _euler_step(latent, _prediction(got))
    assert [s.mode for s in ras.ras_controller.stats] == ["dense", "sparse", "predicted", "sparse", "predicted"]


@pytest.mark.parametrize("name", OUTSIDE_THE_GRAPH)
def test_continued_stale_tokens_move_by_their_last_change(name):
    """After two dense steps, a sparse step with stale_token_order=1 returns, for the tokens it leaves out,
    their value at the second dense step plus its change from the first; for the others what the default
    (the paper's) sparse step computes. Compared token by token in the cut the scores use
    (``prediction_patches``, a reshuffle of the prediction tested in test_patches.py), not through the
    element-to-token map the runtime builds."""
    from ras_compile.runtime import prediction_patches

    family = FAMILIES[name]
    model = family.build(0)
    kwargs = family.inputs(model, BATCH, 0)
    t_arg, n = family.timestep_arg, family.num_tokens
    g = torch.Generator().manual_seed(3)
    index = torch.stack([torch.randperm(n, generator=g)[: max(1, n // 3)].sort().values for _ in range(BATCH)])
    outs = {}
    for order in (0, 1):
        ras = ras_compile(model, RASPolicy(sample_ratio=0.5, warmup_steps=2, reset_steps=(), stale_token_order=order),
                          backend=None, latent_arg=family.latent_arg)
        outs[order] = []
        for i in range(3):
            if i == 2:
                ras.ras_controller.override_next_step("sparse", index)
            outs[order].append(_prediction(ras(**dict(kwargs, **{t_arg: _timestep(kwargs[t_arg], i, 3)}))))
    d0, d1, plain = outs[0]
    assert torch.equal(outs[1][0], d0) and torch.equal(outs[1][1], d1)
    analysis = ras.ras_analysis(**kwargs)
    got, moved, fresh = (prediction_patches(x, analysis) for x in (outs[1][2], 2 * d1 - d0, plain))
    active = torch.zeros(BATCH, n, dtype=torch.bool).scatter_(1, index, True)[:, :, None, None]
    torch.testing.assert_close(got, torch.where(active, fresh, moved), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SUPPORTED)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_sparse_step_after_dense_step_equals_dense_for_random_active_sets(name, data):
    # K/V projections fused with their cache writes, as on CUDA (on CPU the fused ops run their ATen
    # reference): the graph a GPU runs, checked for every family; test_fused_projection.py checks that
    # fusing changes no value, on representative families
    family, model, ras = _compiled(name, 0.5, True)
    kwargs = family.inputs(model, BATCH, data.draw(st.integers(0, 3), label="seed"))
    n = family.num_tokens
    ras.ras_controller.reset()
    dense = _prediction(ras(**kwargs))
    with torch.no_grad():  # the model itself: a fused op that erred alike on both steps would pass a self-comparison
        want = _prediction(model(**kwargs))
    rtol, atol = family.tolerance
    torch.testing.assert_close(dense, want, rtol=rtol, atol=atol)
    k = data.draw(st.integers(1, n), label="k")
    rows = [sorted(data.draw(st.permutations(range(n)), label="perm")[:k]) for _ in range(BATCH)]
    ras.ras_controller.override_next_step("sparse", torch.tensor(rows))
    sparse = _prediction(ras(**kwargs))
    assert ras.ras_controller.stats[-1].mode == "sparse"
    torch.testing.assert_close(sparse, want, rtol=max(rtol, 1e-4), atol=atol)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_families_say_why(name, capfd):
    family = FAMILIES[name]
    model = family.build(0)
    ras = ras_compile(model, RASPolicy(), backend=None, latent_arg=family.latent_arg)
    with pytest.raises(UnsupportedModelError) as info:
        ras(**family.inputs(model, BATCH, 0))
    op, words = REFUSED[name]
    assert words in str(info.value)
    if op is not None:
        assert info.value.op == op and info.value.node
    assert "def forward" not in capfd.readouterr().err  # no partial-graph dump from a failed export


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_families_fall_back_to_the_dense_model(name):
    family = FAMILIES[name]
    model = family.build(0)
    ras = ras_compile(model, RASPolicy(on_unsupported="fallback"), backend=None, latent_arg=family.latent_arg)
    kwargs = family.inputs(model, BATCH, 0)
    with pytest.warns(UserWarning, match="Running the dense compiled model instead"):
        got = ras(**kwargs)
    with torch.no_grad():  # flex attention has no backward on CPU
        want = model(**kwargs)
    got, want = got[0], want[0]
    if isinstance(want, list):  # per-sample outputs (Z-Image)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    else:
        torch.testing.assert_close(got, want)
    assert ras.ras_controller.stats[-1].mode == "fallback"
