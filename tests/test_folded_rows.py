"""Rows of a token axis folded into the batch axis (``TokenLayout.fold``): the gather of a side
input on such an axis, for rows ``(sample, token, inner)`` and sequence-first ``(token, sample,
inner)``, and the batch fold with a feature split that sequence-first attention makes."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ras_compile.passes.token_axis import _regroup_batch_through_view as regroup
from ras_compile.passes.token_ops import gather_folded_rows


def _expected(x: torch.Tensor, index: torch.Tensor, inner: int, token_major: bool) -> torch.Tensor:
    """Row by row, in the order a sparse graph lays the active rows out."""
    batch, k = index.shape
    num_tokens = x.shape[0] // (batch * inner)
    rows = []
    order = [(b, i) for i in range(k) for b in range(batch)] if token_major else \
        [(b, i) for b in range(batch) for i in range(k)]
    for b, i in order:
        token = int(index[b, i])
        first = (token * batch + b) * inner if token_major else (b * num_tokens + token) * inner
        rows.extend(x[first + j] for j in range(inner))
    return torch.stack(rows)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), num_tokens=st.integers(1, 6), inner=st.integers(1, 3),
       token_major=st.booleans(), data=st.data())
def test_a_folded_gather_keeps_every_inner_row_of_each_active_token(batch, num_tokens, inner, token_major, data):
    k = data.draw(st.integers(1, num_tokens), label="k")
    index = torch.tensor([sorted(data.draw(st.permutations(range(num_tokens)), label="perm")[:k])
                          for _ in range(batch)])
    x = torch.randn(batch * num_tokens * inner, 5)
    got = gather_folded_rows(x, index, 0, 2, inner, token_major)
    torch.testing.assert_close(got, _expected(x, index, inner, token_major), rtol=0, atol=0)


def test_a_folded_gather_broadcasts_a_side_input_to_the_tensor_it_joins():
    # [B * N, D] meets [B * N, F, D] as [B * N, 1, D]: the folded axis is axis 0 of rank 3
    x = torch.arange(2 * 3 * 4.0).reshape(6, 4)
    index = torch.tensor([[2], [0]])
    got = gather_folded_rows(x, index, 1, 3, 1)  # given rank 3, x is [1, 6, 4]; the fold is its axis 1
    assert got.shape == (1, 2, 4)
    torch.testing.assert_close(got[0], torch.stack([x[2], x[3]]))


def test_heads_split_off_the_features_fold_into_the_batch():
    # sequence-first q.view(L, B * heads, d): [L=5, B=2, 3 * 4] -> [5, 6, 4], three rows per sample
    assert regroup((5, 2, 12), (5, 6, 4), batch_dim=1, group=1, batch_size=2, token_dim=0) == (1, 3)
    # the rest of the feature axis must land whole in the next output axes
    assert regroup((5, 2, 12), (5, 6, 2, 2), batch_dim=1, group=1, batch_size=2, token_dim=0) == (1, 3)
    assert regroup((5, 2, 12), (5, 4, 6), batch_dim=1, group=1, batch_size=2, token_dim=0) == (1, 2)
