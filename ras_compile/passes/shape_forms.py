"""``x.view_as(y)`` / ``x.reshape_as(y)`` as ``view`` / ``reshape`` to ``y``'s sizes.

The analysis follows views by their sizes (which axes split or merge the token axis or
the token grid) and the rewrite gives a view on the active rows its sparse sizes. The
``_as`` forms carry the sizes in a second tensor operand instead: with their sizes
written out they are the views the analysis knows (a Diffusion-Forcing block's
per-frame modulation ``(x.view(B, T, S, D) + g).view_as(x)``). Sizes are static in a
captured graph, so this is the same function.
"""
from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten

__all__ = ["lower_shape_forms"]

_FORMS = {aten.view_as.default: aten.view.default, aten.reshape_as.default: aten.reshape.default}


def lower_shape_forms(gm: fx.GraphModule) -> int:
    """Rewrite every ``view_as`` / ``reshape_as`` whose sizes are static; returns how many."""
    count = 0
    for node in gm.graph.nodes:
        target = _FORMS.get(node.target)
        if target is None or len(node.args) != 2:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not all(isinstance(d, int) for d in val.shape):
            continue
        node.target, node.args = target, (node.args[0], list(val.shape))
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
