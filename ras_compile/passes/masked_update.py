"""Rewrite boolean-mask updates ``x[m] = f(x[m])`` / ``x[m] = v`` as ``torch.where``.

``x[mask] *= 0.0`` (GLM-Image drops prior-token embeddings this way) is captured as
``index(x, [m])`` -> pointwise ops -> ``index_put_(x, [m], ...)``: the selected rows
have a data-dependent count, so the graph has an unbacked shape and the token analysis
refuses it. The update is the same function as ``where(m[..., None], f(x), x)`` with
static shapes whenever ``f`` is elementwise, which this pass checks: the values written
come from ``index(x, [m])`` through pointwise ops whose other operands are Python
scalars or 0-d tensors, or are one such scalar-like tensor (``x[m] = 0``) or one value
broadcast over the selected rows (``x[~keep] = mask_token``, a ``[D]`` token); the mask is
boolean and indexes the leading axes of ``x``; every intermediate is read only by the
chain (apart from export's size assertions). Anything else is left as it was.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .attention_pattern import _fake
from .token_axis import _val

aten = torch.ops.aten
_INDEX_PUT = (aten.index_put_.default, aten.index_put.default)


def _is_pointwise(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags


def _functional(target):
    """The out-of-place overload of an in-place ATen op (``mul_.Tensor`` -> ``mul.Tensor``)."""
    name = target._schema.name.split("::")[1]
    if not name.endswith("_"):
        return target
    packet = getattr(aten, name[:-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


def _scalar_like(a) -> bool:
    v = _val(a)
    return not isinstance(a, fx.Node) or (isinstance(v, torch.Tensor) and v.dim() == 0)


def _broadcast_row(a, xv: torch.Tensor, mv: torch.Tensor) -> bool:
    """Whether ``a`` is one value broadcast over every selected row: a tensor whose shape broadcasts
    against the axes of ``x`` after the mask's (``x[~keep] = mask_token``, a ``[D]`` token)."""
    v = _val(a)
    rest = tuple(xv.shape[mv.dim():])
    if not isinstance(v, torch.Tensor) or v.dim() > len(rest):
        return False
    return all(s in (1, r) for s, r in zip(reversed(v.shape), reversed(rest)))


def _assertion_only(node: fx.Node) -> bool:
    """A size read or SymInt / SymBool computation that only feeds export's runtime assertions."""
    if node.op == "call_function" and "assert" in str(node.target):
        return True
    if isinstance(_val(node), torch.Tensor):
        return False
    return all(_assertion_only(u) for u in node.users)


def _read_only_by(node: fx.Node, reader: fx.Node) -> bool:
    return all(u is reader or _assertion_only(u) for u in node.users)


def _chain(values: fx.Node, x: fx.Node, mask: fx.Node):
    """The pointwise nodes from ``index(x, [mask])`` to ``values`` (in order), or None."""
    chain, node = [], values
    while True:
        if node.op == "call_function" and node.target is aten.index.Tensor:
            if node.args[0] is x and len(node.args[1]) == 1 and node.args[1][0] is mask:
                return node, chain[::-1]
            return None
        if node.op != "call_function" or not _is_pointwise(node) or _functional(node.target) is None:
            return None
        tensors = [a for a in node.args if isinstance(a, fx.Node) and isinstance(_val(a), torch.Tensor)]
        rows = [a for a in tensors if not _scalar_like(a)]
        if len(rows) != 1 or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            return None
        chain.append(node)
        node = rows[0]


def _emit(graph: fx.Graph, target, args, kwargs):
    node = graph.call_function(target, tuple(args), dict(kwargs))
    _fake(node, target, *args, **kwargs)
    return node


def rewrite_masked_updates(gm: fx.GraphModule) -> list[str]:
    """Replace each elementwise boolean-mask update of ``gm`` by ``aten.where``, in place.

    Returns the names of the replaced ``index_put`` nodes."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    replaced = []
    for put in list(graph.nodes):
        if put.op != "call_function" or put.target not in _INDEX_PUT:
            continue
        x, indices, values = put.args[:3]
        accumulate = put.args[3] if len(put.args) > 3 else put.kwargs.get("accumulate", False)
        if accumulate or len(indices) != 1 or not isinstance(indices[0], fx.Node):
            continue
        mask, xv, mv = indices[0], _val(x), _val(indices[0])
        if not (isinstance(xv, torch.Tensor) and isinstance(mv, torch.Tensor)) or mv.dtype != torch.bool:
            continue
        if mv.dim() > xv.dim() or tuple(mv.shape) != tuple(xv.shape[:mv.dim()]):
            continue
        found = _chain(values, x, mask) if isinstance(values, fx.Node) else None
        if found is not None:
            index, chain = found
            readers = chain + [put]
            if not all(_read_only_by(n, readers[i]) for i, n in enumerate([index] + chain)):
                continue
        elif _scalar_like(values) or _broadcast_row(values, xv, mv):
            index, chain = None, []
        else:
            continue
        in_place = put.target is aten.index_put_.default
        if in_place and _aliased(x, put, order):
            continue  # writing x in place also writes the tensors it shares memory with
        if not isinstance(_val(values), torch.Tensor) or _val(values).dtype != xv.dtype:
            continue  # index_put casts the values to x's dtype, where would promote
        with graph.inserting_before(put):
            shape = list(mv.shape) + [1] * (xv.dim() - mv.dim())
            m = _emit(graph, aten.view.default, (mask, shape), {}) if shape != list(mv.shape) else mask
            if index is None:
                new = values
            else:
                new = x
                for n in chain:
                    src = next(a for a in n.args if isinstance(a, fx.Node) and not _scalar_like(a))
                    args = [new if a is src else a for a in n.args]
                    new = _emit(graph, _functional(n.target), args, n.kwargs)
            where = _emit(graph, aten.where.self, (m, new, x), {})
        if in_place:  # every later reader of x (and of the index_put result) reads the update
            for user in list(x.users):
                if user is not where and order.get(user, -1) > order[put]:
                    user.replace_input_with(x, where)
        put.replace_all_uses_with(where)
        dead = [put] + chain[::-1] + ([index] if index is not None else [])
        for n in dead:
            for u in list(n.users):  # size reads and the assertions on them
                _erase_tree(graph, u)
            graph.erase_node(n)
        replaced.append(put.name)
    if replaced:
        graph.lint()
        gm.recompile()
    return replaced


def _is_view(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and getattr(node.target, "is_view", False)


def _aliased(x: fx.Node, put: fx.Node, order: dict) -> bool:
    """Writing ``x`` in place would also write another graph value: ``x`` is an input or a view, or a
    view of it taken before the write (a view taken after it reads the update, and is rewired)."""
    return x.op == "placeholder" or _is_view(x) or any(_is_view(u) and order[u] < order[put] for u in x.users)


def _erase_tree(graph: fx.Graph, node: fx.Node) -> None:
    for u in list(node.users):
        _erase_tree(graph, u)
    graph.erase_node(node)
