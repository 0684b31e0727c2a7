"""How the latent becomes tokens, beyond one patch embedding (passes/token_axis.py, grid phase).

* A stem convolution that keeps the latent's size (``x + conv3x3(x)`` before the patch
  embedding, "early convolution" ViTs; or a 3x3 ``conv_in`` whose positions are the tokens)
  runs on the full latent: every value before the token source does, so the positions keep
  their place in the grid (as through a GroupNorm).
* A second patch sequence of the latent cut like the token source (PixNerd's pixel patches,
  ``F.unfold(x)``, beside the patch embedding) is gathered where it is made; which of the
  two comes first in the code does not matter.
* A same-size convolution over channels that hold positions inside patches (after a pixel
  unshuffle) mixes patches together: refused, naming it.
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

C, D, HEADS, H, W, P = 4, 16, 2, 8, 12, 2
N = (H // P) * (W // P)
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


class Blocks(nn.Module):
    def __init__(self, depth: int = 2):
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(depth))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
                                 for _ in range(depth))

    def forward(self, x):
        for qkv, mlp in zip(self.qkv, self.mlp):
            q, k, v = (t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2) for t in qkv(x).chunk(3, -1))
            x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            x = x + mlp(x)
        return x


class StemDiT(nn.Module):
    """``x + conv3x3(x)`` on the full latent, then a patch convolution."""

    def __init__(self):
        super().__init__()
        self.stem, self.embed = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, D, P, stride=P)
        self.blocks, self.out = Blocks(), nn.Linear(D, P * P * C)

    def forward(self, latent, timestep):
        b = latent.shape[0]
        x = latent + self.stem(latent)
        x = self.embed(x).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
        x = self.out(self.blocks(x)).view(b, H // P, W // P, P, P, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, C, H, W)


class ConvInDiT(nn.Module):
    """A 3x3 ``conv_in`` on a small latent; each latent position is a token (patch size 1)."""

    def __init__(self):
        super().__init__()
        self.conv_in, self.blocks, self.out = nn.Conv2d(C, D, 3, padding=1), Blocks(), nn.Linear(D, C)

    def forward(self, latent, timestep):
        b, _, h, w = latent.shape
        x = self.conv_in(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
        return self.out(self.blocks(x)).transpose(1, 2).reshape(b, C, h, w)


class PixelDecoderDiT(nn.Module):
    """PixNerd-style: the latent's pixel patches (``F.unfold``) are decoded per token by an MLP
    modulated by that token's transformer output, then folded back."""

    def __init__(self, pixels_first: bool):
        super().__init__()
        self.pixels_first = pixels_first
        self.embed, self.blocks = nn.Conv2d(C, D, P, stride=P), Blocks()
        self.pix_in, self.film, self.pix_out = nn.Linear(C, D), nn.Linear(D, 2 * D), nn.Linear(D, C)

    def forward(self, latent, timestep):
        b = latent.shape[0]
        if self.pixels_first:
            pixels = F.unfold(latent, P, stride=P).transpose(1, 2)  # [B, N, C * P * P]
        s = self.embed(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
        if not self.pixels_first:
            pixels = F.unfold(latent, P, stride=P).transpose(1, 2)
        s = self.blocks(s)
        xp = pixels.reshape(b, N, C, P * P).transpose(2, 3)  # [B, N, P * P, C]
        scale, shift = self.film(s).unsqueeze(2).chunk(2, -1)
        xp = self.pix_out(F.silu(self.pix_in(xp) * (1 + scale) + shift))  # [B, N, P * P, C]
        return F.fold(xp.transpose(2, 3).reshape(b, N, C * P * P).transpose(1, 2), (H, W), P, stride=P)


class UnshuffleStemDiT(nn.Module):
    """A 3x3 convolution after a pixel unshuffle: its channels hold the positions inside each patch."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(C * P * P, D, 3, padding=1)
        self.blocks, self.out = Blocks(), nn.Linear(D, P * P * C)

    def forward(self, latent, timestep):
        b = latent.shape[0]
        x = self.stem(F.pixel_unshuffle(latent, P)).flatten(2).transpose(1, 2)
        x = self.out(self.blocks(x * (1 + timestep[:, None, None] / 1000)))
        return F.pixel_shuffle(x.transpose(1, 2).reshape(b, P * P * C, H // P, W // P), P)


SMALL = (4, 6)  # the ConvInDiT latent: 24 positions
MODELS = {
    "stem": (StemDiT, (H, W), N),
    "conv_in": (ConvInDiT, SMALL, SMALL[0] * SMALL[1]),
    "pixels_first": (lambda: PixelDecoderDiT(pixels_first=True), (H, W), N),
    "pixels_second": (lambda: PixelDecoderDiT(pixels_first=False), (H, W), N),
}


def _model(name):
    torch.manual_seed(0)
    return MODELS[name][0]().eval()


def _inputs(name, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(latent=torch.randn(2, C, *MODELS[name][1], generator=g), timestep=torch.tensor([500.0, 300.0]))




@pytest.mark.parametrize("name", list(MODELS))
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_sparse_step_after_dense_step_equals_the_model(name, data):
    model, ras = compiled_once((__name__, name), lambda: _model(name), POLICY)
    assert_sparse_after_dense_equals_the_model(model, ras, _inputs(name, data.draw(st.integers(0, 3))),
                                               random_active_sets(data, MODELS[name][2]))


@pytest.mark.parametrize("name", list(MODELS))
def test_the_tokens_are_the_patches_and_the_blocks_run_sparse(name):
    ras = ras_compile(_model(name), POLICY, backend=None)
    analysis = ras.ras_analysis(**_inputs(name))
    assert analysis.num_tokens == MODELS[name][2]
    assert len(analysis.attention) == 2
    if name.startswith("pixels"):  # the second patch sequence is gathered where it is cut
        assert analysis.side_sources and analysis.source not in analysis.side_sources


def test_a_same_size_convolution_over_patch_channels_is_refused_naming_it():
    torch.manual_seed(0)
    ras = ras_compile(UnshuffleStemDiT().eval(), POLICY, backend=None)
    with pytest.raises(UnsupportedModelError) as info:
        ras(latent=torch.randn(2, C, H, W), timestep=torch.tensor([500.0, 300.0]))
    assert "whose input channels hold positions inside the patches" in str(info.value)
    assert info.value.op == "aten.conv2d.default"


class DiptychDiT(nn.Module):
    """In-context diptych: a reference latent concatenated beside the noisy one before the patch
    embedding, the prediction cut back to the noisy half."""

    def __init__(self):
        super().__init__()
        self.embed, self.blocks, self.out = nn.Conv2d(C, D, P, stride=P), Blocks(), nn.Linear(D, P * P * C)

    def forward(self, latent, timestep, ref):
        b = latent.shape[0]
        x = self.embed(torch.cat([latent, ref], dim=-1)).flatten(2).transpose(1, 2)  # the pair, side by side
        x = self.out(self.blocks(x * (1 + timestep[:, None, None] / 1000))).view(b, H // P, 2 * W // P, P, P, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, C, H, 2 * W)[..., :W]


def test_a_latent_joined_along_a_spatial_axis_is_refused_naming_the_cat():
    torch.manual_seed(0)
    ras = ras_compile(DiptychDiT().eval(), POLICY, backend=None)
    with pytest.raises(UnsupportedModelError) as info:
        ras(latent=torch.randn(2, C, H, W), timestep=torch.tensor([500.0, 300.0]), ref=torch.randn(2, C, H, W))
    assert "concatenated with another tensor along a spatial axis at 'cat'" in str(info.value)
    assert "the pair, side by side" in str(info.value)
