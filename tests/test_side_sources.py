"""Side branches gathered where they start (ras_compile/passes/side_sources.py).

``PerTokenTimestepDiT`` conditions every token on its own timestep, as LTX-Video's
image-to-video conditioning does: ``timestep [B, N] -> flatten -> sinusoidal embedding ->
MLP -> view [B, N, 6 D]``, then per-block shift / scale / gate. Gathered where it meets the
stream, the MLP ran on all ``N`` rows every sparse step; gathered at the timestep input, it
runs on the active rows, and the step is exactly what it was.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ras_compile.passes.token_axis as ta
from ras_compile import RASPolicy, explain, ras_compile
from ras_compile.passes import side_sources
from ras_compile.passes.latent_grid import TokenGrid
from sparse_checks import (assert_ratio_one_loop_equals_the_model, assert_sparse_after_dense_equals_the_model,
                           random_active_sets)

C, D, HEADS, N, TEXT = 4, 16, 2, 24, 5
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


def _sinusoid(t: torch.Tensor, dim: int = 16) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    arg = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


class PerTokenTimestepDiT(nn.Module):
    def __init__(self, pooled: bool = False, depth: int = 2):
        super().__init__()
        self.pooled = pooled  # (a timestep of B * N rows is taken as given: already flattened)
        self.inp = nn.Linear(C, D)
        self.t_mlp = nn.Sequential(nn.Linear(16, D), nn.SiLU(), nn.Linear(D, 6 * D))
        self.pool = nn.Linear(D, D)
        self.norms = nn.ModuleList(nn.LayerNorm(D, elementwise_affine=False) for _ in range(depth))
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(depth))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
                                 for _ in range(depth))
        self.table = nn.Parameter(torch.randn(6, D) / D)
        self.out = nn.Linear(D, C)

    def forward(self, hidden_states, timestep):
        b, n, _ = hidden_states.shape
        x = self.inp(hidden_states)
        temb = self.t_mlp(_sinusoid(timestep.flatten() if timestep.dim() == 2 else timestep)).view(b, n, 6 * D)
        if self.pooled:  # the per-token embedding also averaged over the tokens: that reading mixes tokens
            x = x + self.pool(temb[..., :D].mean(dim=1, keepdim=True))
        for norm, qkv, mlp in zip(self.norms, self.qkv, self.mlp):
            shift, scale, gate, shift2, scale2, gate2 = (self.table + temb.view(b, n, 6, D)).unbind(2)
            y = norm(x) * (1 + scale) + shift
            q, k, v = qkv(y).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
            x = x + gate * F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, D)
            x = x + gate2 * mlp(norm(x) * (1 + scale2) + shift2)
        return self.out(x)


def _model(**kwargs) -> PerTokenTimestepDiT:
    torch.manual_seed(0)
    return PerTokenTimestepDiT(**kwargs).eval()


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = torch.full((2, N), 800.0)
    t[:, :4] = 0.0  # conditioning tokens (the first frame) are clean
    return dict(hidden_states=torch.randn(2, N, C, generator=g), timestep=t)


def _without_moving(monkeypatch):
    monkeypatch.setattr(side_sources, "gather_at_sources", lambda gm, analysis, rerun: analysis)


def test_a_per_token_timestep_branch_is_gathered_at_the_timestep(monkeypatch):
    model, kw = _model(), _inputs()
    analysis = ras_compile(model, POLICY, backend=None).ras_analysis(**kw)
    assert analysis.side_sources == ["timestep"]
    assert analysis.side_inputs == []  # every per-block shift / scale / gate is on the active rows already
    moved = explain(model, kw, POLICY, verbose=False)
    _without_moving(monkeypatch)
    late = explain(model, kw, POLICY, verbose=False)
    assert len(late.side_inputs) == 12 and not late.side_sources
    assert moved.flop_fraction < late.flop_fraction - 0.05
    assert "side branches gathered where they start" in str(moved)


@settings(max_examples=8, deadline=None)
@given(st.data())
def test_the_moved_gather_keeps_the_sparse_step_exact(data):
    model, kw = _model(), _inputs()
    index = random_active_sets(data, N)
    assert_sparse_after_dense_equals_the_model(model, ras_compile(model, POLICY, backend=None), kw, index)


def test_a_compiled_loop_at_ratio_one_equals_the_model():
    model = _model()
    assert_ratio_one_loop_equals_the_model(model, _inputs)


def test_a_flattened_per_token_timestep_is_gathered_as_folded_rows():
    """The pipeline passes the timestep already flattened (``[B * N]``: samples and tokens folded
    into one axis): the source is gathered row by row (``gather_folded_rows``)."""
    model, kw = _model(), _inputs()
    kw["timestep"] = kw["timestep"].flatten()
    ras = ras_compile(model, POLICY, backend=None)
    analysis = ras.ras_analysis(**kw)
    assert analysis.side_sources == ["timestep"] and analysis.layouts["timestep"].fold == 1
    assert_sparse_after_dense_equals_the_model(model, ras, kw, torch.tensor([[0, 5, 9], [2, 3, 23]]))


def test_a_branch_that_is_also_reduced_over_the_tokens_keeps_its_late_gather():
    """Gathering the timestep would make the mean over the tokens read stale rows (densified): the move
    is rejected, the per-block pieces are gathered where they meet the stream, and the step stays exact."""
    model, kw = _model(pooled=True), _inputs()
    ras = ras_compile(model, POLICY, backend=None)
    analysis = ras.ras_analysis(**kw)
    assert analysis.side_sources == [] and len(analysis.side_inputs) > 0
    assert_sparse_after_dense_equals_the_model(model, ras, kw, torch.tensor([[0, 5, 9], [2, 3, 23]]))


class RopeDiT(nn.Module):
    """A RoPE table computed in the forward from positions: a light branch, left where it is."""

    def __init__(self):
        super().__init__()
        self.inp, self.qkv, self.out = nn.Linear(C, D), nn.Linear(D, 3 * D), nn.Linear(D, C)

    def forward(self, hidden_states, timestep, positions):
        b, n, _ = hidden_states.shape
        x = self.inp(hidden_states) * (1 + timestep[:, None, None] / 1000)
        angle = positions[..., None] * torch.arange(1, D // HEADS // 2 + 1, dtype=torch.float32)  # [B, N, d/2]
        cos, sin = angle.cos().repeat(1, 1, 2)[:, None], angle.sin().repeat(1, 1, 2)[:, None]
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        rot = lambda t: t * cos + torch.cat([-t[..., D // HEADS // 2:], t[..., :D // HEADS // 2]], -1) * sin  # noqa
        return self.out(x + F.scaled_dot_product_attention(rot(q), rot(k), v).transpose(1, 2).reshape(b, n, D))


def test_a_light_branch_stays_gathered_where_it_meets_the_stream():
    torch.manual_seed(0)
    model = RopeDiT().eval()
    kw = dict(hidden_states=torch.randn(2, N, C), timestep=torch.tensor([500.0, 100.0]),
              positions=torch.arange(N, dtype=torch.float32).expand(2, N))
    ras = ras_compile(model, POLICY, backend=None)
    analysis = ras.ras_analysis(**kw)
    assert analysis.side_sources == [] and len(analysis.side_inputs) >= 2
    assert_sparse_after_dense_equals_the_model(model, ras, kw, torch.tensor([[0, 5, 9], [2, 3, 23]]))


def _analysis(batch=2, n=24, grid=(4, 6)) -> ta.TokenAnalysis:
    return ta.TokenAnalysis(n, batch, TokenGrid((batch, 3, 8, 12), (2, 3), (2, 2)), "latent", "source")


@pytest.mark.parametrize("shape,expected", [
    ((2, 24, 16), ta.TokenLayout(1, 0, 0, 24)),                 # [B, N, D]
    ((1, 24, 16), ta.TokenLayout(1, 0, 0, 24)),                 # a table broadcast over the batch
    ((2, 16, 4, 6), ta.TokenLayout(2, 0, 0, 24, grid=(4, 6))),  # [B, C, h, w]
    ((48, 16), ta.TokenLayout(0, None, 0, 24, 1, fold=1)),      # timestep.flatten(): [B * N, D]
    ((2, 24, 24), None),                                        # ambiguous: no gather there
    ((3, 24, 16), None),                                        # a leading axis that is no batch
    ((24, 16), None),                                           # no batch axis with a batch of 2
])
def test_guessed_layouts_of_branch_sources(shape, expected):
    node = torch.fx.Graph().placeholder("x")
    node.meta["val"] = torch.empty(shape)
    assert side_sources.guess_layout(node, _analysis()) == expected


class ControlKeysDiT(nn.Module):
    """A per-token control branch added to the tokens and also attended to as keys: moving its gather
    would turn that cross-attention to fresh control keys into attention over a stale K/V cache."""

    def __init__(self):
        super().__init__()
        self.inp, self.q, self.kv, self.out = nn.Linear(C, D), nn.Linear(D, D), nn.Linear(D, 2 * D), nn.Linear(D, C)
        self.control = nn.Sequential(nn.Linear(C, D), nn.SiLU(), nn.Linear(D, D))

    def forward(self, hidden_states, timestep, control):
        b, n, _ = hidden_states.shape
        c = self.control(control)
        x = self.inp(hidden_states) * (1 + timestep[:, None, None] / 1000) + c
        q = self.q(x).reshape(b, n, HEADS, D // HEADS).transpose(1, 2)
        k, v = self.kv(c).reshape(b, n, 2, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        return self.out(x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, D))


def test_a_branch_that_feeds_attention_keys_keeps_its_late_gather():
    torch.manual_seed(0)
    model = ControlKeysDiT().eval()
    kw = dict(hidden_states=torch.randn(2, N, C), timestep=torch.tensor([500.0, 100.0]), control=torch.randn(2, N, C))
    ras = ras_compile(model, POLICY, backend=None)
    analysis = ras.ras_analysis(**kw)
    assert analysis.side_sources == [] and analysis.cross_attention and not analysis.attention
    assert_sparse_after_dense_equals_the_model(model, ras, kw, torch.tensor([[0, 5, 9], [2, 3, 23]]))


class WanStyleDiT(nn.Module):
    """A spatial latent with Wan 2.2's per-token timestep forms: ``t [B, N]``, or ``t [B]`` expanded
    to every token (``t[:, None].expand(B, N)``); ``torch.outer`` sinusoids of the flattened
    timesteps, an MLP, ``unflatten(0, (B, N))``; register rows padded with ``new_zeros``; and the
    unpatchify written as a per-sample loop (``for u in x``)."""

    P, GH, GW = 2, 4, 6

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(C, D, self.P, stride=self.P)
        self.freqs = nn.Parameter(torch.randn(8), requires_grad=False)
        self.t_mlp = nn.Sequential(nn.Linear(16, D), nn.SiLU(), nn.Linear(D, 3 * D))
        self.qkv, self.mlp = nn.Linear(D, 3 * D), nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.norm = nn.LayerNorm(D, elementwise_affine=False)
        self.out = nn.Linear(D, self.P * self.P * C)

    def forward(self, latent, timestep):
        b = latent.shape[0]
        x = self.embed(latent).flatten(2).transpose(1, 2)
        n = x.shape[1]
        t = timestep[:, None].expand(b, n) if timestep.dim() == 1 else timestep
        arg = torch.outer(t.flatten(), self.freqs)
        shift, scale, gate = self.t_mlp(torch.cat([arg.cos(), arg.sin()], -1)).unflatten(0, (b, n)).chunk(3, -1)
        x = torch.cat([x, x.new_zeros(b, 2, D)], dim=1)  # two register rows
        y = torch.cat([self.norm(x[:, :n]) * (1 + scale) + shift, x[:, n:]], dim=1)
        q, k, v = self.qkv(y).reshape(b, n + 2, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n + 2, D)
        x = x[:, :n] + gate * self.mlp(x[:, :n])
        x = self.out(x)
        return torch.stack([u.view(self.GH, self.GW, self.P, self.P, C).permute(4, 0, 2, 1, 3)
                            .reshape(C, self.GH * self.P, self.GW * self.P) for u in x])


@pytest.mark.parametrize("per_token", [True, False])
def test_wan_style_timestep_branches_on_a_spatial_latent_are_gathered_where_they_start(per_token, monkeypatch):
    torch.manual_seed(0)
    model = WanStyleDiT().eval()
    t = torch.tensor([[800.0] * N, [300.0] * N]) if per_token else torch.tensor([800.0, 300.0])
    if per_token:
        t[:, :4] = 0.0
    kw = dict(latent=torch.randn(2, C, 8, 12), timestep=t)
    ras = ras_compile(model, POLICY, backend=None)
    analysis = ras.ras_analysis(**kw)
    # the timestep input is read before the token sequence exists; the expand makes a token axis from none
    assert analysis.side_sources == (["timestep"] if per_token else ["expand"])
    # the per-sample unpatchify loop runs on each sample's rows; only its grid interleave goes dense
    assert analysis.densify_reasons and all(reason.startswith("the token grid's axes are reordered")
                                            for reason in analysis.densify_reasons.values())
    assert_sparse_after_dense_equals_the_model(model, ras, kw, torch.tensor([[0, 5, 9], [2, 3, 23]]))
    moved = explain(model, kw, POLICY, verbose=False).flop_fraction
    _without_moving(monkeypatch)
    assert moved < explain(model, kw, POLICY, verbose=False).flop_fraction - 0.05
