"""Two rewrites of one exported graph, driven by a ``TokenAnalysis``.

``dense_graph``: the model as it is, plus a fill of every cache site (K/V after
q/k-norm and RoPE, the value at the unpatchify). Signature: ``(*inputs, *caches)``.

``sparse_graph``: the model on the active image tokens only. Signature:
``(*inputs, index, *caches)`` with ``index`` ``[B, k]`` sorted active token ids.
It gathers at the token source, runs token-wise nodes on ``k`` rows (shape
arguments rewritten to the sparse length), gathers side inputs where they meet
the token stream, writes fresh K/V rows into the caches and attends over the
full cached K/V, and scatters the active rows into the activation cache where
the token axis ends, after which the graph is dense again.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from . import token_ops
from .token_axis import _SKIPPED, TokenAnalysis, TokenLayout, _packet

aten = torch.ops.aten

INDEX_INPUT = "ras_index"


def _copy_placeholders(src: fx.Graph, dst: fx.Graph, env: dict) -> None:
    for node in src.nodes:
        if node.op == "placeholder":
            env[node] = dst.placeholder(node.name)
            env[node].meta = dict(node.meta)


def _cache_placeholders(analysis: TokenAnalysis, dst: fx.Graph) -> dict[str, fx.Node]:
    return {c.name: dst.placeholder(c.name) for c in analysis.caches}


def dense_graph(gm: fx.GraphModule, analysis: TokenAnalysis) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict = {}
    _copy_placeholders(gm.graph, graph, env)
    caches = _cache_placeholders(analysis, graph)
    normed = {f.norm.output: f for f in analysis.fused_projections if f.norm is not None}
    filled_through_layout = {f.cache for f in normed.values()}
    fills: dict[str, list] = {}
    for site in analysis.caches:
        if site.name not in filled_through_layout:
            fills.setdefault(site.reader, []).append(site)
    nodes = {n.name: n for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        for site in fills.get(node.name, ()):
            graph.call_function(token_ops.fill_cache_, (caches[site.name], env[nodes[site.node]]))
        if node.op == "placeholder":
            continue
        if node.op == "call_function" and _packet(node) in _SKIPPED:
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.name in normed:
            _fill_through_layout(graph, normed[node.name], caches, nodes, env[node])
    return fx.GraphModule(gm, graph)


def _fill_through_layout(graph: fx.Graph, fused, caches: dict, nodes: dict, value: fx.Node) -> None:
    """Dense-step fill of a fused K cache with a per-head norm: the cache is ``[B, L, D]``
    (the projection's layout) and holds normalised heads, while the graph normalises a
    re-laid-out view. Copy the norm's output into the same layout chain applied to the
    cache: a view of it (fuse_projection checks the chain is views only), so the values
    land in the cache's own layout unchanged."""
    view = caches[fused.cache]
    for name in fused.norm.layout:
        node = nodes[name]
        view = graph.call_function(node.target, (view, *node.args[1:]), dict(node.kwargs))
    graph.call_function(token_ops.fill_cache_, (view, value))


class _SparseBuilder:
    def __init__(self, gm: fx.GraphModule, analysis: TokenAnalysis):
        self.gm, self.a = gm, analysis
        self.graph = fx.Graph()
        self.env: dict = {}
        _copy_placeholders(gm.graph, self.graph, self.env)
        self.index = self.graph.placeholder(INDEX_INPUT)
        self.caches = _cache_placeholders(analysis, self.graph)
        self._k = None
        self._pos: dict[tuple[int, int], fx.Node] = {}
        self._densified: dict[str, fx.Node] = {}
        self._side_gathers: dict[tuple, fx.Node] = {}
        self.side = {}
        for s in analysis.side_inputs:
            self.side.setdefault(s.node, []).append(s)
        self.cache_of = {(c.node, c.kind): c.name for c in analysis.caches}
        self.fused_linear = {f.linear: f for f in analysis.fused_projections}
        self.fused_operand = {f.operand: f for f in analysis.fused_projections}
        self.fused_chain = {name for f in analysis.fused_projections for name in f.chain}
        norms = [f.norm for f in analysis.fused_projections if f.norm is not None]
        self.norm_output = {n.output: n.input for n in norms}  # takes the already-normalised cache's value
        self.norm_inner = {name for n in norms for name in n.nodes if name != n.output}  # not computed
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.side_sources = set(analysis.side_sources)

    # -- symbolic pieces -------------------------------------------------------------
    @property
    def k(self) -> fx.Node:
        if self._k is None:
            self._k = self.graph.call_function(aten.sym_size.int, (self.index, 1))
        return self._k

    def sparse_length(self, dense_length: int):
        extra = dense_length - self.a.num_tokens
        return self.k if extra == 0 else self.graph.call_function(operator.add, (self.k, extra))

    def remap_position(self, p: int, lay: TokenLayout):
        """Sparse position of dense boundary ``p`` on an axis laid out as ``lay``."""
        if p <= lay.offset or p >= 2**62:
            return p
        return self.graph.call_function(operator.add, (self.k, p - self.a.num_tokens))

    def positions(self, lay: TokenLayout) -> fx.Node:
        """The ``[rows, k]`` dense positions of the active tokens on an axis laid out as ``lay``
        (one row per sample, repeated ``batch_group`` times where axes are folded into the batch; one row
        per batch row of a tensor whose rows hold other samples, ``lay.samples``)."""
        group = lay.batch_group if lay.batch_dim is not None else 1
        key = (lay.offset, lay.length, group, lay.outer, lay.samples)
        if key not in self._pos:
            if lay.samples is not None:
                self._pos[key] = self.graph.call_function(
                    token_ops.sample_rows, (self.positions(dataclasses.replace(lay, samples=None)), lay.samples))
            elif group == 1 and lay.outer > 1:  # rows (o, token): every block's active rows, blocks in order
                self._pos[key] = self.graph.call_function(
                    token_ops.tube_positions, (self.index, lay.outer, self.a.num_tokens))
            elif group == 1:
                self._pos[key] = self.graph.call_function(
                    token_ops.dense_positions, (self.index, lay.offset, lay.length, self.a.num_tokens))
            else:
                self._pos[key] = self.graph.call_function(
                    token_ops.repeat_rows, (self.positions(lay.shifted(batch_group=1)), group))
        return self._pos[key]

    def layout(self, node) -> TokenLayout | None:
        v = self.a.layouts.get(node.name) if isinstance(node, fx.Node) else None
        return v if isinstance(v, TokenLayout) else None

    def sparse_shape(self, node: fx.Node) -> list:
        lay = self.layout(node)
        shape = [int(s) for s in node.meta["val"].shape]
        if lay.fold:  # rows (sample, token, inner) of the whole batch
            shape[lay.token_dim] = self.graph.call_function(operator.mul, (self.k, self.a.batch_size * lay.fold))
        elif lay.outer > 1:  # rows (o, token): k active rows in each of the outer blocks
            shape[lay.token_dim] = self.graph.call_function(operator.mul, (self.k, lay.outer))
        else:
            shape[lay.token_dim] = self.sparse_length(lay.length)
        for d in lay.dims[1:]:  # a token grid's other axes: sparse token i sits at (i, 0, ...)
            shape[d] = 1
        return shape

    def densified(self, value: fx.Node) -> fx.Node:
        """The full-size value of ``value``: active rows scattered into its activation cache."""
        if value.name not in self._densified:
            lay = self.layout(value)
            cache = self.caches[self.cache_of[(value.name, "activation")]]
            if lay.grid:
                self._densified[value.name] = self.graph.call_function(
                    token_ops.scatter_grid_tokens_,
                    (cache, self.env[value], self.positions(lay), lay.batch_dim, lay.token_dim, len(lay.grid)))
            else:
                self._densified[value.name] = self.graph.call_function(
                    token_ops.scatter_tokens_, (cache, self.env[value], self.positions(lay), lay.batch_dim,
                                                lay.token_dim))
        return self._densified[value.name]

    # -- node rewrites ---------------------------------------------------------------
    def arg(self, consumer: fx.Node, value):
        if isinstance(value, fx.Node) and f"{consumer.name}:{value.name}" in self.a.densify_at:
            return self.densified(value)
        return self.env[value]

    def build(self) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if node.name == self.a.source or node.name in self.side_sources:
                    self.gather_source(node)
                continue
            if node.op == "call_function" and _packet(node) in _SKIPPED:
                continue
            if node.op == "output":
                self.graph.node_copy(node, lambda n: self.arg(node, n))
                continue
            new = self.rewrite(node)
            self.env[node] = new
            if node.name == self.a.source or node.name in self.side_sources:
                self.gather_source(node)
        return fx.GraphModule(self.gm, self.graph)

    def gather_source(self, node: fx.Node) -> None:
        """The active rows of a token source: the image tokens, or a side branch's source."""
        lay = self.layout(node)
        rank = node.meta["val"].dim()
        if lay.grid:
            self.env[node] = self.graph.call_function(
                token_ops.gather_grid_tokens, (self.env[node], self.positions(lay), lay.batch_dim, lay.token_dim,
                                               lay.grid, rank))
            return
        if lay.fold:  # a side branch's B * N rows (timestep.flatten() of a per-token timestep)
            self.env[node] = self.graph.call_function(
                token_ops.gather_folded_rows, (self.env[node], self.index, lay.token_dim, rank, lay.fold,
                                               lay.token_major))
            return
        self.env[node] = self.graph.call_function(
            token_ops.gather_tokens, (self.env[node], self.positions(lay), lay.batch_dim, lay.token_dim, rank))

    def rewrite(self, node: fx.Node) -> fx.Node:
        g = self.graph
        args = [fx.node.map_arg(a, lambda n: self.arg(node, n)) for a in node.args]
        kwargs = {k: fx.node.map_arg(v, lambda n: self.arg(node, n)) for k, v in node.kwargs.items()}
        if node.name == self.a.source or node.name in self.side_sources:
            return self.copy(node, args, kwargs)  # a source computes the dense value; the gather follows it
        if node.name in self.fused_linear:
            return self.project_into_cache(node, args, kwargs)
        if node.name in self.norm_output:  # the fused op normalised the cache already
            return self.env[self.nodes[self.norm_output[node.name]]]
        if node.name in self.norm_inner:
            return None
        if node.name in self.fused_chain:  # re-lays the full cache out for attention: dense shapes
            return self.copy(node, args, kwargs)
        for side in self.side.get(node.name, ()):
            self.gather_side(node, side, args, kwargs)
        packet = _packet(node) if node.op == "call_function" else None
        out_lay = self.layout(node)
        src_lay = self.layout(node.args[0]) if node.args else None
        if src_lay is not None and f"{node.name}:{node.args[0].name}" in self.a.densify_at:
            src_lay = None  # it reads the full value (densified): its positions and sizes are the dense ones
        if packet in (aten.view, aten.reshape, aten._unsafe_view, aten.expand) and out_lay is not None:
            args[1] = self.sparse_shape(node)
        elif packet is aten.unflatten and out_lay is not None:  # the grid's axes, or B * k folded rows
            return self.graph.call_function(aten.reshape.default, (args[0], self.sparse_shape(node)))
        elif packet is aten.slice and src_lay is not None:
            rank = node.args[0].meta["val"].dim()
            dim = (args[1] if len(args) > 1 else 0) % rank
            if dim == src_lay.token_dim:
                while len(args) < 4:
                    args.append(None)
                start = 0 if args[2] is None else args[2] % src_lay.length if args[2] < 0 else args[2]
                end = src_lay.length if args[3] is None else (args[3] + src_lay.length if args[3] < 0 else args[3])
                if src_lay.outer > 1:  # whole blocks of the image tokens: block o starts at row o * k
                    n = src_lay.length // src_lay.outer
                    args[2] = g.call_function(operator.mul, (self.k, start // n))
                    args[3] = g.call_function(operator.mul, (self.k, min(end, src_lay.length) // n))
                    return self.copy(node, args, kwargs)
                args[2] = self.remap_position(start, src_lay)
                args[3] = self.remap_position(min(end, src_lay.length), src_lay) if end < 2**62 else end
        elif packet is aten.select and src_lay is not None:
            dim = args[1] % node.args[0].meta["val"].dim()
            if dim == src_lay.token_dim and args[2] >= 0:  # a context row after the image rows moves with k
                args[2] = self.remap_position(args[2], src_lay)
        elif packet in (aten.split, aten.split_with_sizes, aten.chunk) and src_lay is not None:
            rank = node.args[0].meta["val"].dim()
            dim_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            dim = dim_arg % rank
            if dim == src_lay.token_dim:
                sizes = []
                start = 0
                for v in node.meta["val"]:
                    size = int(v.shape[dim])
                    contains = start <= src_lay.offset and start + size >= src_lay.offset + self.a.num_tokens
                    sizes.append(g.call_function(operator.add, (self.k, size - self.a.num_tokens)) if contains else size)
                    start += size
                return g.call_function(aten.split_with_sizes.default, (args[0], sizes, dim))
        elif packet is aten.squeeze and src_lay is not None:
            # only the dims that were 1 in the dense graph: with k == 1 the token axis must stay
            in_shape = node.args[0].meta["val"].shape
            kept = [d for d in range(len(in_shape)) if in_shape[d] == 1 and d != src_lay.token_dim]
            removed = [d for d in kept if len(node.meta["val"].shape) < len(in_shape)
                       and _was_squeezed(node, d)]
            if not removed:
                return args[0]
            return g.call_function(aten.squeeze.dims, (args[0], removed))
        elif packet is aten.scaled_dot_product_attention and node.name in self.a.attention:
            args = self.attention_over_cache(node, args)
        return self.copy(node, args, kwargs)

    def copy(self, node: fx.Node, args: list, kwargs: dict) -> fx.Node:
        new = self.graph.call_function(node.target, tuple(args), kwargs) if node.op == "call_function" else \
            self.graph.node_copy(node, lambda n: self.env[n])
        new.meta = {k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")}
        return new

    def gather_side(self, node: fx.Node, side, args: list, kwargs: dict) -> None:
        lay = side.layout

        def gather(value):
            # a RoPE or position table meets the token stream in every layer: gather it once
            key = (value, lay.offset, lay.length, lay.batch_dim, lay.token_dim, side.rank, lay.fold, lay.token_major,
                   lay.outer, lay.grid, lay.samples)
            if key not in self._side_gathers:
                if lay.grid:
                    self._side_gathers[key] = self.graph.call_function(
                        token_ops.gather_grid_tokens,
                        (value, self.positions(lay), lay.batch_dim, lay.token_dim, lay.grid, side.rank))
                elif lay.fold:
                    self._side_gathers[key] = self.graph.call_function(
                        token_ops.gather_folded_rows,
                        (value, self.index, lay.token_dim, side.rank, lay.fold, lay.token_major))
                else:
                    self._side_gathers[key] = self.graph.call_function(
                        token_ops.gather_tokens, (value, self.positions(lay), lay.batch_dim, lay.token_dim, side.rank))
            return self._side_gathers[key]

        if _packet(node) in (aten.cat, aten.stack):
            tensors = list(args[0])
            tensors[side.arg_index] = gather(tensors[side.arg_index])
            args[0] = tensors
        elif side.arg_index < len(args):
            args[side.arg_index] = gather(args[side.arg_index])
        else:  # the attention mask passed by keyword
            kwargs["attn_mask"] = gather(kwargs["attn_mask"])

    def project_into_cache(self, node: fx.Node, args: list, kwargs: dict) -> fx.Node:
        """``linear`` on the active rows, written straight into its cache (one fused op)."""
        fused = self.fused_linear[node.name]
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        lay = self.layout(node)
        cache = self.caches[fused.cache]
        norm = fused.norm
        if norm is None:
            return self.graph.call_function(token_ops.project_into_cache_, (x, weight, bias, self.positions(lay), cache))
        param = lambda name: None if name is None else self.env[self.nodes[name]]  # noqa: E731
        return self.graph.call_function(
            token_ops.project_norm_into_cache_,
            (x, weight, bias, self.positions(lay), cache, norm.kind, param(norm.weight), param(norm.bias), norm.eps,
             norm.head_dim))

    def attention_over_cache(self, node: fx.Node, args: list) -> list:
        """Fresh K/V rows go into the layer's cache; attention reads the whole cache."""
        for slot, kind in ((1, "key"), (2, "value")):
            value = node.args[slot]
            if value.name in self.fused_operand:  # already the full cache, re-laid out
                continue
            if (value.name, kind) not in self.cache_of:  # K/V cache switched off: active tokens attend
                continue                                   # to each other only
            lay = self.layout(value)
            cache = self.caches[self.cache_of[(value.name, kind)]]
            args[slot] = self.graph.call_function(
                token_ops.scatter_tokens_, (cache, args[slot], self.positions(lay), lay.batch_dim, lay.token_dim))
        return args


def _was_squeezed(node: fx.Node, dim: int) -> bool:
    rank = node.args[0].meta["val"].dim()
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None:
        return True
    dims = [dims] if isinstance(dims, int) else dims
    return dim in {d % rank for d in dims}


def sparse_graph(gm: fx.GraphModule, analysis: TokenAnalysis) -> fx.GraphModule:
    return _SparseBuilder(gm, analysis).build()
