"""A token latent predicted inside the joint sequence, laid out by a slot mask (Qwen-Image 2.1's forms).

``SlotDiT`` takes its latent as tokens ``[B, N, C]`` and a boolean slot mask over its
vision-language sequence (text positions, then one slot per group of four image tokens), as
Qwen-Image 2.1 does: each slot is widened to four rows with ``repeat_interleave`` by tensor
repeats, the image tokens are written into the joint sequence with ``joint[:, mask] = x``, and
the model returns its prediction for the whole joint sequence, text rows included. The capture
is specialised on the mask (host_reads), the write becomes a concatenation (buffer_writes), and
the prediction's image rows are the ones scored (``TokenAnalysis.output_rows``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ras_compile import RASPolicy, explain, ras_compile
from sparse_checks import assert_drawn_sparse_step_equals_the_model

C, D, HEADS, T, N = 4, 16, 2, 5, 24
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


class SlotDiT(nn.Module):
    def __init__(self, joint_output: bool = True):
        super().__init__()
        self.joint_output = joint_output
        self.img_in, self.txt_in = nn.Linear(C, D), nn.Linear(8, D)
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(2))
        self.out = nn.Linear(D, C)

    def forward(self, hidden_states, timestep, caption, img_mask):
        b = hidden_states.shape[0]
        x = self.img_in(hidden_states) * (1 + timestep[:, None, None])
        text = self.txt_in(caption)
        repeats = torch.where(img_mask, 4, 1)[0]            # each image slot stands for four tokens
        pad = torch.repeat_interleave(img_mask[0], repeats)
        joint = torch.cat([text, text.new_zeros(b, N // 4, D)], 1).repeat_interleave(repeats, dim=1)
        joint[:, pad] = x
        for qkv in self.qkv:
            q, k, v = (t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2) for t in qkv(joint).chunk(3, -1))
            joint = joint + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        out = self.out(joint)
        return out if self.joint_output else out[:, pad]


def _model(joint_output: bool = True) -> SlotDiT:
    torch.manual_seed(0)
    return SlotDiT(joint_output).eval()


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.cat([torch.zeros(2, T, dtype=torch.bool), torch.ones(2, N // 4, dtype=torch.bool)], 1)
    return dict(hidden_states=torch.randn(2, N, C, generator=g), timestep=torch.tensor([0.7, 0.4]),
                caption=torch.randn(2, T, 8, generator=g), img_mask=mask)


@pytest.mark.parametrize("batch", [2, 1])  # one prompt per call: the pipeline's own case
def test_the_prediction_is_read_from_the_image_rows_of_the_joint_output(batch):
    kw = {k: v[:batch] if isinstance(v, torch.Tensor) else v for k, v in _inputs().items()}
    analysis = ras_compile(_model(), POLICY, backend=None).ras_analysis(**kw)
    assert analysis.num_tokens == N and analysis.output_rows == (T, T + N)
    assert len(analysis.attention) == 2
    assert _model(joint_output=False).forward(**_inputs()).shape == (2, N, C)
    assert ras_compile(_model(False), POLICY, backend=None).ras_analysis(**_inputs()).output_rows is None
    assert f"prediction: rows {T}:{T + N} of the joint sequence" in str(explain(_model(), _inputs(), verbose=False))


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_sparse_step_after_dense_step_equals_the_model(data):
    assert_drawn_sparse_step_equals_the_model(data, (__name__,), _model, POLICY, _inputs, N)


@pytest.mark.parametrize("stale_token_order", [0, 1])
def test_a_loop_picks_the_tokens_of_the_model_that_returns_only_the_image_rows(stale_token_order):
    """Scored from the image rows (not from the first N rows of the joint output), a loop picks the
    same tokens as the twin that returns only them, and its image rows are the twin's outputs; with
    stale-token continuation the text rows are left as computed."""
    policy = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=(), stale_token_order=stale_token_order)
    joint, image = ras_compile(_model(), policy, backend=None), ras_compile(_model(False), policy, backend=None)
    kw = _inputs(0)
    latent = kw.pop("hidden_states")
    with torch.no_grad():
        for step in range(5):
            call = dict(kw, hidden_states=latent, timestep=torch.full((2,), 0.9 - 0.15 * step))
            a, b = joint(**call), image(**call)
            assert a.shape == (2, T + N, C)
            torch.testing.assert_close(a[:, T:], b, rtol=1e-5, atol=1e-5)
            if step:
                assert torch.equal(joint.ras_controller.last_index, image.ras_controller.last_index), step
            latent = latent - 0.1 * b
    assert [s.mode for s in joint.ras_controller.stats] == ["dense"] + ["sparse"] * 4
