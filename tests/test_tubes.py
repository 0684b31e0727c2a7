"""Factorised video DiTs: frames folded into the batch axis (tubes) and the token axis folded into it.

``FactorisedDiT`` is a Latte-style video DiT in plain PyTorch: the latent ``[B, C, F, H, W]``
is cut frame by frame (``[B * F, C, H, W]`` through a patch convolution), spatial blocks
attend within each frame (``[B * F, N, D]``), temporal blocks attend over the frames of
each patch position (``[B * N, F, D]``). No token of a frame can be computed without the
same position in the other frames, so the pass reads a token as a *tube*: one patch
position in every frame, selected and computed as a whole (docs/how-it-works.md).

``temporal`` picks how the temporal blocks write their attention and what else they do:

- ``sdpa``: ``[B * N, heads, F, d]`` through SDPA, with a per-sample, per-token bias table
  ``[B * N, F, D]`` (a side input on the folded axis whose rows all differ);
- ``heads_folded``: heads folded into the batch axis too, ``[B * N * heads, F, d]`` (the
  folded axis then holds ``heads`` rows per token);
- ``conv``: a temporal convolution over the frames of each token, ``[B * N, D, F]``, before
  the attention;
- ``pooled``: a mean over the folded axis (every token's rows) feeds back into the stream:
  a token-mixing operator on a folded axis, which the pass must refuse.
"""
from __future__ import annotations

import dataclasses

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from plain_dits import PlainDiT
from ras_compile import RASPolicy, UnsupportedModelError, explain, ras_compile
from ras_compile.passes import token_axis
from ras_compile.passes.latent_grid import find_token_dim as _find_token_dim

C, P, D, HEADS, FRAMES = 4, 2, 16, 2, 3
HEIGHT, WIDTH = 8, 12
N = (HEIGHT // P) * (WIDTH // P)
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())
TEMPORAL = ("sdpa", "heads_folded", "conv")


class FactorisedDiT(nn.Module):
    def __init__(self, temporal: str = "sdpa", depth: int = 2):
        super().__init__()
        self.temporal = temporal
        self.embed = nn.Conv2d(C, D, P, stride=P)
        self.pos = nn.Parameter(torch.randn(1, N, D))
        self.frame_pos = nn.Parameter(torch.randn(1, FRAMES, D))
        self.token_bias = nn.Parameter(0.5 * torch.randn(N, FRAMES, D))
        self.time = nn.Sequential(nn.Linear(1, D), nn.SiLU(), nn.Linear(D, 2 * D))
        self.spatial = nn.ModuleList(nn.ModuleDict(dict(
            norm=nn.LayerNorm(D), qkv=nn.Linear(D, 3 * D), out=nn.Linear(D, D),
            mlp=nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)))) for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm=nn.LayerNorm(D), qkv=nn.Linear(D, 3 * D), out=nn.Linear(D, D),
            conv=nn.Conv1d(D, D, 3, padding=1))) for _ in range(depth))
        self.final = nn.Linear(D, P * P * C)

    @staticmethod
    def _heads(x, qkv):  # [rows, L, D] -> q, k, v [rows, HEADS, L, d]
        rows, length, _ = x.shape
        return qkv(x).reshape(rows, length, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)

    def forward(self, hidden_states, timestep):
        b, c, f, h, w = hidden_states.shape
        x = hidden_states.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos            # [B * F, N, D]
        n = x.shape[1]
        shift, scale = self.time(timestep.reshape(-1, 1) / 1000.0).chunk(2, dim=-1)  # [B, D] each
        shift_s, scale_s = shift.repeat_interleave(f, dim=0)[:, None], scale.repeat_interleave(f, dim=0)[:, None]
        shift_t, scale_t = shift.repeat_interleave(n, dim=0)[:, None], scale.repeat_interleave(n, dim=0)[:, None]
        bias = self.token_bias.repeat(b, 1, 1) * (1 + scale_t)                 # [B * N, F, D], rows all differ
        for spatial, temporal in zip(self.spatial, self.temporal_blocks):
            q, k, v = self._heads(spatial["norm"](x) * (1 + scale_s) + shift_s, spatial["qkv"])
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * f, n, D)
            x = x + spatial["out"](a)
            x = x + spatial["mlp"](x)
            x = x.reshape(b, f, n, D).permute(0, 2, 1, 3).reshape(b * n, f, D) + self.frame_pos  # [B * N, F, D]
            y = temporal["norm"](x) * (1 + scale_t) + shift_t + bias
            if self.temporal == "conv":
                y = y + temporal["conv"](y.transpose(1, 2)).transpose(1, 2)
            q, k, v = self._heads(y, temporal["qkv"])
            if self.temporal == "heads_folded":
                fold = lambda t: t.reshape(b * n * HEADS, f, D // HEADS)  # noqa: E731
                a = F.scaled_dot_product_attention(fold(q), fold(k), fold(v)).reshape(b * n, HEADS, f, D // HEADS)
            else:
                a = F.scaled_dot_product_attention(q, k, v)
            x = x + temporal["out"](a.transpose(1, 2).reshape(b * n, f, D))
            if self.temporal == "pooled":
                x = x + x.mean(dim=0, keepdim=True)
            x = x.reshape(b, n, f, D).permute(0, 2, 1, 3).reshape(b * f, n, D)
        x = self.final(x).reshape(b, f, h // P, w // P, P, P, c)
        return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, c, f, h, w)


def _model(temporal: str) -> FactorisedDiT:
    torch.manual_seed(0)
    return FactorisedDiT(temporal).eval()


def _inputs(batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    # samples at different timesteps: a per-sample side input gathered with the wrong sample's rows shows
    return dict(hidden_states=torch.randn(batch, C, FRAMES, HEIGHT, WIDTH, generator=g),
                timestep=torch.tensor([999.0 - 100 * seed, 500.0 - 100 * seed][:batch]))


@pytest.mark.parametrize("temporal", TEMPORAL)
def test_tokens_are_tubes_through_the_folded_frames(temporal):
    ras = ras_compile(_model(temporal), POLICY, backend=None)
    analysis = ras.ras_analysis(**_inputs())
    assert analysis.num_tokens == N
    assert analysis.grid.tube_axes == (2,)        # the frames axis of [B, C, F, H, W]
    assert analysis.grid.channel_axes == (1, 2)   # scored together with the channels
    assert len(analysis.attention) == 2            # spatial attention reads cached K/V
    assert len(analysis.token_batched_attention) == 2  # temporal attention runs on the active tubes only
    assert analysis.counts["densified"] == 1       # the unpatchify


def test_explain_names_the_tubes_and_the_attention_within_each_token():
    text = str(explain(_model("sdpa"), _inputs(), POLICY, verbose=False))
    assert "tubes: latent axis 2 is part of every token, folded into the batch axis" in text
    assert "attention within each token (the token axis is a batch axis of it), token-wise (2)" in text


@pytest.mark.parametrize("temporal", TEMPORAL)
@pytest.mark.parametrize("batch", [1, 2])
def test_ratio_one_equals_the_dense_model(temporal, batch):
    model = _model(temporal)
    ras = ras_compile(model, RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=()), backend=None)
    for seed in range(3):  # a dense step, then sparse steps with every tube active
        kw = _inputs(batch, seed)
        with torch.no_grad():
            want = model(**kw)
        torch.testing.assert_close(ras(**kw), want, rtol=1e-5, atol=1e-5)
    assert [s.mode for s in ras.ras_controller.stats] == ["dense", "sparse", "sparse"]


@settings(max_examples=12, deadline=None)
@given(temporal=st.sampled_from(TEMPORAL), batch=st.sampled_from([1, 2]), seed=st.integers(0, 3), data=st.data())
def test_sparse_step_after_dense_equals_dense_for_any_active_set(temporal, batch, seed, data):
    model = _model(temporal)
    kw = _inputs(batch, seed)
    ras = ras_compile(model, POLICY, backend=None)
    dense = ras(**kw)
    k = data.draw(st.integers(1, N), label="k")
    rows = [sorted(data.draw(st.permutations(range(N)), label="perm")[:k]) for _ in range(batch)]
    ras.ras_controller.override_next_step("sparse", torch.tensor(rows))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same timestep twice in a row, on purpose
        sparse = ras(**kw)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_a_sparse_step_computes_only_the_active_tubes():
    """Inactive tubes return their cached prediction in every frame; active ones change with the input."""
    model = _model("sdpa")
    ras = ras_compile(model, POLICY, backend=None)
    kw = _inputs()
    before = ras(**kw)
    active = torch.tensor([[0, 5, 17], [2, 3, 23]])
    ras.ras_controller.override_next_step("sparse", active)
    moved = dict(kw, hidden_states=kw["hidden_states"] + 1.0)
    with torch.no_grad():
        dense_moved = model(**moved)
    after = ras(**moved)
    tokens = lambda t: t.reshape(2, C, FRAMES, HEIGHT // P, P, WIDTH // P, P).permute(0, 3, 5, 1, 2, 4, 6) \
        .reshape(2, N, -1)  # noqa: E731
    for b in range(2):
        inactive = [i for i in range(N) if i not in active[b].tolist()]
        torch.testing.assert_close(tokens(after)[b, inactive], tokens(before)[b, inactive])
        assert not torch.allclose(tokens(after)[b, active[b]], tokens(before)[b, active[b]])
    assert not torch.allclose(after, dense_moved)  # the inactive tubes really were stale


def test_a_reduction_over_a_folded_token_axis_is_refused_and_falls_back():
    model = _model("pooled")
    with pytest.raises(UnsupportedModelError) as info:
        ras_compile(model, POLICY, backend=None).ras_analysis(**_inputs())
    message = str(info.value)
    tubes, plain = message.split("; read without tubes: ")  # the relaxed reading's reason, then the plain one's
    assert "read with tubes (one token = one patch position in every frame" in tubes
    assert "token axis is folded into the batch axis would have to be cached (for mean)" in tubes
    assert "no token sequence found" in plain
    ras = ras_compile(model, RASPolicy(sample_ratio=0.5, on_unsupported="fallback"), backend=None)
    kw = _inputs()
    with pytest.warns(UserWarning, match="Running the dense compiled model instead"):
        got = ras(**kw)
    with torch.no_grad():
        torch.testing.assert_close(got, model(**kw))


def test_a_model_the_plain_reading_accepts_never_reads_tubes():
    """Per-frame patch embedding, then all frames' tokens in one sequence (CogVideoX-style): the plain
    reading finds the whole video grid, so no axis is a tube."""

    class FullAttention(FactorisedDiT):
        def forward(self, hidden_states, timestep):
            b, c, f, h, w = hidden_states.shape
            x = hidden_states.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
            x = self.embed(x).flatten(2).transpose(1, 2).reshape(b, f * N, D)
            q, k, v = self._heads(x, self.spatial[0]["qkv"])
            x = x + self.spatial[0]["out"](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, f * N, D))
            x = self.final(x).reshape(b, f, h // P, w // P, P, P, c)
            return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, c, f, h, w)

    torch.manual_seed(0)
    analysis = ras_compile(FullAttention().eval(), POLICY, backend=None).ras_analysis(**_inputs())
    assert analysis.num_tokens == FRAMES * N
    assert analysis.grid.tube_axes == ()
    assert not analysis.token_batched_attention


@pytest.mark.parametrize("tubes", ["auto", "never"])
def test_a_token_axis_flattened_with_the_batch_stays_token_wise(tubes):
    """``x.reshape(B * N, D)`` around a projection (MoE and MLP code): the plain reading densifies at the
    view and runs the rest on all tokens; the relaxed reading folds the token axis into the batch and
    keeps the stream on the active rows, so it replaces the plain one (with ``tubes="never"`` too: the
    fold makes no grid axis a tube)."""

    class Flattened(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(C, D, P, stride=P)
            self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
            self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
            self.final = nn.Linear(D, P * P * C)

        def forward(self, hidden_states, timestep):
            b, c, h, w = hidden_states.shape
            x = self.embed(hidden_states).flatten(2).transpose(1, 2)
            n = x.shape[1]
            q, k, v = FactorisedDiT._heads(x, self.qkv)
            x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, D))
            x = x + self.mlp(x.reshape(b * n, D)).reshape(b, n, D)
            q, k, v = FactorisedDiT._heads(x, self.qkv)
            x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, D))
            x = self.final(x).reshape(b, h // P, w // P, P, P, c).permute(0, 5, 1, 3, 2, 4)
            return x.reshape(b, c, h, w) * timestep.reshape(-1, 1, 1, 1) / 1000.0

    torch.manual_seed(0)
    model = Flattened().eval()
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(2, C, HEIGHT, WIDTH, generator=g), timestep=torch.tensor([999.0, 500.0]))
    ras = ras_compile(model, dataclasses.replace(POLICY, tubes=tubes), backend=None)
    analysis = ras.ras_analysis(**kw)
    assert len(analysis.attention) == 2 and analysis.counts["densified"] == 1  # only the unpatchify
    assert analysis.grid.tube_axes == ()
    dense = ras(**kw)
    ras.ras_controller.override_next_step("sparse", torch.tensor([[1, 4, 9], [0, 2, 23]]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ras(**kw), dense, rtol=1e-5, atol=1e-5)


def test_a_failure_inside_the_relaxed_reading_never_costs_the_plain_one(monkeypatch):
    """The relaxed reading runs on every capture: an exception inside it (a bug, an operator it
    trips on) leaves the plain reading's analysis, or its precise refusal, as it was."""
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the relaxed reading")

    monkeypatch.setattr(token_axis, "_fold_view", broken)
    monkeypatch.setattr(token_axis, "_merge_view", broken)
    monkeypatch.setattr(token_axis.lg, "find_token_dim",
                        lambda value, shape, tubes=False, **_: broken() if tubes else _find_token_dim(value, shape))
    torch.manual_seed(0)
    plain = ras_compile(FactorisedDiT().eval(), POLICY, backend=None)
    with pytest.raises(UnsupportedModelError, match="no token sequence found"):  # Latte-style: plain refuses
        plain.ras_analysis(**_inputs())
    dit = ras_compile(PlainDiT().eval(), POLICY, backend=None)
    analysis = dit.ras_analysis(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.full((2,), 999.0))
    assert len(analysis.attention) == 2
