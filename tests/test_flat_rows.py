"""A projection over flattened rows, as the projection over the rows' own axes (passes/flat_rows.py).

nn.MultiheadAttention's sequence-first out-projection, ``linear(x.reshape(L * B, E)).view(L, B, E)``,
becomes ``linear`` over ``[L, B, E]``: the same values, and no view that merges the token axis with
the batch. Anything else (a view back to other axes, a flattened tensor read twice) is left alone.
nn.TransformerEncoder DiTs with a timestep token in front of the patch tokens run sparse because of
it (``plain_torch_encoder`` in the conformance suite).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ras_compile.passes.flat_rows import unflatten_projected_rows

aten = torch.ops.aten
W, B = torch.randn(6, 8), torch.randn(6)


def _program(fn, *args):
    class Wrap(nn.Module):
        def forward(self, *a):
            return fn(*a)
    return torch.export.export(Wrap(), args, strict=False)


def _count(program, target) -> int:
    return sum(n.target is target for n in program.graph_module.graph.nodes)


def _sequence_first(x):  # [L, B, E]
    return torch.nn.functional.linear(x.reshape(-1, 8), W, B).view(5, 2, 6)


def _heads_merged_too(x):  # [L, B, H, d] -> [L * B, H * d]
    return torch.nn.functional.linear(x.reshape(10, 8), W, B).view(5, 2, 6) * 2


@pytest.mark.parametrize("fn,shape", [(_sequence_first, (5, 2, 8)), (_heads_merged_too, (5, 2, 2, 4))])
def test_a_projection_over_flattened_rows_keeps_the_rows_axes(fn, shape):
    x = torch.randn(*shape)
    program = _program(fn, x)
    assert unflatten_projected_rows(program.graph_module) == 1
    linears = [n for n in program.graph_module.graph.nodes if n.target is aten.linear.default]
    assert [tuple(n.meta["val"].shape) for n in linears] == [(5, 2, 6)]
    assert tuple(linears[0].args[0].meta["val"].shape) == (5, 2, 8)
    torch.testing.assert_close(program.module()(x), fn(x))


def _other_axes(x):  # viewed back as [2, 5, 6]: not the rows' own axes
    return torch.nn.functional.linear(x.reshape(10, 8), W, B).view(2, 5, 6)


def _read_twice(x):
    rows = x.reshape(10, 8)
    return torch.nn.functional.linear(rows, W, B).view(5, 2, 6), rows.sum()


@pytest.mark.parametrize("fn", [_other_axes, _read_twice])
def test_other_flattenings_are_left_alone(fn):
    x = torch.randn(5, 2, 8)
    program = _program(fn, x)
    assert unflatten_projected_rows(program.graph_module) == 0
    for got, want in zip(torch.utils._pytree.tree_leaves(program.module()(x)), torch.utils._pytree.tree_leaves(fn(x))):
        torch.testing.assert_close(got, want)
