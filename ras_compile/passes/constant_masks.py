"""A ``where`` whose condition is one value everywhere, computed from no input, as its branch.

Code that pads each sequence to a multiple of some length marks the padded rows in a mask
built from Python numbers (``cat([zeros(n), ones(pad)])``) and puts a learned pad token there:
``where(mask, pad_token, x)`` (Z-Image). When no row is padded (the image's token count is
already a multiple) the mask is all false and the ``where`` returns ``x``; but the analysis
would see a mask over the token rows that it has to gather on a sparse step. Such a mask
depends on nothing the call passes in, so it is evaluated here, once, and a ``where`` whose
condition is all false (true) is replaced by its second (first) branch when that branch has
the result's shape and dtype already. Masks that mix values, that depend on an input, or that
anything writes into in place (``mask[i, :n] = True``: its operator alone does not say its
value) are left alone.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .sample_loops import erase_unused

aten = torch.ops.aten

__all__ = ["constant_value", "drop_constant_wheres"]

_MAX_ELEMENTS = 1 << 22  # a constant mask larger than this is not evaluated at capture time
_UNINITIALISED = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
                  aten.new_empty.default, aten.new_empty_strided.default}


def _writes(op, node: fx.Node) -> bool:
    """Whether ``op`` (a user of ``node``) writes into ``node`` in place."""
    schema = getattr(op.target, "_schema", None)
    if schema is None:
        return False
    for i, arg in enumerate(schema.arguments):
        value = op.args[i] if i < len(op.args) else op.kwargs.get(arg.name)
        if arg.alias_info is not None and arg.alias_info.is_write and value is node:
            return True
    return False


def _is_view(op) -> bool:
    schema = getattr(op.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def _written_later(node: fx.Node) -> bool:
    """Whether anything writes into ``node`` or a view of it in place (``mask[i, :n] = 1``): its value
    is then not what its own operator computes."""
    todo, seen = [node], set()
    while todo:
        value = todo.pop()
        if value in seen:
            continue
        seen.add(value)
        for user in value.users:
            if _writes(user, value):
                return True
            if user.op == "call_function" and (_is_view(user) or user.target is operator.getitem):
                todo.append(user)
    return False


def constant_value(node, memo: dict):
    """The value of ``node`` when it is computed by ATen operators from Python values alone (no
    placeholder, parameter or buffer among its inputs), else None."""
    if not isinstance(node, fx.Node):
        return node
    if node in memo:
        return memo[node]
    memo[node] = None
    val = node.meta.get("val")
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) \
            or not isinstance(val, torch.Tensor) or val.numel() > _MAX_ELEMENTS \
            or not all(isinstance(d, int) for d in val.shape) or torch.Tag.nondeterministic_seeded in node.target.tags \
            or node.target in _UNINITIALISED or _written_later(node):
        return None
    missing = object()

    def value(a):
        if isinstance(a, fx.Node):
            v = constant_value(a, memo)
            return missing if v is None else v
        if isinstance(a, (list, tuple)):
            items = [value(x) for x in a]
            return missing if any(x is missing for x in items) else type(a)(items)
        return a

    args, kwargs = value(list(node.args)), {k: value(v) for k, v in node.kwargs.items()}
    if args is missing or any(v is missing for v in kwargs.values()):
        return None
    try:
        memo[node] = node.target(*args, **kwargs)
    except Exception:  # an operator that cannot run outside the trace: not a constant here
        memo[node] = None
    return memo[node]


def _same_form(branch, result: fx.Node) -> bool:
    b, r = branch.meta.get("val") if isinstance(branch, fx.Node) else None, result.meta["val"]
    return isinstance(b, torch.Tensor) and tuple(b.shape) == tuple(r.shape) and b.dtype == r.dtype


def drop_constant_wheres(gm: fx.GraphModule) -> int:
    """Replace every ``where(cond, a, b)`` whose ``cond`` is a constant of one value by ``a`` or ``b``;
    returns how many."""
    memo, count = {}, 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.where.self:
            continue
        cond = constant_value(node.args[0], memo)
        if not isinstance(cond, torch.Tensor) or cond.dtype is not torch.bool or cond.numel() == 0:
            continue
        if not cond.any():
            branch = node.args[2]
        elif cond.all():
            branch = node.args[1]
        else:
            continue
        if not _same_form(branch, node):
            continue
        node.replace_all_uses_with(branch)
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        erase_unused(gm.graph, inputs)
        count += 1
    if count:
        gm.recompile()
    return count
