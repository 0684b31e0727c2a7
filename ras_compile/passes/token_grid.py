"""Token grids: image tokens split over several consecutive axes (``TokenLayout.grid``).

Models unflatten the token sequence back into its patch grid inside a block and keep
computing token-wise there: Sana's convolutional feed-forward (``[B, N, C] -> [B, C, h, w]``,
1x1 convolution, SiLU, a 3x3 depthwise convolution, gating, 1x1 convolution, flatten),
HDiT's ``[B, h, w, C]`` blocks, an unpatchify's ``[B, h, w, p, q, C]``. Without this module
the first such view densified the value, and everything up to the flatten ran on every
token.

A grid layout is followed through the operators that keep each grid position separate
(views that keep the grid's axes together or merge them back into one, permutes that keep
them together and in order, token-wise arithmetic, 1x1 convolutions, projections and norms
over other axes (an eval-mode BatchNorm), GLU, reductions / softmax / splits / slices / concatenations along other axes).
In the sparse graph the grid's axes have sizes ``(k, 1, ...)``: row-major, sparse token
``i`` sits at ``(i, 0, ...)``, so the rank and every other axis stay as they are and a 1x1
convolution runs unchanged. Any other operator meeting a grid (a 3x3 convolution, a
transpose of ``h`` and ``w``, attention) gets the densified value, as before.

The rules here take the analyzer of ``token_axis`` and are dispatched from its ``visit``.
"""
from __future__ import annotations

import dataclasses
from math import prod

import torch.fx as fx

from . import token_axis as ta

_FOLLOWED = ("views that keep its axes together, permutes that keep them in order, token-wise arithmetic, "
             "1x1 convolutions, and projections, norms, reductions, splits and concatenations over other axes")


def grid_run(in_shape, out_shape, token_dim: int) -> tuple[int, tuple[int, ...]] | None:
    """Where a row-major view puts input axis ``token_dim`` when it splits it into several output
    axes: ``(first axis, their sizes)``. The run starts at the first axis of size above 1 (size-1
    axes in front stay size-1 axes) and holds no size-1 axis (a squeeze of it would change the
    grid). None if the axis is not split that way.""" 
    before, n = prod(in_shape[:token_dim]), in_shape[token_dim]
    running = 1
    for j, size in enumerate(out_shape):
        if running == before and size > 1:
            sizes, acc = [], 1
            for s in out_shape[j:]:
                if acc >= n:
                    break
                sizes.append(s)
                acc *= s
            if acc == n and len(sizes) >= 2 and 1 not in sizes:
                return j, tuple(sizes)
            return None
        running *= size
        if running > before:
            return None
    return None


def _merged(lay: ta.TokenLayout, shape) -> tuple[ta.TokenLayout, tuple[int, ...]]:
    """The same tensor read with the grid's axes merged into one token axis."""
    td, g = lay.token_dim, len(lay.grid)
    merged = tuple(shape[:td]) + (lay.length,) + tuple(shape[td + g:])
    batch = lay.batch_dim if lay.batch_dim is None or lay.batch_dim < td else lay.batch_dim - (g - 1)
    return dataclasses.replace(lay, batch_dim=batch, grid=()), merged


def split_view(an, lay: ta.TokenLayout, in_shape, out_shape) -> ta.TokenLayout | None:
    """A view that splits a one-axis token sequence (image tokens only) into a grid, or None."""
    if lay.grid or lay.fold or lay.outer != 1 or lay.batch_group != 1 or lay.offset != 0 \
            or lay.length != an.analysis.num_tokens:
        return None
    found = grid_run(in_shape, out_shape, lay.token_dim)
    if found is None:
        return None
    j, sizes = found
    batch = None
    if lay.batch_dim is not None:
        batch = ta._map_dim_through_view(in_shape, out_shape, lay.batch_dim)
        if batch is None:
            return None
    return ta.TokenLayout(j, batch, 0, lay.length, 1, grid=sizes, samples=lay.samples)


def _view(an, node: fx.Node):
    """A view of a grid: its axes kept together (other axes split or merged around them), merged
    back into one token axis, or split again into another grid; anything else densifies."""
    src = node.args[0]
    lay, merged = _merged(ta._layout(an, src), ta._shape(src))
    out_shape = ta._shape(node)
    token_dim = ta._map_dim_through_view(merged, out_shape, lay.token_dim)
    found = split_view(an, lay, merged, out_shape) if token_dim is None else None
    if token_dim is None and found is None:
        an.densify(src, node, "a view that moves values across the axes of the token grid")
        return None
    batch = None
    if lay.batch_dim is not None:
        batch = ta._map_dim_through_view(merged, out_shape, lay.batch_dim)
        if batch is None:
            an.densify(src, node, "a view that merges the batch axis with the token grid")
            return None
    if found is not None:
        return dataclasses.replace(found, batch_dim=batch)
    return dataclasses.replace(lay, token_dim=token_dim, batch_dim=batch)


def _permute_like(an, node: fx.Node, order: list[int]):
    src = node.args[0]
    lay = ta._layout(an, src)
    moved = [order.index(d) for d in lay.dims]
    if moved != list(range(moved[0], moved[0] + len(moved))):
        an.densify(src, node, "the token grid's axes are reordered or moved apart (an unpatchify's interleave "
                              "of patch and grid axes, or a transpose of the grid)")
        return None
    return dataclasses.replace(lay, token_dim=moved[0],
                               batch_dim=None if lay.batch_dim is None else order.index(lay.batch_dim))


def _permute(an, node):
    rank = len(ta._shape(node))
    return _permute_like(an, node, [ta._norm_dim(d, rank) for d in node.args[1]])


def _movedim(an, node):
    return _permute_like(an, node, ta._movedim_order(node))


def _transpose(an, node):
    rank = len(ta._shape(node))
    if ta._packet(node) is ta.aten.t:
        a, b = 0, rank - 1
    else:
        a, b = (ta._norm_dim(d, rank) for d in node.args[1:3])
    order = list(range(rank))
    order[a], order[b] = order[b], order[a]
    return _permute_like(an, node, order)


def _unsqueeze(an, node):
    lay = ta._layout(an, node.args[0])
    d = ta._norm_dim(node.args[1], len(ta._shape(node)))
    if lay.token_dim < d < lay.token_dim + len(lay.grid):
        an.densify(node.args[0], node, "an axis inserted between the token grid's axes")
        return None
    return ta._unsqueeze(an, node)


def _on_other_axes(an, node: fx.Node, dims: set[int], what: str, rule):
    """Operators that act along ``dims`` only: token-wise when no grid axis is among them."""
    lay = ta._layout(an, node.args[0])
    if dims & set(lay.dims):
        an.densify(node.args[0], node, f"{what} along an axis of the token grid")
        return None
    return rule(an, node)


def _reduction(an, node):
    return _on_other_axes(an, node, ta.reduced_dims(node), "a reduction", ta._reduction)


def _softmax(an, node):
    rank = len(ta._shape(node))
    return _on_other_axes(an, node, {ta._norm_dim(node.args[1], rank)}, "a softmax", ta._softmax)


def _split(an, node):
    rank = len(ta._shape(node.args[0]))
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return _on_other_axes(an, node, {ta._norm_dim(dim, rank)}, "a split", ta._split)


def _slice(an, node):
    rank = len(ta._shape(node.args[0]))
    dim = node.args[1] if len(node.args) > 1 and node.args[1] is not None else 0
    return _on_other_axes(an, node, {ta._norm_dim(dim, rank)}, "a slice", ta._slice)


def _cat(an, node):
    rank = len(ta._shape(node))
    dim = ta._norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), rank)
    lay = next(ta._layout(an, t) for t in node.args[0] if ta._layout(an, t) is not None)
    if dim in lay.dims:
        for t in node.args[0]:
            if ta._layout(an, t) is not None:
                an.densify(t, node, "a concatenation along an axis of the token grid")
        return None
    return ta._cat(an, node)


def visit(an, node: fx.Node, handler, token_inputs: list[fx.Node]):
    """The output layout of ``node``, one of whose ``token_inputs`` is a grid (``handler``: the rule
    ``token_axis`` would apply to one-axis layouts, or None). An operator no grid rule covers runs
    on the full value of every token input (before grids were followed, the view that made the grid
    was densified, so nothing that worked before is refused now)."""
    rule = _rules().get(handler)
    if rule is None:
        for value in token_inputs:
            an.densify(value, node, f"{ta._op_name(node)} meets the token grid, which the pass follows only "
                                    "through " + _FOLLOWED)
        return None
    return rule(an, node)


_RULES: dict = {}


def _rules() -> dict:
    if not _RULES:
        _RULES.update({
            ta._pointwise: ta._pointwise, ta._same_shape: ta._same_shape, ta._expand: ta._expand,
            ta._squeeze: ta._squeeze, ta._linear: ta._linear, ta._layer_norm: ta._layer_norm,
            ta._rms_norm: ta._rms_norm, ta._convolution: ta._convolution, ta._batch_norm: ta._batch_norm,
            ta._group_norm: ta._group_norm, ta._glu: ta._glu, ta._fresh: ta._fresh,
            ta._view: _view, ta._permute: _permute, ta._movedim: _movedim, ta._transpose: _transpose,
            ta._unsqueeze: _unsqueeze, ta._reduction: _reduction, ta._softmax: _softmax, ta._split: _split,
            ta._slice: _slice, ta._cat: _cat,
        })
    return _RULES
