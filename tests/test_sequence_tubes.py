"""Tubes led by the frames: a video DiT that keeps every frame in one token sequence and folds
the frames into the batch only inside its blocks (Open-Sora's STDiT).

``SequenceVideoDiT`` cuts ``[B, C, F, H, W]`` with one Conv3d into ``[B, T * S, D]`` (``T``
frame patches, ``S`` spatial patches), then mixes three kinds of block:

- ``spatial``: ``B (T S) D -> (B T) S D``, attention within each frame;
- ``temporal``: ``B (T S) D -> (B S) T D``, attention over the frames of each position;
- ``full``: attention over the whole ``[B, T * S, D]`` sequence;
- ``joint``: attention over the text followed by the whole sequence;
- ``frame_cross``: ``full``, plus a per-frame cross-attention side branch on ``(B T) S D``.

No token of a frame can be computed without the same position in the other frames (the
temporal blocks), so the pass reads a token as a tube through the frames: the sequence
holds rows ``(frame, token)`` (``TokenLayout.outer``), a sparse step runs the active
positions of every frame, and the full blocks attend with those rows as queries over the
cached keys of all frames (docs/how-it-works.md).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ras_compile import RASPolicy, UnsupportedModelError, explain, ras_compile
from ras_compile.passes import token_ops

C, D, HEADS, TXT, TEXT = 4, 16, 2, 8, 5
FRAMES, HEIGHT, WIDTH = 4, 8, 12
S = (HEIGHT // 2) * (WIDTH // 2)  # spatial patches: the image tokens
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


class SequenceVideoDiT(nn.Module):
    def __init__(self, blocks=("spatial", "temporal", "full"), patch_t: int = 2, flat_pos: bool = False):
        super().__init__()
        self.blocks, self.pt, self.flat_pos = blocks, patch_t, flat_pos
        self.embed = nn.Conv3d(C, D, (patch_t, 2, 2), stride=(patch_t, 2, 2))
        self.pos = nn.Parameter(torch.randn(1, 1, S, D))          # per position, shared by every frame
        self.frame_pos = nn.Parameter(torch.randn(1, FRAMES // patch_t, D))
        self.time = nn.Sequential(nn.Linear(1, D), nn.SiLU(), nn.Linear(D, 3 * D))
        self.text = nn.Linear(TXT, D)
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in blocks)
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in blocks)
        self.out = nn.ModuleList(nn.Linear(D, D) for _ in blocks)
        self.cross_q, self.cross_kv = nn.Linear(D, D), nn.Linear(D, 2 * D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.final = nn.Linear(D, patch_t * 4 * C)

    @staticmethod
    def _attend(x, qkv):  # [rows, L, D] self-attention
        rows, length, _ = x.shape
        q, k, v = qkv(x).reshape(rows, length, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(rows, length, D)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        b, c, f, h, w = hidden_states.shape
        t, s = f // self.pt, (h // 2) * (w // 2)
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)              # [B, T * S, D]
        if self.flat_pos:  # the same positions, added to the flat sequence
            x = x + self.pos[0].repeat(1, t, 1)
        else:
            x = (x.reshape(b, t, s, D) + self.pos).reshape(b, t * s, D)
        shift, scale, gate = self.time(timestep.reshape(-1, 1) / 1000.0)[:, None].chunk(3, dim=-1)
        ctx = self.text(encoder_hidden_states)
        for i, kind in enumerate(self.blocks):
            y = self.norms[i](x) * (1 + scale) + shift
            if kind == "spatial":
                y = self._attend(y.reshape(b * t, s, D), self.qkv[i]).reshape(b, t * s, D)
            elif kind == "temporal":
                y = y.reshape(b, t, s, D).permute(0, 2, 1, 3).reshape(b * s, t, D) + self.frame_pos
                y = self._attend(y, self.qkv[i]).reshape(b, s, t, D).permute(0, 2, 1, 3).reshape(b, t * s, D)
            elif kind == "joint":  # text first, then every frame's tokens (CogVideoX-style)
                y = self._attend(torch.cat([ctx, y], dim=1), self.qkv[i])[:, ctx.shape[1]:]
            elif kind == "frame_cross":  # full attention, plus a per-frame cross-attention side branch
                per_frame = ctx.repeat_interleave(t, dim=0).reshape(b * t, -1, HEADS, D // HEADS).transpose(1, 2)
                q = self.cross_q(y).reshape(b * t, s, HEADS, D // HEADS).transpose(1, 2)
                side = F.scaled_dot_product_attention(q, per_frame, per_frame).transpose(1, 2).reshape(b, t * s, D)
                y = self._attend(y, self.qkv[i]) + side
            else:
                y = self._attend(y, self.qkv[i])
            x = x + gate * self.out[i](y)
            q = self.cross_q(x).reshape(b, t * s, HEADS, D // HEADS).transpose(1, 2)
            k, v = self.cross_kv(ctx).reshape(b, -1, 2, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
            x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t * s, D)
            x = x + self.mlp(x)
        x = self.final(x).reshape(b, t, h // 2, w // 2, self.pt, 2, 2, c)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, f, h, w)


def _model(**kwargs) -> SequenceVideoDiT:
    torch.manual_seed(0)
    return SequenceVideoDiT(**kwargs).eval()


def _inputs(batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    # samples at different timesteps: rows gathered for the wrong sample or frame show
    return dict(hidden_states=torch.randn(batch, C, FRAMES, HEIGHT, WIDTH, generator=g),
                timestep=torch.tensor([999.0 - 100 * seed, 500.0 - 100 * seed][:batch]),
                encoder_hidden_states=torch.randn(batch, TEXT, TXT, generator=g))


def test_tube_positions_cover_every_block_in_order():
    index = torch.tensor([[0, 3], [1, 2]])
    assert token_ops.tube_positions(index, 3, 5).tolist() == [[0, 3, 5, 8, 10, 13], [1, 2, 6, 7, 11, 12]]


@pytest.mark.parametrize("patch_t", [1, 2])
def test_tokens_are_tubes_led_by_the_frames(patch_t):
    analysis = ras_compile(_model(patch_t=patch_t), POLICY, backend=None).ras_analysis(**_inputs())
    assert analysis.num_tokens == S
    assert analysis.grid.tube_axes == (2,)                  # the frames of [B, C, F, H, W]
    assert analysis.grid.channel_axes == (1, 2)             # scored with the channels
    assert analysis.layouts[analysis.source].outer == FRAMES // patch_t  # rows (frame, token)
    assert len(analysis.attention) == 2                     # spatial (per frame) and full, over cached K/V
    assert len(analysis.token_batched_attention) == 1       # temporal: within each tube
    assert len(analysis.cross_attention) == 3
    assert analysis.counts["densified"] == 1                # the unpatchify only
    # spatial K/V cached per frame row of the batch, full-attention K/V over the whole sequence
    assert sorted((c.layout.batch_group, c.layout.outer) for c in analysis.caches if c.kind == "key") \
        == [(1, FRAMES // patch_t), (FRAMES // patch_t, 1)]


def test_explain_names_the_tubes():
    text = str(explain(_model(), _inputs(), POLICY, verbose=False))
    assert f"{S} image tokens" in text
    assert "tubes: latent axis 2 is part of every token, kept in the token sequence (2 rows per token)" in text


@pytest.mark.parametrize("blocks", [("spatial", "temporal", "full"), ("temporal", "spatial"), ("full", "temporal")])
@pytest.mark.parametrize("batch", [1, 2])
def test_ratio_one_equals_the_dense_model(blocks, batch):
    model = _model(blocks=blocks)
    ras = ras_compile(model, RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=()), backend=None)
    for seed in range(3):  # a dense step, then sparse steps with every tube active
        kw = _inputs(batch, seed)
        with torch.no_grad():
            want = model(**kw)
        torch.testing.assert_close(ras(**kw), want, rtol=1e-5, atol=1e-5)
    assert [s.mode for s in ras.ras_controller.stats] == ["dense", "sparse", "sparse"]
    assert ras.ras_analysis(**_inputs(batch)).num_tokens == S


@settings(max_examples=12, deadline=None)
@given(patch_t=st.sampled_from([1, 2]), batch=st.sampled_from([1, 2]), seed=st.integers(0, 3), data=st.data())
def test_sparse_step_after_dense_equals_dense_for_any_active_set(patch_t, batch, seed, data):
    model = _model(patch_t=patch_t)
    kw = _inputs(batch, seed)
    ras = ras_compile(model, POLICY, backend=None)
    dense = ras(**kw)
    k = data.draw(st.integers(1, S), label="k")
    rows = [sorted(data.draw(st.permutations(range(S)), label="perm")[:k]) for _ in range(batch)]
    ras.ras_controller.override_next_step("sparse", torch.tensor(rows))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same timestep twice in a row, on purpose
        sparse = ras(**kw)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_a_sparse_step_computes_only_the_active_tubes():
    """Inactive tubes return their cached prediction in every frame; active ones change with the input,
    and the full blocks' queries see the other frames' cached keys (an error in a block's rows shows)."""
    model = _model()
    ras = ras_compile(model, POLICY, backend=None)
    kw = _inputs()
    before = ras(**kw)
    active = torch.tensor([[0, 5, 17], [2, 3, 23]])
    ras.ras_controller.override_next_step("sparse", active)
    moved = dict(kw, hidden_states=kw["hidden_states"] + 1.0)
    after = ras(**moved)
    tokens = lambda x: x.reshape(2, C, FRAMES, HEIGHT // 2, 2, WIDTH // 2, 2).permute(0, 3, 5, 1, 2, 4, 6) \
        .reshape(2, S, -1)  # noqa: E731
    for b in range(2):
        inactive = [i for i in range(S) if i not in active[b].tolist()]
        torch.testing.assert_close(tokens(after)[b, inactive], tokens(before)[b, inactive])
        assert not torch.allclose(tokens(after)[b, active[b]], tokens(before)[b, active[b]])
    with torch.no_grad():
        assert not torch.allclose(after, model(**moved))  # the inactive tubes really were stale


def _assert_sparse_after_dense_is_exact(ras, kw: dict, index: torch.Tensor) -> None:
    dense = ras(**kw)
    ras.ras_controller.override_next_step("sparse", index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same timestep twice in a row, on purpose
        torch.testing.assert_close(ras(**kw), dense, rtol=1e-5, atol=1e-5)


def test_a_joint_text_and_video_sequence_keeps_the_plain_reading():
    """Text concatenated in front of every frame's tokens (joint attention) is refused by the tube reading
    (a concatenation along the tube rows), so the plain reading (every frame patch a token, the text at an
    offset) is kept, and stays exact."""
    model = _model(blocks=("joint", "full"), flat_pos=True)
    ras = ras_compile(model, POLICY, backend=None)
    kw = _inputs()
    analysis = ras.ras_analysis(**kw)
    assert analysis.grid.tube_axes == () and analysis.num_tokens == (FRAMES // 2) * S
    assert len(analysis.attention) == 2
    _assert_sparse_after_dense_is_exact(ras, kw, torch.tensor([[1, 4, 30], [0, 2, 47]]))


def test_a_full_attention_video_model_keeps_one_token_per_frame_patch():
    """Only full attention over all frames: the tube reading runs as many nodes on the active rows as
    the plain one, so the finer plain reading (one token per frame patch) is kept."""
    model = _model(blocks=("full", "full"), flat_pos=True)
    analysis = ras_compile(model, POLICY, backend=None).ras_analysis(**_inputs())
    assert analysis.num_tokens == (FRAMES // 2) * S and analysis.grid.tube_axes == ()


def test_a_per_frame_side_branch_alone_does_not_make_tokens_tubes():
    """Full attention over all frames plus a per-frame cross-attention branch (Wan-Animate's face
    adapter): the plain reading densifies at the per-frame view and runs that branch on every token;
    the tube reading would run it on the active rows, but with three times coarser tokens and the same
    self-attention on the active rows, so the plain reading is kept."""
    model = _model(blocks=("frame_cross", "full"), flat_pos=True)
    ras = ras_compile(model, POLICY, backend=None)
    kw = _inputs()
    analysis = ras.ras_analysis(**kw)
    assert analysis.num_tokens == (FRAMES // 2) * S and analysis.grid.tube_axes == ()
    assert analysis.counts["densified"] == 2  # the per-frame view and the unpatchify
    _assert_sparse_after_dense_is_exact(ras, kw, torch.tensor([[1, 4, 30], [0, 2, 47]]))


def test_tubes_never_keeps_one_token_per_frame_patch_where_the_plain_reading_serves():
    """Positions added on the flat sequence: the tube reading is chosen by default (it runs more on
    the active rows); ``RASPolicy(tubes="never")`` keeps the plain reading, which densifies at the
    per-frame views, and stays exact."""
    model = _model(flat_pos=True)
    kw = _inputs()
    auto = ras_compile(model, POLICY, backend=None).ras_analysis(**kw)
    ras = ras_compile(model, RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=(), tubes="never"), backend=None)
    never = ras.ras_analysis(**kw)
    assert auto.grid.tube_axes == (2,) and auto.num_tokens == S
    assert never.grid.tube_axes == () and never.num_tokens == (FRAMES // 2) * S
    assert never.layouts[never.source].outer == 1 and never.counts["densified"] > auto.counts["densified"]
    _assert_sparse_after_dense_is_exact(ras, kw, torch.tensor([[1, 4, 30], [0, 2, 47]]))


def test_tubes_never_serves_positions_added_per_frame_through_the_token_grid():
    """``(x.reshape(b, t, s, D) + pos).reshape(b, t * s, D)``: the plain reading follows the
    per-frame view as a token grid (passes/token_grid.py), so with ``tubes="never"`` the model is
    served with one token per frame patch; the frame-wise blocks are densified, and it stays exact."""
    kw = _inputs()
    ras = ras_compile(_model(), RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=(), tubes="never"),
                      backend=None)
    never = ras.ras_analysis(**kw)
    assert never.grid.tube_axes == () and never.num_tokens == (FRAMES // 2) * S
    assert any(lay.grid == (FRAMES // 2, S) for lay in never.layouts.values() if hasattr(lay, "grid"))
    _assert_sparse_after_dense_is_exact(ras, kw, torch.tensor([[1, 4, 30], [0, 2, 47]]))


class TemporalFirst(SequenceVideoDiT):
    """Attention over the frames of each position with no residual, then over the whole sequence:
    without tubes, the first view reorders the token grid, so everything after it would be dense."""

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        b, c, f, h, w = hidden_states.shape
        t, s = f // self.pt, (h // 2) * (w // 2)
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        y = x.reshape(b, t, s, D).permute(0, 2, 1, 3).reshape(b * s, t, D)
        x = self._attend(y, self.qkv[0]).reshape(b, s, t, D).permute(0, 2, 1, 3).reshape(b, t * s, D)
        x = x + self._attend(x, self.qkv[1])
        x = self.final(x).reshape(b, t, h // 2, w // 2, self.pt, 2, 2, c)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, f, h, w)


def test_tubes_never_refuses_what_only_tubes_serve_and_says_so():
    torch.manual_seed(0)
    ras_compile(TemporalFirst().eval(), POLICY, backend=None).ras_analysis(**_inputs())  # tubes serve it
    ras = ras_compile(TemporalFirst().eval(), RASPolicy(tubes="never"), backend=None)
    with pytest.raises(UnsupportedModelError, match=r"RASPolicy\(tubes='never'\) tried no reading where a token "
                                                    r"spans the frames; tubes='auto' does"):
        ras(**_inputs())


def test_a_frame_folded_with_the_samples_into_the_sequence_is_refused():
    """A view that puts the samples inside the token axis (``[B, T, S, D] -> [T, B * S, D]``) has no
    reading: the plain one densifies there and says so, the tube one would have to cache K/V on a
    token axis folded into the batch; refused, never run wrong."""

    class Mixed(SequenceVideoDiT):
        def forward(self, hidden_states, timestep, encoder_hidden_states):
            b, c, f, h, w = hidden_states.shape
            t, s = f // self.pt, (h // 2) * (w // 2)
            x = self.embed(hidden_states).flatten(2).transpose(1, 2)
            y = x.reshape(b, t, s, D).transpose(0, 1).reshape(t, b * s, D)   # samples merged into the tokens
            y = self._attend(y, self.qkv[0]).reshape(t, b, s, D).transpose(0, 1).reshape(b, t * s, D)
            x = self.final(x + y).reshape(b, t, h // 2, w // 2, self.pt, 2, 2, c)
            return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, f, h, w)

    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError) as info:
        ras_compile(Mixed().eval(), POLICY, backend=None).ras_analysis(**_inputs())
    assert "reaches no scaled_dot_product_attention node: the token stream ends where" in str(info.value)


def test_kv_projections_over_tube_rows_fuse_with_their_cache_write():
    """The full block's K/V live on the ``(frame, token)`` rows of ``[B, T * S, D]``: their projections
    fuse with the cache write (``outer * k`` rows scattered at every block's positions), and the fused
    sparse step equals the unfused one and the dense output."""
    model = _model(blocks=("spatial", "temporal", "full"))
    kw = _inputs()
    index = torch.tensor([[0, 5, 17], [2, 3, 23]])
    results = []
    for fuse in (False, True):
        ras = ras_compile(model, POLICY, backend=None, fuse_kv_projection=fuse)
        dense = ras(**kw)
        ras.ras_controller.override_next_step("sparse", index)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results.append((dense, ras(**kw), ras.ras_analysis(**kw)))
    (dense, unfused, _), (dense_f, fused, analysis) = results
    assert [f.linear for f in analysis.fused_projections]  # the full block's split K and V
    assert all(analysis.layouts[f.linear].outer == FRAMES // 2 for f in analysis.fused_projections)
    torch.testing.assert_close(dense_f, dense, rtol=0, atol=0)
    torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused, dense, rtol=1e-5, atol=1e-5)
