"""The token stream picked up again after a densified operator (ras_compile/passes/stream_reentry.py).

``RollDiT`` shifts its ``[B, h, w, D]`` token grid with ``torch.roll`` before a feed-forward and
shifts it back after (Swin's shifted windows, without the windows). A roll of the grid's axes moves values
between tokens, so the grid is densified there and the roll runs on the full grid; its output is the residual stream
from then on, and before the pick-up everything after the first roll (both feed-forwards, the
second block's attention) ran on every token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ras_compile import RASPolicy, explain, ras_compile
from ras_compile.passes import stream_reentry
from sparse_checks import (assert_ratio_one_loop_equals_the_model, assert_sparse_after_dense_equals_the_model,
                           random_active_sets)

C, D, HEADS, H, W, P = 4, 16, 2, 8, 12, 2
GH, GW = H // P, W // P
N = GH * GW
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


class RollDiT(nn.Module):
    def __init__(self, depth: int = 2, conv_at_end: bool = False):
        super().__init__()
        self.conv_at_end = conv_at_end
        self.embed = nn.Conv2d(C, D, P, stride=P)
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(depth))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
                                 for _ in range(depth))
        self.smooth = nn.Conv2d(D, D, 3, padding=1, groups=D)
        self.out = nn.Linear(D, P * P * C)

    def forward(self, latent, timestep):
        b = latent.shape[0]
        x = self.embed(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
        for qkv, mlp in zip(self.qkv, self.mlp):
            q, k, v = qkv(x).reshape(b, N, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
            x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, N, D)
            g = torch.roll(x.view(b, GH, GW, D), shifts=(1, 2), dims=(1, 2))
            g = g + mlp(g)
            x = torch.roll(g, shifts=(-1, -2), dims=(1, 2)).reshape(b, N, D)
        if self.conv_at_end:  # a depthwise convolution on the grid, then straight to the unpatchify
            x = self.smooth(x.transpose(1, 2).reshape(b, D, GH, GW)).flatten(2).transpose(1, 2)
        x = self.out(x).view(b, GH, GW, P, P, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, C, H, W)


def _model(**kwargs) -> RollDiT:
    torch.manual_seed(0)
    return RollDiT(**kwargs).eval()


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(latent=torch.randn(2, C, H, W, generator=g), timestep=torch.tensor([900.0, 300.0]))


def test_the_stream_is_picked_up_after_each_roll(monkeypatch):
    model, kw = _model(), _inputs()
    analysis = ras_compile(model, POLICY, backend=None).ras_analysis(**kw)
    assert analysis.side_sources == ["roll", "roll_1", "roll_2", "roll_3"]
    assert len(analysis.attention) == 2  # the second block's attention reads cached K/V too
    picked = explain(model, kw, POLICY, verbose=False)
    monkeypatch.setattr(stream_reentry, "pick_up_stream", lambda gm, analysis, rerun: analysis)
    ended = explain(model, kw, POLICY, verbose=False)
    assert len(ended.attention_cached_kv) == 1
    assert picked.flop_fraction < ended.flop_fraction - 0.2


@settings(max_examples=8, deadline=None)
@given(st.data())
def test_sparse_step_after_dense_step_equals_the_model_for_random_active_sets(data):
    model, kw = _model(), _inputs()
    index = random_active_sets(data, N)
    assert_sparse_after_dense_equals_the_model(model, ras_compile(model, POLICY, backend=None), kw, index)


def test_ratio_one_equals_the_model_over_a_compiled_loop():
    model = _model()
    assert_ratio_one_loop_equals_the_model(model, _inputs)


def test_an_output_that_runs_nothing_more_on_the_active_rows_is_not_picked_up():
    """One block, then a depthwise convolution on the grid before the unpatchify: picking the stream
    up after the roll back would only densify it again at that convolution (a gather and a scatter
    for nothing), so the roll back's output stays dense; the first roll's is picked up."""
    model, kw = _model(depth=1, conv_at_end=True), _inputs()
    ras = ras_compile(model, POLICY, backend=None)
    analysis = ras.ras_analysis(**kw)
    assert analysis.side_sources == ["roll"]
    assert_sparse_after_dense_equals_the_model(model, ras, kw, torch.tensor([[1, 4, 9], [0, 2, 23]]))
