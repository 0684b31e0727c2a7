"""Per-sample Python loops over the batch, as one batched computation.

Code written for one sample at a time loops over the batch: Lumina-Image-2.0 unpatchifies
``[x[i][a:b].view(h, w, p, p, c).permute(...).flatten(...) for i in range(B)]`` and stacks the
results. Captured, that is ``B`` copies of one chain of shape operators, each starting
with ``select(X, 0, i)``, joined by ``stack(..., 0)``: the analysis would see the batch
axis of a token sequence cut into samples, whose active tokens differ, and refuse it.
When the copies are identical but for ``i``, and ``i`` runs over the whole batch in
order, the stack is the chain applied to ``X`` with every axis moved one to the right
(``view`` sizes gain the batch in front, ``permute`` keeps it first): the same values.

A sample is taken as ``select(X, 0, i)``, as ``X.unbind(0)[i]``, or as the ``i``-th of ``m``
equal pieces ``Y.split(n)`` of rows that hold the samples end to end (``unflatten(Y, 0, [m, n])[i]``).
The samples are joined by ``stack(..., 0)``, by ``pad_sequence(..., batch_first=True)`` of equal
lengths (a stack), or by ``cat(..., 0)``: the samples end to end again, ``flatten(batched, 0, 1)``.
Code that takes the latent as a list of per-sample tensors (Z-Image) patchifies each, joins the
rows with ``cat``, embeds them, splits them back and pads them into a batch; each sample's
sequence is ``cat([x[i], cap[i]])``: a ``cat`` of per-sample chains is the ``cat`` of the batched
chains along the next axis.

``batched_chain(values, batch)`` reads such a set of per-sample values (also for the
writes of ``buffer_writes``); ``rebatch_sample_stacks(gm)`` rewrites the joins.
"""
from __future__ import annotations

import operator

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


def _equal_row_pieces(split: fx.Node) -> int | None:
    """How many equal pieces ``split`` cuts its input's rows into (``split(n)`` / ``split_with_sizes``
    of equal sizes along axis 0, covering every row), else None."""
    if split.target not in (aten.split.Tensor, aten.split_with_sizes.default) or not isinstance(split.args[0], fx.Node):
        return None
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    rows = split.args[0].meta["val"].shape[0]
    if dim != 0 or not isinstance(rows, int):
        return None
    sizes = split.args[1]
    if split.target is aten.split.Tensor:
        return rows // sizes if isinstance(sizes, int) and sizes > 0 and rows % sizes == 0 else None
    if not sizes or any(not isinstance(n, int) or n != sizes[0] for n in sizes) or sizes[0] * len(sizes) != rows:
        return None
    return len(sizes)


def _sample_of(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``(source, i)`` when ``node`` takes sample ``i``: ``select(X, 0, i)`` (source ``X``),
    ``X.unbind(0)[i]`` (source the unbind) or piece ``i`` of equal row pieces (source the split)."""
    if _packet(node) is aten.select and node.args[1] == 0 and isinstance(node.args[2], int) and \
            isinstance(node.args[0], fx.Node):
        return node.args[0], node.args[2]
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and isinstance(node.args[1], int):
        parent = node.args[0]
        if parent.target is aten.unbind.int and (parent.args[1] if len(parent.args) > 1 else 0) == 0:
            return parent, node.args[1]
        if parent.op == "call_function" and _equal_row_pieces(parent) is not None:
            return parent, node.args[1]
    return None


def _samples_in(source: fx.Node) -> int | None:
    """How many samples ``source`` (of ``_sample_of``) holds."""
    if source.target is aten.unbind.int:
        source = source.args[0]
    elif source.op == "call_function" and source.target in (aten.split.Tensor, aten.split_with_sizes.default):
        return _equal_row_pieces(source)
    val = source.meta.get("val")
    return val.shape[0] if isinstance(val, torch.Tensor) and val.dim() else None


def _batched_source(graph: fx.Graph, source: fx.Node, emitted: list) -> fx.Node:
    """The batched tensor that ``source`` (of ``_sample_of``) takes samples of."""
    from .attention_pattern import _fake

    if source.target is aten.unbind.int:
        return source.args[0]
    if source.op == "call_function" and source.target in (aten.split.Tensor, aten.split_with_sizes.default):
        rows = source.args[0]
        m = _equal_row_pieces(source)
        shape = [m, rows.meta["val"].shape[0] // m]
        new = graph.call_function(aten.unflatten.int, (rows, 0, shape))
        _fake(new, aten.unflatten.int, rows, 0, shape)
        emitted.append(new)
        return new
    return source


def _chain(value: fx.Node) -> tuple[fx.Node, int, list[fx.Node]] | None:
    """``(source, i, ops)`` when ``value`` is ``ops`` applied to sample ``i`` of ``source`` (``_sample_of``)
    through shape operators."""
    ops = []
    node = value
    while isinstance(node, fx.Node) and node.op == "call_function":
        packet = _packet(node)
        taken = _sample_of(node)
        if taken is not None:
            return taken[0], taken[1], ops[::-1]
        if not (packet in _DIM_ARG or packet in _SIZE_ARG or packet in _SAME or packet in _DIM_LIST
                or _pointwise_scalar(node) or _repeat_of_each_axis(node)):
            return None
        if packet is aten.squeeze and len(node.args) < 2:
            return None  # squeeze of every size-1 axis: which ones depends on the batch
        ops.append(node)
        node = node.args[0]
    return None


def _repeat_of_each_axis(node: fx.Node) -> bool:
    """``x.repeat(sizes)`` with one size per axis of ``x`` (more would add axes in front)."""
    return _packet(node) is aten.repeat and len(node.args[1]) == _rank(node.args[0])


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
    if _samples_in(source) != batch:
        return None
    first = [_signature(op) for op in chains[0][2]]
    if any([_signature(op) for op in c[2]] != first for c in chains[1:]):
        return None
    return source, chains[0][2]


def _moved(dim: int, rank: int) -> int:
    return (dim % rank) + 1 if rank else 1


def _like(graph: fx.Graph, op: fx.Node, args: list, emitted: list) -> fx.Node:
    """``op``'s operator on ``args``, with its source location, at the graph's insert point."""
    from .attention_pattern import _fake

    new = graph.call_function(op.target, tuple(args), dict(op.kwargs))
    _fake(new, op.target, *args, **op.kwargs)
    for key in ("nn_module_stack", "stack_trace"):
        if key in op.meta:
            new.meta[key] = op.meta[key]
    emitted.append(new)
    return new


def _emit_one(graph: fx.Graph, op: fx.Node, value: fx.Node, batch: int, emitted: list) -> fx.Node:
    """``op`` (one sample's shape operator) applied to the batched ``value`` in place of its first operand."""
    packet = _packet(op)
    args = list(op.args)
    in_rank = _rank(op.args[0])
    if packet in _SIZE_ARG:
        args[1] = [batch, *args[1]]
    elif packet is aten.repeat:
        args[1] = [1, *args[1]]
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
    return _like(graph, op, args, emitted)


def emit_batched(graph: fx.Graph, source: fx.Node, ops: list[fx.Node], batch: int, emitted: list | None = None):
    """Emit ``ops`` (one sample's chain) applied to the batched ``source``, at the graph's insert point
    (the new nodes are appended to ``emitted``); returns the last one."""
    emitted = [] if emitted is None else emitted
    value = _batched_source(graph, source, emitted)
    for op in ops:
        value = _emit_one(graph, op, value, batch, emitted)
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


def _joined(node: fx.Node) -> tuple[list, str] | None:
    """``(values, how)`` when ``node`` joins per-sample values along a new or the first axis: ``stack``
    (axis 0), ``pad_sequence(batch_first=True)`` of equal shapes (a stack) or ``cat`` (axis 0)."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], (list, tuple)):
        return None
    values = list(node.args[0])
    if not values or not all(isinstance(v, fx.Node) for v in values):
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if node.target is aten.stack.default and dim == 0:
        return values, "stack"
    if node.target is aten.cat.default and dim == 0 and values[0].meta["val"].dim() >= 1:
        return values, "cat"
    if node.target is aten.pad_sequence.default:
        batch_first = node.args[1] if len(node.args) > 1 else node.kwargs.get("batch_first", False)
        shapes = {tuple(v.meta["val"].shape) for v in values}
        if batch_first and len(shapes) == 1:
            return values, "stack"
        side = node.args[3] if len(node.args) > 3 else node.kwargs.get("padding_side", "right")
        if batch_first and side == "right":  # (padded on the left, the leading parts would move)
            return values, "pad"
    return None


def _padded_tail(node: fx.Node, values: list, batch: int):
    """``pad_sequence([cat([a_i, ..., z_i]) for i], batch_first=True)`` whose parts but the last have one
    shape in every sample (an image sequence first, then captions of different lengths): the plan of
    ``cat([a, ..., pad_sequence([z_i])], 1)``, the leading parts batched; else None."""
    if not all(v.op == "call_function" and v.target is aten.cat.default and
               (v.args[1] if len(v.args) > 1 else v.kwargs.get("dim", 0)) == 0 for v in values):
        return None
    counts = {len(v.args[0]) for v in values}
    if len(counts) != 1 or counts.pop() < 2:
        return None
    parts = len(values[0].args[0])
    lead = [_plan([v.args[0][j] for v in values], batch) for j in range(parts - 1)]
    if any(p is None for p in lead):
        return None
    padding = node.args[2] if len(node.args) > 2 else node.kwargs.get("padding_value", 0.0)
    return ("cat", 1, lead + [("pad", [v.args[0][-1] for v in values], padding)])


def _equivalent(values: list, memo: dict) -> bool:
    """Whether every value is the same node, or the same deterministic computation of the same nodes:
    a value that does not depend on the sample."""
    first = values[0]
    if all(v is first for v in values):
        return True
    key = tuple(values)
    if key in memo:
        return memo[key]
    memo[key] = False
    if not all(isinstance(v, fx.Node) and v.op == "call_function" and v.target is first.target
               and len(v.args) == len(first.args) and v.kwargs == first.kwargs for v in values):
        return False
    if isinstance(first.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in first.target.tags:
        return False
    for j, arg in enumerate(first.args):
        column = [v.args[j] for v in values]
        if isinstance(arg, fx.Node):
            if not all(isinstance(a, fx.Node) for a in column) or not _equivalent(column, memo):
                return False
        elif isinstance(arg, (list, tuple)) and any(isinstance(a, fx.Node) for a in arg):
            if any(not isinstance(a, (list, tuple)) or len(a) != len(arg) for a in column) or \
                    not all(_equivalent([a[i] for a in column], memo) if isinstance(arg[i], fx.Node)
                            else all(a[i] == arg[i] for a in column) for i in range(len(arg))):
                return False
        elif any(a != arg for a in column):
            return False
    memo[key] = True
    return True


_ROW_OPS = {aten.linear, aten.layer_norm, aten.rms_norm}  # act on trailing axes; other operands are weights


def _pointwise(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags \
        and torch.Tag.nondeterministic_seeded not in node.target.tags


def _op_plan(values: list, batch: int):
    """``("op", values[0], plans)``: every value is one operator applied to per-sample operands (planned
    in ``plans``, None for a non-tensor one) and shared ones; else None."""
    first = values[0]
    if not all(v.target is first.target and len(v.args) == len(first.args) and v.kwargs == first.kwargs
               for v in values):
        return None
    packet = _packet(first)
    shape_op = packet in _DIM_ARG or packet in _SIZE_ARG or packet in _SAME or packet in _DIM_LIST or \
        _repeat_of_each_axis(first)
    pointwise = _pointwise(first)
    if not (shape_op or pointwise or packet in _ROW_OPS) or (packet is aten.squeeze and len(first.args) < 2):
        return None
    plans = []
    for j, arg in enumerate(first.args):
        column = [v.args[j] for v in values]
        if isinstance(arg, fx.Node):
            if not all(isinstance(a, fx.Node) for a in column):
                return None
            plan = _plan(column, batch)
            if plan is None or (j > 0 and not pointwise and plan[0] != "shared"):
                return None  # a weight, a norm's parameters: the same for every sample
            plans.append(plan)
        elif isinstance(arg, (list, tuple)) and any(isinstance(a, fx.Node) for a in arg):
            return None
        elif any(a != arg for a in column):
            return None
        else:
            plans.append(None)
    if not plans or plans[0] is None or (not pointwise and plans[0][0] == "shared") or \
            all(p is None or p[0] == "shared" for p in plans):
        return None
    return ("op", first, plans)


def _plan(values: list, batch: int):
    """How to compute the per-sample ``values`` batched: ``("chain", source, ops)``; ``("shared", node)``
    for a value that does not depend on the sample; ``("cat", dim, plans)`` when every value is a ``cat``
    of per-sample parts (``cat([x[i], c[i]])``); ``("op", node, plans)`` for one operator of per-sample
    and shared operands (``linear(x[i], w)``, ``x[i] * s[i]``); else None."""
    found = batched_chain(values, batch)
    if found is not None:
        return ("chain", *found)
    if all(isinstance(v, fx.Node) and v.op == "call_function" for v in values):
        # (per-sample forms first: with a batch of one, every value is "the same for every sample")
        if all(v.target is aten.cat.default for v in values):
            plan = _cat_plan(values, batch)
        else:
            plan = _op_plan(values, batch)
        if plan is not None:
            return plan
    return ("shared", values[0]) if _equivalent(values, {}) else None


def _cat_plan(values: list, batch: int):
    rank = values[0].meta["val"].dim()
    dims = {(v.args[1] if len(v.args) > 1 else v.kwargs.get("dim", 0)) % max(rank, 1) for v in values}
    counts = {len(v.args[0]) for v in values}
    if len(dims) != 1 or len(counts) != 1:
        return None
    plans = [_plan([v.args[0][j] for v in values], batch) for j in range(counts.pop())]
    if any(p is None for p in plans) or all(p[0] == "shared" for p in plans):
        return None
    return ("cat", dims.pop() + 1, plans)


def _in_batch(graph: fx.Graph, value: fx.Node, batch: int, emitted: list) -> fx.Node:
    """A shared ``value`` given the batch axis in front (every sample the same)."""
    from .attention_pattern import _fake

    front = graph.call_function(aten.unsqueeze.default, (value, 0))
    _fake(front, aten.unsqueeze.default, value, 0)
    sizes = [batch, *value.meta["val"].shape]
    new = graph.call_function(aten.expand.default, (front, sizes))
    _fake(new, aten.expand.default, front, sizes)
    emitted.extend([front, new])
    return new


def _aligned(graph: fx.Graph, value: fx.Node, rank: int, out_rank: int, emitted: list) -> fx.Node:
    """A batched operand of per-sample rank ``rank`` broadcast against a per-sample result of rank
    ``out_rank``: unit axes after the batch axis, as broadcasting puts them in front of a sample."""
    from .attention_pattern import _fake

    for _ in range(out_rank - rank):
        new = graph.call_function(aten.unsqueeze.default, (value, 1))
        _fake(new, aten.unsqueeze.default, value, 1)
        emitted.append(new)
        value = new
    return value


def _emit_plan(graph: fx.Graph, plan, batch: int, emitted: list) -> fx.Node:
    """The batched value of ``plan``; a ``shared`` plan's value as it is (no batch axis)."""
    from .attention_pattern import _fake

    if plan[0] == "chain":
        return emit_batched(graph, plan[1], plan[2], batch, emitted)
    if plan[0] == "shared":
        return plan[1]
    if plan[0] == "pad":  # per-sample pieces of different lengths, padded as the model pads them
        new = graph.call_function(aten.pad_sequence.default, (plan[1], True, plan[2]))
        _fake(new, aten.pad_sequence.default, plan[1], True, plan[2])
        emitted.append(new)
        return new
    if plan[0] == "op":
        return _emit_op(graph, plan[1], plan[2], batch, emitted)
    parts = [_batched_value(graph, p, batch, emitted) for p in plan[2]]
    new = graph.call_function(aten.cat.default, (parts, plan[1]))
    _fake(new, aten.cat.default, parts, plan[1])
    emitted.append(new)
    return new


def _batched_value(graph: fx.Graph, plan, batch: int, emitted: list) -> fx.Node:
    """The value of ``plan`` with the batch axis in front, a shared one expanded over the batch."""
    value = _emit_plan(graph, plan, batch, emitted)
    return _in_batch(graph, value, batch, emitted) if plan[0] == "shared" else value


def _emit_op(graph: fx.Graph, op: fx.Node, plans: list, batch: int, emitted: list) -> fx.Node:
    """``op`` over the batch: its per-sample operands batched (rank-aligned for a pointwise one), shared
    ones as they are."""
    packet = _packet(op)
    if packet not in _ROW_OPS and not _pointwise(op):  # a shape operator of one per-sample operand
        return _emit_one(graph, op, _emit_plan(graph, plans[0], batch, emitted), batch, emitted)
    args, out_rank = list(op.args), _rank(op)
    for j, plan in enumerate(plans):
        if plan is None:
            continue
        value = _emit_plan(graph, plan, batch, emitted)
        if plan[0] != "shared" and packet not in _ROW_OPS:
            value = _aligned(graph, value, _rank(op.args[j]), out_rank, emitted)
        args[j] = value
    return _like(graph, op, args, emitted)


def rebatch_sample_stacks(gm: fx.GraphModule) -> int:
    """Rewrite every join of ``f(X[0]), ..., f(X[B-1])`` (``_joined``) as ``f`` over ``X``; returns how many."""
    from .attention_pattern import _fake

    count = 0
    for node in list(gm.graph.nodes):
        joined = _joined(node)
        if joined is None:
            continue
        values, how = joined
        plan = _padded_tail(node, values, len(values)) if how == "pad" else _plan(values, len(values))
        if plan is None or plan[0] == "shared":  # (the same value for every sample: nothing per sample)
            continue
        emitted: list = []
        with gm.graph.inserting_before(node):  # (a cat of a split's own pieces is its input: padded_rows)
            batched = _emit_plan(gm.graph, plan, len(values), emitted)
            if how == "cat":  # the samples end to end
                batched = gm.graph.call_function(aten.flatten.using_ints, (batched, 0, 1))
                _fake(batched, aten.flatten.using_ints, batched.args[0], 0, 1)
                emitted.append(batched)
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
