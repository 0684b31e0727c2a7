"""Causal SDPA over image tokens as an explicit mask.

``scaled_dot_product_attention(q, k, v, is_causal=True)`` masks key ``j > i`` for query
``i``, by position. On a sparse step the queries are the active rows only, so the row
index of a query is no longer its position and ``is_causal`` would mask the wrong keys.
The same function with the mask written out, ``attn_mask = ones(L, S).tril()`` (the
top-left alignment ``is_causal`` uses), has a ``[L, S]`` operand whose query axis the
analysis gathers like any attention mask's: query ``i`` keeps its own row of the mask.

Only attention whose keys descend from the latent is rewritten (a causal text encoder
inside the forward keeps ``is_causal``, and its fast kernels); the analysis refuses any
``is_causal`` left on image tokens.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .attention_pattern import _fake

aten = torch.ops.aten

__all__ = ["lower_causal_attention"]


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.users)
    return seen


def lower_causal_attention(gm: fx.GraphModule, latent: fx.Node) -> list[str]:
    """Rewrite every causal SDPA whose keys descend from ``latent`` with an explicit lower-triangular
    boolean mask; returns the names of the SDPA nodes rewritten."""
    reached = _descendants(latent)
    done = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default:
            continue
        args = list(node.args) + [None] * (6 - len(node.args))
        is_causal = node.kwargs.get("is_causal", args[5])
        mask = node.kwargs.get("attn_mask", args[3])
        if not is_causal or mask is not None or node.args[1] not in reached:
            continue
        q, k = node.args[0], node.args[1]
        rows, cols = q.meta["val"].shape[-2], k.meta["val"].shape[-2]
        device = q.meta["val"].device
        with gm.graph.inserting_before(node):
            ones = gm.graph.call_function(aten.ones.default, ([rows, cols],),
                                          {"dtype": torch.bool, "device": device})
            _fake(ones, aten.ones.default, [rows, cols], dtype=torch.bool, device=device, like=q)
            tril = gm.graph.call_function(aten.tril.default, (ones,))
            _fake(tril, aten.tril.default, ones)
        for key in ("nn_module_stack", "stack_trace"):
            if key in node.meta:
                ones.meta[key] = tril.meta[key] = node.meta[key]
        kwargs = {k_: v for k_, v in node.kwargs.items() if k_ not in ("is_causal", "attn_mask")}
        node.args = (*node.args[:3], tril, *node.args[4:5])  # dropout_p, where given
        node.kwargs = {**kwargs, "is_causal": False}
        done.append(node.name)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
