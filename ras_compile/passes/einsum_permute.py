"""Lower single-operand einsums that only reorder axes to ``aten.permute``, and put the shared axes of
two-operand products first.

``torch.export`` keeps ``torch.einsum`` as one ``aten.einsum`` node. Models that patchify
or unpatchify with einops-style equations (PRX: ``"nchpwq->nhwcpq"``) then hide a plain
axis permutation behind an operator the token analysis has no rule for. An equation with
one operand, no repeated or dropped index and no ellipsis is exactly ``permute``; every
other einsum is left alone (reductions, diagonals and products keep their meaning, and
the analysis refuses or handles them as before).

A two-operand product whose shared (batch) axes are not leading, attention written over
``[B, N, H, D]`` as ``einsum("bnhd,bmhd->bhnm", q, k)`` and ``einsum("bhnm,bmhd->bnhd", p, v)``,
is the same product with each operand permuted to its batch axes first (in the output's order)
and the output permuted back: ``einsum("bhnd,bhmd->bhnm", q.permute(..), k.permute(..))``, the
form passes/attention_pattern.py reads as attention. Only products whose every term has exactly
two letters besides the batch letters are rewritten (each operand one own and one contracted
axis, or both own: matrix products over batches); the order of those two is kept.
"""
from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten

__all__ = ["lead_einsum_batch_axes", "lower_einsum_permutes"]


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


def _batch_first(equation: str) -> tuple[list[int], list[int], str, list[int]] | None:
    """``(perm_a, perm_b, equation, perm_out)`` putting a two-operand einsum's batch letters first in
    every term; None when it is not such a product or already has that form."""
    eq = equation.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1 or "." in eq:
        return None
    ins, out = eq.split("->")
    a, b = ins.split(",")
    if any(len(set(t)) != len(t) for t in (a, b, out)):
        return None
    batch = [c for c in out if c in a and c in b]
    rest = [[c for c in t if c not in batch] for t in (a, b, out)]
    if any(len(r) != 2 for r in rest) or not set(out) <= set(a) | set(b):
        return None
    a2, b2, out2 = ("".join(batch + r) for r in rest)
    if (a2, b2, out2) == (a, b, out):
        return None
    return [a.index(c) for c in a2], [b.index(c) for c in b2], f"{a2},{b2}->{out2}", [out2.index(c) for c in out]


def _permuted(graph: fx.Graph, node: fx.Node, order: list[int]) -> fx.Node:
    if order == sorted(order):
        return node
    new = graph.call_function(aten.permute.default, (node, order))
    new.meta["val"] = node.meta["val"].permute(order)
    return new


def lead_einsum_batch_axes(gm: fx.GraphModule) -> list[str]:
    """Rewrite each two-operand ``aten.einsum`` whose batch axes are not leading into permutes around
    an einsum with them first (module docstring), in place; the names of the rewritten nodes."""
    rewritten = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or getattr(node.target, "overloadpacket", None) is not aten.einsum:
            continue
        operands = node.args[1]
        if len(operands) != 2 or not all(isinstance(o, fx.Node) and isinstance(o.meta.get("val"), torch.Tensor)
                                         for o in operands):
            continue
        form = _batch_first(node.args[0])
        if form is None:
            continue
        perm_a, perm_b, equation, perm_out = form
        graph = gm.graph
        with graph.inserting_before(node):
            a, b = _permuted(graph, operands[0], perm_a), _permuted(graph, operands[1], perm_b)
            product = graph.call_function(aten.einsum.default, (equation, [a, b]))
            product.meta = dict(node.meta)
            product.meta["val"] = torch.einsum(equation, a.meta["val"], b.meta["val"])
            result = _permuted(graph, product, perm_out)
        if result is not product:
            result.meta = {**node.meta, "val": result.meta["val"]}
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        rewritten.append(node.name)
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten
