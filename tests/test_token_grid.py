"""Token grids (ras_compile/passes/token_grid.py): a token sequence unflattened back into its
patch grid inside a block keeps running on the active tokens, in the sparse grid form
``(k, 1)``, through 1x1 convolutions, norms and projections, and is densified only where a
grid operator mixes positions (a 3x3 depthwise convolution, a transpose of the grid).

``GridDiT`` has the two grid blocks research DiTs write: Sana's convolutional feed-forward
(``[B, N, D] -> [B, D, h, w]``, 1x1 convolution, SiLU, 3x3 depthwise convolution, gate, 1x1
convolution, flatten) and an HDiT-style ``[B, h, w, D]`` feed-forward with a grid-shaped
position table added there.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ras_compile import RASPolicy, explain, ras_compile
from ras_compile.passes import token_ops
from ras_compile.passes.token_grid import grid_run
from sparse_checks import (assert_ratio_one_loop_equals_the_model, assert_sparse_after_dense_equals_the_model,
                           random_active_sets)

C, D, HEADS, H, W, P = 4, 16, 2, 8, 12, 2
GH, GW = H // P, W // P
N = GH * GW
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


class GridDiT(nn.Module):
    def __init__(self, transpose_grid: bool = False, unruled_after_grid: bool = False):
        super().__init__()
        self.transpose_grid, self.unruled_after_grid = transpose_grid, unruled_after_grid
        self.embed = nn.Conv2d(C, D, P, stride=P)
        self.time = nn.Linear(1, D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.inverted = nn.Conv2d(D, 4 * D, 1)                        # Sana's GLUMBConv
        self.depth = nn.Conv2d(4 * D, 4 * D, 3, padding=1, groups=4 * D)
        self.point = nn.Conv2d(2 * D, D, 1, bias=False)
        self.norm = nn.LayerNorm(D)                                    # an HDiT-style grid block
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.grid_pos = nn.Parameter(torch.randn(1, GH, 1, D))        # broadcast over the grid's columns
        self.out = nn.Linear(D, P * P * C)

    def forward(self, latent, timestep):
        b = latent.shape[0]
        x = self.embed(latent).flatten(2).transpose(1, 2) + self.time(timestep[:, None] / 1000)[:, None]
        q, k, v = self.qkv(x).reshape(b, N, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, N, D))
        y = x.unflatten(1, (GH, GW)).permute(0, 3, 1, 2)             # [B, D, h, w]
        y = F.silu(self.inverted(y))
        y, gate = self.depth(y).chunk(2, dim=1)
        x = x + self.point(y * F.silu(gate)).flatten(2).transpose(1, 2)
        g = x.view(b, GH, GW, D)                                       # [B, h, w, D]
        if self.transpose_grid:
            g = g.transpose(1, 2)
        g = self.fc2(F.gelu(self.fc1(self.norm(g)))) + (self.grid_pos.transpose(1, 2) if self.transpose_grid
                                                      else self.grid_pos)
        if self.transpose_grid:
            g = g.transpose(1, 2)
        x = x + g.reshape(b, N, D)
        if self.unruled_after_grid:  # no token rule: reached only through the grid
            x = x + x.unflatten(1, (GH, GW)).flatten(1, 2).cummax(-1).values * 1e-2
        x = self.out(x).view(b, GH, GW, P, P, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, C, H, W)


def _model(**kwargs) -> GridDiT:
    torch.manual_seed(0)
    return GridDiT(**kwargs).eval()


def _inputs(batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(latent=torch.randn(batch, C, H, W, generator=g),
                timestep=torch.tensor([900.0, 300.0][:batch]))


# ---- the layout math ----------------------------------------------------------------------------

@pytest.mark.parametrize("out_shape,expected", [
    ((2, 8, 12, 16), (1, (8, 12))),            # unflatten(1, (h, w))
    ((2, 8, 12, 2, 8), (1, (8, 12))),          # and the channels split behind it
    ((2, 1, 8, 12, 16), (2, (8, 12))),         # a size-1 axis in front stays outside the grid
    ((2, 8, 1, 12, 16), None),                 # a size-1 axis inside it: a squeeze would change the grid
    ((2, 96, 16), None),                       # not split
    ((16, 12, 16), None),                      # the batch merged into it
    ((2, 8, 192), None),                       # values moved across the token and channel axes
    ((2, 2, 4, 12, 16), (1, (2, 4, 12))),      # three grid axes
])
def test_grid_run_finds_where_a_view_splits_the_token_axis(out_shape, expected):
    assert grid_run((2, 96, 16), out_shape, 1) == expected


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.sampled_from([(4, 6), (3, 5), (2, 3, 4)]), st.integers(1, 3), st.booleans(),
       st.data())
def test_grid_gather_and_scatter_match_flat_indexing(batch, grid, channels, channels_first, data):
    n = 1
    for s in grid:
        n *= s
    k = data.draw(st.integers(1, n))
    index = torch.stack([torch.randperm(n)[:k].sort().values for _ in range(batch)])
    shape = (batch, channels, *grid) if channels_first else (batch, *grid, channels)
    token_dim = 2 if channels_first else 1
    x = torch.randn(shape)
    flat = x.flatten(token_dim, token_dim + len(grid) - 1)
    want = torch.stack([flat[b].index_select(token_dim - 1, index[b]) for b in range(batch)])
    sparse = token_ops.gather_grid_tokens(x, index, 0, token_dim, grid, x.dim())
    assert sparse.shape[token_dim:token_dim + len(grid)] == (k,) + (1,) * (len(grid) - 1)
    torch.testing.assert_close(sparse.flatten(token_dim, token_dim + len(grid) - 1), want)
    cache = torch.randn(shape)
    before = cache.clone()
    assert token_ops.scatter_grid_tokens_(cache, sparse * 2, index, 0, token_dim, len(grid)) is cache
    got, ref = cache.flatten(token_dim, token_dim + len(grid) - 1), before.flatten(token_dim, token_dim + len(grid) - 1)
    for b in range(batch):
        ref[b].index_copy_(token_dim - 1, index[b], want[b] * 2)
    torch.testing.assert_close(got, ref)


def test_a_side_input_broadcast_over_part_of_the_grid_is_expanded_then_gathered():
    table = torch.randn(1, 4, 1, 3)  # [1, h, 1, D] against a [B, h, w, D] grid
    index = torch.tensor([[0, 5, 11], [2, 3, 7]])
    full = table.expand(2, 4, 3, 3).flatten(1, 2)
    want = torch.stack([full[b, index[b]] for b in range(2)]).unsqueeze(2)
    torch.testing.assert_close(token_ops.gather_grid_tokens(table, index, 0, 1, (4, 3), 4), want)


# ---- the analysis -------------------------------------------------------------------------------

def test_the_convolutional_feed_forward_runs_on_the_active_tokens_but_its_depthwise_convolution():
    ras = ras_compile(_model(), POLICY, backend=None)
    analysis = ras.ras_analysis(**_inputs())
    # the 1x1 convolutions carry the grid; the depthwise one runs on its densified input, and its
    # output is gathered where it is computed (passes/side_sources.py), so the gate and the point
    # convolution after it run on the active tokens too
    assert analysis.layouts["conv2d_1"].grid == analysis.layouts["conv2d_3"].grid == (GH, GW)
    assert analysis.side_sources == ["conv2d_2"] and analysis.layouts["conv2d_2"].grid == (GH, GW)
    reasons = analysis.densify_reasons
    assert any(key.startswith("conv2d_2:") and reason == "a convolution over the token axis"
               for key, reason in reasons.items())
    # the HDiT-style block: norm, projections and the grid-shaped table on the active tokens
    grid_side = [s for s in analysis.side_inputs if s.layout.grid == (GH, GW)]
    assert len(grid_side) == 1
    assert [r for r in reasons.values() if "grid" in r] == [
        "the token grid's axes are reordered or moved apart (an unpatchify's interleave of patch and grid axes, "
        "or a transpose of the grid)"]  # only the unpatchify


def test_following_the_grid_saves_what_densifying_at_it_ran_densely(monkeypatch):
    model, kw = _model(), _inputs()
    with_grids = explain(model, kw, POLICY, verbose=False)
    import ras_compile.passes.token_axis as ta
    plain = ta._analyze
    monkeypatch.setattr(ta, "_analyze", lambda gm, latent, **k: plain(gm, latent, **{**k, "grids": False}))
    # and no stream picked up after the densified unflatten (passes/stream_reentry.py): no grids at all
    monkeypatch.setattr(ta.stream_reentry, "pick_up_stream", lambda gm, analysis, rerun: analysis)
    without = explain(model, kw, POLICY, verbose=False)
    assert with_grids.flop_fraction < without.flop_fraction - 0.1


@settings(max_examples=8, deadline=None)
@given(st.data())
def test_sparse_step_after_dense_step_equals_the_model_for_random_active_sets(data):
    model, kw = _model(), _inputs()
    index = random_active_sets(data, N)
    ras = ras_compile(model, POLICY, backend=None)
    assert_sparse_after_dense_equals_the_model(model, ras, kw, index)


def test_ratio_one_equals_the_model_over_a_loop_compiled():
    assert_ratio_one_loop_equals_the_model(_model(), lambda step: _inputs(seed=step))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])  # Inductor: the grid gathers and cache views
def test_a_compiled_sparse_step_matches_the_eager_one(backend):
    model, kw = _model(), _inputs()
    index = torch.tensor([[0, 3, 7, 20], [1, 2, 11, 23]])
    eager, compiled = ras_compile(model, POLICY, backend=None), ras_compile(model, POLICY, backend=backend)
    outs = []
    for ras in (eager, compiled):
        ras(**kw)
        ras.ras_controller.override_next_step("sparse", index)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs.append(ras(**{**kw, "latent": kw["latent"] * 0.5}))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def test_a_transposed_grid_is_densified_and_stays_exact():
    model, kw = _model(transpose_grid=True), _inputs()
    ras = ras_compile(model, POLICY, backend=None)
    reasons = ras.ras_analysis(**kw).densify_reasons
    assert sum("reordered" in r for r in reasons.values()) == 2  # the transpose and the unpatchify
    assert_sparse_after_dense_equals_the_model(model, ras, kw, torch.tensor([[1, 4, 9], [0, 2, 23]]))


def test_a_model_the_grid_reading_refuses_is_read_without_grids():
    """Past a grid merged back into a sequence the model calls an operator no rule covers (cummax);
    that code ran on the densified value before grids were followed, so the model is still served:
    read without grids, the cummax runs on the densified value (the blocks' grids are then picked
    up again after their densified views, passes/stream_reentry.py)."""
    model, kw = _model(unruled_after_grid=True), _inputs()
    ras = ras_compile(model, POLICY, backend=None)
    analysis = ras.ras_analysis(**kw)
    assert analysis.reading["grids"] is False
    assert "cummax" not in analysis.layouts
    assert any(key.startswith("unflatten_1:") for key in analysis.densify_at)
    assert_sparse_after_dense_equals_the_model(model, ras, kw, torch.tensor([[1, 4, 9], [0, 2, 23]]))


class PointwiseConv1d(nn.Module):
    """Tokens moved to the last axis for a Conv1d(D, D, 1) (Stable-Audio's preprocess conv form)."""

    def __init__(self):
        super().__init__()
        self.inp, self.conv, self.qkv = nn.Linear(C, D), nn.Conv1d(D, D, 1), nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, C)

    def forward(self, hidden_states):
        b, n, _ = hidden_states.shape
        x = self.inp(hidden_states)
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        return self.out(x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, D))


def test_a_1x1_convolution_over_the_token_axis_is_token_wise():
    torch.manual_seed(0)
    model = PointwiseConv1d().eval()
    kw = dict(hidden_states=torch.randn(2, 24, C))
    ras = ras_compile(model, POLICY, backend=None)
    analysis = ras.ras_analysis(**kw)
    assert analysis.layouts["conv1d"] is not None
    assert not any(key.startswith("conv1d:") for key in analysis.densify_at)
    assert_sparse_after_dense_equals_the_model(model, ras, kw, torch.tensor([[1, 4, 9], [0, 2, 23]]))


class NormsDiT(nn.Module):
    """Norms research feed-forwards put on the grid or on ``[B, C, N]``: a timm ConvMlp with an
    eval-mode BatchNorm2d (a per-channel affine map: token-wise), a PoolFormer GroupNorm(1, C)
    (statistics over the grid: densified), and a Conformer convolution module on ``[B, C, N]``
    (pointwise Conv1d, GLU over the channels, depthwise Conv1d, BatchNorm1d, SiLU, pointwise Conv1d)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(C, D, P, stride=P)
        self.qkv = nn.Linear(D, 3 * D)
        self.fc1, self.bn, self.fc2 = nn.Conv2d(D, 2 * D, 1), nn.BatchNorm2d(2 * D), nn.Conv2d(2 * D, D, 1)
        self.gn = nn.GroupNorm(1, D)
        self.pw1, self.dw = nn.Conv1d(D, 2 * D, 1), nn.Conv1d(D, D, 3, padding=1, groups=D)
        self.bn1d, self.pw2 = nn.BatchNorm1d(D), nn.Conv1d(D, D, 1)
        self.out = nn.Linear(D, P * P * C)
        for bn in (self.bn, self.bn1d):  # running statistics that are not the identity
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, latent, timestep):
        b = latent.shape[0]
        x = self.embed(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
        q, k, v = self.qkv(x).reshape(b, N, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, N, D)
        g = x.transpose(1, 2).reshape(b, D, GH, GW)
        x = x + self.fc2(F.gelu(self.bn(self.fc1(g)))).flatten(2).transpose(1, 2)
        x = x + self.gn(x.transpose(1, 2).reshape(b, D, GH, GW)).flatten(2).transpose(1, 2)
        c = F.glu(self.pw1(x.transpose(1, 2)), dim=1)
        x = x + self.pw2(F.silu(self.bn1d(self.dw(c)))).transpose(1, 2)
        x = self.out(x).view(b, GH, GW, P, P, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, C, H, W)


def test_eval_batch_norm_and_glu_are_token_wise_and_group_norm_is_densified():
    torch.manual_seed(0)
    model, kw = NormsDiT().eval(), _inputs()
    ras = ras_compile(model, POLICY, backend=None)
    analysis = ras.ras_analysis(**kw)
    norms = {n: analysis.layouts.get(n) for n in ("batch_norm", "batch_norm_1", "glu")}
    assert all(lay is not None for lay in norms.values()), norms
    assert analysis.layouts["batch_norm"].grid == (GH, GW)
    reasons = set(analysis.densify_reasons.values())
    assert "a group / instance norm (statistics over the token axis)" in reasons
    assert "a convolution over the token axis" in reasons  # the depthwise Conv1d
    assert_sparse_after_dense_equals_the_model(model, ras, kw, torch.tensor([[1, 4, 9], [0, 2, 23]]))
