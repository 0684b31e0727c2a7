"""A patch embedding whose kernel overlaps its neighbours (``Conv2d(C, D, 3, stride=2, padding=1)``,
``Conv2d(C, D, 4, stride=2, padding=1)``: one output position per 2x2 cell, each reading a wider
window), as convolutional-stem DiTs write it.

The embedding runs before the token source, on the full latent, so reading neighbouring pixels is
exact; token ``i`` owns the stride-sized cell ``i``, the cell the unpatchify writes it back to. The
properties every supported model keeps: a sparse step right after a dense step equals the model
for any active set, and the grid is read with the stride as the patch.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ras_compile import RASPolicy, UnsupportedModelError, ras_compile
from sparse_checks import assert_sparse_after_dense_equals_the_model, compiled_once, random_active_sets

C, D, P, H, W = 4, 16, 2, 8, 12
N = (H // P) * (W // P)
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())
EMBEDDINGS = {"k3s2p1": dict(kernel_size=3, stride=2, padding=1), "k4s2p1": dict(kernel_size=4, stride=2, padding=1),
              "k5s2p2": dict(kernel_size=5, stride=2, padding=2)}


class OverlapDiT(nn.Module):
    def __init__(self, **conv):
        super().__init__()
        self.embed = nn.Conv2d(C, D, **conv)
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, P * P * C)

    def forward(self, latent, timestep):
        b = latent.shape[0]
        x = self.embed(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
        q, k, v = (t.unflatten(-1, (2, D // 2)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        out = self.out(x).view(b, H // P, W // P, P, P, C).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, C, H, W)


def _model(name: str) -> OverlapDiT:
    torch.manual_seed(0)
    return OverlapDiT(**EMBEDDINGS[name]).eval()


def _inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(latent=torch.randn(2, C, H, W, generator=g), timestep=torch.tensor([700.0, 300.0]))


@pytest.mark.parametrize("name", sorted(EMBEDDINGS))
def test_the_stride_is_the_patch(name):
    analysis = ras_compile(_model(name), POLICY, backend=None).ras_analysis(**_inputs(0))
    assert analysis.num_tokens == N and analysis.grid.patch_size == (P, P) and len(analysis.attention) == 1


@pytest.mark.parametrize("name", sorted(EMBEDDINGS))
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_sparse_step_after_dense_step_equals_the_model(name, data):
    model, ras = compiled_once((__name__, name), lambda: _model(name), POLICY)
    assert_sparse_after_dense_equals_the_model(model, ras, _inputs(data.draw(st.integers(0, 3))),
                                               random_active_sets(data, N))


@pytest.mark.parametrize("conv", [dict(kernel_size=3, stride=2, padding=0),  # 3 x 5 positions: no cell each
                                  dict(kernel_size=2, stride=2, dilation=2, padding=1)])
def test_a_convolution_whose_positions_are_not_one_per_cell_is_refused_by_name(conv):
    class Odd(OverlapDiT):
        def forward(self, latent, timestep):
            x = self.embed(latent).flatten(2).transpose(1, 2)
            q, k, v = (t.unflatten(-1, (2, D // 2)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
            return F.scaled_dot_product_attention(q, k, v).sum() * latent

    ras = ras_compile(Odd(**conv).eval(), POLICY, backend=None)
    with pytest.raises(UnsupportedModelError, match="neither cuts patches"):
        ras.ras_analysis(**_inputs(0))
