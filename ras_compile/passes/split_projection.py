"""Split a packed Q/K/V projection into one projection per part, so K and V can fuse with their cache write.

Most research DiTs project queries, keys and values with one ``linear`` to ``[.., 3 * D]``, view the
result as ``[.., 3, heads, d]``, move the packed axis to the front and take the parts (timm's
``qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)``, U-ViT's ``qkv[0]``,
``nn.MultiheadAttention``'s ``unflatten(-1, (3, E))``), or cut the features into the parts directly
(``torch.split(qkv, D, dim=-1)``: diffusers' fused processors after ``fuse_qkv_projections()``). The fused K/V projection
(passes/fuse_projection.py) needs a ``linear`` whose output is exactly one cache, so here each part
gets its own ``linear`` on a row block of the weight (and bias), followed by the same layout chain
with the packed axis of size one, and the part selected at index 0. Values are the same up to the
GeMM's summation order: each output column is the same dot product.

Applied only where the fused projection will run (CUDA), and only to projections whose parts reach
the keys or values of an attention that reads cached K/V.
"""
from __future__ import annotations

import operator
from math import prod

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from .token_axis import _SKIPPED, TokenAnalysis, _packet, _readers

aten = torch.ops.aten

_VIEWS = {aten.view, aten.reshape, aten._unsafe_view}
_MOVES = {aten.permute, aten.transpose, aten.unsqueeze, aten.squeeze, aten.contiguous, aten.clone, aten.alias}


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _axis_after(node: fx.Node, axis: int) -> int | None:
    """Where axis ``axis`` of ``node.args[0]`` lands in ``node``'s output (None if the node drops it or
    cannot be followed)."""
    rank_in, packet = _val(node.args[0]).dim(), _packet(node)
    if packet is aten.permute:
        return [d % rank_in for d in node.args[1]].index(axis)
    if packet is aten.transpose:
        a, b = (d % rank_in for d in node.args[1:3])
        return b if axis == a else a if axis == b else axis
    if packet is aten.unsqueeze:
        d = node.args[1] % (rank_in + 1)
        return axis + 1 if axis >= d else axis
    if packet is aten.squeeze:
        if len(node.args) < 2:
            return None  # squeezing every size-1 axis would take the packed axis of size one too
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        shape = _val(node.args[0]).shape
        removed = {d % rank_in for d in dims if shape[d % rank_in] == 1}
        return None if axis in removed else axis - sum(1 for d in removed if d < axis)
    return axis  # contiguous / clone / alias / a cast to the same dtype


def _parts(pre: fx.Node, axis: int, count: int) -> dict[int, fx.Node] | None:
    """The node taking part ``i`` of ``pre`` along ``axis``, for every reader of ``pre``; None unless
    every reader takes parts (``select``, ``unbind`` or a split into size-one pieces, then getitem)."""
    found: dict[int, fx.Node] = {}
    for user in _readers(pre):
        packet = _packet(user) if user.op == "call_function" else None
        if packet is aten.select and user.args[1] % _val(pre).dim() == axis:
            found[user.args[2] % count] = user
        elif packet in (aten.unbind, aten.split, aten.split_with_sizes, aten.chunk):
            at = 1 if packet is aten.unbind else 2
            dim = user.args[at] if len(user.args) > at else user.kwargs.get("dim", 0)
            pieces = _val(user)
            if dim % _val(pre).dim() != axis or len(pieces) != count \
                    or any(int(p.shape[axis]) != 1 for p in pieces if packet is not aten.unbind):
                return None
            for item in _readers(user):
                if item.target is not operator.getitem:
                    return None
                found[item.args[1]] = item
        else:
            return None
    return found


def _reaches_cached_kv(node: fx.Node, analysis: TokenAnalysis, depth: int = 12) -> bool:
    """Whether ``node`` becomes, within ``depth`` nodes, the keys or values of an attention that reads
    cached K/V (a part worth its own projection)."""
    frontier, seen = [node], {node}
    for _ in range(depth):
        following = []
        for n in frontier:
            for user in n.users:
                if user.name in analysis.attention and any(a is n for a in user.args[1:3]):
                    return True
                if user not in seen:
                    seen.add(user)
                    following.append(user)
        frontier = following
    return False


def _fake(graph_node: fx.Node, mode) -> None:
    """``meta["val"]`` of a new node, computed on the fake values of its inputs."""
    args = fx.node.map_arg(graph_node.args, _val)
    kwargs = fx.node.map_arg(graph_node.kwargs, _val)
    with mode:
        graph_node.meta["val"] = graph_node.target(*args, **kwargs)


def _is_move(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if _packet(node) in (aten.to, aten._to_copy):  # .float() of a float tensor: the same values
        return node.meta["val"].dtype == node.args[0].meta["val"].dtype and not node.kwargs.get("device")
    return _packet(node) in _MOVES


def _split_one(gm: fx.GraphModule, linear: fx.Node, analysis: TokenAnalysis) -> bool:
    if len(_readers(linear)) != 1:
        return False
    view = _readers(linear)[0]
    if view.op != "call_function" or _packet(view) not in _VIEWS | {aten.unflatten}:
        return False
    lead = tuple(int(s) for s in _val(linear).shape[:-1])
    features = int(_val(linear).shape[-1])
    shape = tuple(int(s) for s in _val(view).shape)
    axis = len(lead)
    if shape[:axis] != lead or len(shape) <= axis + 1 or shape[axis] < 2 or prod(shape[axis:]) != features:
        return False
    count = shape[axis]
    chain, pre = [], view
    while True:  # follow the packed axis through moves to the node whose readers take the parts
        parts = _parts(pre, axis, count)
        if parts is not None:
            break
        if len(_readers(pre)) != 1:
            return False
        nxt = _readers(pre)[0]
        if not _is_move(nxt):
            return False
        axis = _axis_after(nxt, axis)
        if axis is None:
            return False
        chain.append(nxt)
        pre = nxt
    if sorted(parts) != list(range(count)) or not any(_reaches_cached_kv(p, analysis) for p in parts.values()):
        return False
    if _packet(view) is aten.unflatten:  # unflatten(-1, (count, ...)) of the features
        sizes = list(view.args[2])
        packed_at = [0] if view.args[1] % (axis + 1) == axis and sizes[0] == count else []
    else:
        sizes = list(view.args[1])
        packed_at = [len(lead)] if len(sizes) == len(shape) and sizes[len(lead)] == count else []
    if not packed_at:
        return False
    sizes[packed_at[0]] = 1
    mode = detect_fake_mode([_val(linear)])
    graph, width = gm.graph, features // count
    x, weight = linear.args[0], linear.args[1]
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    with graph.inserting_before(linear):
        for i, part in parts.items():
            rows = lambda t: graph.call_function(aten.slice.Tensor, (t, 0, i * width, (i + 1) * width))  # noqa: E731
            new = [rows(weight)] + ([rows(bias)] if bias is not None else [])
            new.append(graph.call_function(aten.linear.default, (x, *new)))
            head_args = (new[-1], sizes) if _packet(view) is not aten.unflatten else (new[-1], view.args[1], sizes)
            new.append(graph.call_function(view.target, head_args))
            for move in chain:
                new.append(graph.call_function(move.target, (new[-1], *move.args[1:]), dict(move.kwargs)))
            if _packet(part) is aten.select or part.target is operator.getitem \
                    and _packet(part.args[0]) is aten.unbind:
                new.append(graph.call_function(aten.select.int, (new[-1], axis, 0)))
            for n in new:
                _fake(n, mode)
                n.meta["stack_trace"] = linear.meta.get("stack_trace")
            part.replace_all_uses_with(new[-1])
    dead = [*parts.values(), *{p.args[0] for p in parts.values() if p.target is operator.getitem}, *reversed(chain),
            view, linear]
    for node in dead:
        for check in [u for u in node.users if u.op == "call_function" and _packet(u) in _SKIPPED]:
            graph.erase_node(check)  # the metadata assertions on a node that is gone
        if not node.users:
            graph.erase_node(node)
    return True


def _split_columns(gm: fx.GraphModule, linear: fx.Node, analysis: TokenAnalysis) -> bool:
    """The packed output cut into its parts along the features directly, ``q, k, v = torch.split(qkv,
    D, dim=-1)`` (diffusers' fused processors after ``fuse_qkv_projections()``): each part its own
    ``linear`` on its rows of the weight."""
    readers = _readers(linear)
    if len(readers) != 1 or readers[0].op != "call_function" \
            or _packet(readers[0]) not in (aten.split, aten.split_with_sizes, aten.chunk):
        return False
    cut, rank = readers[0], _val(linear).dim()
    dim = cut.args[2] if len(cut.args) > 2 else cut.kwargs.get("dim", 0)
    items = _readers(cut)
    if dim % rank != rank - 1 or not items or any(i.target is not operator.getitem for i in items):
        return False
    if not any(_reaches_cached_kv(i, analysis) for i in items):
        return False
    sizes = [int(v.shape[-1]) for v in _val(cut)]
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    mode = detect_fake_mode([_val(linear)])
    graph = gm.graph
    x, weight = linear.args[0], linear.args[1]
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    with graph.inserting_before(linear):
        for item in items:
            j = item.args[1]
            rows = lambda t: graph.call_function(aten.slice.Tensor, (t, 0, starts[j], starts[j] + sizes[j]))  # noqa: E731
            new = [rows(weight)] + ([rows(bias)] if bias is not None else [])
            new.append(graph.call_function(aten.linear.default, (x, *new)))
            for n in new:
                _fake(n, mode)
                n.meta["stack_trace"] = linear.meta.get("stack_trace")
            item.replace_all_uses_with(new[-1])
    for node in [*items, cut, linear]:
        for check in [u for u in node.users if u.op == "call_function" and _packet(u) in _SKIPPED]:
            graph.erase_node(check)
        if not node.users:
            graph.erase_node(node)
    return True


def split_packed_projections(gm: fx.GraphModule, analysis: TokenAnalysis) -> int:
    """Split every packed projection whose parts feed cached K/V (in place); how many were split."""
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.linear.default]
    split = sum(_split_one(gm, linear, analysis) or _split_columns(gm, linear, analysis) for linear in linears)
    if split:
        gm.graph.lint()
        gm.recompile()
    return split
