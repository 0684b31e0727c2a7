"""Views of a densified value, in a full-attention video DiT (tokens: frames x patches).

An operator that reads frames of the token sequence through a ``[B, T, S, D]`` view (a key
frame added to every frame, ``v[:, j:j + 1]``; a temporal shift, ``v[:, :-1]`` padded back) runs on
the full value: the view is densified there. Its slice bounds are then dense positions, kept as
they are (they were remapped as if they were sparse positions: a crash, and for a slice ending
near the end of the sequence a silently wrong frame).

An in-place write into such a view (the temporal shift module's reference form, ``out =
zeros_like(v); out[:, 1:, :, :f] = v[:, :-1, :, :f]; ...``) would land in the full copy that the
sparse graph makes for that view while ``out``'s other readers read its active rows: refused
under the plain reading (the frame-tube reading, in which the frames are not the token axis,
serves it).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from ras_compile import RASPolicy, UnsupportedModelError, ras_compile
from sparse_checks import (assert_ratio_one_loop_equals_the_model, assert_sparse_after_dense_equals_the_model,
                           compiled_once, random_active_sets)

C, D, HEADS, T, H, W, P = 4, 16, 2, 3, 4, 8, 2
S = (H // P) * (W // P)
N = T * S
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


def _shift_cat(v):
    f = v.shape[-1] // 8
    return torch.cat([F.pad(v[:, :-1, :, :f], (0, 0, 0, 0, 1, 0)), F.pad(v[:, 1:, :, f:2 * f], (0, 0, 0, 0, 0, 1)),
                      v[:, :, :, 2 * f:]], -1)


def _shift_write(v):
    f = v.shape[-1] // 8
    out = torch.zeros_like(v)
    out[:, 1:, :, :f] = v[:, :-1, :, :f]
    out[:, :-1, :, f:2 * f] = v[:, 1:, :, f:2 * f]
    out[:, :, :, 2 * f:] = v[:, :, :, 2 * f:]
    return out


FRAME_OPS = {
    "first_frame": lambda v: v + 0.5 * v[:, 0:1],
    "middle_frame": lambda v: v + 0.5 * v[:, 1:2],
    "last_frame": lambda v: v + 0.5 * v[:, -1:],
    "all_but_last": lambda v: torch.cat([v[:, :1], v[:, :-1]], 1),
    "shift_cat": _shift_cat,
}


class FrameViewDiT(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        torch.manual_seed(0)
        self.op = {**FRAME_OPS, "shift_write": _shift_write}[op]
        self.embed = nn.Conv3d(C, D, (1, P, P), stride=(1, P, P))
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(2))
        self.out = nn.Linear(D, P * P * C)

    def forward(self, latent, timestep):
        b = latent.shape[0]
        x = self.embed(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
        for qkv in self.qkv:
            x = self.op(x.view(b, T, S, D)).reshape(b, N, D)
            q, k, v = (t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in qkv(x).chunk(3, -1))
            x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = self.out(x).view(b, T, H // P, W // P, P, P, C)
        return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, C, T, H, W)


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(latent=torch.randn(2, C, T, H, W, generator=g), timestep=torch.tensor([700.0, 400.0]))


@pytest.mark.parametrize("op", sorted(FRAME_OPS))
def test_ratio_one_equals_the_model(op):
    assert_ratio_one_loop_equals_the_model(FrameViewDiT(op).eval(), lambda step: _inputs(step))


@pytest.mark.parametrize("op", sorted(FRAME_OPS))
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_sparse_step_after_a_dense_step_equals_the_model(op, data):
    model, ras = compiled_once(("densified_views", op), lambda: FrameViewDiT(op).eval(), POLICY)
    seed = data.draw(st.integers(0, 3), label="seed")
    n = ras.ras_analysis(**_inputs()).num_tokens  # N, or S where a reading with frame tubes serves it
    near_full = data.draw(st.booleans(), label="near_full")  # k = n - 1: the silently wrong case
    index = torch.stack([torch.randperm(n)[1:].sort().values for _ in range(2)]) if near_full \
        else random_active_sets(data, n)
    assert_sparse_after_dense_equals_the_model(model, ras, _inputs(seed), index)


def test_a_write_into_a_densified_view_is_refused_without_frame_tubes():
    """Without tubes the readings left either write into a densified view (refused) or densify the
    stream before the attention; the refusal names one of them."""
    ras = ras_compile(FrameViewDiT("shift_write").eval(), RASPolicy(tubes="never"), backend=None)
    with pytest.raises(UnsupportedModelError, match="densified there|reaches no scaled_dot_product_attention"):
        ras(**_inputs())


def test_the_written_shift_is_served_by_the_frame_tube_reading():
    """Before the write check, the reading with the write into a densified view was taken: every step,
    ratio 1 included, lost the shifted channels."""
    model = FrameViewDiT("shift_write").eval()
    assert_ratio_one_loop_equals_the_model(model, lambda step: _inputs(step))
    ras = ras_compile(model, POLICY, backend=None)
    assert ras.ras_analysis(**_inputs()).num_tokens == S  # each token a tube through the frames
