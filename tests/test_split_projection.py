"""Packed q/k/v projections split into one per part (passes/split_projection.py), so the fused K/V
projection can write K and V straight into their caches: the same values, one linear per part, and
only projections whose parts reach attention over cached K/V."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conformance_models import FAMILIES
from ras_compile import RASPolicy, explain, ras_compile
from ras_compile.passes import token_ops

C, P, D, HEADS = 4, 2, 16, 2
FORMS = ("unbind", "select", "split", "float_then_select", "columns_split", "columns_chunk")
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


class PackedDiT(nn.Module):
    """timm-style attention, ``qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)``, the parts taken
    in ``form``; and a cross-attention to text whose packed ``kv`` projection of the text stays whole."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.embed = nn.Conv2d(C, D, P, stride=P)
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.q, self.kv = nn.Linear(D, D), nn.Linear(D, 2 * D)
        self.proj = nn.Linear(D, P * P * C)

    def forward(self, hidden_states, timestep, text):
        b, c, h, w = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2) * (timestep.reshape(-1, 1, 1) / 1000.0)
        n = x.shape[1]
        qkv = self.qkv(x).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        if self.form.startswith("columns"):  # diffusers' fused processors: the features cut directly
            parts = torch.split(self.qkv(x), D, dim=-1) if self.form == "columns_split" else self.qkv(x).chunk(3, -1)
            q, k, v = (t.reshape(b, n, HEADS, D // HEADS).transpose(1, 2) for t in parts)
        elif self.form == "unbind":
            q, k, v = qkv.unbind(0)
        elif self.form == "select":
            q, k, v = qkv[0], qkv[1], qkv[2]
        elif self.form == "split":
            q, k, v = (t.squeeze(0) for t in qkv.split(1, dim=0))
        else:
            qkv = qkv.float()
            q, k, v = qkv[0], qkv[1], qkv[2]
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, D))
        kv = self.kv(text).reshape(b, -1, 2, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        q = self.q(x).reshape(b, n, HEADS, D // HEADS).transpose(1, 2)
        x = x + F.scaled_dot_product_attention(q, kv[0], kv[1]).transpose(1, 2).reshape(b, n, D)
        x = self.proj(x).reshape(b, h // P, w // P, P, P, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, C, 8, 12, generator=g), timestep=torch.tensor([999.0, 500.0]),
                text=torch.randn(2, 5, D, generator=g))


def _model(form: str) -> PackedDiT:
    torch.manual_seed(0)
    return PackedDiT(form).eval()


@pytest.mark.parametrize("form", FORMS)
def test_the_packed_projection_of_cached_attention_splits_and_k_v_fuse(form):
    ras = ras_compile(_model(form), POLICY, backend=None, fuse_kv_projection=True)
    captured = ras.ras_capture(**_inputs())
    fused = captured.analysis.fused_projections
    assert len(fused) == 2  # K and V of the self-attention; the text's packed kv stays one linear
    linears = [n for n in captured.sparse.graph.nodes if n.op == "call_function"
               and n.target in (torch.ops.aten.linear.default, token_ops.project_into_cache_)]
    assert sum(n.target is token_ops.project_into_cache_ for n in linears) == 2
    assert len(linears) == 2 + 1 + 1 + 1 + 1 + 1  # K, V fused; Q; out; cross q; text kv; proj


@pytest.mark.parametrize("form", FORMS)
def test_split_and_fused_steps_equal_the_model_and_the_unfused_sparse_step(form):
    model = _model(form)
    kw = _inputs(1)
    results = []
    for fuse in (False, True):
        ras = ras_compile(model, POLICY, backend=None, fuse_kv_projection=fuse)
        dense = ras(**kw)
        ras.ras_controller.override_next_step("sparse", torch.tensor([[0, 3, 7, 20], [1, 2, 11, 23]]))
        moved = dict(kw, hidden_states=kw["hidden_states"] + 0.5, timestep=torch.tensor([900.0, 400.0]))
        results.append((dense, ras(**moved)))
    with torch.no_grad():
        torch.testing.assert_close(results[1][0], model(**kw), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-5)


def test_explain_counts_the_split_projections_as_fusible_on_cuda():
    text = str(explain(_model("unbind"), _inputs(), POLICY, verbose=False))
    assert "K/V projections fused with the cache write on CUDA: 2 of 2" in text


def test_diffusers_fused_qkv_projections_split_again_for_the_cache_writes():
    """``fuse_qkv_projections()`` packs SD3's to_q / to_k / to_v into one to_qkv (and the context's into
    to_added_qkv); the image part's K and V still fuse with their cache writes."""
    family = FAMILIES["sd3"]
    model = family.build(0)
    kw = family.inputs(model, 2, 0)
    before = explain(model, kw, POLICY, verbose=False).fusible_projections
    model.fuse_qkv_projections()
    after = explain(model, kw, POLICY, verbose=False).fusible_projections
    assert len(after) == len(before) == 4
    ras = ras_compile(model, POLICY, backend=None, fuse_kv_projection=True)
    dense = ras(**kw)
    ras.ras_controller.override_next_step("sparse", torch.tensor([[0, 5, 9], [2, 3, 15]]))
    with torch.no_grad():
        want = model(**kw)[0]
    torch.testing.assert_close(dense[0], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ras(**kw)[0], want, rtol=1e-4, atol=1e-5)
