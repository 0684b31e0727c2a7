"""One row of the token axis taken with ``select``, and the batch of a token sequence changed.

* A class / label token in the sequence read as ``x[:, 0]``, ``x[:, -1]`` or ``x[:, T + N]``
  (a CLS head, a label token that modulates the final layer) is a context row: always
  computed, so a sparse step reads it at its sparse position (after the image rows it moves
  with the active count).
* ``x[:, i]`` of an image token's row reads that token, active or not: it is densified.
* A batch doubled (or tiled, or split into groups) after the patch embedding, classifier-free
  guidance on the token features or perturbed-attention guidance's processors: each batch row
  runs on its latent sample's active tokens (``TokenLayout.samples``; tests/test_sample_rows.py).
  A prediction with another batch than the latent is refused by name.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ras_compile import RASPolicy, UnsupportedModelError, explain, ras_compile
from sparse_checks import assert_sparse_after_dense_equals_the_model, compiled_once, random_active_sets

C, D, HEADS, H, W, P = 4, 16, 2, 8, 12, 2
N = (H // P) * (W // P)
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


class LabelTokenDiT(nn.Module):
    """``[cls, image tokens, label]``; ``read`` picks the row the final modulation comes from."""

    def __init__(self, read: str):
        super().__init__()
        self.read = read
        self.embed = nn.Conv2d(C, D, P, stride=P)
        self.cls, self.label = nn.Parameter(torch.randn(1, 1, D)), nn.Embedding(10, D)
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(2))
        self.mod, self.out = nn.Linear(D, 2 * D), nn.Linear(D, P * P * C)

    def forward(self, latent, timestep, y):
        b = latent.shape[0]
        x = self.embed(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
        x = torch.cat([self.cls.expand(b, -1, -1), x, self.label(y)[:, None]], 1)
        for qkv in self.qkv:
            q, k, v = (t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2) for t in qkv(x).chunk(3, -1))
            x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        index = {"cls": 0, "last": -1, "label_position": 1 + N, "image_row": 3}[self.read]
        row = x[:, index]
        shift, scale = self.mod(row).unsqueeze(1).chunk(2, -1)
        out = self.out(x[:, 1:1 + N] * (1 + scale) + shift).view(b, H // P, W // P, P, P, C)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, C, H, W)


class DoubledBatchDiT(nn.Module):
    """Guidance on the token features: the token batch doubled inside the forward."""

    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.embed, self.qkv, self.out = nn.Conv2d(C, D, P, stride=P), nn.Linear(D, 3 * D), nn.Linear(D, P * P * C)

    def forward(self, latent, timestep, y):
        b = latent.shape[0]
        x = self.embed(latent).flatten(2).transpose(1, 2)
        if self.how == "output_guidance":
            pass
        elif self.how == "groups":  # perturbed-attention guidance's processors: each half of the batch its own way
            first, second = x.chunk(2)
            x = torch.cat([first * 2.0, second], 0)
            x = torch.cat([x, x], 0)
        else:
            x = {"cat": lambda: torch.cat([x, x], 0), "repeat": lambda: x.repeat(2, 1, 1),
                 "repeat_interleave": lambda: x.repeat_interleave(2, dim=0)}[self.how]()
        q, k, v = (t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        if self.how == "output_guidance":  # the batch halved after the unpatchify: one prediction for two
            out = self.out(x).view(b, H // P, W // P, P, P, C).permute(0, 5, 1, 3, 2, 4).reshape(b, C, H, W)
            cond, uncond = out.chunk(2)
            return uncond + 2.0 * (cond - uncond)
        cond, uncond = x.chunk(2) if self.how != "repeat_interleave" else (x[0::2], x[1::2])
        x = self.out(uncond + 2.0 * (cond - uncond)).view(b, H // P, W // P, P, P, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, C, H, W)


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(latent=torch.randn(2, C, H, W, generator=g), timestep=torch.tensor([500.0, 300.0]),
                y=torch.tensor([1, 7]))


def _model(read: str) -> LabelTokenDiT:
    torch.manual_seed(0)
    return LabelTokenDiT(read).eval()


READS = ["cls", "last", "label_position", "image_row"]


@pytest.mark.parametrize("read", READS)
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_sparse_step_after_dense_step_equals_the_model(read, data):
    model, ras = compiled_once((__name__, read), lambda: _model(read), POLICY)
    assert_sparse_after_dense_equals_the_model(model, ras, _inputs(data.draw(st.integers(0, 3))),
                                               random_active_sets(data, N))


@pytest.mark.parametrize("read", READS)
def test_a_context_row_is_read_sparse_and_an_image_row_densified(read):
    ex = explain(_model(read), _inputs(), POLICY, verbose=False)
    image_row = [r for _v, _c, r in ex.densified if "one image token's row" in r]
    assert bool(image_row) == (read == "image_row")
    assert len(ex.attention_cached_kv) == 2 and ex.flop_fraction < 0.7


@pytest.mark.parametrize("how", ["cat", "repeat", "repeat_interleave", "groups"])
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_a_token_batch_doubled_inside_the_forward_runs_each_row_on_its_samples_tokens(how, data):
    model, ras = compiled_once((__name__, "doubled", how), lambda: DoubledBatchDiT(how).eval(), POLICY)
    assert_sparse_after_dense_equals_the_model(model, ras, _inputs(data.draw(st.integers(0, 3))),
                                               random_active_sets(data, N))


def test_a_prediction_with_another_batch_than_the_latent_says_so():
    torch.manual_seed(0)
    ras = ras_compile(DoubledBatchDiT("output_guidance").eval(), POLICY, backend=None)
    with pytest.raises(UnsupportedModelError) as info:
        ras(**_inputs())
    assert "the prediction has the latent's grid but a batch of 1, not the latent's 2" in str(info.value)
