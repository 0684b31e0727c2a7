"""Slices and concatenations along the batch axis before the patch embedding (DiT's
``forward_with_cfg``: ``half = x[: len(x) // 2]``, ``cat([half, half])``): followed while the
token source keeps the latent's batch, refused by name when the forward halves or doubles it."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from plain_dits import PlainDiT
from ras_compile import RASPolicy, UnsupportedModelError, ras_compile

POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())
N = 24  # an 8 x 12 latent, patch 2


class Batched(nn.Module):
    """PlainDiT behind a batch rearrangement of the latent: ``"cfg"`` (the first half twice),
    ``"swap"`` (the halves exchanged), ``"half"`` (the first half only), ``"double"`` (the
    latent twice)."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        torch.manual_seed(0)
        self.inner = PlainDiT()

    def forward(self, hidden_states, timestep):
        x, half = hidden_states, hidden_states.shape[0] // 2
        if self.form == "cfg":
            x = torch.cat([x[:half], x[:half]])
        elif self.form == "swap":
            x = torch.cat([x[half:], x[:half]])
        elif self.form == "half":
            x, timestep = x[:half], timestep[:half]
        elif self.form == "double":
            x, timestep = torch.cat([x, x]), torch.cat([timestep, timestep])
        return self.inner(x, timestep)


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(4, 4, 8, 12, generator=g), timestep=torch.full((4,), 999.0))


@settings(max_examples=8, deadline=None)
@given(form=st.sampled_from(["cfg", "swap"]), seed=st.integers(0, 3), data=st.data())
def test_rows_of_the_latent_rearranged_along_the_batch_keep_the_sparse_after_dense_property(form, seed, data):
    model = Batched(form).eval()
    ras = ras_compile(model, POLICY, backend=None)
    kw = _inputs(seed)
    assert ras.ras_analysis(**kw).num_tokens == N
    dense = ras(**kw)
    with torch.no_grad():
        torch.testing.assert_close(dense, model(**kw), rtol=1e-5, atol=1e-5)
    k = data.draw(st.integers(1, N), label="k")
    rows = [sorted(data.draw(st.permutations(range(N)), label="perm")[:k]) for _ in range(4)]
    ras.ras_controller.override_next_step("sparse", torch.tensor(rows))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same timestep twice in a row, on purpose
        sparse = ras(**kw)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["half", "double"])
def test_a_batch_halved_or_doubled_inside_the_forward_is_refused_by_name(form):
    ras = ras_compile(Batched(form).eval(), POLICY, backend=None)
    with pytest.raises(UnsupportedModelError) as info:
        ras.ras_analysis(**_inputs())
    message = str(info.value)
    assert "the token sequence's batch is not the latent's batch of 4" in message
    assert "cut or joined along the batch axis before the patch embedding" in message
