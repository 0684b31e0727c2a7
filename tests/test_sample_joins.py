"""Per-sample values joined back into a batch (passes/sample_loops.py), constant masks
(passes/constant_masks.py) and padded rows (passes/padded_rows.py), each rewrite on its own graph.

A sample is ``x[i]``, ``x.unbind(0)[i]`` or a piece of ``rows.split(n)``; the joins are ``stack``,
``cat`` along the rows and ``pad_sequence``. Every rewritten graph returns what the function
returns, and what the rewrite cannot read as one batch (samples out of order, a left-padded
sequence, a mask something writes into) is left as it was.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from ras_compile.passes.constant_masks import drop_constant_wheres
from ras_compile.passes.padded_rows import split_joined_pieces, split_padded_wheres
from ras_compile.passes.sample_loops import rebatch_sample_stacks
from exported import Exported

aten = torch.ops.aten
WEIGHT = torch.randn(6, 8)


def _unbound_rows_embedded(x):  # x [B, 4, 8]: per-sample rows end to end, embedded, split, padded
    rows = torch.cat([xi.permute(1, 0) for xi in x.unbind(0)])   # [B * 8, 4]
    pieces = torch.nn.functional.linear(rows, WEIGHT[:, :4]).split(8)
    return pad_sequence(list(pieces), batch_first=True) * 2


def _joint_with_tails(x, a, b):  # x [2, 5, 6] first, then captions of 3 and 7 rows
    return pad_sequence([torch.cat([x[0][:4], a]), torch.cat([x[1][:4], b])], batch_first=True, padding_value=-1.0)


def _left_padded(x, a, b):
    return pad_sequence([torch.cat([x[0], a]), torch.cat([x[1], b])], batch_first=True, padding_side="left")


def _rows_out_of_order(x):
    return torch.cat([x[1], x[0]])


def test_unbound_samples_joined_end_to_end_and_split_back_are_one_batch():
    x = torch.randn(3, 4, 8)
    gm = Exported(_unbound_rows_embedded, x)
    assert rebatch_sample_stacks(gm.gm) == 2  # the cat of the samples, and the padded split
    assert not {aten.unbind.int, aten.cat.default, aten.split_with_sizes.default, aten.split.Tensor,
                aten.pad_sequence.default} & gm.targets()
    torch.testing.assert_close(gm(x), _unbound_rows_embedded(x))


def test_a_padded_join_keeps_the_equal_leading_parts_batched_and_pads_the_tails():
    x, a, b = torch.randn(2, 5, 6), torch.randn(3, 6), torch.randn(7, 6)
    gm = Exported(_joint_with_tails, x, a, b)
    assert rebatch_sample_stacks(gm.gm) == 1
    pads = [n for n in gm.gm.graph.nodes if n.target is aten.pad_sequence.default]
    assert [tuple(n.meta["val"].shape) for n in pads] == [(2, 7, 6)]  # the tails alone
    assert aten.select.int not in gm.targets()
    torch.testing.assert_close(gm(x, a, b), _joint_with_tails(x, a, b))


@pytest.mark.parametrize("fn,args", [(_left_padded, (torch.randn(2, 5, 6), torch.randn(3, 6), torch.randn(7, 6))),
                                     (_rows_out_of_order, (torch.randn(2, 5, 6),))])
def test_joins_that_are_no_batch_are_left_alone(fn, args):
    gm = Exported(fn, *args)
    assert rebatch_sample_stacks(gm.gm) == 0
    torch.testing.assert_close(gm(*args), fn(*args))


def _padded_where(x, pad):  # rows padded to a multiple of 8: none are, here
    mask = torch.cat([torch.zeros(8, dtype=torch.bool), torch.zeros(0, dtype=torch.bool)])
    return torch.where(mask[:, None], pad, x)


def _some_padded(x, pad):
    mask = torch.cat([torch.zeros(5, dtype=torch.bool), torch.ones(3, dtype=torch.bool)])
    return torch.where(mask[:, None], pad, x)


def _written_mask(x, pad):
    mask = torch.zeros(8, dtype=torch.bool)
    mask[6:] = True  # the operator that made it says all false; the write says otherwise
    return torch.where(mask[:, None], pad, x)


def _input_mask(x, pad):
    return torch.where(x[:, :1] > 0, pad, x)


def test_a_where_whose_constant_mask_is_all_false_is_its_other_branch():
    x, pad = torch.randn(8, 4), torch.randn(4)
    gm = Exported(_padded_where, x, pad)
    assert drop_constant_wheres(gm.gm) == 1
    assert aten.where.self not in gm.targets()
    torch.testing.assert_close(gm(x, pad), x)


@pytest.mark.parametrize("fn", [_some_padded, _written_mask, _input_mask])
def test_masks_of_mixed_written_or_input_values_are_kept(fn):
    x, pad = torch.randn(8, 4), torch.randn(4)
    gm = Exported(fn, x, pad)
    assert drop_constant_wheres(gm.gm) == 0
    torch.testing.assert_close(gm(x, pad), fn(x, pad))


SCALE, PAD = torch.randn(6), torch.randn(6)


def _per_sample_operators(x, s):  # x [B, 5, 8], s [B]: a projection and a per-sample scale in the loop
    return torch.stack([torch.nn.functional.linear(x[i], WEIGHT) * s[i] + SCALE for i in range(x.shape[0])])


def _shared_tail(x):  # each sample's rows, then the same two pad rows
    return pad_sequence([torch.cat([torch.nn.functional.linear(x[i], WEIGHT), PAD.expand(2, 6)])
                         for i in range(x.shape[0])], batch_first=True)


def _weights_per_sample(x, w):  # a weight that differs per sample: no batched linear
    return torch.stack([torch.nn.functional.linear(x[i], w[i]) for i in range(x.shape[0])])


@pytest.mark.parametrize("fn,args", [(_per_sample_operators, (torch.randn(3, 5, 8), torch.randn(3))),
                                     (_shared_tail, (torch.randn(3, 5, 8),))])
def test_operators_of_per_sample_and_shared_operands_run_over_the_batch(fn, args):
    gm = Exported(fn, *args)
    assert rebatch_sample_stacks(gm.gm) == 1
    assert not {aten.select.int, aten.stack.default, aten.pad_sequence.default} & gm.targets()
    linears = [n for n in gm.gm.graph.nodes if n.target is aten.linear.default]
    assert [tuple(n.meta["val"].shape) for n in linears] == [(3, 5, 6)]  # one projection of the batch
    torch.testing.assert_close(gm(*args), fn(*args))


def test_a_weight_per_sample_is_left_alone():
    args = (torch.randn(2, 5, 8), torch.randn(2, 6, 8))
    gm = Exported(_weights_per_sample, *args)
    assert rebatch_sample_stacks(gm.gm) == 0
    torch.testing.assert_close(gm(*args), _weights_per_sample(*args))


def _padded_rows(x):  # x [2, 6, 8]: each sample's 6 rows padded to 8 with copies of its last row
    rows = torch.cat([torch.cat([x[i], x[i][-1:].repeat(2, 1)]) for i in range(2)])
    mask = torch.cat([torch.cat([torch.zeros(6, dtype=torch.bool), torch.ones(2, dtype=torch.bool)])] * 2)
    return torch.where(mask[:, None], PAD, torch.nn.functional.linear(rows, WEIGHT) * 2)


def _mask_inside_a_part(x):  # the replaced rows are rows of the image, not appended ones
    rows = torch.cat([x[0], x[1]])
    mask = torch.cat([torch.zeros(4, dtype=torch.bool), torch.ones(2, dtype=torch.bool),
                      torch.zeros(6, dtype=torch.bool)])
    return torch.where(mask[:, None], PAD, torch.nn.functional.linear(rows, WEIGHT))


def _mask_over_an_input(x):  # rows of an input: no cat they were appended by
    mask = torch.cat([torch.zeros(4, dtype=torch.bool), torch.ones(2, dtype=torch.bool)])
    return torch.where(mask[:, None], WEIGHT[0], x)


def test_rows_padded_and_then_replaced_by_a_pad_token_are_the_pad_token():
    x = torch.randn(2, 6, 8)
    gm = Exported(_padded_rows, x)
    assert split_padded_wheres(gm.gm) == 1
    assert aten.where.self not in gm.targets() and aten.repeat.default not in gm.targets()  # copies unread
    assert all(tuple(n.meta["val"].shape) == (6, 6) for n in gm.gm.graph.nodes if n.target is aten.linear.default)
    torch.testing.assert_close(gm(x), _padded_rows(x))
    for fn, arg in [(_mask_inside_a_part, x), (_mask_over_an_input, x[0])]:
        gm = Exported(fn, arg)
        assert split_padded_wheres(gm.gm) == 0
        torch.testing.assert_close(gm(arg), fn(arg))


def _rejoined(x, a, b):
    whole = torch.cat(list(x.split(3)))                      # the pieces of a split, joined again
    first, second = torch.cat([a, b, x]).split([5, 9])      # a split at the joined parts' boundaries
    return whole * 2, first + 1, second - 1


def test_a_split_at_the_parts_of_a_cat_is_the_parts_and_a_whole_split_joined_is_its_input():
    x, a, b = torch.randn(9, 4), torch.randn(2, 4), torch.randn(3, 4)
    gm = Exported(_rejoined, x, a, b)
    assert split_joined_pieces(gm.gm) == 2
    assert not {aten.split.Tensor, aten.split_with_sizes.default} & gm.targets()
    for got, want in zip(gm(x, a, b), _rejoined(x, a, b)):
        torch.testing.assert_close(got, want)
