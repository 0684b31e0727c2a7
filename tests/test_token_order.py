"""Image tokens in column-major order (``x.transpose(2, 3).flatten(2)``: token ``i`` is patch
``(i % H, i // H)``), as some ports of JAX / channel-last code write the patchify.

The analysis reads the grid's axes in token order (``grid_axes == (3, 2)``), so the prediction is
cut into patches the way the tokens are, and a token's score is its own patch's. The property:
the same model with row-major tokens (attention without positions is order-equivariant, so both
compute one function) picks the same patches and returns the same outputs over a whole RAS loop.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ras_compile import RASPolicy, ras_compile
from sparse_checks import assert_sparse_after_dense_equals_the_model, compiled_once, random_active_sets

C, D, P, H, W = 4, 16, 2, 8, 12
HC, WC = H // P, W // P
N = HC * WC
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


class OrderDiT(nn.Module):
    def __init__(self, column_major: bool):
        super().__init__()
        self.column_major = column_major
        self.embed = nn.Conv2d(C, D, P, stride=P)
        self.qkv, self.mlp = nn.Linear(D, 3 * D), nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.out = nn.Linear(D, P * P * C)

    def forward(self, latent, timestep):
        b = latent.shape[0]
        grid = self.embed(latent) * (1 + timestep[:, None, None, None] / 1000)
        x = (grid.transpose(2, 3) if self.column_major else grid).flatten(2).transpose(1, 2)
        q, k, v = (t.unflatten(-1, (2, D // 2)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + self.mlp(x)
        if self.column_major:  # tokens (w, h): patches back to (h, w)
            out = self.out(x).view(b, WC, HC, P, P, C).permute(0, 5, 2, 3, 1, 4)
        else:
            out = self.out(x).view(b, HC, WC, P, P, C).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, C, H, W)


def _model(column_major: bool) -> OrderDiT:
    torch.manual_seed(0)
    return OrderDiT(column_major).eval()


def _inputs(seed: int, t: float = 900.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(latent=torch.randn(2, C, H, W, generator=g), timestep=torch.tensor([t, t]))


def test_the_grid_is_read_in_token_order():
    analysis = ras_compile(_model(True), POLICY, backend=None).ras_analysis(**_inputs(0))
    assert analysis.num_tokens == N and analysis.grid.grid_axes == (3, 2) and analysis.grid.grid_shape == (WC, HC)
    assert len(analysis.attention) == 1


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_sparse_step_after_dense_step_equals_the_model(data):
    model, ras = compiled_once((__name__,), lambda: _model(True), POLICY)
    assert_sparse_after_dense_equals_the_model(model, ras, _inputs(data.draw(st.integers(0, 3))),
                                               random_active_sets(data, N))


def _column_of(row_major_tokens: torch.Tensor) -> torch.Tensor:
    """Row-major token ids (h * WC + w) as column-major ones (w * HC + h)."""
    h, w = row_major_tokens // WC, row_major_tokens % WC
    return w * HC + h


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_a_loop_picks_the_same_patches_as_the_row_major_model(ratio):
    policy = RASPolicy(sample_ratio=ratio, warmup_steps=1, reset_steps=())
    rows, cols = (ras_compile(_model(m), policy, backend=None) for m in (False, True))
    latent = _inputs(0)["latent"]
    with torch.no_grad():
        for step in range(5):
            kw = dict(latent=latent, timestep=torch.full((2,), 900.0 - 150 * step))
            a, b = rows(**kw), cols(**kw)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            if step:
                picked = rows.ras_controller.last_index
                want = torch.stack([_column_of(i).sort().values for i in picked])
                assert torch.equal(cols.ras_controller.last_index.sort(-1).values, want), step
            latent = latent - 0.1 * a
    assert [s.mode for s in cols.ras_controller.stats] == ["dense"] + ["sparse"] * 4
