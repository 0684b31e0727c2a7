"""Token mixers of research DiTs inside a plain DiT block: each one either runs token-wise on the
active rows or is densified (runs on the full input), never silently wrong.

Every mixer sits in the middle of three blocks, between the attention and the feed-forward. The
property: a sparse step right after a dense step on the same inputs returns the model's output for
any active set (hypothesis). The explanation says which mixers were densified and why; the
token-wise ones (the same operators over the channels) must not be.

Two bugs found by probes are pinned here: a norm over the token axis (``x.norm(dim=1)``,
``torch.norm(x, p=2, dim=1)``: ``linalg_vector_norm(x, ord, dim)``) was read with the order as
its dims, so it ran token-wise and a sparse step returned wrong values; ``F.normalize`` (an order
of ``2.0``) crashed the analysis. ``view_as`` / ``reshape_as`` to the grid and back had no rule.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from ras_compile import RASPolicy, explain
from sparse_checks import assert_sparse_after_dense_equals_the_model, compiled_once, random_active_sets

C, D, HEADS, H, W, P = 4, 16, 2, 8, 12, 2
GH, GW = H // P, W // P
N = GH * GW


def _gather_by_rank(x):  # argsort over tokens, used as a feature (ranks are token-mixing)
    return x + 1e-2 * torch.argsort(x.sum(-1), dim=1).unsqueeze(-1).to(x.dtype)


# name -> (mixer on [B, N, D], words of the densify reason or None when it is token-wise)
MIXERS = {
    "norm_over_tokens": (lambda x: x / x.norm(dim=1, keepdim=True) * math.sqrt(N), "reduction"),
    "grn_torch_norm": (lambda x: x * torch.norm(x, p=2, dim=1, keepdim=True) / 4, "reduction"),
    "p1_norm_over_tokens_rank4": (
        lambda x: (lambda h: (h / h.norm(p=1, dim=2, keepdim=True)).transpose(1, 2).reshape(x.shape))(
            x.view(x.shape[0], N, HEADS, D // HEADS).transpose(1, 2)) * N, "reduction"),
    "normalize_channels": (lambda x: F.normalize(x, dim=-1) * math.sqrt(D), None),
    "normalize_over_tokens": (lambda x: F.normalize(x, dim=1) * math.sqrt(N), "reduction"),
    "cumsum_tokens": (lambda x: x.cumsum(1) / N, "cumulative"),
    "cumsum_channels": (lambda x: x.cumsum(-1) / D, None),
    "roll_tokens": (lambda x: torch.roll(x, 1, dims=1), "roll"),
    "roll_channels": (lambda x: torch.roll(x, 3, dims=-1), None),
    "roll_flat": (lambda x: torch.roll(x, 5), "roll"),
    "flip_tokens": (lambda x: x + x.flip(1), "flip"),
    "flip_channels": (lambda x: x + x.flip(-1), None),
    "argsort_tokens": (_gather_by_rank, "argsort"),
    "avg_pool_tokens": (lambda x: F.avg_pool1d(x.transpose(1, 2), 3, 1, 1, count_include_pad=False).transpose(1, 2),
                        "pooling"),
    "avg_pool_channels": (lambda x: F.avg_pool1d(x, 3, 1, 1), None),
    "adaptive_pool_tokens": (lambda x: x + F.adaptive_avg_pool1d(x.transpose(1, 2), 1).transpose(1, 2), "pooling"),
    # einsum read by its letters: the tokens' letter kept is token-wise, summed away it mixes tokens
    "einsum_projection": (lambda x: torch.einsum("bnd,de->bne", x, torch.eye(D) * 0.5), None),
    "einsum_token_mix": (lambda x: torch.einsum("bnd,mn->bmd", x, torch.ones(N, N) / N), "einsum that sums"),
    "einsum_linear_attention": (lambda x: torch.einsum("bnd,bde->bne", x, torch.einsum("bnd,bne->bde", x, x) / N),
                                "einsum that sums"),
    # the grid and back through the _as forms (passes/shape_forms.py): token-wise
    "view_as_grid": (lambda x: (x.view(x.shape[0], GH, GW, D) * 0.5 + 1).view_as(x), None),
    "reshape_as_grid": (lambda x: (x.reshape(x.shape[0], GH, GW, D) - 1).reshape_as(x), None),
}


class MixerDiT(nn.Module):
    def __init__(self, mixer, token_mlp: bool = False):
        super().__init__()
        self.mixer = mixer
        self.embed = nn.Conv2d(C, D, P, stride=P)
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(3))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)) for _ in range(3))
        self.token_mlp = nn.Sequential(nn.Linear(N, 2 * N), nn.GELU(), nn.Linear(2 * N, N)) if token_mlp else None
        self.out = nn.Linear(D, P * P * C)

    def forward(self, latent, timestep):
        b = latent.shape[0]
        x = self.embed(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
        for i, (qkv, mlp) in enumerate(zip(self.qkv, self.mlp)):
            q, k, v = qkv(x).reshape(b, N, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
            x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, N, D)
            if i == 1:
                x = x + (self.mixer(x) if self.token_mlp is None else self.token_mlp(x.transpose(1, 2)).transpose(1, 2))
            x = x + mlp(x)
        x = self.out(x).view(b, GH, GW, P, P, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, C, H, W)


def _model(name: str) -> MixerDiT:
    torch.manual_seed(0)
    if name == "token_mlp":
        return MixerDiT(None, token_mlp=True).eval()
    return MixerDiT(MIXERS[name][0]).eval()


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(latent=torch.randn(2, C, H, W, generator=g), timestep=torch.tensor([500.0, 300.0]))


NAMES = [*MIXERS, "token_mlp"]
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_sparse_step_after_dense_step_equals_the_model(name, data):
    model, ras = compiled_once((__name__, name), lambda: _model(name), POLICY)
    assert_sparse_after_dense_equals_the_model(model, ras, _inputs(data.draw(st.integers(0, 3))),
                                               random_active_sets(data, N))


@pytest.mark.parametrize("name", NAMES)
def test_mixing_operators_are_densified_and_token_wise_ones_are_not(name):
    words = "projection over the token axis" if name == "token_mlp" else MIXERS[name][1]
    ex = explain(_model(name), _inputs(), POLICY, verbose=False)
    reasons = [reason for _value, _consumer, reason in ex.densified]
    mixing = [r for r in reasons if "unpatchify" not in r and "split back into the latent grid" not in r]
    if words is None:
        assert mixing == [], reasons
    else:
        assert any(words in r for r in mixing), reasons
    assert ex.flop_fraction < 0.7  # the other blocks, and the mixer's own block's attention, run sparse
