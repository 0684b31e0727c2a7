"""Rows appended as padding and then overwritten by a pad token, as the rows they are.

Z-Image pads each sample's image tokens to a multiple of 32 rows with copies of the last
token (``cat([x, x[-1:].repeat(p, 1)])``), joins the samples' rows, embeds them, and then puts
a learned pad token on the padded rows: ``where(mask, pad_token, rows)`` with a mask made of
Python numbers. The copies are never read (the pad token replaces them), but the analysis
would see the last image token read by a slice of the token axis and refuse it.

``split_padded_wheres(gm)``: a ``where`` whose condition is a constant that selects whole rows
(it varies along axis 0 only), in runs that fall on the boundaries of a ``cat`` the other
branch is computed from (through row-wise operators: ``linear``, pointwise operators whose
other operands broadcast along the rows, casts), is the ``cat`` of its runs: the kept runs
are the rows of that ``cat``'s parts (the row-wise operators applied to the parts: the
padding copies are no longer read), the replaced runs the pad token expanded. A mask whose
runs do not fall on such boundaries (a mask over image tokens) is left as it is.

``split_joined_pieces(gm)``: ``split(cat(parts), sizes)`` whose pieces each cover whole parts
is the ``cat`` of each piece's parts (the samples' rows joined and split again), and
``cat(split(x, sizes))`` of every piece in order is ``x``.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .attention_pattern import _fake
from .constant_masks import constant_value
from .node_shapes import static_shape
from .sample_loops import erase_unused

aten = torch.ops.aten

__all__ = ["split_padded_wheres", "split_joined_pieces"]

_MAX_RUNS = 64
_CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.clone.default, aten.alias.default,
          aten.contiguous.default}


def _rowwise_input(node: fx.Node) -> fx.Node | None:
    """The operand whose rows (axis 0) ``node`` maps one to one, when ``node`` is row-wise along axis 0
    through that operand alone, else None."""
    if node.op != "call_function":
        return None
    out = static_shape(node)
    if out is None or not out:
        return None
    if node.target is aten.linear.default and len(out) >= 2:
        return node.args[0]
    if node.target in _CASTS:
        return node.args[0]
    if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags:
        full = [a for a in node.args if isinstance(a, fx.Node) and static_shape(a) == out]
        others = [a for a in node.args if isinstance(a, fx.Node) and a not in full]
        if len(full) != 1 or any(len(static_shape(a) or ()) >= len(out) and (static_shape(a) or (0,))[0] != 1
                                 for a in others):
            return None  # (another operand with rows of its own would need slicing too)
        return full[0]
    return None


def _parts(node: fx.Node) -> list[tuple[int, int, fx.Node]] | None:
    """``(start, end, part)`` rows of the ``cat`` along axis 0 that ``node`` is computed from through
    row-wise operators (nested ``cat``s flattened), else None."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target is not aten.cat.default:
        node = _rowwise_input(node)
    if not isinstance(node, fx.Node) or node.target is not aten.cat.default:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if dim != 0:
        return None
    found, start = [], 0
    for part in node.args[0]:
        shape = static_shape(part)
        if not shape:
            return None
        rows = shape[0]
        inner = _parts(part) if part.op == "call_function" and part.target is aten.cat.default else None
        if inner is None:
            found.append((start, start + rows, part))
        else:
            found.extend((start + a, start + b, p) for a, b, p in inner)
        start += rows
    return found


def _rows(graph: fx.Graph, node: fx.Node, a: int, b: int) -> fx.Node:
    """Rows ``a:b`` of ``node``, computed from the ``cat`` part(s) they come from: the row-wise operators
    between are applied to the part (or a slice of it) rather than the whole."""
    if (a, b) == (0, static_shape(node)[0]):
        return node
    if node.op == "call_function" and node.target is aten.cat.default:
        start = 0
        for part in node.args[0]:
            rows = static_shape(part)[0]
            if start <= a and b <= start + rows:
                return _rows(graph, part, a - start, b - start)
            start += rows
    elif (source := _rowwise_input(node)) is not None:
        inner = _rows(graph, source, a, b)
        args = tuple(inner if x is source else x for x in node.args)
        new = graph.call_function(node.target, args, dict(node.kwargs))
        _fake(new, node.target, *args, **node.kwargs)
        return new
    new = graph.call_function(aten.slice.Tensor, (node, 0, a, b))
    _fake(new, aten.slice.Tensor, node, 0, a, b)
    return new


def _row_runs(cond: torch.Tensor, shape: tuple) -> list[tuple[bool, int, int]] | None:
    """The runs of ``cond`` (broadcast to ``shape``) along axis 0, when it selects whole rows."""
    try:
        full = cond.expand(shape).reshape(shape[0], -1)
    except RuntimeError:
        return None
    if full.shape[1] and not bool((full == full[:, :1]).all()):
        return None
    rows = full[:, 0].tolist() if full.shape[1] else []
    runs, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[start]:
            runs.append((bool(rows[start]), start, i))
            start = i
    return runs


def split_padded_wheres(gm: fx.GraphModule) -> int:
    """Rewrite each ``where`` over padded rows as the ``cat`` of its runs (module docstring); returns how many."""
    graph, memo, count = gm.graph, {}, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.where.self:
            continue
        cond, pad, kept = node.args
        out, pad_shape = static_shape(node), static_shape(pad)
        if out is None or len(out) < 2 or static_shape(kept) != out or pad_shape is None:
            continue
        value = constant_value(cond, memo)
        if not isinstance(value, torch.Tensor) or value.dtype is not torch.bool:
            continue
        runs = _row_runs(value, out)
        if runs is None or len(runs) < 2 or len(runs) > _MAX_RUNS:
            continue
        parts = _parts(kept)
        bounds = {a for a, _, _ in parts or ()} | {b for _, b, _ in parts or ()}
        if parts is None or any(r[1] not in bounds or r[2] not in bounds for r in runs if r[0]) \
                or len(pad_shape) >= len(out) and pad_shape[0] != 1 \
                or pad.meta["val"].dtype != node.meta["val"].dtype or kept.meta["val"].dtype != node.meta["val"].dtype:
            continue
        with graph.inserting_before(node):
            pieces = []
            for replaced, a, b in runs:
                if replaced:
                    piece = graph.call_function(aten.expand.default, (pad, [b - a, *out[1:]]))
                    _fake(piece, aten.expand.default, pad, [b - a, *out[1:]])
                else:
                    piece = _rows(graph, kept, a, b)
                pieces.append(piece)
            new = graph.call_function(aten.cat.default, (pieces, 0))
            _fake(new, aten.cat.default, pieces, 0)
        node.replace_all_uses_with(new)
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erase_unused(graph, inputs)
        count += 1
    if count:
        gm.recompile()
    return count


def _whole_split(node: fx.Node) -> fx.Node | None:
    """``x`` when ``node`` is ``cat([split(x, sizes)[0], ..., split(x, sizes)[-1]], 0)``, else None."""
    pieces = node.args[0]
    first = pieces[0] if pieces else None
    if not isinstance(first, fx.Node) or first.target is not operator.getitem:
        return None
    split = first.args[0]
    if split.target not in (aten.split_with_sizes.default, aten.split.Tensor) or \
            (split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)) != 0:
        return None
    count = len(split.meta["val"])
    if len(pieces) != count or any(not isinstance(p, fx.Node) or p.target is not operator.getitem
                                   or p.args[0] is not split or p.args[1] != i for i, p in enumerate(pieces)):
        return None
    return split.args[0]


def split_joined_pieces(gm: fx.GraphModule) -> int:
    """Rewrite each ``split(cat(parts), sizes)[i]`` whose piece covers whole parts as the ``cat`` of those
    parts (or the part itself), and each ``cat`` of a whole split as the split's input; returns how many."""
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.cat.default and \
                (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) == 0:
            whole = _whole_split(node)
            if whole is not None and static_shape(whole) == static_shape(node):
                node.replace_all_uses_with(whole)
                inputs = node.all_input_nodes
                graph.erase_node(node)
                erase_unused(graph, inputs)
                count += 1
            continue
        if node.op != "call_function" or node.target is not aten.split_with_sizes.default:
            continue
        source, sizes = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if dim != 0 or not isinstance(source, fx.Node) or source.target is not aten.cat.default \
                or (source.args[1] if len(source.args) > 1 else 0) != 0:
            continue
        parts, starts, start = list(source.args[0]), [], 0
        if not all(static_shape(part) for part in parts):
            continue
        for part in parts:
            starts.append(start)
            start += static_shape(part)[0]
        starts.append(start)
        groups, a = [], 0
        for size in sizes:
            if a not in starts or a + size not in starts:
                groups = None
                break
            groups.append(parts[starts.index(a):starts.index(a + size)])
            a += size
        users = list(node.users)
        if groups is None or any(u.target is not operator.getitem for u in users):
            continue
        for user in users:
            group = groups[user.args[1]]
            with graph.inserting_before(user):
                if len(group) == 1:
                    piece = group[0]
                else:
                    piece = graph.call_function(aten.cat.default, (list(group), 0))
                    _fake(piece, aten.cat.default, list(group), 0)
            user.replace_all_uses_with(piece)
            graph.erase_node(user)
        graph.erase_node(node)
        erase_unused(graph, [source])
        count += 1
    if count:
        gm.recompile()
    return count
