"""Shape operators in other spellings, written as the ones the analysis follows.

* ``x.view_as(y)`` / ``x.reshape_as(y)`` are ``view`` / ``reshape`` to ``y``'s sizes. The
  analysis follows views by their sizes (which axes split or merge the token axis or the
  token grid) and the rewrite gives a view on the active rows its sparse sizes. The ``_as``
  forms carry the sizes in a second tensor operand instead: with their sizes written out they
  are the views the analysis knows (a Diffusion-Forcing block's per-frame modulation
  ``(x.view(B, T, S, D) + g).view_as(x)``).
* ``x.narrow(d, s, n)`` is ``x[(:,) * d, s:s + n]``, a ``slice``; ``torch.tensor_split(x, ...)``
  is ``split_with_sizes`` with the pieces' sizes (in-context conditioning tokens dropped with
  ``narrow``, a sequence cut by ``tensor_split``).

Sizes are static in a captured graph, so each is the same function.
"""
from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten

__all__ = ["lower_shape_forms"]

_FORMS = {aten.view_as.default: aten.view.default, aten.reshape_as.default: aten.reshape.default}
_TENSOR_SPLITS = (aten.tensor_split.sections, aten.tensor_split.indices)


def _static(val) -> bool:
    vals = val if isinstance(val, (list, tuple)) else [val]
    return all(isinstance(v, torch.Tensor) and all(isinstance(d, int) for d in v.shape) for v in vals)


def _lowered(node: fx.Node):
    """The (target, args) of the followed form of ``node``, or None."""
    val = node.meta.get("val")
    if val is None or not _static(val):
        return None
    if node.target in _FORMS and len(node.args) == 2:
        return _FORMS[node.target], (node.args[0], list(val.shape))
    if node.target is aten.narrow.default and all(isinstance(a, int) for a in node.args[1:]):
        x, dim, start, length = node.args
        size = x.meta["val"].shape[dim]
        start = start + size if start < 0 else start
        return aten.slice.Tensor, (x, dim, start, start + length)
    if node.target in _TENSOR_SPLITS:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        return aten.split_with_sizes.default, (node.args[0], [int(v.shape[dim]) for v in val], dim)
    return None


def lower_shape_forms(gm: fx.GraphModule) -> int:
    """Rewrite every ``view_as`` / ``reshape_as`` / ``narrow`` / ``tensor_split`` whose sizes are
    static; returns how many."""
    count = 0
    for node in gm.graph.nodes:
        lowered = _lowered(node) if node.op == "call_function" else None
        if lowered is None:
            continue
        node.target, node.args = lowered
        node.kwargs = {}
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
