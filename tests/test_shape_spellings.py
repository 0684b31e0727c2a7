"""Slices and splits of the token sequence in other spellings (passes/shape_forms.py).

In-context conditioning tokens (DiT's in-context variant: timestep and label tokens before the
image) are dropped at the end with ``x[:, 2:]``, ``x.narrow(1, 2, N)``, ``x.split([2, N], 1)`` or
``torch.tensor_split(x, [2], 1)``; the channels are cut into equal sections with
``torch.tensor_split(x, 2, -1)``. Every spelling is the same function, served
sparse: ratio 1 and a sparse step after a dense step equal the model.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from ras_compile import RASPolicy, explain
from sparse_checks import (assert_ratio_one_loop_equals_the_model, assert_sparse_after_dense_equals_the_model,
                           compiled_once, random_active_sets)

C, D, HEADS, H, W, P = 4, 16, 2, 8, 12, 2
N = (H // P) * (W // P)
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())
DROPS = {
    "slice": lambda x: x[:, 2:],
    "narrow": lambda x: x.narrow(1, 2, N),
    "narrow_negative_start": lambda x: x.narrow(1, -N, N),
    "split": lambda x: x.split([2, N], 1)[1],
    "tensor_split_indices": lambda x: torch.tensor_split(x, [2], dim=1)[1],
    "tensor_split_sections": lambda x: torch.cat(torch.tensor_split(x, 2, dim=-1)[::-1], -1)[:, 2:],
}


class InContextDiT(nn.Module):
    def __init__(self, drop: str):
        super().__init__()
        torch.manual_seed(0)
        self.drop = DROPS[drop]
        self.embed, self.t, self.y = nn.Conv2d(C, D, P, stride=P), nn.Linear(1, D), nn.Embedding(10, D)
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, P * P * C)

    def forward(self, latent, timestep, label):
        b = latent.shape[0]
        x = torch.cat([self.t(timestep[:, None, None] / 1000), self.y(label)[:, None],
                       self.embed(latent).flatten(2).transpose(1, 2)], 1)
        q, k, v = (t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = self.out(self.drop(x)).view(b, H // P, W // P, P, P, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, C, H, W)


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(latent=torch.randn(2, C, H, W, generator=g), timestep=torch.tensor([600.0, 200.0]),
                label=torch.tensor([3, 8]))


@pytest.mark.parametrize("drop", sorted(DROPS))
def test_ratio_one_equals_the_model(drop):
    assert_ratio_one_loop_equals_the_model(InContextDiT(drop).eval(), lambda step: _inputs(step))


@pytest.mark.parametrize("drop", sorted(DROPS))
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_sparse_step_after_a_dense_step_equals_the_model(drop, data):
    model, ras = compiled_once(("spellings", drop), lambda: InContextDiT(drop).eval(), POLICY)
    assert_sparse_after_dense_equals_the_model(model, ras, _inputs(data.draw(st.integers(0, 3))),
                                               random_active_sets(data, N))


@pytest.mark.parametrize("drop", sorted(DROPS))
def test_every_spelling_runs_on_the_active_tokens(drop):
    assert explain(InContextDiT(drop).eval(), _inputs(), POLICY, verbose=False).flop_fraction < 0.7
