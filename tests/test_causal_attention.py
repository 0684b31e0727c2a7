"""Causal attention over image tokens (passes/causal_mask.py): ``is_causal=True`` becomes an explicit
lower-triangular mask whose query rows are gathered with the active tokens, so a sparse step keeps
each active query's own causal row (with ``is_causal`` the k active rows would read as positions
0..k-1). A causal attention that does not read the image tokens (a text encoder in the forward)
keeps ``is_causal``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ras_compile import RASPolicy, explain
from sparse_checks import (assert_ratio_one_loop_equals_the_model, assert_sparse_after_dense_equals_the_model,
                           compiled_once, random_active_sets)

C, D, HEADS, H, W, P, T = 4, 16, 2, 8, 12, 2, 5
N = (H // P) * (W // P)
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


class CausalDiT(nn.Module):
    """An autoregressive-order DiT: every block's attention is causal over the raster order of the
    patches; a causal text encoder runs on the prompt and is read by cross-attention."""

    def __init__(self, depth: int = 2):
        super().__init__()
        self.embed = nn.Conv2d(C, D, P, stride=P)
        self.text_qkv = nn.Linear(D, 3 * D)
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(depth))
        self.cross_q = nn.ModuleList(nn.Linear(D, D) for _ in range(depth))
        self.out = nn.Linear(D, P * P * C)

    @staticmethod
    def heads(t):
        return t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2)

    def forward(self, latent, timestep, text):
        b = latent.shape[0]
        q, k, v = self.text_qkv(text).chunk(3, -1)
        text = text + F.scaled_dot_product_attention(self.heads(q), self.heads(k), self.heads(v),
                                                     is_causal=True).transpose(1, 2).flatten(2)
        x = self.embed(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
        for qkv, cross_q in zip(self.qkv, self.cross_q):
            q, k, v = (self.heads(t) for t in qkv(x).chunk(3, -1))
            x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
            x = x + F.scaled_dot_product_attention(self.heads(cross_q(x)), self.heads(text),
                                                   self.heads(text)).transpose(1, 2).flatten(2)
        x = self.out(x).view(b, H // P, W // P, P, P, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, C, H, W)


def _model() -> CausalDiT:
    torch.manual_seed(0)
    return CausalDiT().eval()


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(latent=torch.randn(2, C, H, W, generator=g), timestep=torch.tensor([500.0, 300.0]),
                text=torch.randn(2, T, D, generator=g))




@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_a_sparse_step_after_a_dense_step_keeps_each_query_its_causal_row(data):
    model, ras = compiled_once(__name__, _model, POLICY)
    assert_sparse_after_dense_equals_the_model(model, ras, _inputs(data.draw(st.integers(0, 3))),
                                               random_active_sets(data, N))


def test_ratio_one_equals_the_model_over_a_compiled_loop():
    assert_ratio_one_loop_equals_the_model(_model(), lambda step: _inputs(step))


def test_image_attention_gets_the_explicit_mask_and_the_text_encoder_keeps_is_causal():
    import torch.fx as fx

    from ras_compile.passes.causal_mask import lower_causal_attention

    kw = _inputs()
    program = torch.export.export(_model(), (), kw, strict=False)
    gm = program.graph_module
    latent = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "latent")
    sdpa = [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    lowered = lower_causal_attention(gm, latent)
    assert lowered == [sdpa[1].name, sdpa[3].name]  # the image self-attentions; not the text encoder's
    causal = [n.name for n in sdpa if n.kwargs.get("is_causal", len(n.args) > 5 and n.args[5])]
    assert causal == [sdpa[0].name]
    assert all(isinstance(sdpa[i].args[3], fx.Node) and sdpa[i].args[3].target is torch.ops.aten.tril.default
               for i in (1, 3))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(**kw), _model()(**kw))  # the same function
    ex = explain(_model(), kw, POLICY, verbose=False)
    assert len(ex.attention_cached_kv) == 2 and len(ex.cross_attention) == 2
    assert ex.flop_fraction < 0.7
