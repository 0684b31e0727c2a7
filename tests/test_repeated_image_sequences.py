"""Attention over the image tokens twice: a decoder attending to ``[its tokens, the encoder's]``.

``DecoderDiT`` runs encoder blocks, then restarts a decoder stream from the patch embedding
whose attention keys are ``cat([decoder, encoder], 1)``: 2N key rows, each block of N the same
image tokens (MotifVideo's decoder layers). The concatenation is read as two blocks of the
token axis that hold the same active rows; a slice of whole blocks (RoPE on the decoder's
block only) is one of them. A slice that cuts a block is refused.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ras_compile import RASPolicy, UnsupportedModelError, ras_compile
from sparse_checks import assert_drawn_sparse_step_equals_the_model, assert_ratio_one_loop_equals_the_model

C, D, HEADS, H, W, P = 4, 16, 2, 8, 12, 2
N = (H // P) * (W // P)
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


class DecoderDiT(nn.Module):
    def __init__(self, cut: int = N):
        super().__init__()
        self.cut = cut
        self.embed = nn.Conv2d(C, D, P, stride=P)
        self.enc = nn.Linear(D, 3 * D)
        self.dec_q, self.dec_kv = nn.Linear(D, D), nn.Linear(D, 2 * D)
        self.out = nn.Linear(D, P * P * C)
        self.register_buffer("angle", torch.linspace(0, 3, N)[:, None] * torch.ones(D // HEADS))

    def heads(self, t):
        return t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2)

    def forward(self, latent, timestep):
        b = latent.shape[0]
        x0 = self.embed(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
        q, k, v = (self.heads(t) for t in self.enc(x0).chunk(3, -1))
        enc = x0 + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        dec = x0.clone()  # the decoder restarts from the patch embedding
        both = torch.cat([dec, enc], 1)
        k, v = (self.heads(t) for t in self.dec_kv(both).chunk(2, -1))
        rotated = k[:, :, : self.cut] * self.angle[: self.cut].cos()  # position terms on the decoder's keys only
        k = torch.cat([rotated, k[:, :, self.cut:]], 2)
        dec = dec + F.scaled_dot_product_attention(self.heads(self.dec_q(dec)), k, v).transpose(1, 2).flatten(2)
        x = self.out(dec).view(b, H // P, W // P, P, P, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, C, H, W)


def _model(cut: int = N) -> DecoderDiT:
    torch.manual_seed(0)
    return DecoderDiT(cut).eval()


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(latent=torch.randn(2, C, H, W, generator=g), timestep=torch.tensor([500.0, 300.0]))


def test_both_blocks_of_keys_are_cached():
    analysis = ras_compile(_model(), POLICY, backend=None).ras_analysis(**_inputs())
    assert analysis.num_tokens == N and len(analysis.attention) == 2  # the encoder's and the decoder's
    assert any(lay.outer == 2 for lay in analysis.layouts.values() if hasattr(lay, "outer"))
    assert_ratio_one_loop_equals_the_model(_model(), _inputs)  # compiled (aot_eager): the block sizes are k * o


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_sparse_step_after_dense_step_equals_the_model(data):
    assert_drawn_sparse_step_equals_the_model(data, (__name__,), _model, POLICY, _inputs, N)


def test_a_slice_through_a_block_is_refused():
    with pytest.raises(UnsupportedModelError) as info:
        ras_compile(_model(cut=N // 2), POLICY, backend=None).ras_analysis(**_inputs())
    assert "other than whole blocks of them" in str(info.value)
