"""A sequence written piece by piece into a fresh buffer, as one concatenation.

Joint text + image sequences are often assembled in place::

    seq = x.new_zeros(B, T + N, D)
    seq[:, :T] = text
    seq[:, T:] = image          # or, per sample: for i in range(B): seq[i, T:] = image[i]

Captured, that is a ``new_zeros`` buffer, views of it (``slice`` / ``select``) and
``copy_`` / ``fill_`` into them. The analysis follows values, not storage, so a token
sequence written into a buffer is refused (the write would land in a gathered copy). When
the writes tile the buffer along one axis and nothing reads it before the last write, the
buffer is ``cat([text, image], 1)``: the same values, and a form the analysis follows.

* Per-sample writes (``seq[i, a:b] = f(image[i])`` for every ``i`` in order, the same ``a:b``
  and the same chain ``f``; ``sample_loops``) are read as one batched write first.
* A part no write covers keeps the buffer's fill (zeros, ones, ``full``'s value; ``empty`` is
  read as zeros, as good as any garbage).
* The buffer may also be any computed tensor that aliases nothing (an operator whose schema
  returns a new tensor, not a view or ``self``): ``joint[:, T:T + N] = image`` into a joint
  sequence computed before, which is ``cat([joint[:, :T], image, joint[:, T + N:]], 1)``; the
  parts no write covers are slices of the buffer's value before the writes.
* Anything else (overlapping writes, writes along two axes, a read between writes, a view
  written twice) leaves the buffer as it is.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .attention_pattern import _fake
from .sample_loops import _packet, batched_chain, emit_batched, erase_unused, is_assert

aten = torch.ops.aten

__all__ = ["concatenate_buffer_writes"]

_FRESH = {aten.new_zeros: 0.0, aten.zeros: 0.0, aten.new_empty: 0.0, aten.empty: 0.0, aten.new_ones: 1.0,
          aten.ones: 1.0, aten.zeros_like: 0.0, aten.empty_like: 0.0, aten.ones_like: 1.0}
_FULL = {aten.new_full: 2, aten.full: 1, aten.full_like: 1}  # the fill value's argument index
_WRITES = {aten.copy_.default, aten.fill_.Scalar, aten.fill_.Tensor}


PRIOR = object()  # the fill of a computed buffer: its own values before the writes


def _fresh_result(node: fx.Node) -> bool:
    """Whether ``node``'s value is a new tensor that aliases none of its operands (its schema's result
    carries no alias annotation: not a view, not ``self`` returned, not an in-place write)."""
    schema = getattr(node.target, "_schema", None)
    return (node.op == "call_function" and schema is not None and len(schema.returns) == 1
            and schema.returns[0].alias_info is None)


def _fill_value(buf: fx.Node):
    packet = _packet(buf)
    if packet in _FRESH:
        return _FRESH[packet]
    if packet in _FULL:
        value = buf.args[_FULL[packet]]
        return value if isinstance(value, (int, float, bool)) else None
    return PRIOR if _fresh_result(buf) else None


class _Write:
    """``buf[box] = value``: ``box`` per axis ``(start, stop)``; ``select`` axes are dropped in ``value``."""

    def __init__(self, node: fx.Node, views: list[fx.Node], shape: tuple[int, ...]):
        self.node, self.views = node, views
        self.box = [(0, n) for n in shape]
        self.selected: list[int] = []  # buffer axes a select removed, in order
        axes = list(range(len(shape)))  # view axis -> buffer axis
        self.ok = True
        for view in views:
            packet = _packet(view)
            rank = len(axes)
            dim = view.args[1] % rank
            axis = axes[dim]
            lo, hi = self.box[axis]
            if packet is aten.select:
                index = view.args[2] % (hi - lo)
                self.box[axis] = (lo + index, lo + index + 1)
                self.selected.append(axis)
                del axes[dim]
            else:  # slice(dim, start, end, step)
                start = view.args[2] if len(view.args) > 2 and view.args[2] is not None else 0
                end = view.args[3] if len(view.args) > 3 and view.args[3] is not None else hi - lo
                step = view.args[4] if len(view.args) > 4 else 1
                if step != 1 or not isinstance(start, int) or not isinstance(end, int):
                    self.ok = False
                    return
                n = hi - lo
                start, end = max(0, start + n if start < 0 else start), min(n, end + n if end < 0 else end)
                self.box[axis] = (lo + start, lo + max(start, end))

    @property
    def value(self):
        return self.node.args[1]


def _views_to(write: fx.Node, buf: fx.Node) -> list[fx.Node] | None:
    """The slice / select chain from ``buf`` to the written view, outermost first."""
    chain, node = [], write.args[0]
    while node is not buf:
        if not isinstance(node, fx.Node) or _packet(node) not in (aten.slice, aten.select):
            return None
        if [u for u in node.users if not is_assert(u)] != ([write] if not chain else [chain[-1]]):
            return None  # a view read by anything but the next view / the write
        chain.append(node)
        node = node.args[0]
    return chain[::-1]


def _writes_of(buf: fx.Node, order: dict) -> tuple[list[_Write], list[fx.Node]] | None:
    """The writes into ``buf`` and its other readers; None unless every view of it is written once
    and every other reader comes after the last write."""
    writes, readers = [], []
    seen = set()
    for user in buf.users:
        if is_assert(user):
            continue
        tops = [user]
        if _packet(user) in (aten.slice, aten.select):
            ends = _write_below(user)
            if ends is None:
                readers.append(user)
                continue
            tops = [ends]
        for write in tops:
            if write in seen:
                continue
            seen.add(write)
            if write.target not in _WRITES:
                readers.append(write)
                continue
            views = _views_to(write, buf)
            if views is None or write.users:
                return None
            writes.append(_Write(write, views, tuple(buf.meta["val"].shape)))
    if not writes or any(not w.ok for w in writes):
        return None
    last = max(order[w.node] for w in writes)
    if any(order[r] < last for r in readers):
        return None
    return sorted(writes, key=lambda w: order[w.node]), readers


def _write_below(view: fx.Node) -> fx.Node | None:
    """The write at the end of a chain of single-reader views starting at ``view``, if any."""
    node = view
    while True:
        users = [u for u in node.users if not is_assert(u)]
        if len(users) != 1:
            return None
        user = users[0]
        if user.target in _WRITES and user.args[0] is node:
            return user
        if _packet(user) not in (aten.slice, aten.select) or user.args[0] is not node:
            return None
        node = user


class _Piece:
    """What fills one box of the buffer: ``kind`` "value" (a node), "chain" (a per-sample chain to emit
    batched), "fill" (a Python scalar) or "fills" (0-d nodes, one per sample); ``dropped``: the buffer
    axes the written view had selected away (the value lacks them)."""

    def __init__(self, box, kind, payload, dropped):
        self.box, self.kind, self.payload, self.dropped = box, kind, payload, dropped


def _single(w: _Write) -> _Piece:
    if w.node.target is aten.copy_.default:
        return _Piece(w.box, "value", w.value, w.selected)
    if isinstance(w.value, fx.Node):
        return _Piece(w.box, "fills", [w.value], w.selected)
    return _Piece(w.box, "fill", w.value, w.selected)


def _pieces(writes: list[_Write], batch: int) -> list[_Piece] | None:
    """The writes as pieces; per-sample writes (axis 0 selected, the same box otherwise, every sample once)
    grouped into one batched piece each; None when they are no such set."""
    if not any(w.selected[:1] == [0] for w in writes):
        return [_single(w) for w in writes]
    if not all(w.selected[:1] == [0] for w in writes):
        return None
    groups: dict = {}
    for w in writes:
        groups.setdefault(tuple(w.box[1:]), []).append(w)
    out = []
    for key, group in groups.items():
        group.sort(key=lambda w: w.box[0][0])
        if [w.box[0][0] for w in group] != list(range(batch)):
            return None
        if any(w.node.target is not group[0].node.target for w in group):
            return None
        box, dropped = [(0, batch), *key], group[0].selected[1:]
        if any(w.selected[1:] != dropped for w in group):
            return None
        if group[0].node.target is aten.copy_.default:
            found = batched_chain([w.value for w in group], batch)
            if found is None:
                return None
            out.append(_Piece(box, "chain", found, dropped))
        elif all(isinstance(w.value, fx.Node) for w in group):
            out.append(_Piece(box, "fills", [w.value for w in group], dropped))
        elif len({w.value for w in group}) == 1 and not isinstance(group[0].value, fx.Node):
            out.append(_Piece(box, "fill", group[0].value, dropped))
        else:
            return None
    return out


def _tiling_axis(boxes: list, shape: tuple[int, ...]) -> int | None:
    """The one axis along which the boxes differ (every box spans every other axis whole)."""
    axes = [a for a in range(len(shape)) if any(b[a] != (0, shape[a]) for b in boxes)]
    if len(axes) > 1:
        return None
    axis = axes[0] if axes else 0
    spans = sorted(b[axis] for b in boxes)
    if any(lo < prev_hi for (_, prev_hi), (lo, _) in zip(spans, spans[1:])):
        return None  # overlapping writes
    return axis


def concatenate_buffer_writes(gm: fx.GraphModule) -> int:
    """Rewrite every buffer that writes tile along one axis as a ``cat``; returns how many."""
    graph, count = gm.graph, 0
    for buf in list(graph.nodes):
        if buf.op != "call_function" or not buf.users:
            continue
        fill = _fill_value(buf)
        val = buf.meta.get("val")
        if fill is None or not isinstance(val, torch.Tensor) or not all(isinstance(d, int) for d in val.shape):
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        found = _writes_of(buf, order)
        if found is None:
            continue
        writes, readers = found
        shape = tuple(val.shape)
        pieces = _pieces(writes, shape[0]) if shape else None
        if not pieces:
            continue
        axis = _tiling_axis([p.box for p in pieces], shape)
        if axis is None or not readers:
            continue
        first_reader = min(readers, key=order.get)
        with graph.inserting_before(first_reader):
            cat = _emit_cat(graph, buf, pieces, axis, shape, fill)
        if cat is None:
            continue
        buf.replace_all_uses_with(cat, delete_user_cb=lambda user: user in readers)
        written = [w.value for w in writes if isinstance(w.value, fx.Node)]  # erasing a node clears its args
        for w in writes:
            graph.erase_node(w.node)
        erase_unused(graph, [v for w in writes for v in w.views] + [buf] + written)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


def _emit_cat(graph: fx.Graph, buf: fx.Node, pieces: list, axis: int, shape, fill) -> fx.Node | None:
    parts, at = [], 0
    for piece in sorted(pieces, key=lambda p: p.box[axis][0]):
        lo, hi = piece.box[axis]
        if lo > at:
            size = list(shape)
            size[axis] = lo - at
            parts.append(_full(graph, size, fill, buf, axis, at))
        parts.append(_emit_piece(graph, piece, [b - a for a, b in piece.box], buf, shape[0]))
        at = hi
    if at < shape[axis]:
        size = list(shape)
        size[axis] = shape[axis] - at
        parts.append(_full(graph, size, fill, buf, axis, at))
    if len(parts) == 1:
        return parts[0]
    cat = _call(graph, aten.cat.default, parts, axis)
    return cat if tuple(cat.meta["val"].shape) == tuple(shape) else None


def _full(graph: fx.Graph, size: list, fill, buf: fx.Node, axis: int = 0, start: int = 0) -> fx.Node:
    """The buffer's fill over ``size`` (its rows ``start:`` along ``axis`` for a computed buffer)."""
    if fill is PRIOR:
        return _call(graph, aten.slice.Tensor, buf, axis, start, start + size[axis])
    val = buf.meta["val"]
    return _call(graph, aten.full.default, size, fill, dtype=val.dtype, device=val.device, like=buf)


def _call(graph: fx.Graph, target, *args, like=None, **kwargs) -> fx.Node:
    """``target(*args, **kwargs)`` as a new node with its fake value (operands may be lists of nodes)."""
    node = graph.call_function(target, args, kwargs)
    _fake(node, target, *args, like=like, **kwargs)
    return node


def _emit_piece(graph: fx.Graph, piece: _Piece, box_shape: list, buf: fx.Node, batch: int) -> fx.Node:
    """The values written into ``piece``'s box, in the buffer's dtype and the box's shape: the value
    broadcast to the written view (as ``copy_`` does), then the selected axes put back."""
    val = buf.meta["val"]
    view_shape = [n for axis, n in enumerate(box_shape) if axis not in piece.dropped]
    if piece.kind == "fill":
        node = _full(graph, view_shape, piece.payload, buf)
    else:
        if piece.kind == "chain":
            node = emit_batched(graph, *piece.payload, batch)
        elif piece.kind == "value":
            node = piece.payload
        else:  # 0-d fill tensors: one per sample (batched) or one
            node = piece.payload[0] if len(piece.payload) == 1 else _call(graph, aten.stack.default, piece.payload)
            if len(piece.payload) > 1:
                node = _call(graph, aten.view.default, node, [batch] + [1] * (len(view_shape) - 1))
        if node.meta["val"].dtype != val.dtype:
            node = _call(graph, aten._to_copy.default, node, dtype=val.dtype)
        if list(node.meta["val"].shape) != view_shape:
            node = _call(graph, aten.expand.default, node, view_shape)
    for axis in sorted(piece.dropped):
        node = _call(graph, aten.unsqueeze.default, node, axis)
    return node
