"""Computations run chunk by chunk along the token axis (passes/token_chunks.py).

diffusers' forward chunking (``enable_forward_chunking`` / ``set_chunk_feed_forward``) and
memory-saving research code run a feed-forward, or an attention's queries, over pieces of the
sequence and concatenate the results. When every operator of the piece's computation is row-wise
along the cut axis, the pieces joined are the computation on the whole sequence: the pass
replaces them with it, and a sparse step after a dense step equals the model for any active set.
A computation that mixes rows of its piece (a softmax over the cut axis) keeps its chunks, which
the analysis refuses by name (or, with ``on_unsupported="fallback"``, runs as the model does).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ras_compile import RASPolicy, UnsupportedModelError, explain, ras_compile
from ras_compile.passes.token_chunks import join_token_chunks
from ras_compile.tiny_models import example_inputs, tiny_pixart_transformer, tiny_sd3_transformer
from sparse_checks import assert_sparse_after_dense_equals_the_model, compiled_once, random_active_sets

aten = torch.ops.aten
C, D, HEADS, H, W, P = 4, 16, 2, 8, 8, 2
N = (H // P) * (W // P)
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


class ChunkedDiT(nn.Module):
    """A DiT whose feed-forward (``ff``: linear, GELU, linear; ``geglu``: a gated one that chunks its
    own features) or attention queries (``queries``) run over four pieces of the token axis."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.embed = nn.Conv2d(C, D, P, stride=P)
        self.qkv = nn.Linear(D, 3 * D)
        self.norm = nn.LayerNorm(D)
        self.up = nn.Linear(D, 4 * D if mode == "geglu" else 2 * D)
        self.down = nn.Linear(2 * D, D)
        self.out = nn.Linear(D, P * P * C)

    def _ff(self, x):
        if self.mode == "geglu":
            value, gate = self.up(x).chunk(2, dim=-1)
            return self.down(value * F.gelu(gate))
        return self.down(F.gelu(self.up(self.norm(x)), approximate="tanh"))

    def forward(self, latent, timestep):
        b = latent.shape[0]
        x = self.embed(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
        q, k, v = (t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        if self.mode == "queries":
            attn = torch.cat([F.scaled_dot_product_attention(part, k, v) for part in q.chunk(4, dim=2)], dim=2)
        else:
            attn = F.scaled_dot_product_attention(q, k, v)
        x = x + attn.transpose(1, 2).flatten(2)
        if self.mode == "mixing":  # a softmax over each piece's tokens: the pieces are not row-wise
            x = x + torch.cat([self.up(p).softmax(dim=1)[..., :D] for p in x.chunk(2, dim=1)], dim=1)
        else:
            x = x + torch.cat([self._ff(p) for p in x.chunk(4, dim=1)], dim=1)
        out = self.out(x).view(b, H // P, W // P, P, P, C)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, C, H, W)


def _model(mode: str) -> ChunkedDiT:
    torch.manual_seed(0)
    return ChunkedDiT(mode).eval()


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(latent=torch.randn(2, C, H, W, generator=g), timestep=torch.tensor([500.0, 300.0]))


def _only_the_unpatchify_is_dense(analysis) -> bool:
    """Whether the one value read densely is the output's unpatchify (as in every model)."""
    reasons = analysis.densify_reasons.values()
    return all(r.startswith("the token grid's axes are reordered") for r in reasons) and len(reasons) <= 1


@pytest.mark.parametrize("mode", ["ff", "geglu", "queries"])
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_sparse_step_after_dense_step_equals_the_model(mode, data):
    model, ras = compiled_once((__name__, mode), lambda: _model(mode), POLICY)
    assert_sparse_after_dense_equals_the_model(model, ras, _inputs(data.draw(st.integers(0, 3))),
                                               random_active_sets(data, N))


@pytest.mark.parametrize("mode", ["ff", "geglu", "queries"])
def test_the_chunked_model_runs_token_sparse(mode):
    analysis = ras_compile(_model(mode), POLICY, backend=None).ras_analysis(**_inputs())
    assert analysis.num_tokens == N and len(analysis.attention) == 1
    assert _only_the_unpatchify_is_dense(analysis)


def test_explain_reports_the_joined_pieces_with_their_line():
    text = str(explain(_model("ff"), _inputs(), POLICY, verbose=False))
    assert "piecewise computations joined (1): cat" in text and "4 pieces along axis 1" in text
    assert "test_token_chunks.py:" in text and "x.chunk(4, dim=1)" in text, text


def test_a_computation_that_mixes_the_rows_of_its_piece_keeps_its_chunks_and_is_refused():
    model = _model("mixing")
    with pytest.raises(UnsupportedModelError) as info:
        ras_compile(model, POLICY, backend=None).ras_analysis(**_inputs())
    assert info.value.op == "aten.chunk.default" and "cuts through the image tokens" in str(info.value)
    ras = ras_compile(model, RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=(), on_unsupported="fallback"),
                      backend=None)
    with pytest.warns(UserWarning):
        ras(**_inputs())
    for step in range(1, 4):  # the fallback runs the model as it is
        kw = _inputs(step)
        kw["timestep"] = kw["timestep"] * (1 - step / 4)
        with torch.no_grad():
            torch.testing.assert_close(ras(**kw), model(**kw), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the rewrite on its own


def _program(fn, *args):
    class Wrap(nn.Module):
        def forward(self, *a):
            return fn(*a)
    return torch.export.export(Wrap(), args, strict=False)


def _count(program, packet) -> int:
    return sum(1 for n in program.graph_module.graph.nodes
               if getattr(n.target, "overloadpacket", None) is packet)


_WEIGHT, _BIAS, _GATED = torch.randn(6, 5), torch.randn(6), torch.randn(10, 5)


def _linear_gelu(x):
    return torch.cat([F.gelu(F.linear(p, _WEIGHT, _BIAS)) * 2 for p in x.chunk(3, dim=1)], dim=1)


def _split_sizes(x):
    return torch.cat([F.layer_norm(p, (5,)).relu() for p in x.split([2, 4, 3], dim=1)], dim=1)


def _gated(x):
    def ff(p):
        a, g = F.linear(p, _GATED).chunk(2, -1)
        return a * F.silu(g)
    return torch.cat([ff(p) for p in x.chunk(3, dim=1)], dim=1)


def _queries(x):
    q = x.unsqueeze(1)
    return torch.cat([F.scaled_dot_product_attention(p, q, q) for p in q.chunk(3, dim=2)], dim=2)


def _hand_written(x):  # a hand-written RMSNorm, weights applied with @, a softmax over the features
    def ff(p):
        p = p * torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (p @ _GATED.T).softmax(-1) @ _GATED
    return torch.cat([ff(p) for p in x.chunk(3, dim=1)], dim=1)


def _queries_with_mask_rows(x):  # each query chunk reads its own rows of a [L, S] mask
    q = x.unsqueeze(1)
    mask = (torch.arange(9)[:, None] - torch.arange(9)[None, :]).abs() <= 3
    return torch.cat([F.scaled_dot_product_attention(p, q, q, attn_mask=m)
                      for p, m in zip(q.chunk(3, dim=2), mask.view(1, 1, 9, 9).chunk(3, dim=2))], dim=2)


@pytest.mark.parametrize("fn", [_linear_gelu, _split_sizes, _gated, _queries, _hand_written, _queries_with_mask_rows])
def test_row_wise_pieces_joined_are_one_computation_with_the_same_values(fn):
    x = torch.randn(2, 9, 5)
    program = _program(fn, x)
    assert len(join_token_chunks(program.graph_module)) == 1
    assert _count(program, aten.cat) == 0
    assert _count(program, aten.chunk) + _count(program, aten.split) + _count(program, aten.split_with_sizes) \
        == (1 if fn is _gated else 0)  # the gate's own chunk over the features stays
    torch.testing.assert_close(program.module()(x), fn(x))


def _mixing(x):
    return torch.cat([p.softmax(dim=1) for p in x.chunk(3, dim=1)], dim=1)


def _different(x):
    a, b, c = x.chunk(3, dim=1)
    return torch.cat([a.relu(), b.relu(), c.sigmoid()], dim=1)


def _out_of_order(x):
    a, b, c = x.chunk(3, dim=1)
    return torch.cat([b.relu(), a.relu(), c.relu()], dim=1)


def _read_elsewhere(x):
    pieces = [p.relu() for p in x.chunk(3, dim=1)]
    return torch.cat(pieces, dim=1), pieces[0].sum()


def _other_axis(x):
    return torch.cat([p.relu() for p in x.chunk(3, dim=1)], dim=2)


def _other_chunks(x):
    a = [p.relu() for p in x.chunk(3, dim=1)]
    b = [p.relu() for p in (x * 2).chunk(3, dim=1)]
    return torch.cat([a[0], b[1], a[2]], dim=1)


def _norm_over_tokens(x):  # a mean over each piece's rows
    return torch.cat([p - p.mean(1, keepdim=True) for p in x.chunk(3, dim=1)], dim=1)


def _unbound(x):  # the pieces' rows taken apart along another axis and stacked: no row-wise operator
    return torch.cat([torch.stack([u.relu() for u in p.unbind(1)], 1) for p in x.chunk(3, dim=2)], dim=2)


def _causal_queries(x):  # is_causal aligns the mask to each piece: not the mask over the whole
    q = x.unsqueeze(1)
    return torch.cat([F.scaled_dot_product_attention(p, q, q, is_causal=True) for p in q.chunk(3, dim=2)], dim=2)


@pytest.mark.parametrize("fn", [_mixing, _different, _out_of_order, _read_elsewhere, _other_axis, _other_chunks,
                                _causal_queries, _unbound, _norm_over_tokens])
def test_pieces_that_are_not_one_row_wise_computation_are_left_alone(fn):
    x = torch.randn(2, 9, 5)
    program = _program(fn, x)
    assert join_token_chunks(program.graph_module) == []
    torch.testing.assert_close(program.module()(x), fn(x))


# --------------------------------------------------------------------------- diffusers' forward chunking


@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_diffusers_feed_forward_chunking_runs_token_sparse(family):
    build = tiny_pixart_transformer if family == "pixart" else tiny_sd3_transformer
    model = build(num_layers=1, num_attention_heads=2, attention_head_dim=8, patch_size=2, sample_size=8, seed=0)
    for block in model.transformer_blocks:
        block.set_chunk_feed_forward(4, dim=1)
    kw = example_inputs(model, batch=2, height=8, width=8, seed=0, text_len=7)
    ras = ras_compile(model, POLICY, backend=None)
    analysis = ras.ras_analysis(**kw)
    assert analysis.num_tokens == 16 and _only_the_unpatchify_is_dense(analysis)
    torch.manual_seed(1)
    for _ in range(3):
        index = torch.stack([torch.randperm(16)[:5].sort().values for _ in range(2)])
        assert_sparse_after_dense_equals_the_model(model, ras, kw, index)


# --------------------------------------------------------------------------- attention over slices of the batch


def _sliced_attention(q, k, v, m):  # SlicedAttnProcessor: heads folded into the batch, two slices at a time
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    for s in range(0, q.shape[0], 2):
        scores = torch.baddbmm(m[s:s + 2], q[s:s + 2], k[s:s + 2].transpose(1, 2), beta=1, alpha=0.5)
        out[s:s + 2] = torch.bmm(scores.softmax(-1), v[s:s + 2])
    return out


def _sliced_with_a_gap(q, k, v, m):
    return torch.cat([F.scaled_dot_product_attention(q[s:s + 2], k[s:s + 2], v[s:s + 2]) for s in (0, 3)])


def _sliced_keys_not_cut(q, k, v, m):  # every slice of queries attends to the first slice's keys
    return torch.cat([F.scaled_dot_product_attention(q[s:s + 2], k[:2], v[:2]) for s in (0, 2, 4)])


def _sliced_out_of_order(q, k, v, m):
    return torch.cat([F.scaled_dot_product_attention(q[s:s + 2], k[s:s + 2], v[s:s + 2]) for s in (2, 0, 4)])


def _rewritten(fn, *args):
    """``fn`` exported and rewritten as the capture does before joining (buffer writes, attention)."""
    from ras_compile.passes.attention_pattern import recognise_attention
    from ras_compile.passes.buffer_writes import concatenate_buffer_writes

    program = _program(fn, *args)
    concatenate_buffer_writes(program.graph_module)
    recognise_attention(program.graph_module)
    return program


@pytest.mark.parametrize("cut", [(slice(None, -4), slice(-4, None)), (slice(0, 5), slice(-4, 100))])
def test_slices_from_the_end_are_read_as_python_reads_them(cut):
    def halves(x):
        return torch.cat([F.linear(x[:, c], _WEIGHT, _BIAS).relu() for c in cut], dim=1)

    x = torch.randn(2, 9, 5)
    program = _program(halves, x)
    assert len(join_token_chunks(program.graph_module)) == 1
    torch.testing.assert_close(program.module()(x), halves(x))


def test_slices_that_overlap_from_the_end_are_left_alone():
    def overlapping(x):
        return torch.cat([x[:, :-2].relu(), x[:, -5:].relu()], dim=1)

    x = torch.randn(2, 9, 5)
    program = _program(overlapping, x)
    assert join_token_chunks(program.graph_module) == []
    torch.testing.assert_close(program.module()(x), overlapping(x))


def test_attention_over_slices_of_the_batch_is_one_attention_over_the_batch():
    q, k, v, m = torch.randn(6, 5, 4), torch.randn(6, 7, 4), torch.randn(6, 7, 3), torch.randn(6, 1, 7)
    program = _rewritten(_sliced_attention, q, k, v, m)
    assert len(join_token_chunks(program.graph_module)) == 1
    assert _count(program, aten.scaled_dot_product_attention) == 1 and _count(program, aten.slice) == 0
    torch.testing.assert_close(program.module()(q, k, v, m), _sliced_attention(q, k, v, m))


@pytest.mark.parametrize("fn", [_sliced_with_a_gap, _sliced_keys_not_cut, _sliced_out_of_order])
def test_slices_that_do_not_take_the_batch_apart_in_order_are_left_alone(fn):
    q, k, v, m = torch.randn(6, 5, 4), torch.randn(6, 7, 4), torch.randn(6, 7, 3), torch.randn(6, 1, 7)
    program = _rewritten(fn, q, k, v, m)
    assert join_token_chunks(program.graph_module) == []
    torch.testing.assert_close(program.module()(q, k, v, m), fn(q, k, v, m))


def test_diffusers_sliced_attention_processor_runs_token_sparse():
    from diffusers.models.attention_processor import SlicedAttnProcessor

    model = tiny_pixart_transformer(num_layers=1, num_attention_heads=2, attention_head_dim=8, patch_size=2,
                                    sample_size=8, seed=0)
    model.set_attn_processor(SlicedAttnProcessor(slice_size=1))
    kw = example_inputs(model, batch=2, height=8, width=8, seed=0, text_len=7)
    ras = ras_compile(model, POLICY, backend=None)
    analysis = ras.ras_analysis(**kw)
    assert analysis.num_tokens == 16 and len(analysis.attention) == 1 and _only_the_unpatchify_is_dense(analysis)
    torch.manual_seed(2)
    for _ in range(3):
        index = torch.stack([torch.randperm(16)[:6].sort().values for _ in range(2)])
        assert_sparse_after_dense_equals_the_model(model, ras, kw, index)


def test_pieces_that_each_draw_their_own_noise_are_left_alone():
    def noisy(x):
        return torch.cat([p + torch.rand(1, 1, 5) for p in x.chunk(3, dim=1)], dim=1)

    program = _program(noisy, torch.randn(2, 9, 5))
    assert join_token_chunks(program.graph_module) == []
