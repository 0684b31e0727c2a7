"""Sequences assembled in place, and per-sample loops (passes/buffer_writes.py, passes/sample_loops.py).

``JointDiT`` builds its joint text + image sequence in a zeros buffer, by slices
(``seq[:, :T] = text; seq[:, T:] = image``) or per sample (``for i: seq[i, T:] = image[i]``,
and the output ``stack([seq[i, T:] for i])``), as Lumina-Image-2.0 does. Rewritten as
``cat`` / batched views, the analysis follows them: a sparse step after a dense step
equals the model for any active set. Writes the rewrite does not cover (a read between
two writes) leave the buffer in place, and an image-token value written into it is
refused: on a sparse step the write would land in a gathered copy.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ras_compile import RASPolicy, UnsupportedModelError, ras_compile
from ras_compile.passes.buffer_writes import concatenate_buffer_writes
from ras_compile.passes.sample_loops import rebatch_sample_stacks
from exported import Exported
from sparse_checks import (assert_ratio_one_loop_equals_the_model, assert_sparse_after_dense_equals_the_model,
                           compiled_once, random_active_sets)

aten = torch.ops.aten
C, D, HEADS, H, W, P, T = 4, 16, 2, 8, 12, 2, 5
N = (H // P) * (W // P)
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


class JointDiT(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.embed, self.text = nn.Conv2d(C, D, P, stride=P), nn.Linear(8, D)
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(2))
        self.out = nn.Linear(D, P * P * C)

    def forward(self, latent, timestep, caption):
        b = latent.shape[0]
        img = self.embed(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
        txt = self.text(caption)
        seq = img.new_zeros(b, T + 1 + N, D)  # one row left zero between text and image
        if self.mode == "slices":
            seq[:, :T] = txt
            seq[:, T + 1:] = img
        elif self.mode == "loop":
            for i in range(b):
                seq[i, :T] = txt[i]
                seq[i, T + 1:] = img[i]
        elif self.mode == "read_between":  # the buffer is read before the image is written
            seq[:, :T] = txt
            pooled = seq.mean(1, keepdim=True)
            seq[:, T + 1:] = img
            seq = seq + pooled
        for qkv in self.qkv:
            q, k, v = (t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2) for t in qkv(seq).chunk(3, -1))
            seq = seq + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        out = self.out(seq)
        if self.mode == "loop":  # unpatchified per sample, then stacked
            return torch.stack([out[i, T + 1:].view(H // P, W // P, P, P, C).permute(4, 0, 2, 1, 3)
                                .flatten(3, 4).flatten(1, 2) for i in range(b)])
        x = out[:, T + 1:].view(b, H // P, W // P, P, P, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, C, H, W)


def _model(mode: str) -> JointDiT:
    torch.manual_seed(0)
    return JointDiT(mode).eval()


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(latent=torch.randn(2, C, H, W, generator=g), timestep=torch.tensor([500.0, 300.0]),
                caption=torch.randn(2, T, 8, generator=g))




@pytest.mark.parametrize("mode", ["slices", "loop"])
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_sparse_step_after_dense_step_equals_the_model(mode, data):
    model, ras = compiled_once((__name__, mode), lambda: _model(mode), POLICY)
    assert_sparse_after_dense_equals_the_model(model, ras, _inputs(data.draw(st.integers(0, 3))),
                                               random_active_sets(data, N))


@pytest.mark.parametrize("mode", ["slices", "loop"])
def test_the_joint_sequence_is_attention_over_cached_kv(mode):
    analysis = ras_compile(_model(mode), POLICY, backend=None).ras_analysis(**_inputs())
    assert len(analysis.attention) == 2 and analysis.num_tokens == N
    assert_ratio_one_loop_equals_the_model(_model(mode), lambda step: _inputs(step))


def test_a_write_the_rewrite_does_not_cover_is_refused():
    ras = ras_compile(_model("read_between"), POLICY, backend=None)
    with pytest.raises(UnsupportedModelError) as info:
        ras(**_inputs())
    assert info.value.op == "aten.copy_.default"
    assert "in-place write of image-token values into a tensor that holds none" in str(info.value)


# --------------------------------------------------------------------------- the rewrites on their own


def _graph(fn, *args) -> Exported:
    return Exported(fn, *args)


def _targets(program):
    return program.targets()


def _full_buffer(a, b):
    buf = a.new_full((2, 9, 3), 7.0)
    buf[:, 1:4] = a            # a gap of fill before, and after
    buf[:, 5:8] = b * 2
    return buf + 1


def _per_sample_fill(a, b):
    mask = torch.zeros(2, 6, dtype=torch.bool)
    for i in range(2):
        mask[i, :3] = True
    buf = a.new_zeros(2, 6, 3)
    for i in range(2):
        buf[i, 3:] = a[i].flip(0)
    return buf * mask[..., None] + b.sum()


def _selected_axis(a, b):
    buf = a.new_zeros(2, 2, 3, 3)
    buf[:, 0] = a              # a select on axis 1, the value broadcast to the view
    buf[:, 1] = b[:, :1]
    return buf


@pytest.mark.parametrize("fn,shapes", [
    (_full_buffer, ((2, 3, 3), (2, 3, 3))),
    (_per_sample_fill, ((2, 3, 3), (1,))),
    (_selected_axis, ((2, 3, 3), (2, 3, 3))),
])
def test_writes_that_tile_a_fresh_buffer_become_a_cat_with_the_same_values(fn, shapes):
    args = tuple(torch.randn(*s) for s in shapes)
    gm = _graph(fn, *args)
    assert concatenate_buffer_writes(gm.gm) >= 1
    assert aten.copy_.default not in _targets(gm) and aten.cat.default in _targets(gm)
    torch.testing.assert_close(gm(*args), fn(*args))


def _computed_buffer(a, b):
    joint = torch.cat([a, a.new_zeros(2, 4, 3)], 1) * 2   # a computed tensor, not a fresh buffer
    joint[:, 3:6] = b                                       # the parts left: rows 0:3 and 6:7 as they were
    return joint.sin()


def test_writes_into_a_computed_tensor_become_a_cat_of_it_and_the_values():
    args = (torch.randn(2, 3, 3), torch.randn(2, 3, 3))
    gm = _graph(_computed_buffer, *args)
    assert concatenate_buffer_writes(gm.gm) == 1
    assert aten.copy_.default not in _targets(gm) and aten.cat.default in _targets(gm)
    torch.testing.assert_close(gm(*args), _computed_buffer(*args))


def _into_a_view(a, b):
    joint = torch.cat([a, a.new_zeros(2, 4, 3)], 1)
    rows = joint.view(2, 7, 3)  # a view: the write reaches joint too
    rows[:, 3:6] = b
    return joint + rows


def _into_an_input(a, b):
    a[:, 1:] = b[:, :2]         # the caller's tensor is written
    return a * 2


@pytest.mark.parametrize("fn", [_into_a_view, _into_an_input])
def test_writes_into_a_view_or_an_input_are_left_alone(fn):
    args = (torch.randn(2, 3, 3), torch.randn(2, 3, 3))
    gm = _graph(fn, *(a.clone() for a in args))
    assert concatenate_buffer_writes(gm.gm) == 0
    assert aten.copy_.default in _targets(gm)
    torch.testing.assert_close(gm(*(a.clone() for a in args)), fn(*(a.clone() for a in args)))


def _overlapping(a, b):
    buf = a.new_zeros(2, 6, 3)
    buf[:, :4] = a.repeat(1, 2, 1)[:, :4]
    buf[:, 2:] = b.repeat(1, 2, 1)[:, :4]  # overwrites rows 2, 3
    return buf


def _two_axes(a, b):
    buf = a.new_zeros(2, 6, 6)
    buf[:, :3, :3] = a
    buf[:, 3:, 3:] = b
    return buf


@pytest.mark.parametrize("fn", [_overlapping, _two_axes])
def test_writes_that_do_not_tile_one_axis_are_left_alone(fn):
    args = (torch.randn(2, 3, 3), torch.randn(2, 3, 3))
    gm = _graph(fn, *args)
    assert concatenate_buffer_writes(gm.gm) == 0
    assert aten.copy_.default in _targets(gm)
    torch.testing.assert_close(gm(*args), fn(*args))


def _stacked(x):
    return torch.stack([x[i, 1:].view(2, 3, 4).permute(2, 0, 1).flatten(1) * 2 for i in range(x.shape[0])])


def _stacked_out_of_order(x):
    return torch.stack([x[1], x[0]])


def test_a_stack_of_the_same_per_sample_chain_is_the_chain_over_the_batch():
    x = torch.randn(3, 7, 4)
    gm = _graph(_stacked, x)
    assert rebatch_sample_stacks(gm.gm) == 1
    assert aten.stack.default not in _targets(gm) and aten.select.int not in _targets(gm)
    torch.testing.assert_close(gm(x), _stacked(x))
    gm = _graph(_stacked_out_of_order, x[:2])
    assert rebatch_sample_stacks(gm.gm) == 0  # samples in another order: no batched chain
