"""Captions of different lengths before the image in one batch: each sample's rows reordered, image first.

Lumina-Image-2.0 (diffusers' ``Lumina2Transformer2DModel``, Alpha-VLLM's ``NextDiT``) lays out each
sample's joint sequence as ``[caption (c_i rows), image (n rows), padding]``, with ``c_i`` read from
the caption mask on the host. Captured for the mask's values (host_reads.py), that is per-sample
writes at per-sample offsets into fresh buffers, the same layout for every buffer with that row axis
(the hidden states, the RoPE position ids, the attention mask)::

    buf = zeros(B, L, ...)
    for i: buf[i, :c_i] = cap[i, :c_i]; buf[i, c_i:c_i + n] = img[i]; mask[i, :c_i + n] = True
    ... the layers, over all rows ...
    out = stack([y[i, c_i:c_i + n] for i in range(B)])

No single row layout of the active image tokens serves every sample. But when every operator
between those writes and the reads of their rows treats the rows alike (each output row is computed
from the same row of its operands, and attention sees every row as a key, with the mask and the
RoPE angles carried by rows laid out the same way), the same computation with each sample's rows in
another order computes the same rows in that order. This pass moves each sample's image rows to the
front, ``[image (n), caption (c_i), padding]``, in every such buffer, and points every per-sample
read of rows computed from them at the new rows; the image is then at rows ``[0, n)`` of every
sample, a joint sequence with the text after the image, which the analysis follows. Each buffer
becomes ``cat([head, tail], 1)``: ``head`` holds rows ``[0, n)`` (written per sample at the same
rows, which passes/buffer_writes.py reads as one batched write), ``tail`` the rest.

The pass follows every value computed from the buffers, tracking their batch and row axes, and
rewrites only when each operator is one that treats the rows alike: pointwise operators (other
operands broadcast along the rows), casts and copies, views that keep the batch and row axes whole
(``view`` / ``reshape`` / ``flatten`` / ``unsqueeze`` / ``permute`` / ``view_as_complex`` ...),
``expand`` / ``repeat`` / ``split`` / ``cat`` / slices along other axes, ``linear`` and matmul by a
weight, norms, softmaxes and reductions over other axes, ``gather`` of a table by row-wise indices
(RoPE angles by position ids), and ``scaled_dot_product_attention`` over rows of these buffers with
a key mask from them (not ``is_causal``). The rows leave the followed values only through
per-sample reads ``y[i, a:b]`` within one part (caption, image or padding). Anything else (a slice
of the rows for all samples, a convolution or cumulative sum along them, an operand with rows of its
own that were not reordered, a graph output that carries them) leaves the graph as it is: the
analysis then refuses the writes as before, with this pass's reason.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from ..source_frames import node_frame
from .attention_pattern import _fake
from .node_shapes import static_shape
from .sample_loops import _packet, is_assert
from .token_axis import SAMPLE_OFFSETS_REASON

aten = torch.ops.aten

__all__ = ["reorder_sample_offsets"]

_SIZE_AT = {aten.zeros: 0, aten.ones: 0, aten.empty: 0, aten.full: 0,
            aten.new_zeros: 1, aten.new_ones: 1, aten.new_empty: 1, aten.new_full: 1}
_WRITES = {aten.copy_, aten.fill_}
_SAME = {aten.clone, aten.contiguous, aten._to_copy, aten.to, aten.alias, aten.detach, aten.lift_fresh_copy,
         aten.dropout}
_VIEWS = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze, aten.unsqueeze,
          aten.view_as_real, aten.view_as_complex}
_NORMS = {aten.layer_norm: 1, aten.rms_norm: 1}  # the normalised shape argument
_SOFTMAX = {aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax}
_REDUCTIONS = {aten.sum, aten.mean, aten.amax, aten.amin, aten.var, aten.std}
_CUTS = {aten.split, aten.chunk, aten.split_with_sizes}


class _Stop(Exception):
    """The rows are not treated alike somewhere: the graph is left as it is (the message says where)."""


def _where(node: fx.Node) -> str:
    return f"'{node.name}' ({node.target}{node_frame(node)})"


# --------------------------------------------------------------------------- the layout of one buffer


class _Layout:
    """Each sample's parts along the rows: caption ``[0, c_i)``, image ``[c_i, c_i + n)``, padding after."""

    def __init__(self, caps: tuple[int, ...], n: int, rows: int):
        self.caps, self.n, self.rows = caps, n, rows

    def key(self):
        return self.caps, self.n, self.rows

    def parts(self, i: int) -> list[tuple[int, int, int]]:
        """Sample ``i``'s parts as ``(start, end, new start)``."""
        c, n = self.caps[i], self.n
        return [(0, c, n), (c, c + n, 0), (c + n, self.rows, c + n)]

    def moved(self, i: int, a: int, b: int) -> tuple[int, int] | None:
        """Where rows ``[a, b)`` of sample ``i`` are after the reordering, if they lie in one part."""
        if a >= b or self.caps[i] == 0:
            return a, b
        for start, end, new in self.parts(i):
            if start <= a and b <= end:
                return new + a - start, new + b - start
        return None


def _slice_range(node: fx.Node, size: int) -> tuple[int, int] | None:
    """``(start, end)`` of ``slice(x, 0, start, end)`` (step 1) along an axis of ``size``."""
    if _packet(node) is not aten.slice or (node.args[1] if len(node.args) > 1 else 0) != 0:
        return None
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else size
    step = node.args[4] if len(node.args) > 4 else 1
    if step != 1 or not isinstance(start, int) or not isinstance(end, int):
        return None
    start, end = (s + size if s < 0 else s for s in (start, end))
    return max(0, min(start, size)), max(0, min(end, size))


def _write_chain(head: fx.Node) -> tuple[list[fx.Node], fx.Node] | None:
    """The views from ``head`` (a sample's rows of a buffer) down to the write into the last of them:
    ``(views, write)``; None when ``head`` is read (or written through anything else)."""
    views, node = [], head
    while len(node.users) == 1:
        user = next(iter(user for user in node.users))
        if _packet(user) in _WRITES and user.args[0] is node:
            return views, user
        if _packet(user) not in (aten.select, aten.slice) or user.args[0] is not node or len(user.args) < 2 \
                or user.args[1] == 0:
            return None  # the rows (axis 0 of the sample) stay whole: only other axes are cut
        views.append(user)
        node = user
    return None


def _row_constant(view: fx.Node, write: fx.Node) -> bool:
    """Whether the written value is the same for every row (a fill, or a value broadcast along axis 0)."""
    if _packet(write) is aten.fill_:
        return True
    value = write.args[1]
    shape, rank = static_shape(value), len(static_shape(view) or ())
    return shape is not None and (len(shape) < rank or shape[0] == 1)


class _Buffer:
    """A fresh buffer ``[B, L, ...]`` and its per-sample writes ``buf[i, a:b, ...] = v``."""

    def __init__(self, node: fx.Node, writes: list, data_uses: list[fx.Node]):
        self.node, self.writes, self.data_uses = node, writes, data_uses  # writes: (i, a, b, head, views, write)

    def layout(self) -> _Layout | None:
        """The caption / image layout its row-varying writes make, when the image start differs between
        samples; None for any other (or no) layout."""
        batch, rows = static_shape(self.node)[:2]
        varying = [sorted({(a, b) for i, a, b, _h, views, w in self.writes if j == i and a < b
                           and not _row_constant(views[-1] if views else _h, w)}) for j in range(batch)]
        if not all(varying):
            return None
        caps, sizes = [], set()
        for ranges in varying:
            if len(ranges) == 1:
                (c, e), = ranges
            elif len(ranges) == 2 and ranges[0][0] == 0 and ranges[0][1] == ranges[1][0]:
                c, e = ranges[1]
            else:
                return None
            caps.append(c)
            sizes.add(e - c)
        if len(sizes) != 1 or len(set(caps)) == 1:
            return None
        return _Layout(tuple(caps), sizes.pop(), rows)

    def fits(self, layout: _Layout) -> bool:
        """Whether every write keeps its meaning with each sample's rows reordered by ``layout``: rows
        written within one part, or the same value written over whole parts."""
        for i, a, b, head, views, write in self.writes:
            if layout.moved(i, a, b) is not None:
                continue
            if not _row_constant(views[-1] if views else head, write):
                return False
            if any(a < end and start < b and not (a <= start and end <= b) for start, end, _ in layout.parts(i)):
                return False  # a constant over part of a part
        return True


def _buffers(gm: fx.GraphModule) -> list[_Buffer]:
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or _packet(node) not in _SIZE_AT:
            continue
        shape = static_shape(node)
        if shape is None or len(shape) < 2:
            continue
        writes, uses = [], []
        for user in node.users:
            if _packet(user) is aten.select and user.args[0] is node and user.args[1] == 0 \
                    and isinstance(user.args[2], int):
                head, span = user, (0, shape[1])
                only = next(iter(user.users)) if len(user.users) == 1 else None
                if only is not None and _slice_range(only, shape[1]) is not None:
                    head, span = only, _slice_range(only, shape[1])
                chain = _write_chain(head)
                if chain is not None:
                    writes.append((user.args[2] % shape[0], span[0], span[1], head, *chain))
                    continue
            uses.append(user)
        if writes:
            found.append(_Buffer(node, writes, uses))
    return found


# --------------------------------------------------------------------------- following the rows


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _through_view(before: tuple, after: tuple, d: int) -> int | None:
    """Where axis ``d`` of ``before`` is in ``after`` (a view of the same elements in the same order),
    if it stays one whole axis."""
    lead, size = math.prod(before[:d]), before[d]
    acc = 1
    for k, s in enumerate(after):
        if acc == lead and s == size:
            return k
        acc *= s
    return None


class _Follow:
    """The values computed from a group's buffers: node -> (batch axis, row axis); the reads of their
    rows: (read slice node, sample, start, end)."""

    def __init__(self, layout: _Layout, batch: int):
        self.layout, self.batch = layout, batch
        self.axes: dict[fx.Node, tuple[int, int]] = {}
        self.reads: list[tuple[fx.Node, int, int, int]] = []

    def run(self, gm: fx.GraphModule, starts: list[fx.Node], skip: set) -> None:
        for buf in starts:
            self.axes[buf] = (0, 1)
        for node in gm.graph.nodes:
            if node in self.axes or node in skip or node.op == "placeholder" or node.op == "get_attr":
                continue
            ins = [a for a in node.all_input_nodes if a in self.axes]
            if not ins:
                continue
            if node.op == "output":
                raise _Stop(f"the reordered rows reach a graph output through {_where(ins[0])}")
            if is_assert(node):
                continue
            axes = self._step(node, ins)
            if axes is not None:
                self.axes[node] = axes

    # one operator -------------------------------------------------------------------------------
    def _of(self, node, rank_out: int):
        """An operand's axes aligned to an output of ``rank_out`` (pointwise broadcasting)."""
        b, j = self.axes[node]
        shift = rank_out - node.meta["val"].dim()
        return b + shift, j + shift

    def _step(self, node: fx.Node, ins: list[fx.Node]):
        packet, x = _packet(node), node.args[0] if node.args else None
        val = node.meta.get("val")
        if node.target is operator.getitem:  # an item of a cut along another axis, or of native_layer_norm
            return self.axes[x]
        if packet is aten.select and x in self.axes:
            return self._select(node)
        if packet in _WRITES or self._writes_in_place(node):
            raise _Stop(f"{_where(node)} writes into values computed from the reordered rows")
        if packet in _CUTS | {aten.native_layer_norm}:  # their values are lists: their items keep the axes
            return self._tuple(node)
        if not isinstance(val, torch.Tensor):
            raise _Stop(f"{_where(node)} is not followed")
        out_shape = tuple(val.shape)
        rank = len(out_shape)
        if packet is aten.scaled_dot_product_attention:
            return self._attention(node)
        if packet is aten.gather:
            return self._gather(node)
        if packet is aten.type_as:
            if x not in self.axes:
                raise _Stop(f"{_where(node)}: only its dtype comes from the reordered rows")
            return self.axes[x]
        if packet is aten.cat:
            return self._cat(node)
        only_first = [a for a in ins if a is not x]
        if packet in _SAME | _VIEWS | {aten.permute, aten.transpose, aten.t, aten.expand, aten.repeat, aten.slice,
                                      aten.linear, aten.matmul} | set(_NORMS) | _SOFTMAX | _REDUCTIONS:
            if x not in self.axes or only_first:
                raise _Stop(f"{_where(node)} combines the reordered rows with other operands along them")
        b, j = self.axes.get(x, (None, None))
        in_shape = static_shape(x) if isinstance(x, fx.Node) else None
        if packet in _SAME:
            return b, j
        if packet in _VIEWS:
            nb, nj = _through_view(in_shape, out_shape, b), _through_view(in_shape, out_shape, j)
            if nb is None or nj is None:
                raise _Stop(f"{_where(node)} merges or splits the batch or row axis")
            return nb, nj
        if packet is aten.permute:
            perm = [_norm(d, rank) for d in node.args[1]]
            return perm.index(b), perm.index(j)
        if packet in (aten.transpose, aten.t):
            d0, d1 = (0, 1) if packet is aten.t else (_norm(node.args[1], rank), _norm(node.args[2], rank))
            swap = {d0: d1, d1: d0}
            return swap.get(b, b), swap.get(j, j)
        if packet in (aten.expand, aten.repeat):
            shift = rank - len(in_shape)
            sizes = node.args[1]
            if packet is aten.repeat and (sizes[b + shift] != 1 or sizes[j + shift] != 1):
                raise _Stop(f"{_where(node)} repeats along the batch or row axis")
            return b + shift, j + shift
        if packet is aten.slice:
            d = _norm(node.args[1] if len(node.args) > 1 else 0, rank)
            if d in (b, j) and out_shape[d] != in_shape[d]:
                raise _Stop(f"{_where(node)} slices the rows (or the batch) for every sample alike")
            return b, j
        if packet in (aten.linear, aten.matmul):
            w = node.args[1]
            if w in self.axes or len(static_shape(w) or ()) > 2 or j == len(in_shape) - 1 or b == len(in_shape) - 1:
                raise _Stop(f"{_where(node)} contracts along the rows or with another value computed from them")
            return b, j
        if packet in _NORMS:
            normed = len(node.args[_NORMS[packet]])
            if max(b, j) >= len(in_shape) - normed:
                raise _Stop(f"{_where(node)} normalises over the rows")
            return b, j
        if packet in _SOFTMAX:
            if _norm(node.args[1], rank) in (b, j):
                raise _Stop(f"{_where(node)} is a softmax over the rows")
            return b, j
        if packet in _REDUCTIONS:
            return self._reduction(node, in_shape, b, j)
        if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags:
            return self._pointwise(node, rank)
        raise _Stop(f"{_where(node)} is not known to treat the rows alike")

    def _tuple(self, node: fx.Node):
        x = node.args[0]
        if x not in self.axes or any(a in self.axes for a in node.all_input_nodes if a is not x):
            raise _Stop(f"{_where(node)} combines the reordered rows with other operands along them")
        b, j = self.axes[x]
        rank = x.meta["val"].dim()
        if _packet(node) is aten.native_layer_norm:
            if max(b, j) >= rank - len(node.args[1]):
                raise _Stop(f"{_where(node)} normalises over the rows")
            return b, j
        d = _norm(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), rank)
        if d in (b, j):
            raise _Stop(f"{_where(node)} cuts along the batch or row axis")
        return b, j

    def _writes_in_place(self, node: fx.Node) -> bool:
        schema = getattr(node.target, "_schema", None)
        return bool(schema and schema.arguments and schema.arguments[0].alias_info is not None
                    and schema.arguments[0].alias_info.is_write)

    def _pointwise(self, node: fx.Node, rank: int):
        found = None
        for a in node.all_input_nodes:
            if a in self.axes:
                axes = self._of(a, rank)
                if found is not None and axes != found:
                    raise _Stop(f"{_where(node)} combines values whose rows lie on different axes")
                found = axes
        for a in node.all_input_nodes:
            shape = static_shape(a)
            if a in self.axes or shape is None:
                continue
            lead = rank - len(shape)
            if found[1] >= lead and shape[found[1] - lead] != 1:
                raise _Stop(f"{_where(node)} combines the reordered rows with rows of '{a.name}', which were "
                            "not reordered")
        return found

    def _select(self, node: fx.Node):
        x, d = node.args[0], node.args[1]
        b, j = self.axes[x]
        d = _norm(d, x.meta["val"].dim())
        if d == j:
            raise _Stop(f"{_where(node)} takes one row for every sample alike")
        if d != b:
            return b - (b > d), j - (j > d)
        i, nj = node.args[2] % self.batch, j - (j > d)
        rows = self.layout.rows
        for user in node.users:
            span = _slice_range(user, rows) if nj == 0 else None
            if span is None and self.layout.caps[i] != 0:
                raise _Stop(f"{_where(user)} reads sample {i}'s rows other than as one slice of them")
            if any(self._writes_in_place(u) and u.args[0] is user for u in user.users):
                raise _Stop(f"{_where(user)}: sample {i}'s rows are written in place after the buffers are made")
            if span is not None:
                if self.layout.moved(i, *span) is None:
                    raise _Stop(f"{_where(user)} reads rows {span[0]}:{span[1]} of sample {i}, which span its "
                                "caption and image")
                self.reads.append((user, i, *span))
        return None  # a sample's rows: no longer followed

    def _cat(self, node: fx.Node):
        parts = node.args[0]
        rank = node.meta["val"].dim()
        d = _norm(node.args[1] if len(node.args) > 1 else 0, rank)
        if not all(p in self.axes and p.meta["val"].dim() == rank for p in parts):
            raise _Stop(f"{_where(node)} joins the reordered rows with values whose rows were not reordered")
        axes = {self.axes[p] for p in parts}
        if len(axes) != 1 or d in next(iter(axes)):
            raise _Stop(f"{_where(node)} joins along the batch or row axis")
        return axes.pop()

    def _reduction(self, node: fx.Node, in_shape: tuple, b: int, j: int):
        rank = len(in_shape)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = list(range(rank)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
        dims = [_norm(d, rank) for d in dims]
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if b in dims or j in dims:
            raise _Stop(f"{_where(node)} reduces over the rows or the batch")
        if keep:
            return b, j
        return b - sum(d < b for d in dims), j - sum(d < j for d in dims)

    def _gather(self, node: fx.Node):
        table, d, index = node.args[:3]
        rank = node.meta["val"].dim()
        d = _norm(d, rank)
        if index in self.axes and table not in self.axes and d == self.axes[index][1]:
            return self.axes[index]  # a table's entries by per-row indices: each row's own
        if index in self.axes and table in self.axes and self.axes[index] == self.axes[table] \
                and d not in self.axes[index]:
            return self.axes[index]
        raise _Stop(f"{_where(node)} gathers along the rows")

    def _attention(self, node: fx.Node):
        q, k, v = node.args[:3]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
        rank = node.meta["val"].dim()
        if causal:
            raise _Stop(f"{_where(node)} is causal: its mask depends on the order of the rows")
        if q not in self.axes or self.axes[q][1] != rank - 2:
            raise _Stop(f"{_where(node)}: its queries are not the reordered rows")
        keys = [t in self.axes for t in (k, v)]
        if keys == [True, True]:
            if not self.axes[k] == self.axes[v] == self.axes[q]:
                raise _Stop(f"{_where(node)}: its keys and values are not laid out as its queries")
        elif keys != [False, False]:
            raise _Stop(f"{_where(node)}: only one of its keys and values comes from the reordered rows")
        if isinstance(mask, fx.Node):
            shape = static_shape(mask)
            mrank = len(shape)
            if mask in self.axes:
                mb, mj = self._of(mask, rank)
                if not keys[0] or mj != rank - 1 or mb != self.axes[q][0] or not _broadcast_rows(mask, mrank - 2):
                    raise _Stop(f"{_where(node)}: its mask is not a key mask laid out as its keys")
            elif (keys[0] and shape[-1] != 1) or (mrank >= 2 and shape[-2] != 1):
                raise _Stop(f"{_where(node)}: its mask has rows of its own, which were not reordered")
        return self.axes[q]


def _broadcast_rows(mask: fx.Node, d: int) -> bool:
    """Whether ``mask`` is the same along axis ``d`` (its queries): size 1 there, or expanded from size 1."""
    node = mask
    while isinstance(node, fx.Node):
        shape = static_shape(node)
        if shape is None or d >= len(shape):
            return False
        if shape[d] == 1:
            return True
        if _packet(node) is aten.expand:
            src = static_shape(node.args[0])
            shift = len(shape) - len(src)
            return d < shift or src[d - shift] == 1
        if _packet(node) not in _SAME or not node.args:
            return False
        node = node.args[0]
    return False


# --------------------------------------------------------------------------- the rewrite


def _factory(graph: fx.Graph, buf: fx.Node, rows: int) -> fx.Node:
    shape = list(static_shape(buf))
    at = _SIZE_AT[_packet(buf)]
    args = list(buf.args)
    args[at] = [shape[0], rows, *shape[2:]]
    node = graph.call_function(buf.target, tuple(args), dict(buf.kwargs))
    _fake(node, buf.target, *args, like=buf, **buf.kwargs)
    return node


def _emit(graph: fx.Graph, node: fx.Node, args: list) -> fx.Node:
    new = graph.call_function(node.target, tuple(args), dict(node.kwargs))
    _fake(new, node.target, *args, **node.kwargs)
    return new


def _rewrite_buffer(gm: fx.GraphModule, buf: _Buffer, layout: _Layout) -> None:
    graph, node, n = gm.graph, buf.node, layout.n
    with graph.inserting_after(node):
        tail = _factory(graph, node, layout.rows - n)
    with graph.inserting_after(node):
        head = _factory(graph, node, n)
    for i, a, b, access, views, write in buf.writes:
        pieces = [layout.moved(i, a, b)] if layout.moved(i, a, b) is not None else \
            [layout.moved(i, max(a, s), min(b, e)) for s, e, _ in layout.parts(i) if max(a, s) < min(b, e)]
        with graph.inserting_before(write):
            for start, end in (p for p in pieces if p[0] < p[1]):  # an empty write (a caption of 0 rows) writes nothing
                target, offset, size = (head, 0, n) if end <= n else (tail, n, layout.rows - n)
                sel = graph.call_function(aten.select.int, (target, 0, i))
                _fake(sel, aten.select.int, target, 0, i)
                view = sel
                if (start - offset, end - offset) != (0, size):
                    view = graph.call_function(aten.slice.Tensor, (sel, 0, start - offset, end - offset))
                    _fake(view, aten.slice.Tensor, sel, 0, start - offset, end - offset)
                for v in views:
                    view = _emit(graph, v, [view, *v.args[1:]])
                _emit(graph, write, [view, *write.args[1:]])
    with graph.inserting_after(max((w[5] for w in buf.writes), key=_order(graph))):
        joined = graph.call_function(aten.cat.default, ([head, tail], 1))
        _fake(joined, aten.cat.default, [head, tail], 1)
    for use in buf.data_uses:
        use.replace_input_with(node, joined)
    for _i, _a, _b, access, views, write in buf.writes:  # the old writes, readers first
        for old in [write, *reversed(views), access] + ([access.args[0]] if access.target is aten.slice.Tensor else []):
            graph.erase_node(old)
    graph.erase_node(node)


def _order(graph: fx.Graph):
    position = {node: k for k, node in enumerate(graph.nodes)}
    return position.__getitem__


def reorder_sample_offsets(gm: fx.GraphModule) -> list[str]:
    """Reorder each sample's joint rows image first where captions of different lengths put the image at
    per-sample offsets (see the module docstring); the buffers reordered, with where they are made. When offsets are
    found but the rows are not treated alike, ``gm.meta[SAMPLE_OFFSETS_REASON]`` says where."""
    gm.meta.pop(SAMPLE_OFFSETS_REASON, None)
    buffers = _buffers(gm)
    groups: dict[tuple, list[tuple[_Buffer, _Layout]]] = {}
    for buf in buffers:
        layout = buf.layout()
        if layout is not None:
            groups.setdefault((static_shape(buf.node)[0], layout.key()), []).append((buf, layout))
    done = []
    for (batch, _key), members in groups.items():
        layout = members[0][1]
        rows = layout.rows
        same = [b for b in buffers if b.layout() is None and static_shape(b.node)[:2] == (batch, rows)
                and b.fits(layout)]  # written with constants over whole parts: the attention mask
        group = [m[0] for m in members] + same
        try:
            if not all(b.fits(layout) for b in group):
                raise _Stop("a write spans the caption and the image of a sample")
            order = _order(gm.graph)
            for b in group:
                last = max(order(w[5]) for w in b.writes)
                early = [u for u in b.data_uses if order(u) < last]
                if early:
                    raise _Stop(f"'{early[0].name}' reads '{b.node.name}' before its last write")
            follow = _Follow(layout, batch)
            skip = {n for b in group for w in b.writes for n in (w[3], *w[4], w[5])} | \
                {w[3].args[0] for b in group for w in b.writes if w[3].target is aten.slice.Tensor}
            follow.run(gm, [b.node for b in group], skip)
        except _Stop as stop:
            gm.meta[SAMPLE_OFFSETS_REASON] = str(stop)
            continue
        caps = ", ".join(map(str, layout.caps))
        done.extend(f"{b.node.name} {list(static_shape(b.node))} (captions of {caps} rows before {layout.n} image "
                    f"rows){node_frame(b.node)}" for b in group)
        for b in group:
            _rewrite_buffer(gm, b, layout)
        for read, i, a, b in follow.reads:
            start, end = layout.moved(i, a, b)
            read.args = (read.args[0], 0, start, end, *read.args[4:])
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
