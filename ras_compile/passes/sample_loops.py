"""Per-sample Python loops over the batch, as one batched computation.

Code written for one sample at a time loops over the batch: Lumina-Image-2.0 unpatchifies
``[x[i][a:b].view(h, w, p, p, c).permute(...).flatten(...) for i in range(B)]`` and stacks the
results. Captured, that is ``B`` copies of one chain of shape operators, each starting
with ``select(X, 0, i)``, joined by ``stack(..., 0)``: the analysis would see the batch
axis of a token sequence cut into samples, whose active tokens differ, and refuse it.
When the copies are identical but for ``i``, and ``i`` runs over the whole batch in
order, the stack is the chain applied to ``X`` with every axis moved one to the right
(``view`` sizes gain the batch in front, ``permute`` keeps it first): the same values.

``batched_chain(values, batch)`` reads such a set of per-sample values (also for the
writes of ``buffer_writes``); ``rebatch_sample_stacks(gm)`` rewrites the stacks.
"""
from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten

__all__ = ["batched_chain", "emit_batched", "erase_unused", "is_assert", "rebatch_sample_stacks"]

# (packet) -> how its dim arguments move when a batch axis is put in front
_DIM_ARG = {aten.slice: 1, aten.select: 1, aten.transpose: (1, 2), aten.flatten: (1, 2), aten.unflatten: 1,
            aten.unsqueeze: 1, aten.squeeze: 1, aten.movedim: (1, 2), aten.narrow: 1}
_SIZE_ARG = {aten.view, aten.reshape, aten._unsafe_view}
_DIM_LIST = {aten.permute, aten.flip}  # a list of axes (a permutation keeps the batch first)
_SAME = {aten.contiguous, aten.clone, aten.alias, aten.detach, aten._to_copy, aten.to}
_ASSERTS = {aten._assert_tensor_metadata, aten._assert_scalar}


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", node.target)


def is_assert(node: fx.Node) -> bool:
    """Export's metadata checks (``_assert_tensor_metadata``): they read a value but compute nothing."""
    return _packet(node) in _ASSERTS


def _rank(node: fx.Node) -> int:
    return node.meta["val"].dim()


def _pointwise_scalar(node: fx.Node) -> bool:
    """A pointwise operator of one tensor and Python scalars (``x * 2``, ``x.float()``)."""
    return (isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags
            and not any(isinstance(a, fx.Node) for a in node.args[1:])
            and not any(isinstance(v, fx.Node) for v in node.kwargs.values()))


def _chain(value: fx.Node) -> tuple[fx.Node, int, list[fx.Node]] | None:
    """``(X, i, ops)`` when ``value`` is ``ops`` applied to ``select(X, 0, i)`` through shape operators."""
    ops = []
    node = value
    while isinstance(node, fx.Node) and node.op == "call_function":
        packet = _packet(node)
        if packet is aten.select and node.args[1] == 0 and isinstance(node.args[2], int) and \
                isinstance(node.args[0], fx.Node):
            return node.args[0], node.args[2], ops[::-1]
        if not (packet in _DIM_ARG or packet in _SIZE_ARG or packet in _SAME or packet in _DIM_LIST
                or _pointwise_scalar(node)):
            return None
        if packet is aten.squeeze and len(node.args) < 2:
            return None  # squeeze of every size-1 axis: which ones depends on the batch
        ops.append(node)
        node = node.args[0]
    return None


def _signature(op: fx.Node) -> tuple:
    return (op.target, tuple(op.args[1:]), tuple(sorted(op.kwargs.items())))


def batched_chain(values: list, batch: int) -> tuple[fx.Node, list[fx.Node]] | None:
    """``(X, ops)`` when ``values[i]`` is the same chain of shape operators applied to ``select(X, 0, i)``
    for ``i = 0 .. batch - 1`` (the chains of sample 0 are returned as ``ops``), else None."""
    if len(values) != batch or batch < 1:
        return None
    chains = [_chain(v) for v in values]
    if any(c is None for c in chains):
        return None
    source = chains[0][0]
    if any(c[0] is not source or c[1] != i for i, c in enumerate(chains)):
        return None
    if source.meta["val"].shape[0] != batch:
        return None
    first = [_signature(op) for op in chains[0][2]]
    if any([_signature(op) for op in c[2]] != first for c in chains[1:]):
        return None
    return source, chains[0][2]


def _moved(dim: int, rank: int) -> int:
    return (dim % rank) + 1 if rank else 1


def emit_batched(graph: fx.Graph, source: fx.Node, ops: list[fx.Node], batch: int, emitted: list | None = None):
    """Emit ``ops`` (one sample's chain) applied to the batched ``source``, at the graph's insert point
    (the new nodes are appended to ``emitted``); returns the last one."""
    from .attention_pattern import _fake

    emitted = [] if emitted is None else emitted
    value = source
    for op in ops:
        packet = _packet(op)
        args = list(op.args)
        in_rank = _rank(op.args[0])
        if packet in _SIZE_ARG:
            args[1] = [batch, *args[1]]
        elif packet is aten.permute:
            args[1] = [0] + [_moved(d, in_rank) for d in args[1]]
        elif packet is aten.flip:
            args[1] = [_moved(d, in_rank) for d in args[1]]
        elif packet in _DIM_ARG:
            spots = _DIM_ARG[packet]
            for spot in (spots if isinstance(spots, tuple) else (spots,)):
                if spot < len(args):
                    rank = _rank(op) if packet is aten.unsqueeze else in_rank
                    args[spot] = _moved(args[spot], rank)
            if packet is aten.flatten and len(args) < 3:  # flatten(x) / flatten(x, a): to the last axis
                args += [1, -1][len(args) - 1:]
        args[0] = value
        new = graph.call_function(op.target, tuple(args), dict(op.kwargs))
        _fake(new, op.target, *args, **op.kwargs)
        for key in ("nn_module_stack", "stack_trace"):
            if key in op.meta:
                new.meta[key] = op.meta[key]
        emitted.append(new)
        value = new
    return value


def erase_unused(graph: fx.Graph, nodes) -> None:
    """Erase ``nodes`` that nothing reads, readers first, then what only they read."""
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if getattr(node, "_erased", False):
            continue
        if node.op == "call_function" and node.users and all(is_assert(u) for u in node.users):
            for user in list(node.users):  # export's metadata checks of a value nothing else reads
                graph.erase_node(user)
        if node.op == "call_function" and not node.users:
            inputs = node.all_input_nodes
            graph.erase_node(node)
            todo.extend(inputs)


def rebatch_sample_stacks(gm: fx.GraphModule) -> int:
    """Rewrite every ``stack([f(X[0]), ..., f(X[B-1])], 0)`` as ``f`` over ``X``; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.stack.default:
            continue
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        values = list(node.args[0])
        if dim != 0 or not values:
            continue
        found = batched_chain(values, len(values))
        if found is None:
            continue
        emitted: list = []
        with gm.graph.inserting_before(node):
            batched = emit_batched(gm.graph, *found, len(values), emitted)
        if tuple(batched.meta["val"].shape) != tuple(node.meta["val"].shape):
            erase_unused(gm.graph, emitted[::-1])
            continue
        node.replace_all_uses_with(batched)
        gm.graph.erase_node(node)
        erase_unused(gm.graph, values)  # (read before the erase: erasing a node clears its args)
        count += 1
    if count:
        gm.recompile()
    return count
