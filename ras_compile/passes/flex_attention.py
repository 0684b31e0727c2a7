"""Rewrite ``flex_attention`` calls that are plain attention as one SDPA node.

Some DiTs always run attention through ``torch.nn.attention.flex_attention``, also when
they pass no mask (AnyFlow-FAR). ``torch.export`` keeps that as one higher-order op with
a score function and a block mask as subgraphs, which the token analysis has no rule
for. It is plain attention when the score function is the identity, the block mask is
the full one that ``block_mask=None`` builds (one block over all queries and keys, visited
by every query, and a ``mask_mod`` that returns True), there are no extra buffers, and
only the output (not the log-sum-exp or max) is read: then ``flex_attention(q, k, v,
scale=s)`` is ``scaled_dot_product_attention(q, k, v, scale=s)`` in the same
``[B, H, L, D]`` layout (GQA when the head counts differ). Any other call (a real mask,
block-sparse tables, a score function) is left alone, for the analysis to refuse.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .attention_pattern import _fake

aten = torch.ops.aten

__all__ = ["recognise_flex_attention"]


def _subgraph(gm: fx.GraphModule, node) -> fx.GraphModule | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return getattr(gm, node.target, None)
    return None


def _returned(sub: fx.GraphModule):
    out = next(n for n in sub.graph.nodes if n.op == "output").args[0]
    return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out


def _returns_placeholder(sub: fx.GraphModule, index: int) -> bool:
    """``sub`` returns its ``index``-th input unchanged (the identity score_mod)."""
    holders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    return len(holders) > index and _returned(sub) is holders[index]


def _returns_all_true(sub: fx.GraphModule) -> bool:
    """``sub`` returns a constant True (the no-op mask_mod: ``new_ones([], dtype=bool)``)."""
    out = _returned(sub)
    return (isinstance(out, fx.Node) and out.op == "call_function"
            and out.target in (aten.new_ones.default, aten.ones.default)
            and out.kwargs.get("dtype") is torch.bool)


def _is_full_block_mask(block_mask, q: fx.Node, k: fx.Node) -> bool:
    """The block mask ``flex_attention(block_mask=None)`` builds: one block (block sizes at least the
    query and key lengths) that every query visits (``kv_num_blocks`` made by ``ones``, its index by
    ``zeros``) and no separately listed full blocks. Sparsity of a real block mask lives in those
    block tables, not in its mask_mod, so the mask_mod alone says nothing."""
    if not isinstance(block_mask, (tuple, list)) or len(block_mask) < 16:
        return False
    num_blocks, indices, full_num_blocks, full_indices = block_mask[2:6]
    q_block, kv_block = block_mask[-3], block_mask[-2]
    if not (isinstance(q_block, int) and isinstance(kv_block, int)):
        return False
    if q_block < q.meta["val"].shape[-2] or kv_block < k.meta["val"].shape[-2]:
        return False
    made_by = lambda n, op: isinstance(n, fx.Node) and n.op == "call_function" and n.target is op  # noqa: E731
    return (made_by(num_blocks, aten.ones.default) and made_by(indices, aten.zeros.default)
            and full_num_blocks is None and full_indices is None)


def _is_flex(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", str(node.target)) == "flex_attention"


def recognise_flex_attention(gm: fx.GraphModule) -> list[str]:
    """Replace each plain ``flex_attention`` of ``gm`` by ``aten.scaled_dot_product_attention``,
    in place. Returns the names of the new SDPA nodes (an empty list leaves ``gm`` untouched)."""
    found = []
    for node in list(gm.graph.nodes):
        if not _is_flex(node):
            continue
        q, k, v, score_mod, block_mask, scale = node.args[:6]
        score = _subgraph(gm, score_mod)
        mask = _subgraph(gm, block_mask[-1]) if isinstance(block_mask, (tuple, list)) else None
        if score is None or mask is None or not _returns_placeholder(score, 0) or not _returns_all_true(mask):
            continue
        if not _is_full_block_mask(block_mask, q, k):
            continue  # a block-sparse mask (NABLA, sliding windows by blocks ...)
        if any(len(o) for o in node.args[7:] if isinstance(o, (tuple, list))):
            continue  # score_mod / mask_mod buffers
        readers = list(node.users)
        if any(u.target is not operator.getitem for u in readers):
            continue
        if any(u.args[1] != 0 and u.users for u in readers):
            continue  # the log-sum-exp or max is read
        kwargs = {"scale": float(scale)}
        if q.meta["val"].shape[1] != k.meta["val"].shape[1]:
            kwargs["enable_gqa"] = True
        with gm.graph.inserting_before(node):
            sdpa = gm.graph.call_function(aten.scaled_dot_product_attention.default, (q, k, v), kwargs)
        _fake(sdpa, aten.scaled_dot_product_attention.default, q, k, v, **kwargs)
        for u in readers:
            if u.args[1] == 0:
                u.replace_all_uses_with(sdpa)
            gm.graph.erase_node(u)
        gm.graph.erase_node(node)
        found.append(sdpa.name)
    if found:
        # no dead-code elimination: the now-unread block-mask construction is vmapped code whose
        # _vmap_increment_nesting calls have no readers; removing them alone breaks the rest
        gm.graph.lint()
        gm.recompile()
    return found
