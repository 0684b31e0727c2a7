"""Lower single-operand einsums that only reorder axes to ``aten.permute``.

``torch.export`` keeps ``torch.einsum`` as one ``aten.einsum`` node. Models that patchify
or unpatchify with einops-style equations (PRX: ``"nchpwq->nhwcpq"``) then hide a plain
axis permutation behind an operator the token analysis has no rule for. An equation with
one operand, no repeated or dropped index and no ellipsis is exactly ``permute``; every
other einsum is left alone (reductions, diagonals and products keep their meaning, and
the analysis refuses or handles them as before).
"""
from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten


def _permutation(equation: str, rank: int) -> list[int] | None:
    equation = equation.replace(" ", "")
    if "->" not in equation or "." in equation or "," in equation:
        return None
    lhs, rhs = equation.split("->")
    if len(lhs) != rank or len(set(lhs)) != len(lhs) or sorted(lhs) != sorted(rhs):
        return None
    return [lhs.index(c) for c in rhs]


def lower_einsum_permutes(gm: fx.GraphModule) -> list[str]:
    """Replace each permutation-only ``aten.einsum`` of ``gm`` by ``aten.permute``, in place.

    Returns the names of the replaced nodes (an empty list leaves ``gm`` untouched)."""
    replaced = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or getattr(node.target, "overloadpacket", None) is not aten.einsum:
            continue
        equation, operands = node.args[0], node.args[1]
        if len(operands) != 1 or not isinstance(operands[0], fx.Node):
            continue
        val = operands[0].meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        order = _permutation(equation, val.dim())
        if order is None:
            continue
        with gm.graph.inserting_before(node):
            permute = gm.graph.call_function(aten.permute.default, (operands[0], order))
        permute.meta = dict(node.meta)
        node.replace_all_uses_with(permute)
        gm.graph.erase_node(node)
        replaced.append(node.name)
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return replaced
