"""Token tensors whose batch rows are not the latent's samples in order (``TokenLayout.samples``).

* ``LoopAttentionDiT``: attention in a per-sample Python loop, each sample with its own number of
  caption tokens (Mochi's processor: ``q[i:i + 1]`` joined with sample ``i``'s valid caption,
  attended, padded back, and the samples joined with ``cat(dim=0)``); with ``select=True`` the loop
  takes ``x[i]`` and joins with ``torch.stack``.
* ``GuidedDiT``: classifier-free guidance inside the forward: the token batch doubled by
  ``cat([x, x])`` (or ``repeat``), conditional and unconditional context, halves split by ``chunk(2)``
  and combined before the unpatchify.
* ``PerturbedDiT``: perturbed-attention guidance's processor: the batch (the pipeline's doubled
  latent) split into halves, the second half's attention replaced by its values, joined again.

Each row gets the active tokens of its own latent sample; the properties: ratio 1 equals the model,
and a sparse step right after a dense step equals the model for any active sets.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from ras_compile import RASPolicy, UnsupportedModelError, explain, ras_compile
from sparse_checks import (assert_ratio_one_loop_equals_the_model, assert_sparse_after_dense_equals_the_model,
                           compiled_once, random_active_sets)

C, D, HEADS, H, W, P, T = 4, 16, 2, 8, 12, 2, 5
N = (H // P) * (W // P)
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


def _init(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    return model.eval()


class _Patches(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.out = nn.Conv2d(C, D, P, stride=P), nn.Linear(D, P * P * C)

    def tokens(self, latent, timestep):
        return self.embed(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)

    def unpatchify(self, x):
        b = x.shape[0]
        x = self.out(x).view(b, H // P, W // P, P, P, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, C, H, W)


class LoopAttentionDiT(_Patches):
    def __init__(self, select: bool = False):
        super().__init__()
        self.select = select
        self.text = nn.Linear(8, D)
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(2))
        self.text_qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(2))
        self.proj = nn.ModuleList(nn.Linear(D, D) for _ in range(2))

    def heads(self, t):
        return t.unflatten(-1, (HEADS, -1)).transpose(-3, -2)

    def forward(self, latent, timestep, caption, mask):
        x, c = self.tokens(latent, timestep), self.text(caption)
        lengths = mask.sum(1).tolist()  # each sample's caption length, read on the host
        for qkv, text_qkv, proj in zip(self.qkv, self.text_qkv, self.proj):
            q, k, v = (self.heads(t) for t in qkv(x).chunk(3, dim=-1))
            tq, tk, tv = (self.heads(t) for t in text_qkv(c).chunk(3, dim=-1))
            outs = []
            for i, n in enumerate(lengths):
                if self.select:  # x[i]: one sample, no batch axis
                    o = F.scaled_dot_product_attention(q[i], torch.cat([k[i], tk[i, :, :n]], dim=1),
                                                       torch.cat([v[i], tv[i, :, :n]], dim=1))
                else:  # x[i:i + 1], Mochi's processor
                    o = F.scaled_dot_product_attention(
                        torch.cat([q[i:i + 1], tq[i:i + 1, :, :n]], dim=2),
                        torch.cat([k[i:i + 1], tk[i:i + 1, :, :n]], dim=2),
                        torch.cat([v[i:i + 1], tv[i:i + 1, :, :n]], dim=2))
                    o = F.pad(o, (0, 0, 0, T - n))[:, :, :N]  # back to one length, the image rows kept
                outs.append(o)
            o = torch.stack(outs) if self.select else torch.cat(outs, dim=0)
            x = x + proj(o.transpose(1, 2).flatten(2))
        return self.unpatchify(x)


class GuidedDiT(_Patches):
    def __init__(self, double: str = "cat"):
        super().__init__()
        self.double = double
        self.text, self.null = nn.Linear(8, D), nn.Parameter(torch.randn(1, T, D))
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(2))
        self.proj = nn.ModuleList(nn.Linear(D, D) for _ in range(2))

    def forward(self, latent, timestep, caption, guidance_scale: float = 4.0):
        x = self.tokens(latent, timestep)
        b = x.shape[0]
        x = torch.cat([x, x]) if self.double == "cat" else x.repeat(2, 1, 1)
        c = torch.cat([self.text(caption), self.null.expand(b, -1, -1)])
        for qkv, proj in zip(self.qkv, self.proj):
            q, k, v = (t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in qkv(torch.cat([c, x], 1)).chunk(3, -1))
            x = x + proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))[:, T:]
        cond, uncond = x.chunk(2)
        return self.unpatchify(uncond + guidance_scale * (cond - uncond))


class PerturbedDiT(_Patches):
    def __init__(self):
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(2))
        self.proj = nn.ModuleList(nn.Linear(D, D) for _ in range(2))

    def forward(self, latent, timestep):
        x = self.tokens(latent, timestep)
        for qkv, proj in zip(self.qkv, self.proj):
            org, ptb = x.chunk(2)  # PAG: the second half of the batch attends to itself only
            q, k, v = (t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in qkv(org).chunk(3, -1))
            org = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            ptb = qkv(ptb).chunk(3, -1)[2]  # the perturbed path: attention replaced by its values
            x = x + proj(torch.cat([org, ptb]))
        return self.unpatchify(x)


def _caption_inputs(b=2, seed=0, lengths=(5, 2)):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, T, dtype=torch.long)
    for i, n in enumerate(lengths[:b]):
        mask[i, :n] = 1
    return dict(latent=torch.randn(b, C, H, W, generator=g), timestep=torch.tensor([700.0, 300.0][:b]),
                caption=torch.randn(b, T, 8, generator=g), mask=mask)


def _plain_inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(latent=torch.randn(b, C, H, W, generator=g), timestep=torch.linspace(800, 200, b))


CASES = {
    "loop_slices": (lambda: _init(LoopAttentionDiT()), _caption_inputs, 2),
    "loop_select": (lambda: _init(LoopAttentionDiT(select=True)), _caption_inputs, 2),
    "guidance_cat": (lambda: _init(GuidedDiT("cat")), lambda b=2, seed=0: {
        k: v for k, v in _caption_inputs(b, seed).items() if k != "mask"}, 2),
    "guidance_repeat": (lambda: _init(GuidedDiT("repeat")), lambda b=2, seed=0: {
        k: v for k, v in _caption_inputs(b, seed).items() if k != "mask"}, 2),
    "perturbed_halves": (lambda: _init(PerturbedDiT()), _plain_inputs, 4),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_ratio_one_equals_the_model(name):
    make, inputs, batch = CASES[name]
    assert_ratio_one_loop_equals_the_model(make(), lambda step: inputs(batch, step))


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_sparse_step_after_a_dense_step_equals_the_model(name, data):
    make, inputs, batch = CASES[name]
    model, ras = compiled_once(("sample_rows", name), make, POLICY)
    kw = inputs(batch, data.draw(st.integers(0, 3), label="seed"))
    assert_sparse_after_dense_equals_the_model(model, ras, kw, random_active_sets(data, N, batch))


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_row_computes_only_its_samples_active_tokens(name):
    """The per-sample pieces, the doubled batch and its halves all run on the active tokens: the FLOP
    fraction of a sparse step at ratio 0.5 is well below a dense step's."""
    make, inputs, batch = CASES[name]
    e = explain(make(), inputs(batch, 0), POLICY, verbose=False)
    assert e.flop_fraction < 0.7, e.flop_fraction


def test_samples_joined_with_their_tokens_at_other_rows_are_refused():
    """A per-sample loop that puts each sample's image tokens at other rows (caption first, of its own
    length) and joins the samples: no single row layout serves the active tokens; refused by name."""

    class CaptionFirst(LoopAttentionDiT):
        def forward(self, latent, timestep, caption, mask):
            x, c = self.tokens(latent, timestep), self.text(caption)
            lengths = mask.sum(1).tolist()
            rows = [F.pad(torch.cat([c[i:i + 1, :n], x[i:i + 1]], 1), (0, 0, 0, T - n)) for i, n in enumerate(lengths)]
            joint = torch.cat(rows)  # sample 0's image at rows 5.., sample 1's at rows 2..
            return self.unpatchify(self.proj[0](joint)[:, :N])

    model = _init(CaptionFirst())
    ras = ras_compile(model, POLICY, backend=None)
    with pytest.raises(UnsupportedModelError, match="carry their image tokens at other rows"):
        ras(**_caption_inputs())
