"""The fused K/V projection (passes/fuse_projection.py): "linear on the active rows, then
scatter into the cache" becomes one ``ras_compile.linear_scatter_`` op (with a per-head
q/k-norm on K: ``ras_compile.linear_norm_scatter_``), and nothing changes.

On CPU the op runs its ATen reference, so fusing must give exactly the unfused values;
the Triton kernel's own numerics are checked in test_kernels.py.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance_models import FAMILIES
from families import Case, flow_sigmas, prediction_of, timestep_for
from ras_compile import RASPolicy, ras_compile
from ras_compile.passes import token_ops
from test_conformance import _euler_step, _prediction, _timestep

BATCH = 2
# Fusing must change no value. test_conformance.py runs every family's random sparse steps with the
# fusion forced on; here the fused and unfused graphs are compared bit for bit on families that cover
# the forms fusion meets: self / joint / dual-stream attention, K/V behind q/k-norms or RoPE, video and
# audio tokens, windows, tokens flattened to [B*N, D], masked or flattened cross-attention.
REPRESENTATIVE = ["dit", "sd3", "sd35", "flux", "cogvideox", "auraflow", "wan", "hunyuan_video", "ltx2",
                  "stable_audio", "plain_swin_window", "plain_moe_topk_flat", "plain_fit", "plain_pixart_controlnet"]
_modules: dict = {}


def _pair(name: str):
    """The family compiled without and with fusion (backend None: the rewritten graphs run as they are)."""
    if name not in _modules:
        family = FAMILIES[name]
        model = family.build(0)
        policy = RASPolicy(sample_ratio=0.5)
        _modules[name] = (family, model, *(ras_compile(model, policy, backend=None, latent_arg=family.latent_arg,
                                                       fuse_kv_projection=fuse) for fuse in (False, True)))
    return _modules[name]


@pytest.mark.parametrize("name", REPRESENTATIVE)
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fused_sparse_step_equals_the_unfused_one_and_the_dense_output(name, data):
    family, model, plain, fused = _pair(name)
    assert fused.ras_analysis(**family.inputs(model, BATCH, 0)).fused_projections  # the family fuses something
    kwargs = family.inputs(model, BATCH, data.draw(st.integers(0, 3), label="seed"))
    n = family.num_tokens
    k = data.draw(st.integers(1, n), label="k")
    index = torch.tensor([sorted(data.draw(st.permutations(range(n)), label="perm")[:k]) for _ in range(BATCH)])
    results = []
    for ras in (plain, fused):
        ras.ras_controller.reset()
        dense = _prediction(ras(**kwargs))
        ras.ras_controller.override_next_step("sparse", index)
        results.append((dense, _prediction(ras(**kwargs))))
    (dense, unfused), (dense_f, sparse_f) = results
    torch.testing.assert_close(dense_f, dense, rtol=0, atol=0)
    torch.testing.assert_close(sparse_f, unfused, rtol=0, atol=0)
    torch.testing.assert_close(sparse_f, dense, rtol=1e-4, atol=1e-5)


def _ops(graph_module, target) -> int:
    return sum(1 for n in graph_module.graph.nodes if n.op == "call_function" and n.target is target)


@pytest.mark.parametrize("name,fused,norms,caches", [
    ("dit", 4, 0, 4),        # self-attention: K and V of every layer
    ("sd3", 4, 0, 4),        # joint attention: the image projections, joined with fresh text rows
    ("sd35", 6, 3, 6),       # + diffusers' RMSNorm on K (decomposed in the graph), also in the attn2 layer
    ("cogvideox", 4, 2, 4),  # nn.LayerNorm on K (aten.layer_norm)
    ("auraflow", 4, 2, 4),   # FP32LayerNorm on K: layer_norm on an fp32 copy, cast back
    ("flux", 2, 0, 4),       # K goes through RMSNorm and then RoPE: only V is fused
    ("sana", 0, 0, 0),       # linear attention: no K/V cache at all
    # PixArt-Sigma's qkv(x).reshape(B, N, 3, C).unbind(2), then .to(dtype): export's metadata assertion
    # on the cast's input is no second reader
    ("plain_pixart_sigma_kvc", 4, 0, 4),
])
def test_which_projections_fuse_and_the_sparse_graph_calls_the_op_instead_of_a_scatter(name, fused, norms, caches):
    family, model, plain, ras = _pair(name)
    kwargs = family.inputs(model, BATCH, 0)
    ras(**kwargs)
    analysis = ras.ras_analysis(**kwargs)
    assert len(analysis.fused_projections) == fused
    assert sum(c.kind in ("key", "value") for c in analysis.caches) == caches
    assert analysis.counts["kv_projections_fused"] == fused
    assert analysis.counts["kv_norms_fused"] == norms
    assert all(f.norm is None or f.cache.endswith("_key") for f in analysis.fused_projections)
    sparse = ras.ras_capture(**kwargs).sparse
    unfused = plain.ras_capture(**kwargs).sparse
    assert _ops(sparse, token_ops.project_into_cache_) == fused - norms
    assert _ops(sparse, token_ops.project_norm_into_cache_) == norms
    assert _ops(sparse, token_ops.scatter_tokens_) == _ops(unfused, token_ops.scatter_tokens_) - fused
    if norms:  # the sparse graph computes no norm statistics for the fused K paths
        assert _ops(sparse, torch.ops.aten.rsqrt.default) + _ops(sparse, torch.ops.aten.layer_norm.default) < \
            _ops(unfused, torch.ops.aten.rsqrt.default) + _ops(unfused, torch.ops.aten.layer_norm.default)
    for site in analysis.caches:  # a fused cache lives in the projection's [B, L, D] layout
        if any(f.cache == site.name for f in analysis.fused_projections):
            assert (site.layout.batch_dim, site.layout.token_dim, len(site.shape)) == (0, 1, 3)


def test_auto_fuses_only_on_cuda():
    family, model, _, _ = _pair("dit")
    ras = ras_compile(model, RASPolicy(), backend=None)  # fuse_kv_projection="auto", CPU tensors
    kwargs = family.inputs(model, BATCH, 0)
    ras(**kwargs)
    assert ras.ras_analysis(**kwargs).fused_projections == []


def test_bad_fuse_option_is_refused():
    with pytest.raises(ValueError, match="fuse_kv_projection='yes'"):
        ras_compile(torch.nn.Linear(2, 2), RASPolicy(), fuse_kv_projection="yes")


def test_fused_whole_loop_through_dynamo_equals_the_unfused_loop():
    case = Case("sd3", layers=2, heads=2, head_dim=8, patch=2, height=8, width=12, batch=2)
    model = case.build()
    policy = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=(4,))
    kwargs = case.inputs(model)
    sigmas = flow_sigmas(6)
    latents = []
    for fuse in (False, True):
        ras = ras_compile(model, policy, backend="aot_eager", fuse_kv_projection=fuse)
        latent = kwargs["hidden_states"]
        for i in range(6):
            t = timestep_for(sigmas[i], case.batch)
            latent = latent + (sigmas[i + 1] - sigmas[i]) * prediction_of(ras(**dict(kwargs, hidden_states=latent,
                                                                                      timestep=t)))
        assert [s.mode for s in ras.ras_controller.stats].count("sparse") == 4
        latents.append(latent)
    torch.testing.assert_close(latents[1], latents[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- q/k-norm in the epilogue, compiled

QK_NORM = ["sd35", "cogvideox", "auraflow"]
_compiled: dict = {}


def _aot(name: str, ratio: float):
    """The family compiled with aot_eager and fusion forced on (the ATen reference of the fused ops on CPU)."""
    key = (name, ratio)
    if key not in _compiled:
        family = FAMILIES[name]
        model = family.build(0)
        policy = RASPolicy(sample_ratio=ratio, warmup_steps=1, reset_steps=(3,))
        _compiled[key] = (family, model, ras_compile(model, policy, backend="aot_eager", latent_arg=family.latent_arg,
                                                     fuse_kv_projection=True))
    return _compiled[key]


@pytest.mark.parametrize("name", QK_NORM)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_normed_k_fused_sparse_step_after_dense_returns_the_dense_output_under_aot_eager(name, data):
    family, model, ras = _aot(name, 0.5)
    kwargs = family.inputs(model, BATCH, data.draw(st.integers(0, 3), label="seed"))
    n = family.num_tokens
    k = data.draw(st.integers(1, n), label="k")
    index = torch.tensor([sorted(data.draw(st.permutations(range(n)), label="perm")[:k]) for _ in range(BATCH)])
    ras.ras_controller.reset()
    dense = _prediction(ras(**kwargs))
    ras.ras_controller.override_next_step("sparse", index)
    sparse = _prediction(ras(**kwargs))
    assert ras.ras_controller.stats[-1].mode == "sparse"
    assert ras.ras_analysis(**kwargs).counts["kv_norms_fused"] > 0
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", QK_NORM)
def test_normed_k_fused_ratio_one_equals_the_dense_model_under_aot_eager(name):
    family, model, ras = _aot(name, 1.0)
    kwargs = family.inputs(model, BATCH, 0)
    latent, t_arg = family.latent_arg, family.timestep_arg
    dense_latent = ras_latent = kwargs[latent]
    with torch.no_grad():
        for step in range(3):
            t = _timestep(kwargs[t_arg], step, 3)
            want = _prediction(model(**dict(kwargs, **{latent: dense_latent, t_arg: t})))
            got = _prediction(ras(**dict(kwargs, **{latent: ras_latent, t_arg: t})))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            dense_latent, ras_latent = _euler_step(dense_latent, want), _euler_step(ras_latent, got)
    assert [s.mode for s in ras.ras_controller.stats] == ["dense", "sparse", "sparse"]
    assert ras.ras_analysis(**kwargs).counts["kv_norms_fused"] > 0


def test_explain_counts_the_fused_norms():
    from ras_compile import explain

    family = FAMILIES["sd35"]
    model = family.build(0)
    result = explain(model, family.inputs(model, BATCH, 0), latent_arg=family.latent_arg, verbose=False)
    assert len(result.fusible_projections) == 6 and len(result.fused_norms) == 3
    assert "per-head norm in the epilogue: 3" in str(result)


@pytest.mark.parametrize("name", QK_NORM)
def test_dense_graph_fills_normed_k_caches_as_a_full_sparse_write_does(name):
    """The dense graph fills a fused K cache by copying the norm's output through the
    layout chain's views: the caches hold what the sparse graph's fused op writes with
    every token active (the projection layout, normalised heads)."""
    from ras_compile.capture import call_arguments

    family, model, _, ras = _pair(name)
    kwargs = family.inputs(model, BATCH, 1)
    ras(**kwargs)
    cap = ras.ras_capture(**kwargs)
    inputs = cap.graph_inputs(call_arguments(ras._signature, (), dict(kwargs)))
    fresh = lambda: [torch.full(c.shape, float("nan"), dtype=c.dtype) for c in cap.analysis.caches]  # noqa: E731
    dense_caches, sparse_caches = fresh(), fresh()
    with torch.no_grad():
        cap.dense(*inputs, *dense_caches)
        everyone = torch.arange(family.num_tokens).expand(BATCH, -1).contiguous()
        cap.sparse(*inputs, everyone, *sparse_caches)
    normed = {f.cache for f in cap.analysis.fused_projections if f.norm is not None}
    assert normed
    for site, d, s in zip(cap.analysis.caches, dense_caches, sparse_caches):
        if site.name in normed:
            assert not d.isnan().any()
            torch.testing.assert_close(d, s, rtol=1e-5, atol=1e-6, msg=lambda m: f"{site.name}: {m}")
