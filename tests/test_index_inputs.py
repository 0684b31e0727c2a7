"""Rows placed and taken by index inputs (MiniMax-H3's packed sequence; host_reads, runtime).

``PackedDiT`` writes its text and image rows into one packed sequence with ``index_copy`` by
position inputs, and takes the image rows back with ``index_select``. The plain capture
traces those as operators whose rows the analysis cannot know; refused there, the model is
captured once more for the index inputs' values, where each index that is one ascending
contiguous run is the slice it is. Indexes that are not (scattered positions) keep the
first refusal.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ras_compile import RASPolicy, UnsupportedModelError, ras_compile
from sparse_checks import (assert_drawn_sparse_step_equals_the_model, assert_sparse_after_dense_equals_the_model,
                           compiled_once, random_active_sets)

C, D, HEADS, T, N = 4, 16, 2, 5, 24
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


class PackedDiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_in, self.txt_in = nn.Linear(C, D), nn.Linear(8, D)
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(2))
        self.out = nn.Linear(D, C)

    def forward(self, hidden_states, timestep, caption, text_indices, image_indices):
        x = self.img_in(hidden_states) * (1 + timestep[:, None, None])
        text = self.txt_in(caption)
        seq = text.new_zeros(x.shape[0], T + N, D)
        seq = seq.index_copy(1, text_indices, text).index_copy(1, image_indices, x)
        for qkv in self.qkv:
            q, k, v = (t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2) for t in qkv(seq).chunk(3, -1))
            seq = seq + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.out(seq).index_select(1, image_indices)


def _model() -> PackedDiT:
    torch.manual_seed(0)
    return PackedDiT().eval()


def _inputs(seed: int = 0, image_first: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    text, image = (torch.arange(N, N + T), torch.arange(N)) if image_first else \
        (torch.arange(T), torch.arange(T, T + N))
    return dict(hidden_states=torch.randn(2, N, C, generator=g), timestep=torch.tensor([0.7, 0.4]),
                caption=torch.randn(2, T, 8, generator=g), text_indices=text, image_indices=image)


@pytest.mark.parametrize("image_first", [False, True])
def test_rows_placed_by_index_inputs_are_slices_of_the_capture(image_first):
    ras = ras_compile(_model(), POLICY, backend=None)
    analysis = ras.ras_analysis(**_inputs(image_first=image_first))
    assert analysis.num_tokens == N and len(analysis.attention) == 2
    assert {"['text_indices']", "['image_indices']"} <= set(ras._value_inputs)  # part of the capture's key


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_sparse_step_after_dense_step_equals_the_model(data):
    assert_drawn_sparse_step_equals_the_model(data, (__name__,), _model, POLICY, _inputs, N)


def test_other_positions_are_another_capture():
    model = _model()
    ras = ras_compile(model, RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=()), backend=None)
    with torch.no_grad():
        for step, image_first in enumerate([False, True, False]):
            kw = _inputs(step, image_first)
            torch.testing.assert_close(ras(**kw), model(**kw), rtol=1e-5, atol=1e-5)
    assert len(ras._captures) == 2


def test_scattered_positions_keep_the_refusal():
    kw = _inputs()
    kw["image_indices"] = torch.cat([torch.arange(N // 2), torch.arange(N // 2 + T, N + T)])  # text between
    kw["text_indices"] = torch.tensor(sorted(set(range(T + N)) - set(kw["image_indices"].tolist())))
    with pytest.raises(UnsupportedModelError) as info:
        ras_compile(_model(), POLICY, backend=None).ras_analysis(**kw)
    assert info.value.op == "aten.index_copy.default"
    assert "no token rule for this operator" in str(info.value)


class IndexedDiT(PackedDiT):
    """The same rows placed and taken by tensor indexing: ``seq[:, idx] = x``, ``out[:, idx]``."""

    def forward(self, hidden_states, timestep, caption, text_indices, image_indices):
        x = self.img_in(hidden_states) * (1 + timestep[:, None, None])
        seq = x.new_zeros(x.shape[0], T + N, D)
        seq[:, text_indices] = self.txt_in(caption)
        seq[:, image_indices] = x
        for qkv in self.qkv:
            q, k, v = (t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2) for t in qkv(seq).chunk(3, -1))
            seq = seq + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.out(seq)[:, image_indices]


@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_rows_placed_by_tensor_indexing_run_sparse(data):
    torch.manual_seed(0)
    model, ras = compiled_once((__name__, "indexed"), lambda: IndexedDiT().eval(), POLICY)
    kw = _inputs(data.draw(st.integers(0, 3)), image_first=data.draw(st.booleans()))
    assert_sparse_after_dense_equals_the_model(model, ras, kw, random_active_sets(data, N))


class UnshuffledDiT(PackedDiT):
    """MDT's side-interpolator unshuffle: the tokens gathered back by an index input (``ids_restore``),
    the identity at inference."""

    def forward(self, hidden_states, timestep, caption, text_indices, image_indices):
        x = self.img_in(hidden_states) * (1 + timestep[:, None, None])
        restore = image_indices - image_indices.min()  # the order to gather the tokens in
        x = torch.gather(x, 1, restore[None, :, None].expand(x.shape[0], -1, x.shape[2]))
        q, k, v = (t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2) for t in self.qkv[0](x).chunk(3, -1))
        return self.out(x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def test_a_gather_by_an_identity_index_input_moves_nothing():
    torch.manual_seed(0)
    model = UnshuffledDiT().eval()
    ras = ras_compile(model, POLICY, backend=None)
    assert len(ras.ras_analysis(**_inputs()).attention) == 1
    assert_sparse_after_dense_equals_the_model(model, ras, _inputs(1), torch.tensor([[0, 4, 7], [1, 2, 23]]))
    shuffled = _inputs()
    shuffled["image_indices"] = torch.arange(N).flip(0)  # a real permutation of the tokens: refused
    with pytest.raises(UnsupportedModelError) as info:
        ras_compile(model, POLICY, backend=None).ras_analysis(**shuffled)
    assert info.value.op == "aten.gather.default" and "moves values between image tokens" in str(info.value)
