"""Lower "project the active rows, write them into the K/V cache" to one fused op.

Without this pass a sparse step computes ``linear`` on the ``k`` active rows, reshapes
the result to attention's layout and scatters it into the layer's K or V cache: the
projected rows make a round trip through memory. When the path from a ``linear`` to
the attention's K or V operand only re-lays the tensor out (views, transposes,
permutes, unsqueezes, and a concatenation with always-computed text rows along the
token axis), the cache can live in the linear's own output layout ``[B, L, D]``
instead. The sparse graph then calls ``ras_compile.linear_scatter_`` (the Triton GeMM
with a scatter epilogue on CUDA, its ATen reference elsewhere), and replays the
layout chain on the full cache to feed attention. Values are unchanged: the chain
moves no numbers, it only reinterprets them.

Paths with a per-head norm or RoPE between the projection and attention are kept in
the unfused form (a cache write after the norm / RoPE): see docs/kernels.md.

``fuse_kv_projections(gm, analysis)`` returns a new analysis whose fusible K/V cache
sites sit at their ``linear`` node, with ``fused_projections`` naming them; the
rewrite reads that field. It never changes the dense graph's values.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .token_axis import CacheSite, TokenAnalysis, TokenLayout, _packet

aten = torch.ops.aten

_LAYOUT_ONLY = {aten.view, aten._unsafe_view, aten.reshape, aten.transpose, aten.permute, aten.unsqueeze,
                aten.unflatten, aten.alias}


@dataclasses.dataclass(frozen=True)
class FusedProjection:
    """Cache ``cache`` holds the output of ``linear``; ``chain`` re-lays it out for attention."""

    cache: str
    linear: str
    chain: tuple[str, ...]  # from the linear's user to the attention operand, in graph order


def _layout(analysis: TokenAnalysis, node) -> TokenLayout | None:
    lay = analysis.layouts.get(node.name) if isinstance(node, fx.Node) else None
    return lay if isinstance(lay, TokenLayout) else None


def _chain_input(node: fx.Node, analysis: TokenAnalysis) -> fx.Node | None:
    """The one token-carrying input a chain node re-lays out, or None if it is not a chain node."""
    packet = _packet(node) if node.op == "call_function" else None
    if packet in _LAYOUT_ONLY and isinstance(node.args[0], fx.Node):
        return node.args[0]
    if packet is aten.cat:
        lay = _layout(analysis, node)
        rank = node.meta["val"].dim()
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % rank
        carriers = [t for t in node.args[0] if _layout(analysis, t) is not None]
        if lay is not None and dim == lay.token_dim and len(carriers) == 1:
            return carriers[0]  # image rows joined with text rows that are computed every step
    return None


def _fusible(site: CacheSite, nodes: dict[str, fx.Node], analysis: TokenAnalysis) -> FusedProjection | None:
    operand = nodes[site.node]
    if not all(u.name in analysis.attention for u in operand.users):
        return None  # the operand feeds something else, which expects its sparse rows
    chain = [operand]
    node = operand
    touched = {s.node for s in analysis.side_inputs} | {key.split(":")[0] for key in analysis.densify_at}
    while True:
        if node.name in touched:
            return None  # the rewrite does more than re-lay this node out
        source = _chain_input(node, analysis)
        if source is None:
            return None
        if len(source.users) != 1:
            return None  # another reader of an intermediate (an in-place RoPE, a second head) needs it
        if source.op == "call_function" and source.target is aten.linear.default:
            break
        chain.append(source)
        node = source
    linear = source
    lay = _layout(analysis, linear)
    shape = tuple(int(s) for s in linear.meta["val"].shape)
    if lay is None or len(shape) != 3 or lay.batch_dim != 0 or lay.token_dim != 1:
        return None
    weight = linear.args[1]
    if _layout(analysis, weight) is not None or (len(linear.args) > 2 and _layout(analysis, linear.args[2])):
        return None
    return FusedProjection(site.name, linear.name, tuple(n.name for n in reversed(chain)))


def fuse_kv_projections(gm: fx.GraphModule, analysis: TokenAnalysis) -> TokenAnalysis:
    """``analysis`` with every fusible K/V cache moved to its projection's output layout."""
    nodes = {n.name: n for n in gm.graph.nodes}
    caches, fused = [], []
    for site in analysis.caches:
        found = _fusible(site, nodes, analysis) if site.kind in ("key", "value") else None
        if found is None:
            caches.append(site)
            continue
        linear = nodes[found.linear]
        caches.append(dataclasses.replace(
            site, node=linear.name, layout=_layout(analysis, linear),
            shape=tuple(int(s) for s in linear.meta["val"].shape), dtype=linear.meta["val"].dtype,
            reader=found.chain[0]))
        fused.append(found)
    counts = dict(analysis.counts, kv_projections_fused=len(fused))
    return dataclasses.replace(analysis, caches=caches, fused_projections=fused, counts=counts)
