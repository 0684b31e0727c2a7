"""Drop values nothing reads: a pure function of the exported graph, in place.

torch.export keeps computations whose results no output needs. ``nn.MultiheadAttention``
called with its default ``need_weights=True`` averages the attention probabilities over the
heads and the caller drops them (``attn(x, x, x)[0]``); that dead read of the softmax would
make the softmax look shared, and the attention chain unrecognisable.

Only ATen operators without side effects (and ``getitem`` of their results) are erased. Every
other call stays: functorch's ``_vmap_increment_nesting`` / ``_add_batch_dim`` around a block
mask built with ``vmap`` read as unused, yet erasing them alone breaks the region they bracket.
In-place writes, random draws, placeholders and the output stay too.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

__all__ = ["drop_dead_values"]


def _kept(node: fx.Node) -> bool:
    if node.op != "call_function":
        return True
    if node.target is operator.getitem:
        return False
    return not isinstance(node.target, torch._ops.OpOverload) or node.is_impure()


def drop_dead_values(gm: fx.GraphModule) -> bool:
    """Erase the side-effect-free ATen nodes whose values nothing reads; True if any was."""
    changed = gm.graph.eliminate_dead_code(is_impure_node=_kept)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed
