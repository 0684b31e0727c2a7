"""A computation run chunk by chunk along an axis, as one computation over the whole axis.

diffusers' forward chunking (``enable_forward_chunking(chunk_size, dim=1)``,
``set_chunk_feed_forward``) and memory-saving research code run a feed-forward (or an attention's
queries) over pieces of the sequence: ``torch.cat([ff(p) for p in x.chunk(n, dim=1)], dim=1)``.
Captured, that is a ``chunk`` / ``split`` of ``x`` along ``dim``, ``n`` copies of one chain (the same
operators on the same weights), and a ``cat`` of their results along ``dim`` in order. On the token
axis the analysis would see the image tokens cut into pieces whose active tokens differ.

When every operator of the chain is **row-wise along** ``dim`` (each output row depends on the same
input row only: ``linear`` over the features, pointwise operators whose other operands broadcast
along ``dim``, ``layer_norm`` / ``rms_norm`` over trailing features, dropout in eval mode, casts,
and ``scaled_dot_product_attention`` whose chunked operand is the queries, without ``is_causal``, which
aligns its mask to each piece), the chunks' results
joined in order are the chain applied to ``x``: the cat is replaced by one copy of the chain on
``x``. Any other operator keeps the chunked form (which the analysis then judges).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .attention_pattern import _fake
from .sample_loops import erase_unused, is_assert

aten = torch.ops.aten

__all__ = ["join_token_chunks"]

_CUTS = {aten.chunk, aten.split, aten.split_with_sizes}
_ROW_WISE = {aten.linear, aten.gelu, aten.silu, aten.relu, aten.dropout, aten._to_copy, aten.to, aten.clone,
             aten.contiguous, aten.alias, aten.detach}
_NORMS = {aten.layer_norm: 1, aten.rms_norm: 1}  # the normalised shape argument


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", node.target)


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _broadcasts_along(operand, out_rank: int, dim: int) -> bool:
    """Whether ``operand`` (another operand of a pointwise operator) has size 1 along output axis ``dim``
    (or does not reach it)."""
    val = _val(operand)
    if not isinstance(val, torch.Tensor):
        return True
    lead = out_rank - val.dim()
    return dim < lead or val.shape[dim - lead] == 1


def _reads(node: fx.Node) -> list:
    return [a for a in node.args if isinstance(a, fx.Node)] + \
        [v for v in node.kwargs.values() if isinstance(v, fx.Node)]


def _cut_dim(cut: fx.Node) -> int:
    return cut.args[2] if len(cut.args) > 2 else cut.kwargs.get("dim", 0)


def _row_wise(node: fx.Node, inner: set, dim: int) -> bool:
    """Whether ``node``'s output rows along ``dim`` depend on the same rows of its operands in ``inner``
    (the chunk's computation) only, its other operands being weights or broadcasting along ``dim``."""
    packet, operands = _packet(node), _reads(node)
    if node.target is operator.getitem:  # an item of a cut along another axis
        return node.args[0] in inner
    first_only = node.args[0] in inner and all(a not in inner for a in operands[1:])
    if packet in _CUTS:
        return first_only and _cut_dim(node) % _val(node.args[0]).dim() != dim
    val = _val(node)
    if not isinstance(val, torch.Tensor) or any(isinstance(_val(a), torch.Tensor) and _val(a).dim() != val.dim()
                                                 for a in operands if a in inner):
        return False  # every tensor of the computation keeps the rank, so ``dim`` names one axis throughout
    rank = val.dim()
    if packet is aten.linear:
        return first_only and dim != rank - 1
    if packet in _NORMS:
        return first_only and dim < rank - len(node.args[_NORMS[packet]])
    if packet is aten.scaled_dot_product_attention:  # the chunked operand is the queries
        causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
        return first_only and dim == rank - 2 and not causal \
            and all(_broadcasts_along(a, rank, dim) for a in operands[3:])  # is_causal aligns to each piece
    if packet in _ROW_WISE:
        return first_only
    if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags:
        return all(a in inner or _broadcasts_along(a, rank, dim) for a in operands)
    return False


def _region(item: fx.Node, piece: fx.Node, dim: int, limit: int = 512) -> list[fx.Node] | None:
    """The computation from ``item`` (one piece of the cut) to ``piece`` (its result), in graph order
    (``item`` first), when every operator in it is row-wise along ``dim`` and nothing outside it reads
    its intermediates; None otherwise."""
    below, todo = {item}, [item]
    while todo:  # what is computed from the item
        for user in todo.pop().users:
            if user not in below and user.op == "call_function":
                below.add(user)
                todo.append(user)
                if len(below) > limit:
                    return None
    if piece not in below:
        return None
    region, todo = {piece}, [piece]
    while todo:  # ... and feeds the piece
        for a in todo.pop().all_input_nodes:
            if a in below and a not in region:
                region.add(a)
                todo.append(a)
    for node in region:
        if node is not item and not _row_wise(node, region, dim):
            return None
        readers = [u for u in node.users if not is_assert(u)]
        if node is not piece and any(u not in region for u in readers):
            return None  # an intermediate read elsewhere too
    order = {n: i for i, n in enumerate(item.graph.nodes)} if len(region) > 1 else {item: 0}
    return sorted(region, key=order.__getitem__)


def _ancestors(node: fx.Node, limit: int = 512) -> list[fx.Node]:
    """``node`` and what it is computed from, nearest first."""
    seen, order, frontier = {node}, [node], [node]
    while frontier and len(order) < limit:
        nxt = []
        for n in frontier:
            if n.op == "call_function":
                for a in n.all_input_nodes:
                    if a not in seen:
                        seen.add(a)
                        nxt.append(a)
        order += nxt
        frontier = nxt
    return order


def _source_item(piece: fx.Node, i: int, count: int, rank: int, dim: int) -> fx.Node | None:
    """The nearest ``getitem(cut, i)`` that ``piece`` is computed from, of a chunk / split along ``dim``
    into ``count`` pieces."""
    for node in _ancestors(piece):
        if node.target is operator.getitem and node.args[1] == i and isinstance(node.args[0], fx.Node):
            cut = node.args[0]
            if cut.op == "call_function" and _packet(cut) in _CUTS and len(_val(cut)) == count \
                    and _val(cut.args[0]).dim() == rank and _cut_dim(cut) % rank == dim:
                return node
    return None


def _signature(region: list[fx.Node]) -> list[tuple]:
    """What two copies of a computation must share: every operator's target and arguments, with the
    computation's own values named by their place in it."""
    place = {n: i for i, n in enumerate(region)}
    name = lambda a: ("<region>", place[a]) if a in place else a  # noqa: E731
    return [(op.target, tuple(fx.node.map_arg(a, name) for a in op.args),
             tuple(sorted((k, fx.node.map_arg(v, name)) for k, v in op.kwargs.items()))) for op in region[1:]]


def _join(gm: fx.GraphModule, cat: fx.Node) -> bool:
    pieces = list(cat.args[0])
    if not all(isinstance(p, fx.Node) and isinstance(_val(p), torch.Tensor) for p in pieces):
        return False
    rank = _val(cat).dim()
    dim = (cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)) % rank
    regions, cut = [], None
    for i, piece in enumerate(pieces):
        item = _source_item(piece, i, len(pieces), rank, dim)
        if item is None or (cut is not None and item.args[0] is not cut):
            return False
        cut = item.args[0]
        if len([u for u in piece.users if not is_assert(u)]) != 1:
            return False  # the piece is read elsewhere too
        region = _region(item, piece, dim)
        if region is None:
            return False
        regions.append(region)
    first = _signature(regions[0])
    if any(_signature(r) != first for r in regions[1:]):
        return False
    graph, x = gm.graph, cut.args[0]
    copies = {regions[0][0]: x}
    with graph.inserting_before(cat):
        for op in regions[0][1:]:
            swap = lambda a: copies.get(a, a)  # noqa: E731
            args, kwargs = fx.node.map_arg(op.args, swap), fx.node.map_arg(op.kwargs, swap)
            new = graph.call_function(op.target, args, kwargs)
            _fake(new, op.target, *args, **kwargs)
            for key in ("stack_trace", "nn_module_stack"):
                new.meta[key] = op.meta.get(key)
            copies[op] = new
    cat.replace_all_uses_with(copies[regions[0][-1]])
    erase_unused(graph, [cat])
    return True


def join_token_chunks(gm: fx.GraphModule) -> int:
    """Replace every chunked row-wise computation joined back along its axis (in place); how many."""
    cats = [n for n in gm.graph.nodes if n.op == "call_function" and _packet(n) is aten.cat
            and isinstance(n.args[0], (list, tuple)) and len(n.args[0]) > 1]
    joined = sum(_join(gm, cat) for cat in cats)
    if joined:
        gm.graph.lint()
        gm.recompile()
    return joined
