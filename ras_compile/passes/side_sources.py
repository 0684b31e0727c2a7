"""Side inputs gathered at their source, not where they meet the token stream.

A side input is a dense tensor with a token axis that joins the stream (``SideInput``): a
position table, RoPE, and also whole per-token branches computed outside the stream. The
analysis gathers it at the node where it joins, so the branch itself runs on every token
each sparse step: LTX-Video's per-token timestep (``[B, N]``) goes through the timestep MLP
on all ``N`` rows; after Sana's 3x3 depthwise convolution (which needs every position) the
gate and the 1x1 point convolution run on all of them.

This pass moves the gather up. For each side input it takes the *branch*: the ancestors of the
gathered value that carry a token axis (an axis of ``N``, the token grid's axes, or ``B * N``
folded rows) and are read only inside the branch or by the side input's consumers, stopping at
nodes that read the stream itself, at inputs and parameters, and at nodes that make a token
axis from inputs without one (``t[:, None].expand(B, N)``, a mask's patch convolution). The branch's *sources* (the nodes just outside it
that feed it) are gathered instead, and the analysis is run again with those sources laid out
as token tensors, so every node of the branch is checked by the same token rules. The move is
kept only if that analysis succeeds and densifies nothing it did not densify before: then every
value the branch computes on the active rows is used only by token-wise nodes, and the sparse
step computes exactly what it computed with the late gather, on fewer rows.

Branches without a projection, convolution or matrix product (a RoPE table, a sliced
position table) are left alone: moving them saves next to nothing.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable

import torch
import torch.fx as fx

from . import token_axis as ta

aten = torch.ops.aten

_HEAVY = {aten.linear, aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten.mm, aten.bmm, aten.matmul,
          aten.addmm, aten.baddbmm, aten.einsum}
MAX_ANALYSES = 12  # re-analyses per model while moving gathers (each is a pass over the graph)


def _side_value(nodes: dict, side: ta.SideInput) -> fx.Node | None:
    consumer = nodes[side.node]
    if ta._packet(consumer) in (aten.cat, aten.stack):
        value = consumer.args[0][side.arg_index]
    elif side.arg_index < len(consumer.args):
        value = consumer.args[side.arg_index]
    else:
        value = consumer.kwargs.get("attn_mask")
    return value if isinstance(value, fx.Node) else None


def guess_layout(node: fx.Node, analysis: ta.TokenAnalysis) -> ta.TokenLayout | None:
    """The token layout a branch node would have: the one axis of ``N`` image tokens, or the
    token grid's axes in order; a leading axis of the batch's size (or 1) is the batch axis.
    Without either, an axis of ``B * N`` rows holds samples and tokens folded together
    (``timestep.flatten()`` of a per-token timestep)."""
    found = _guess_shape(ta._shape(node), analysis) if ta._is_tensor(node) else []
    return found[0] if len(found) == 1 else None


def _guess_shape(shape: tuple[int, ...], analysis: ta.TokenAnalysis) -> list[ta.TokenLayout]:
    n, batch = analysis.num_tokens, analysis.batch_size
    batch_dim = 0 if batch > 1 else None
    found = []
    if len(shape) > 1 and (batch == 1 or shape[0] in (1, batch)):  # a leading batch axis
        found += [ta.TokenLayout(d, batch_dim, 0, n) for d in range(1, len(shape)) if shape[d] == n]
        grid = analysis.grid.grid_shape if analysis.grid is not None and not analysis.grid.tube_axes else ()
        if len(grid) >= 2:
            found += [ta.TokenLayout(d, batch_dim, 0, n, grid=tuple(grid)) for d in range(1, len(shape) - len(grid) + 1)
                      if tuple(shape[d:d + len(grid)]) == tuple(grid)]
    if batch > 1:  # the samples and tokens folded into one axis of B * N rows
        found += [ta.TokenLayout(d, None, 0, n, 1, fold=1) for d in range(len(shape)) if shape[d] == batch * n]
    return found


def _plausible(node: fx.Node, analysis: ta.TokenAnalysis) -> bool:
    """``node`` (or every part of a multi-output node) has an axis that could carry its tokens (one
    that is ambiguous, ``[B, N, N]``, is followed through but cannot be a source)."""
    val = ta._val(node)
    if isinstance(val, (list, tuple)):
        return bool(val) and all(isinstance(v, torch.Tensor) for v in val) and \
            all(_guess_shape(tuple(int(s) for s in v.shape), analysis) for v in val)
    return ta._is_tensor(node) and bool(_guess_shape(ta._shape(node), analysis))


def branch_sources(values: list[fx.Node], consumers: set[str], analysis: ta.TokenAnalysis,
                   order: dict[str, int]) -> tuple[dict, bool] | None:
    """The sources of the branch that computes ``values`` (side inputs of the nodes ``consumers``),
    as ``{name: guessed layout}``, and whether the branch does real work (a projection,
    convolution or matrix product). None if there is no branch, or a source has no layout.

    Nodes are taken latest first, so every reader of a node inside the branch has been
    classified before the node itself."""
    layouts = analysis.layouts
    annotated = lambda n: isinstance(layouts.get(n.name), ta.TokenLayout)  # noqa: E731
    branch: set[str] = set()
    queue = [(-order[v.name], v) for v in values]
    heapq.heapify(queue)
    seen = {v.name for v in values}
    sources: dict[str, ta.TokenLayout] = {}
    heavy = False
    while queue:
        _, node = heapq.heappop(queue)
        readers = {u.name for u in ta._readers(node)}
        inside = node.name in {v.name for v in values} or readers <= branch | consumers
        reads_stream = any(annotated(a) for a in _tensor_inputs(node))
        if not inside or node.op != "call_function" or reads_stream:
            lay = guess_layout(node, analysis)
            if lay is None:
                return None  # a multi-output node, or no single token axis: no gather there
            sources[node.name] = lay
            continue
        followed = [a for a in _data_inputs(node) if not annotated(a) and _plausible(a, analysis)]
        lay = guess_layout(node, analysis)
        if not followed and lay is not None:  # the branch starts here: a token axis made from none
            sources[node.name] = lay            # (``t[:, None].expand(B, N)``, a mask's patch convolution)
            continue
        branch.add(node.name)
        heavy |= ta._packet(node) in _HEAVY
        for a in followed:
            if a.name not in seen:
                seen.add(a.name)
                heapq.heappush(queue, (-order[a.name], a))
    if not branch:
        return None
    return sources, heavy


_WEIGHTED = {aten.linear, aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution}


def _is_weight(node: fx.Node) -> bool:
    """A parameter, buffer or constant of the model (capture.mark_input_kinds), not a model input."""
    return node.op == "placeholder" and node.meta.get("ras_input_kind", "USER_INPUT") != "USER_INPUT"


def _data_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs a branch follows: a projection's or convolution's data operand, not its weight and
    bias (which may happen to have an axis of N, or B * N, rows); never the model's weights."""
    inputs = _tensor_inputs(node)
    if node.op == "call_function" and ta._packet(node) in _WEIGHTED:
        inputs = inputs[:1]
    return [a for a in inputs if not _is_weight(a)]


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    found = []
    for arg in list(node.args) + list(node.kwargs.values()):
        for a in arg if isinstance(arg, (list, tuple)) else [arg]:
            val = ta._val(a) if isinstance(a, fx.Node) else None
            if isinstance(val, torch.Tensor) or (isinstance(val, (list, tuple)) and val
                                                 and all(isinstance(v, torch.Tensor) for v in val)):
                found.append(a)  # a tensor, or a multi-output node (split, chunk) read through getitem
    return found


def _keeps(found: ta.TokenAnalysis, before: ta.TokenAnalysis) -> bool:
    """The moved gathers change nothing but where rows are selected: nothing new is densified, the
    same values are cached as K/V (a branch that fed attention's keys would otherwise be read
    stale from a new cache), the attention nodes are classified alike, and fewer side inputs
    are gathered late."""
    kv = lambda a: {(c.node, c.kind) for c in a.caches if c.kind != "activation"}  # noqa: E731
    classified = lambda a: (a.attention, a.cross_attention, a.token_batched_attention)  # noqa: E731
    return (set(found.densify_at) <= set(before.densify_at) and kv(found) == kv(before)
            and classified(found) == classified(before) and len(found.side_inputs) < len(before.side_inputs))


def gather_at_sources(gm: fx.GraphModule, analysis: ta.TokenAnalysis,
                      rerun: Callable[[dict], ta.TokenAnalysis]) -> ta.TokenAnalysis:
    """``analysis`` with the gathers of heavy side branches moved to their sources (see the module
    docstring); ``rerun(sources)`` analyses the graph again with ``sources`` laid out as given."""
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    consumers: dict[str, set[str]] = {}
    for side in analysis.side_inputs:
        value = _side_value(nodes, side)
        if value is not None:
            consumers.setdefault(value.name, set()).add(side.node)
    every = set().union(*consumers.values()) if consumers else set()
    candidates = []
    # all side branches as one (they share ancestry: LTX's per-token timestep embedding is unbound
    # into the shift / scale / gate of every block), then each value's own branch
    together = branch_sources([nodes[name] for name in consumers], every, analysis, order)
    if together is not None and together[1]:
        candidates.append(together[0])
    for name, readers in consumers.items():
        found = branch_sources([nodes[name]], readers, analysis, order)
        if found is not None and found[1] and found[0] not in candidates:
            candidates.append(found[0])
    best, accepted, tries = analysis, {}, 0
    for sources in candidates:  # keep each branch whose move verifies
        if tries >= MAX_ANALYSES:
            break
        tries += 1
        merged = {**accepted, **sources}
        try:
            found = rerun(merged)
        except Exception:  # noqa: BLE001 - a move that does not analyse never costs the analysis it improves
            continue
        if _keeps(found, best):
            best, accepted = found, merged
    return best
