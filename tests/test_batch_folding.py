"""Views that fold a per-sample axis into the batch axis ([B, H, N, d] -> [B * H, N, d]) and
split it back: the token analysis follows samples through them (``TokenLayout.batch_group``)."""
from __future__ import annotations

import torch

from plain_dits import PlainDiT
from ras_compile import RASPolicy, ras_compile
from ras_compile.passes.token_axis import _regroup_batch_through_view as regroup
from ras_compile.passes.token_ops import repeat_rows


def test_folding_heads_behind_the_batch_multiplies_the_group():
    # [B=2, H=3, N=5, d=4] -> [6, 5, 4]: the batch axis stays axis 0, now three rows per sample
    assert regroup((2, 3, 5, 4), (6, 5, 4), batch_dim=0, group=1, batch_size=2, token_dim=2) == (0, 3)
    # folded twice: [2, 3, 2, 5, 4] -> [12, 5, 4]
    assert regroup((2, 3, 2, 5, 4), (12, 5, 4), batch_dim=0, group=1, batch_size=2, token_dim=3) == (0, 6)
    # an already folded axis folds further: group 3 times 2
    assert regroup((6, 2, 5, 4), (12, 5, 4), batch_dim=0, group=3, batch_size=2, token_dim=2) == (0, 6)


def test_splitting_the_folded_axis_divides_the_group():
    assert regroup((6, 5, 4), (2, 3, 5, 4), batch_dim=0, group=3, batch_size=2, token_dim=1) == (0, 1)
    assert regroup((12, 5, 4), (4, 3, 5, 4), batch_dim=0, group=6, batch_size=2, token_dim=1) == (0, 2)


def test_views_that_mix_samples_with_tokens_are_not_followed():
    # the token axis folded into the batch axis: rows of one sample would move with tokens
    assert regroup((2, 5, 4), (10, 4), batch_dim=0, group=1, batch_size=2, token_dim=1) is None
    # a split that does not keep samples outermost (3 is no multiple of the batch 2)
    assert regroup((6, 5, 4), (3, 2, 5, 4), batch_dim=0, group=3, batch_size=2, token_dim=1) is None


def test_repeat_rows_repeats_each_sample_group_times():
    pos = torch.tensor([[0, 4], [1, 3]])
    assert repeat_rows(pos, 3).tolist() == [[0, 4]] * 3 + [[1, 3]] * 3


def test_folded_heads_with_inductor_keep_the_sparse_after_dense_property():
    """The folded layout's gathers and cache writes through Inductor (the other tests use aot_eager)."""
    torch.manual_seed(0)
    model = PlainDiT(attention="folded_heads", depth=1).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 700.0)
    ras = ras_compile(model, RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=()), backend="inductor")
    dense = ras(x, t)
    torch.testing.assert_close(dense, model(x, t), rtol=1e-5, atol=1e-5)
    ras.ras_controller.override_next_step("sparse", torch.tensor([[0, 2, 9, 15], [3, 4, 5, 11]]))
    torch.testing.assert_close(ras(x, t), dense, rtol=1e-5, atol=1e-5)
