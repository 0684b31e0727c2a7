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

A K path may also carry one per-head norm (RMSNorm or LayerNorm over the head dim, in
the forms passes/head_norm.py recognises) between the layout ops: ``linear -> view /
transpose to heads -> norm -> layout ops -> attention``. Then the cache holds the
normalised heads in the ``[B, L, D]`` layout, the sparse graph calls
``ras_compile.linear_norm_scatter_`` (the norm in the GeMM's epilogue) and computes no
norm nodes, and the dense graph fills the cache by copying the norm's output into the
layout chain applied to the cache (a view of it). That needs the chain in front of the
norm to hand it whole, aligned heads of the projection's columns (``_aligned_heads``),
a head dim the kernel can tile (a power of two <= 256 dividing D) and per-head affine
parameters; otherwise the path stays unfused. Paths with RoPE after the norm stay
unfused (a cache write after the RoPE): see docs/kernels.md.

``fuse_kv_projections(gm, analysis)`` returns a new analysis whose fusible K/V cache
sites sit at their ``linear`` node, with ``fused_projections`` naming them; the
rewrite reads that field. It never changes the dense graph's values.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from ..kernels.linear_norm_scatter import norm_head_dim_supported
from .head_norm import HeadNormMatch, match_head_norm
from .token_axis import CacheSite, TokenAnalysis, TokenLayout, _packet, _readers

aten = torch.ops.aten

_LAYOUT_ONLY = {aten.view, aten._unsafe_view, aten.reshape, aten.transpose, aten.permute, aten.unsqueeze,
                aten.squeeze, aten.unflatten, aten.alias}


@dataclasses.dataclass(frozen=True)
class FusedNorm:
    """The per-head norm carried by a fused K projection (``linear_norm_scatter_``'s epilogue)."""

    kind: str                 # "rms" or "layer"
    weight: str | None        # [head_dim] affine weight node
    bias: str | None          # [head_dim] affine bias node (layer norm)
    eps: float
    head_dim: int
    input: str                # the node the norm reads: the projection re-laid out to heads
    output: str               # the normalised value (attention's operand, or the next chain node's input)
    nodes: tuple[str, ...]    # every node of the norm; the sparse graph computes none of them
    layout: tuple[str, ...]   # the chain nodes from the linear's user to ``input``, in graph order


@dataclasses.dataclass(frozen=True)
class FusedProjection:
    """Cache ``cache`` holds the output of ``linear`` (normalised per head when ``norm`` is
    set); ``chain`` re-lays it out for attention, whose operand is ``operand``."""

    cache: str
    linear: str
    chain: tuple[str, ...]  # from the linear's user to the attention operand, in graph order, norm excluded
    operand: str = ""       # the attention operand (the chain's last node, or the norm's output)
    norm: FusedNorm | None = None


def _layout(analysis: TokenAnalysis, node) -> TokenLayout | None:
    lay = analysis.layouts.get(node.name) if isinstance(node, fx.Node) else None
    return lay if isinstance(lay, TokenLayout) else None


def _chain_input(node: fx.Node, analysis: TokenAnalysis) -> fx.Node | None:
    """The one token-carrying input a chain node re-lays out, or None if it is not a chain node."""
    packet = _packet(node) if node.op == "call_function" else None
    if packet in _LAYOUT_ONLY and isinstance(node.args[0], fx.Node):
        return node.args[0]
    if packet is aten.select and node.args[0].meta["val"].shape[node.args[1]] == 1:
        return node.args[0]  # the one part of a split packed projection (passes/split_projection.py)
    if packet in (aten.to, aten._to_copy) and node.meta["val"].dtype == node.args[0].meta["val"].dtype \
            and node.meta["val"].device == node.args[0].meta["val"].device:
        return node.args[0]  # .float() of a float tensor
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
    if not all(u.name in analysis.attention for u in _readers(operand)):
        return None  # the operand feeds something else, which expects its sparse rows
    chain: list[fx.Node] = []
    norm: HeadNormMatch | None = None
    norm_at = 0  # chain nodes appended before the norm was found (post-norm part)
    node = operand
    touched = {s.node for s in analysis.side_inputs} | {key.split(":")[0] for key in analysis.densify_at} \
        | set(analysis.side_sources)
    while True:
        if node.name in touched:
            return None  # the rewrite does more than re-lay this node out
        found = match_head_norm(node) if norm is None and site.kind == "key" else None
        if found is not None:
            if touched & set(found.nodes):
                return None
            norm, norm_at = found, len(chain)
            source = nodes[found.input]
            inside = set(found.nodes)
            if any(u.name not in inside for u in _readers(source)):
                return None  # the un-normalised heads are read elsewhere (a second head, a RoPE of q)
        else:
            chain.append(node)
            source = _chain_input(node, analysis)
            if source is None:
                return None
            if len(_readers(source)) != 1:  # (export's metadata assertions on it read nothing the rewrite keeps)
                return None  # another reader of an intermediate (an in-place RoPE, a second head) needs it
        if source.op == "call_function" and source.target is aten.linear.default:
            break
        node = source
    linear = source
    lay = _layout(analysis, linear)
    shape = tuple(int(s) for s in linear.meta["val"].shape)
    if lay is None or len(shape) != 3 or lay.batch_dim != 0 or lay.token_dim != 1 or lay.batch_group != 1:
        return None
    weight = linear.args[1]
    if _layout(analysis, weight) is not None or (len(linear.args) > 2 and _layout(analysis, linear.args[2])):
        return None
    graph_order = tuple(n.name for n in reversed(chain))
    fused_norm = None
    if norm is not None:
        pre_norm = list(reversed(chain[norm_at:]))  # linear's user .. the norm's input
        fused_norm = _fused_norm(norm, linear, pre_norm, nodes, analysis)
        if fused_norm is None:
            return None
    return FusedProjection(site.name, linear.name, graph_order, operand.name, fused_norm)


def _fused_norm(norm: HeadNormMatch, linear: fx.Node, pre_norm: list[fx.Node], nodes: dict[str, fx.Node],
                analysis: TokenAnalysis) -> FusedNorm | None:
    """The norm as the fused op can run it, or None: its affine parameters are per-head
    constants, it keeps the projection's dtype, and the layout chain in front of it
    hands it whole heads of the projection's output columns."""
    out_val = linear.meta["val"]
    if not norm_head_dim_supported(norm.head_dim, int(out_val.shape[-1])):
        return None  # the kernel's tile must hold whole heads
    if nodes[norm.output].meta["val"].dtype != out_val.dtype:
        return None  # the cache holds the projection's dtype
    for name in (norm.weight, norm.bias):
        if name is None:
            continue
        param = nodes[name]
        if _layout(analysis, param) is not None or param.meta["val"].dtype not in (out_val.dtype, torch.float32):
            return None
    if not _aligned_heads(linear, pre_norm, norm.head_dim):
        return None
    return FusedNorm(norm.kind, norm.weight, norm.bias, norm.eps, norm.head_dim, norm.input, norm.output,
                     norm.nodes, tuple(n.name for n in pre_norm))


def _aligned_heads(linear: fx.Node, pre_norm: list[fx.Node], head_dim: int) -> bool:
    """True when ``pre_norm`` (layout-only nodes) turns the projection's ``[B, L, D]``
    output into a view whose last dim is one aligned block of ``head_dim`` columns.

    Replayed on a meta tensor of the projection's shape and strides: the result must be
    a view of it (no copy, so the dense graph can fill the cache through the same
    chain), unit stride along the last dim and every other stride and the offset a
    multiple of ``head_dim``. Then normalising the last dim is normalising heads of the
    ``[B, L, D]`` rows, which is what the fused op does.
    """
    val = linear.meta["val"]
    probe = torch.empty(tuple(int(s) for s in val.shape), dtype=val.dtype, device="meta")
    out = probe
    for node in pre_norm:
        if _packet(node) not in _LAYOUT_ONLY | {aten.select} or any(isinstance(a, fx.Node) for a in node.args[1:]):
            return False  # a concatenation (text rows un-normalised in the replay) or a traced shape
        try:
            out = node.target(out, *node.args[1:], **node.kwargs)
        except Exception:  # noqa: BLE001 - a layout the probe cannot replay is not fused
            return False
    if out is not probe and getattr(out, "_base", None) is not probe:
        return False
    if out.dim() == 0 or out.shape[-1] != head_dim or out.stride(-1) != 1 or out.storage_offset() % head_dim:
        return False
    return all(stride % head_dim == 0 or size == 1 for size, stride in zip(out.shape[:-1], out.stride()[:-1]))


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
            reader=found.chain[0] if found.chain else found.operand))
        fused.append(found)
    counts = dict(analysis.counts, kv_projections_fused=len(fused),
                  kv_norms_fused=sum(f.norm is not None for f in fused))
    return dataclasses.replace(analysis, caches=caches, fused_projections=fused, counts=counts)
