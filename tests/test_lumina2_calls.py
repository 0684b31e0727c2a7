"""Lumina2 as its pipeline calls it: the conditional and the unconditional pass are two calls per
step, with the prompt's and the negative prompt's caption masks (of different lengths).

The forward reads the mask's lengths on the host (host_reads.py), so the two calls are two
captures, each kept; with ``calls_per_step=2`` each call slot has its own controller and caches.
At ratio 1 every call equals the model over a whole loop; at ratio 0.5 the steps after the
warm-up run sparse in both slots, and no call captures again after the first two.
"""
from __future__ import annotations

import warnings

import torch

from conformance_models import FAMILIES, TEXT_LEN
from ras_compile import RASPolicy, ras_compile

FAMILY = FAMILIES["lumina2"]


def _calls(model, steps: int):
    """The two calls of each step: (step, kwargs) with the cond mask (5 tokens) and the uncond one (2)."""
    base = FAMILY.inputs(model, 1, 0)
    masks = []
    for length in (5, 2):
        mask = torch.zeros(1, TEXT_LEN, dtype=torch.bool)
        mask[:, :length] = True
        masks.append(mask)
    for step in range(steps):
        t = torch.full((1,), 1.0 - step / (steps + 1))
        for mask in masks:
            yield step, dict(base, timestep=t, encoder_attention_mask=mask)


def _run(policy, steps: int = 4):
    model = FAMILY.build(0)
    ras = ras_compile(model, policy, backend=None, latent_arg=FAMILY.latent_arg)
    got, want = [], []
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _step, kw in _calls(model, steps):
            got.append(ras(**kw)[0])
            want.append(model(**kw)[0])
    return ras, got, want, [str(w.message) for w in caught]


def test_ratio_one_equals_the_model_on_both_calls_of_every_step():
    ras, got, want, _ = _run(RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=(), calls_per_step=2))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert len(ras._captures) == 2  # one graph per caption mask


def test_both_slots_run_sparse_after_the_warm_up_and_nothing_captures_again():
    ras, _got, _want, messages = _run(RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=(), calls_per_step=2))
    for controller in ras.ras_controllers:
        assert [s.mode for s in controller.stats] == ["dense", "sparse", "sparse", "sparse"]
    assert len(ras._captures) == 2
    assert not [m for m in messages if "called twice in a row" in m]  # the slots take the two calls
