"""Captions of different lengths before the image in one batch (passes/sample_offsets.py).

Lumina-Image-2.0 writes each sample's joint sequence as ``[caption (c_i), image (n), padding]``
with ``c_i`` read from the caption mask on the host. The pass reorders every such buffer image
first in each sample and points the per-sample reads at the new rows. Checked here on diffusers'
``Lumina2Transformer2DModel`` and on a small model written the same way (``CaptionFirstDiT``):
ratio 1 equals the model, a sparse step after a dense step equals the model for any active set,
and a model whose rows are not all treated alike (a positional table over the joint rows, causal
attention, a slice of the rows for all samples, a cumulative sum) is refused with the reason.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conformance_models import FAMILIES, TEXT_LEN
from pipeline_parts import tiny_vae
from ras_compile import RASPolicy, UnsupportedModelError, explain, ras_compile
from sparse_checks import assert_drawn_sparse_step_equals_the_model, assert_ratio_one_loop_equals_the_model

C, D, HEADS, T, GRID = 4, 16, 2, 6, (4, 5)
N = GRID[0] * GRID[1]
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


class CaptionFirstDiT(nn.Module):
    """Lumina-Image-2.0's layout in a few lines: per-sample caption lengths from the mask, the
    caption then the image at per-sample rows of a joint buffer, position ids laid out alike (a
    position table gathered by them), a key mask, the image rows read back per sample. ``variant``
    adds one operator that does not treat the rows alike."""

    def __init__(self, variant: str = ""):
        super().__init__()
        self.variant = variant
        self.img_in, self.txt_in = nn.Linear(C, D), nn.Linear(8, D)
        self.pos = nn.Parameter(torch.randn(64, D) * 0.1)  # by position id
        self.joint_pos = nn.Parameter(torch.randn(1, T + N, D) * 0.1)  # by row of the joint sequence
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(2))
        self.norm = nn.LayerNorm(D)
        self.out = nn.Linear(D, C)

    def forward(self, hidden_states, timestep, caption, caption_mask):
        B = hidden_states.shape[0]
        x = self.img_in(hidden_states.flatten(2).transpose(1, 2))  # [B, N, D]
        text = self.txt_in(caption)
        lengths = caption_mask.sum(1).tolist()
        L = max(lengths) + N
        seq = x.new_zeros(B, L, D)
        ids = torch.zeros(B, L, dtype=torch.int64)
        mask = torch.zeros(B, L, dtype=torch.bool)
        for i, c in enumerate(lengths):
            seq[i, :c] = text[i, :c]
            seq[i, c:c + N] = x[i]
            ids[i, :c] = torch.arange(c)
            ids[i, c:c + N] = torch.arange(N) + 32
            mask[i, :c + N] = True
        seq = seq + torch.gather(self.pos[None].expand(B, -1, -1), 1, ids[..., None].expand(-1, -1, D))
        if self.variant == "joint_table":
            seq = seq + self.joint_pos[:, :L]
        if self.variant == "slice":
            seq = seq + seq[:, :1]  # the first row of every sample, whatever it holds
        if self.variant == "cumsum":
            seq = seq.cumsum(1) / L
        if self.variant == "write_after":
            seq[0, :2] *= 2  # the first rows of sample 0, whatever they hold
        seq = seq * (1 + timestep[:, None, None])
        for qkv in self.qkv:
            q, k, v = (t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2) for t in qkv(self.norm(seq)).chunk(3, -1))
            if self.variant == "causal":
                att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
            seq = seq + att.transpose(1, 2).flatten(2)
        y = self.out(seq)
        if self.variant == "output_rows":
            return y
        return torch.stack([y[i, c:c + N].transpose(0, 1).reshape(C, *GRID) for i, c in enumerate(lengths)])


def _model(variant: str = "") -> CaptionFirstDiT:
    torch.manual_seed(0)
    return CaptionFirstDiT(variant).eval()


def _inputs(seed: int = 0, lengths=(2, 5)) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), T, dtype=torch.int64)
    for i, c in enumerate(lengths):
        mask[i, :c] = 1
    return dict(hidden_states=torch.randn(len(lengths), C, *GRID, generator=g), timestep=torch.tensor([0.7, 0.4]),
                caption=torch.randn(len(lengths), T, 8, generator=g), caption_mask=mask)


@pytest.mark.parametrize("lengths", [(2, 5), (6, 1), (0, 4)])
def test_ratio_one_equals_the_model_with_captions_of_different_lengths(lengths):
    assert_ratio_one_loop_equals_the_model(_model(), lambda step: _inputs(step, lengths), steps=3)


def test_the_analysis_finds_the_image_rows_first_in_every_sample():
    ras = ras_compile(_model(), POLICY, backend=None)
    analysis = ras.ras_analysis(**_inputs())
    assert analysis.num_tokens == N and len(analysis.attention) == 2
    assert len(analysis.reordered_rows) == 3  # the sequence, the position ids and the mask
    assert all("captions of 2, 5 rows before 20 image rows" in r for r in analysis.reordered_rows)


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_sparse_step_after_dense_step_equals_the_model(data):
    assert_drawn_sparse_step_equals_the_model(data, (__name__, "toy"), _model, POLICY, _inputs, N)


@pytest.mark.parametrize("variant, words", [
    ("joint_table", "rows of 'slice"),  # a table by joint row: its rows were not reordered
    ("causal", "is causal"),
    ("slice", "slices the rows"),
    ("cumsum", "cumsum"),
    ("output_rows", "reach a graph output"),
    ("write_after", "written in place"),
])
def test_rows_not_all_treated_alike_are_refused_with_the_reason(variant, words):
    ras = ras_compile(_model(variant), POLICY, backend=None)
    with pytest.raises(UnsupportedModelError) as caught:
        ras.ras_analysis(**_inputs())
    message = str(caught.value)
    assert "the rows were not reordered image first" in message and words in message, message


def test_equal_caption_lengths_need_no_reordering():
    ras = ras_compile(_model(), POLICY, backend=None)
    assert ras.ras_analysis(**_inputs(lengths=(4, 4))).reordered_rows == []


# --------------------------------------------------------------------------- diffusers' Lumina2

LUMINA2 = FAMILIES["lumina2"]


def _lumina2_inputs(seed: int = 0) -> dict:
    kw = LUMINA2.inputs(None, 2, seed)
    mask = torch.zeros(2, TEXT_LEN, dtype=torch.bool)
    mask[0, :3], mask[1, :TEXT_LEN - 1] = True, True
    return dict(kw, encoder_attention_mask=mask)


def _lumina2_model():
    return LUMINA2.build(0).eval()


def test_lumina2_with_captions_of_different_lengths_in_one_batch_runs_sparse():
    ras = ras_compile(_lumina2_model(), POLICY, backend=None)
    analysis = ras.ras_analysis(**_lumina2_inputs())
    assert analysis.num_tokens == LUMINA2.num_tokens and analysis.attention
    assert len(analysis.reordered_rows) == 3  # the joint hidden states, the position ids, the attention mask
    text = explain(_lumina2_model(), _lumina2_inputs(), POLICY, verbose=False)
    assert "rows reordered image first in each sample (3 buffers)" in str(text)


def test_lumina2_ratio_one_equals_the_model_with_captions_of_different_lengths():
    def inputs(step):
        return dict(_lumina2_inputs(step), return_dict=False)
    model = _lumina2_model()
    ras = ras_compile(model, RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=()), backend="aot_eager")
    for step in range(3):
        kw = inputs(step)
        kw["timestep"] = kw["timestep"] * (1 - step / 4)
        with torch.no_grad():
            torch.testing.assert_close(ras(**kw)[0], model(**kw)[0], rtol=1e-5, atol=1e-5)


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_lumina2_sparse_step_after_dense_step_equals_the_model(data):
    def model():
        return _Sample(_lumina2_model())
    assert_drawn_sparse_step_equals_the_model(data, (__name__, "lumina2"), model, POLICY, _lumina2_inputs,
                                              LUMINA2.num_tokens)


class _Sample(nn.Module):
    """The model's prediction tensor (the sparse-step check compares tensors)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, return_dict=False):
        return self.model(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                          encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]


# --------------------------------------------------------------------------- inside an unchanged Lumina2Pipeline

PIPELINE_STEPS = 4


def _lumina2_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

    pipe = Lumina2Pipeline(transformer=_lumina2_model(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(),
                           text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe):
    """Two prompts in one batch, of 4 and 11 tokens (caption features passed in: no text encoder
    offline), and negative prompts of 2; guidance runs as a second call per step."""
    g = torch.Generator().manual_seed(11)
    prompts, negatives = torch.randn(2, 12, 32, generator=g), torch.randn(2, 12, 32, generator=g)
    mask, negative_mask = torch.zeros(2, 12, dtype=torch.bool), torch.zeros(2, 12, dtype=torch.bool)
    mask[0, :4], mask[1, :11], negative_mask[:, :2] = True, True, True
    return pipe(prompt_embeds=prompts, prompt_attention_mask=mask, negative_prompt_embeds=negatives,
                negative_prompt_attention_mask=negative_mask, guidance_scale=4.0, height=128, width=128,
                num_inference_steps=PIPELINE_STEPS, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.slow
def test_lumina2_pipeline_with_prompts_of_different_lengths_at_full_ratio_reproduces_the_dense_pipeline():
    pipe = _lumina2_pipeline()
    dense = _generate(pipe)
    policy = RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=(), calls_per_step=2)
    pipe.transformer = ras_compile(pipe.transformer, policy, backend="aot_eager")
    got = _generate(pipe)
    assert got.shape == dense.shape == (2, 4, 16, 16)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    for controller in pipe.transformer.ras_controllers:  # the prompts' call and the negative prompts' call
        assert [s.mode for s in controller.stats] == ["dense"] + ["sparse"] * (PIPELINE_STEPS - 1)


@pytest.mark.slow
def test_lumina2_pipeline_with_prompts_of_different_lengths_runs_sparse_on_half_the_tokens():
    pipe = _lumina2_pipeline()
    dense = _generate(pipe)
    policy = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=(), calls_per_step=2)
    pipe.transformer = ras_compile(pipe.transformer, policy, backend=None)
    got = _generate(pipe)
    for controller in pipe.transformer.ras_controllers:
        assert [s.active_tokens for s in controller.stats][1:] == [32] * (PIPELINE_STEPS - 1)  # of 64
    assert got.shape == dense.shape and torch.isfinite(got).all() and not torch.equal(got, dense)
