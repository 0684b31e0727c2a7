"""A computation run piece by piece along an axis, as one computation over the whole axis.

diffusers' forward chunking (``enable_forward_chunking(chunk_size, dim=1)``,
``set_chunk_feed_forward``) and memory-saving research code run a feed-forward (or an attention's
queries) over pieces of the sequence: ``torch.cat([ff(p) for p in x.chunk(n, dim=1)], dim=1)``.
diffusers' ``SlicedAttnProcessor`` runs attention over slices of the batch axis (heads folded in),
``q[s:e]``, ``k[s:e]``, ``v[s:e]``, and writes each result into ``out[s:e]`` (a ``cat`` once
passes/buffer_writes.py has run). Captured, that is ``n`` copies of one computation (the same
operators on the same weights), each reading the ``i``-th piece of one or more tensors cut along
``dim`` (``chunk`` / ``split`` items or ``slice`` ranges that tile the axis in order), and a ``cat`` of
their results along ``dim`` in order. On the token axis the analysis would see the image tokens cut
into pieces whose active tokens differ; on a folded batch axis, heads taken apart.

When every operator of the computation is **row-wise along** ``dim`` (each output row depends on the
same rows of its cut inputs only: ``linear`` over the features, pointwise operators whose other
operands broadcast along ``dim``, ``layer_norm`` / ``rms_norm`` over trailing features, dropout in eval
mode, casts, ``x @ W`` with a weight, a softmax or a kept reduction over other axes (a hand-written
RMSNorm), a ``chunk`` / ``split`` along another axis and its items (GEGLU, SwiGLU), and
``scaled_dot_product_attention`` whose cut operand is the queries along their token axis (and its mask's
rows, cut alike, or a mask shared by every query), without
``is_causal``, which aligns its mask to each piece, or whose cut operands are all of q, k, v (and the
mask) along a batch axis, without ``enable_gqa``), the pieces' results joined in order are the
computation on the uncut tensors: the cat is replaced by one copy of it. Operands from outside the
pieces must be the same in every piece, or the same pure computation on the same inputs (a weight
transposed inside the chunked function). Anything else keeps its pieces (which the analysis then
judges).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..source_frames import node_frame
from .attention_pattern import _fake
from .sample_loops import erase_unused, is_assert

aten = torch.ops.aten

__all__ = ["join_token_chunks"]

_CUTS = {aten.chunk, aten.split, aten.split_with_sizes}
_ROW_WISE = {aten.linear, aten.gelu, aten.silu, aten.relu, aten.dropout, aten._to_copy, aten.to, aten.clone,
             aten.contiguous, aten.alias, aten.detach}
_NORMS = {aten.layer_norm: 1, aten.rms_norm: 1}  # the normalised shape argument
_ALONG = {aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax}  # over one axis
_REDUCTIONS = {aten.sum, aten.mean, aten.amax, aten.amin, aten.var}  # over axes, kept (keepdim)
_LIMIT = 512  # nodes one piece's computation may span


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
    return lead >= 0 and (dim < lead or val.shape[dim - lead] == 1)


def _reads(node: fx.Node) -> list:
    return [a for a in node.args if isinstance(a, fx.Node)] + \
        [v for v in node.kwargs.values() if isinstance(v, fx.Node)]


def _cut_dim(cut: fx.Node) -> int:
    return cut.args[2] if len(cut.args) > 2 else cut.kwargs.get("dim", 0)


def _sdpa_row_wise(node: fx.Node, inner: set, rank: int, dim: int) -> bool:
    q, k, v = node.args[:3]
    causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    gqa = node.kwargs.get("enable_gqa", False)
    if dim == rank - 2:  # query chunks: every query row sees the same keys (a mask's rows cut alike, or shared)
        return q in inner and k not in inner and v not in inner and not causal \
            and all(a in inner or _broadcasts_along(a, rank, dim) for a in _reads(node)[3:])
    if dim < rank - 2:  # batch slices: each slice of the batch attends within itself
        return not gqa and all(a in inner or _broadcasts_along(a, rank, dim) for a in _reads(node)) \
            and all(t in inner for t in (q, k, v))
    return False


def _row_wise(node: fx.Node, inner: set, dim: int) -> bool:
    """Whether ``node``'s output rows along ``dim`` depend on the same rows of its operands in ``inner``
    (the piece's computation) only, its other operands being weights or broadcasting along ``dim``."""
    packet, operands = _packet(node), _reads(node)
    if node.target is operator.getitem:  # an item of a cut along another axis
        return node.args[0] in inner and _packet(node.args[0]) in _CUTS
    first_only = node.args[0] in inner and all(a not in inner for a in operands[1:])
    if packet in _CUTS:
        return first_only and _cut_dim(node) % _val(node.args[0]).dim() != dim
    val = _val(node)
    if not isinstance(val, torch.Tensor) or any(isinstance(_val(a), torch.Tensor) and _val(a).dim() != val.dim()
                                                 for a in operands if a in inner):
        return False  # every tensor of the computation keeps the rank, so ``dim`` names one axis throughout
    rank = val.dim()
    if dim >= rank:
        return False
    if packet is aten.linear:
        return first_only and dim != rank - 1
    if packet in _NORMS:
        return first_only and dim < rank - len(node.args[_NORMS[packet]])
    if packet is aten.scaled_dot_product_attention:
        return _sdpa_row_wise(node, inner, rank, dim)
    if packet in (aten.matmul, aten.mm):  # x @ W with a weight W: the features contracted
        w = _val(node.args[1])
        return first_only and isinstance(w, torch.Tensor) and w.dim() <= 2 and dim != rank - 1
    if packet in _ALONG:  # a softmax over another axis (a router's over its experts)
        return first_only and node.args[1] % rank != dim
    if packet in _REDUCTIONS:  # x.pow(2).mean(-1, keepdim=True) of a hand-written RMSNorm
        axes = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        axes = [axes] if isinstance(axes, int) else axes
        return first_only and bool(axes) and all(isinstance(a, int) and a % rank != dim for a in axes)
    if packet in _ROW_WISE:
        return first_only
    if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags:
        return all(a in inner or _broadcasts_along(a, rank, dim) for a in operands)
    return False


def _piece_of(node: fx.Node, dim: int, rank: int) -> tuple | None:
    """``node`` as a piece of a rank-``rank`` tensor cut along ``dim``: ``(source, key)`` with key
    ``("item", cut, i, count)`` for ``getitem(chunk / split(source), i)`` or ``("range", start, end)`` for
    a ``slice``; None otherwise."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        cut = node.args[0]
        if cut.op == "call_function" and _packet(cut) in _CUTS and isinstance(_val(cut.args[0]), torch.Tensor) \
                and _val(cut.args[0]).dim() == rank and _cut_dim(cut) % rank == dim:
            return cut.args[0], ("item", cut, node.args[1], len(_val(cut)))
        return None
    if _packet(node) is aten.slice and isinstance(_val(node.args[0]), torch.Tensor) \
            and _val(node.args[0]).dim() == rank:
        source = node.args[0]
        at = node.args[1] if len(node.args) > 1 else 0
        start = node.args[2] if len(node.args) > 2 else None
        end = node.args[3] if len(node.args) > 3 else None
        step = node.args[4] if len(node.args) > 4 else 1
        size = _val(source).shape[dim]
        if at % rank != dim or step != 1 or not all(isinstance(v, (int, type(None))) for v in (start, end)) \
                or not isinstance(size, int):
            return None
        start, end = start or 0, size if end is None else end
        start, end = (max(0, min(size, v + size if v < 0 else v)) for v in (start, end))  # as Python slices
        return source, ("range", start, end)
    return None


def _above(piece: fx.Node, dim: int, rank: int) -> tuple[set, set]:
    """What ``piece`` is computed from (nearest ``_LIMIT`` nodes), and which of those are pieces of cut
    tensors (the search stops at them)."""
    above, leaves, todo = {piece}, set(), [piece]
    while todo and len(above) < _LIMIT:
        node = todo.pop(0)
        if _piece_of(node, dim, rank) is not None:
            leaves.add(node)
            continue
        if node.op == "call_function":
            for a in node.all_input_nodes:
                if a not in above:
                    above.add(a)
                    todo.append(a)
    return above, leaves


def _region(piece: fx.Node, above: set, leaves: set, dim: int,
            order: dict) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """The computation of ``piece`` from the cut pieces ``leaves``: ``(leaves, nodes)``, the operators
    between them and ``piece`` in graph order (``piece`` last), when every operator is row-wise along
    ``dim`` and nothing else reads their values; None otherwise."""
    if piece in leaves:
        return [piece], []
    inner, todo = set(leaves), list(leaves)
    while todo:  # of what the piece is computed from, what is computed from a cut piece
        for user in todo.pop().users:
            if user in above and user not in inner:
                inner.add(user)
                todo.append(user)
    if piece not in inner:
        return None
    nodes = inner - leaves
    for node in sorted(inner, key=order.__getitem__):  # in graph order: operands judged before their readers
        if node in nodes and not _row_wise(node, inner, dim):
            return None
        if node is not piece and any(u not in nodes for u in node.users if not is_assert(u)):
            return None  # a value of the computation read elsewhere too
    return sorted(leaves, key=order.__getitem__), sorted(nodes, key=order.__getitem__)


def _signature(leaves: list[fx.Node], nodes: list[fx.Node], dim: int, rank: int) -> tuple:
    """What two pieces' computations must share: the cut tensors they read, and every operator's target
    and arguments, with the computation's own values named by their place in it."""
    place = {n: ("leaf", i) for i, n in enumerate(leaves)} | {n: ("node", i) for i, n in enumerate(nodes)}
    name = lambda a: place[a] if a in place else _canonical(a) if isinstance(a, fx.Node) else a  # noqa: E731
    return (tuple(_piece_of(leaf, dim, rank)[0] for leaf in leaves),
            tuple((op.target, tuple(fx.node.map_arg(a, name) for a in op.args),
                   tuple(sorted((k, fx.node.map_arg(v, name)) for k, v in op.kwargs.items()))) for op in nodes))


def _canonical(node: fx.Node, depth: int = 8):
    """What an operand from outside the computation is, such that two copies of one pure computation on
    the same inputs (``self.w.t()`` written inside the chunked function, one per piece) compare equal."""
    if depth == 0 or node.op != "call_function" or node.is_impure() or not isinstance(_val(node), torch.Tensor) \
            or (isinstance(node.target, torch._ops.OpOverload)
                and torch.Tag.nondeterministic_seeded in node.target.tags):
        return node
    name = lambda a: _canonical(a, depth - 1) if isinstance(a, fx.Node) else a  # noqa: E731
    return ("computed", node.target, tuple(fx.node.map_arg(a, name) for a in node.args),
            tuple(sorted((k, fx.node.map_arg(v, name)) for k, v in node.kwargs.items())))


def _tile(keys: list[tuple], size) -> bool:
    """Whether the cut keys of one source, piece by piece, take its axis apart in order."""
    if keys[0][0] == "item":
        cut, count = keys[0][1], keys[0][3]
        return count == len(keys) and all(k[0] == "item" and k[1] is cut and k[2] == i for i, k in enumerate(keys))
    if not all(k[0] == "range" for k in keys):
        return False
    return keys[0][1] == 0 and keys[-1][2] == size and all(a[2] == b[1] for a, b in zip(keys, keys[1:]))


def _join(gm: fx.GraphModule, cat: fx.Node, order: dict) -> bool:
    pieces = list(cat.args[0])
    if not all(isinstance(p, fx.Node) and isinstance(_val(p), torch.Tensor) for p in pieces):
        return False
    rank = _val(cat).dim()
    dim = (cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)) % rank
    if any(len([u for u in p.users if not is_assert(u)]) != 1 for p in pieces) or len(set(pieces)) != len(pieces):
        return False  # a piece read elsewhere too
    searched = [_above(p, dim, rank) for p in pieces]
    shared = set.intersection(*(leaves for _, leaves in searched))  # read by every piece alike: not a cut
    regions = [_region(p, above, leaves - shared, dim, order) for p, (above, leaves) in zip(pieces, searched)]
    if any(r is None for r in regions):
        return False
    first = _signature(*regions[0], dim, rank)
    if not first[0] or any(_signature(*r, dim, rank) != first for r in regions[1:]):
        return False
    for at, source in enumerate(first[0]):  # each cut tensor taken apart in order, piece by piece
        if not _tile([_piece_of(r[0][at], dim, rank)[1] for r in regions], _val(source).shape[dim]):
            return False
    leaves, nodes = regions[0]
    graph, copies = gm.graph, {leaf: _piece_of(leaf, dim, rank)[0] for leaf in leaves}
    with graph.inserting_before(cat):
        for op in nodes:
            swap = lambda a: copies.get(a, a)  # noqa: E731
            args, kwargs = fx.node.map_arg(op.args, swap), fx.node.map_arg(op.kwargs, swap)
            new = graph.call_function(op.target, args, kwargs)
            _fake(new, op.target, *args, **kwargs)
            for key in ("stack_trace", "nn_module_stack"):
                new.meta[key] = op.meta.get(key)
            copies[op] = new
    joined = copies[nodes[-1] if nodes else leaves[0]]
    if tuple(_val(joined).shape) != tuple(_val(cat).shape):  # cannot happen for a tiling; kept as a guard
        erase_unused(graph, [copies[op] for op in nodes])
        return False
    cat.replace_all_uses_with(joined)
    erase_unused(graph, [cat])
    return True


def join_token_chunks(gm: fx.GraphModule) -> list[str]:
    """Replace every piecewise row-wise computation joined back along its axis (in place); what was
    joined, one line each (``cat_3: 4 pieces along axis 1 at attention.py:533 `...```)."""
    cats = [n for n in gm.graph.nodes if n.op == "call_function" and _packet(n) is aten.cat
            and isinstance(n.args[0], (list, tuple)) and len(n.args[0]) > 1]
    joined, order = [], None
    for cat in cats:
        order = order or {n: i for i, n in enumerate(gm.graph.nodes)}  # graph order, made again after a join
        pieces, rank = len(cat.args[0]), _val(cat).dim()
        axis = (cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)) % rank
        where = node_frame(cat)
        if _join(gm, cat, order):
            joined.append(f"{cat.name}: {pieces} pieces along axis {axis}{where}")
            order = None
    if joined:
        gm.graph.lint()
        gm.recompile()
    return joined
