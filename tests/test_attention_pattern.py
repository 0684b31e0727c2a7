"""Hand-written attention (passes/attention_pattern.py) goes through the pass like SDPA.

Models that write ``softmax(q k^T) v`` out by hand (timm's non-fused path, einsum with a
mask, heads folded into the batch axis, a learned bias over query and key axes, one
K/V head broadcast over the query heads, diffusers' classic ``AttnProcessor``, in-place updates
of the scores as MDT writes them) are rewritten to one SDPA node whose K/V are
cached; the properties are the ones SDPA models keep: the dense graph equals the model,
a sparse step right after a dense step equals it for any active set.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

from plain_dits import HAND_WRITTEN_ATTENTION, PlainDiT
from ras_compile import RASPolicy, UnsupportedModelError, explain, ras_compile
from ras_compile.passes.attention_pattern import recognise_attention

aten = torch.ops.aten
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


def _sparse_after_dense(model, inputs: dict, index: torch.Tensor):
    ras = ras_compile(model, POLICY, backend="aot_eager")
    dense = ras(**inputs)
    ras.ras_controller.override_next_step("sparse", index)
    return ras, dense, ras(**inputs)


def _export(fn: torch.nn.Module, *args) -> fx.GraphModule:
    return torch.export.export(fn, args, strict=False).graph_module


def _targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("form", HAND_WRITTEN_ATTENTION)
def test_each_hand_written_form_becomes_cached_attention_and_keeps_dense_equivalence(form):
    torch.manual_seed(0)
    model = PlainDiT(attention=form, depth=2).eval()
    x, t = torch.randn(2, 4, 8, 12), torch.full((2,), 999.0)
    ras = ras_compile(model, POLICY, backend="aot_eager")
    analysis = ras.ras_analysis(x, t)
    assert len(analysis.recognised_attention) == 2
    assert len(analysis.attention) == 2 and analysis.counts["attention_cached_kv"] == 2
    assert {r.sdpa for r in analysis.recognised_attention} == set(analysis.attention)
    dense = ras(x, t)
    torch.testing.assert_close(dense, model(x, t), rtol=1e-5, atol=1e-5)
    ras.ras_controller.override_next_step("sparse", torch.tensor([[0, 5, 6, 23], [1, 2, 17, 20]]))
    torch.testing.assert_close(ras(x, t), dense, rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(form=st.sampled_from(HAND_WRITTEN_ATTENTION), batch=st.integers(1, 3), data=st.data())
def test_sparse_step_after_dense_equals_dense_for_any_active_set(form, batch, data):
    torch.manual_seed(1)
    model = PlainDiT(attention=form, depth=2, heads=2).eval()
    x, t = torch.randn(batch, 4, 8, 8), torch.full((batch,), 500.0)
    k = data.draw(st.integers(1, 16), label="k")
    rows = [data.draw(st.permutations(range(16)), label="order")[:k] for _ in range(batch)]
    _, dense, sparse = _sparse_after_dense(model, dict(hidden_states=x, timestep=t), torch.tensor(rows))
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_diffusers_classic_attention_processor_is_supported():
    """diffusers' AttnProcessor: baddbmm(empty, q, k^T, beta=0, alpha=scale), softmax, bmm,
    with heads folded into the batch axis ([B * H, N, d])."""
    from diffusers import DiTTransformer2DModel
    from diffusers.models.attention_processor import AttnProcessor

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    for module in model.modules():
        if hasattr(module, "set_processor"):
            module.set_processor(AttnProcessor())
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.full((2,), 400),
                  class_labels=torch.tensor([1, 7]), return_dict=False)
    ras, dense, sparse = _sparse_after_dense(model, inputs, torch.tensor([[0, 3, 9], [2, 4, 15]]))
    analysis = ras.ras_analysis(**inputs)
    assert [r.scores for r in analysis.recognised_attention] == ["baddbmm", "baddbmm_1"]
    assert all(abs(r.scale - 8 ** -0.5) < 1e-12 for r in analysis.recognised_attention)
    torch.testing.assert_close(dense[0], model(**inputs)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-5, atol=1e-5)


def test_unprojected_self_attention_mixer_is_recognised_too():
    model = PlainDiT(token_mixer="manual_attention", depth=2)
    x, t = torch.randn(2, 4, 8, 12), torch.full((2,), 999.0)
    ras, dense, sparse = _sparse_after_dense(model, dict(hidden_states=x, timestep=t),
                                             torch.tensor([[1, 2, 3], [4, 20, 23]]))
    assert len(ras.ras_analysis(x, t).recognised_attention) == 2
    torch.testing.assert_close(dense, model(x, t))
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_explain_reports_the_recognised_attention():
    model = PlainDiT(attention="timm", depth=1)
    report = explain(model, dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.ones(2)), verbose=False)
    text = str(report)
    assert "hand-written attention recognised (1)" in text
    assert "matmul -> softmax -> matmul_1 as scaled_dot_product_attention" in text


# -- the rewrite itself, on small graphs -------------------------------------------------------

class _Scores(torch.nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, q, k, v, m):
        return self.body(q, k, v, m)


def _rewrite(body, *args):
    gm = _export(_Scores(body), *args)
    found = recognise_attention(gm)
    return gm, found


QKV = (torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6))


def _in_place_bias(q, k, v, m):
    attn = q @ k.transpose(-2, -1) * 0.5
    attn += m
    return attn.softmax(-1) @ v


def _in_place_scale_and_fill(q, k, v, m):
    attn = q @ k.transpose(-2, -1)
    attn.mul_(0.5)
    attn.masked_fill_(m < -1, -1e9)
    return attn.softmax(-1) @ v


def _in_place_on_scores_read_elsewhere(q, k, v, m):
    scores = q @ k.transpose(-2, -1)
    seen = scores * 1.0  # the scores before the update, read outside the chain
    scores += m
    return scores.softmax(-1) @ v + seen.mean()


@pytest.mark.parametrize("name,body,scale,mask", [
    ("in-place bias", _in_place_bias, 0.5, "additive"),
    ("in-place scale and fill", _in_place_scale_and_fill, 0.5, "boolean"),
    ("scaled after", lambda q, k, v, m: ((q @ k.transpose(-1, -2)) * 0.5).softmax(-1) @ v, 0.5, None),
    ("divided, two factors", lambda q, k, v, m: (q @ k.transpose(-2, -1) / 4.0 * 3.0).softmax(-1) @ v, 0.75, None),
    ("constant shift ignored", lambda q, k, v, m: (q @ k.transpose(-2, -1) + 2.0).softmax(-1) @ v, 1.0, None),
    ("additive mask", lambda q, k, v, m: (q @ k.transpose(-2, -1) + m).softmax(-1) @ v, 1.0, "additive"),
    ("mask first", lambda q, k, v, m: (m + q @ k.transpose(-2, -1)).softmax(-1) @ v, 1.0, "additive"),
    ("finite fill", lambda q, k, v, m: (q @ k.transpose(-2, -1)).masked_fill(m < -1, -1e9).softmax(-1) @ v,
     1.0, "boolean"),
    ("dtype softmax", lambda q, k, v, m: torch.softmax(q @ k.transpose(-2, -1), -1, dtype=torch.float32) @ v,
     1.0, None),
    ("softmax cast back with type_as", lambda q, k, v, m: (q @ k.transpose(-2, -1)).float().softmax(-1).type_as(q) @ v,
     1.0, None),
    # a tensor scale constant over the keys (a learned per-head logit scale, here per query) scales the queries
    ("tensor scale per query", lambda q, k, v, m: ((q @ k.transpose(-2, -1)) * m[..., :1].exp()).softmax(-1) @ v,
     1.0, None),
    ("channels first", lambda q, k, v, m: torch.einsum("bhts,bhcs->bhct", torch.einsum(
        "bhct,bhcs->bhts", q.transpose(-2, -1), k.transpose(-2, -1)).softmax(-1), v.transpose(-2, -1))
     .transpose(-2, -1), 1.0, None),
    ("channels first, values first", lambda q, k, v, m: torch.einsum("bhcs,bhts->bhtc", v.transpose(-2, -1),
                                                                     torch.einsum("bhtc,bhcs->bhts", q, k.transpose(
                                                                         -2, -1)).softmax(-1)), 1.0, None),
    ("tensor scale then bias", lambda q, k, v, m: (torch.einsum("bhnd,bhmd->bhnm", q, k) / m[..., :1].exp() * 0.5
                                                   + m).softmax(-1) @ v, 0.5, "additive"),
])
def test_rewrite_matches_the_hand_written_function(name, body, scale, mask):
    m = torch.randn(1, 1, 5, 7)
    gm, found = _rewrite(body, *QKV, m)
    assert len(found) == 1, name
    assert found[0].scale == pytest.approx(scale) and found[0].mask == mask
    targets = _targets(gm)
    assert aten.scaled_dot_product_attention.default in targets
    assert not {aten.softmax.int, aten._softmax.default, aten.matmul.default} & set(targets)
    torch.testing.assert_close(gm(*QKV, m)[0], body(*QKV, m), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,body", [
    ("attention maps also returned",
     lambda q, k, v, m: (lambda p: (p @ v, p))((q @ k.transpose(-2, -1)).softmax(-1))),
    ("softmax over the query axis", lambda q, k, v, m: (q @ q.transpose(-2, -1)).softmax(-2) @ q),
    ("tensor-valued scale", lambda q, k, v, m: ((q @ k.transpose(-2, -1)) * m).softmax(-1) @ v),
    ("two additive masks", lambda q, k, v, m: (q @ k.transpose(-2, -1) + m + m * 2).softmax(-1) @ v),
    # the scale applies to the bias too: softmax((q k^T + m) c) is no SDPA with mask m and scale c
    ("bias scaled after", lambda q, k, v, m: ((q @ k.transpose(-2, -1) + m) * 0.5).softmax(-1) @ v),
    ("bias scaled by a tensor after", lambda q, k, v, m: ((q @ k.transpose(-2, -1) + m) * m[..., :1]).softmax(-1) @ v),
    ("probabilities changed", lambda q, k, v, m: ((q @ k.transpose(-2, -1)).softmax(-1) * 2) @ v),
    ("mild fill", lambda q, k, v, m: (q @ k.transpose(-2, -1)).masked_fill(m < -1, -5.0).softmax(-1) @ v),
    ("no softmax", lambda q, k, v, m: (q @ k.transpose(-2, -1)) @ v),
    ("probabilities on the right", lambda q, k, v, m: v.transpose(-2, -1) @ (k @ q.transpose(-2, -1)).softmax(-1)),
    ("in-place update of scores read elsewhere", _in_place_on_scores_read_elsewhere),
])
def test_what_is_not_exactly_attention_is_left_alone(name, body):
    m = torch.randn(1, 1, 5, 7)
    gm, found = _rewrite(body, *QKV, m)
    assert found == [], name
    assert aten.scaled_dot_product_attention.default not in _targets(gm)


def _folded(q, k, v):
    return (t.reshape(-1, *t.shape[-2:]) for t in (q, k, v))


def _viewed_fill(q, k, v, m):  # a key padding mask [B, 1, 1, S] applied in the unfolded view
    fq, fk, fv = _folded(q, k, v)
    scores = torch.bmm(fq, fk.transpose(1, 2)).view(*q.shape[:2], q.shape[2], k.shape[2])
    scores = scores.masked_fill(m[:, :1, :1] < -1, float("-inf")) * 0.5
    return torch.bmm(scores.view(-1, q.shape[2], k.shape[2]).softmax(-1), fv).view(*q.shape[:3], v.shape[-1])


def _viewed_bias_both_sides(q, k, v, m):  # scores viewed for the bias, probabilities viewed back before the bmm
    fq, fk, fv = _folded(q, k, v)
    scores = (torch.bmm(fq, fk.transpose(1, 2)) * 0.25).view(*q.shape[:2], q.shape[2], k.shape[2]) + m
    probs = scores.softmax(-1).view(-1, q.shape[2], k.shape[2])
    return torch.bmm(probs, fv)


@pytest.mark.parametrize("name,body,scale,mask", [
    ("viewed fill", _viewed_fill, 0.5, "boolean"),
    ("viewed bias, both sides", _viewed_bias_both_sides, 0.25, "additive"),
])
def test_views_of_the_scores_leading_axes_carry_the_mask_with_them(name, body, scale, mask):
    q, k, v = (torch.cat([t, t * 0.5]) for t in QKV)  # batch 4
    m = torch.randn(4, 3, 5, 7)
    gm, found = _rewrite(body, q, k, v, m)
    assert len(found) == 1, name
    assert found[0].scale == pytest.approx(scale) and found[0].mask == mask
    assert not {aten.softmax.int, aten._softmax.default, aten.bmm.default} & set(_targets(gm))
    torch.testing.assert_close(gm(q, k, v, m)[0], body(q, k, v, m), rtol=1e-5, atol=1e-6)


def _viewed_scale_per_head(q, k, v, m):  # a tensor factor in the view: left alone (it would need the view)
    fq, fk, fv = _folded(q, k, v)
    scores = torch.bmm(fq, fk.transpose(1, 2)).view(*q.shape[:2], q.shape[2], k.shape[2]) * m[..., :1]
    return torch.bmm(scores.view(-1, q.shape[2], k.shape[2]).softmax(-1), fv)


def _viewed_rows_merged(q, k, v, m):  # a view that merges the query axis: no longer [.., L, S]
    fq, fk, fv = _folded(q, k, v)
    scores = torch.bmm(fq, fk.transpose(1, 2)).view(-1, k.shape[2]).softmax(-1)
    return torch.bmm(scores.view(-1, q.shape[2], k.shape[2]), fv)


@pytest.mark.parametrize("body", [_viewed_scale_per_head, _viewed_rows_merged])
def test_views_that_the_sdpa_cannot_carry_are_left_alone(body):
    q, k, v = (torch.cat([t, t * 0.5]) for t in QKV)
    m = torch.randn(4, 3, 5, 7)
    gm, found = _rewrite(body, q, k, v, m)
    assert found == []
    torch.testing.assert_close(gm(q, k, v, m)[0], body(q, k, v, m))


def test_a_token_mixer_that_is_no_attention_is_still_refused_with_its_node():
    ras = ras_compile(PlainDiT(token_mixer="gram"), RASPolicy(), backend=None)
    with pytest.raises(UnsupportedModelError) as info:
        ras(torch.randn(1, 4, 8, 8), torch.full((1,), 999.0))
    assert info.value.op == "aten.matmul.default" and "two token axes" in str(info.value)
    assert "scaled_dot_product_attention" in str(info.value)


def test_one_kv_head_broadcast_over_the_query_heads_is_expanded_into_the_sdpa():
    """Multi-query attention written with matmul's broadcasting (K/V ``[b, 1, n, d]``): the
    SDPA reads K and V expanded to every query head, and computes the same function."""
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 1, 7, 4), torch.randn(2, 1, 7, 6)
    body = lambda q, k, v, m: ((q @ k.transpose(-2, -1)) * 0.5 + m).softmax(-1) @ v  # noqa: E731
    m = torch.randn(1, 1, 5, 7)
    gm, found = _rewrite(body, q, k, v, m)
    assert len(found) == 1 and found[0].mask == "additive"
    sdpa = next(n for n in gm.graph.nodes if n.target == aten.scaled_dot_product_attention.default)
    for operand in sdpa.args[1:3]:
        assert operand.target == aten.expand.default and tuple(operand.meta["val"].shape[:2]) == (2, 3)
    torch.testing.assert_close(gm(q, k, v, m)[0], body(q, k, v, m), rtol=1e-5, atol=1e-6)


def test_queries_that_broadcast_against_the_keys_are_left_alone():
    """The output's batch axes must be the queries': one query head against three K/V heads
    is no attention of those queries."""
    q, k, v = torch.randn(2, 1, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6)
    gm, found = _rewrite(lambda q, k, v, m: (q @ k.transpose(-2, -1)).softmax(-1) @ v, q, k, v, torch.zeros(1))
    assert found == [] and aten.scaled_dot_product_attention.default not in _targets(gm)
