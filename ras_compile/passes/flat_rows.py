"""A projection over flattened rows, as the projection over the rows' own axes.

Sequence-first code projects ``[L, B, E]`` through ``[L * B, E]`` rows and views the result
back: ``nn.MultiheadAttention``'s out-projection in ``F.multi_head_attention_forward`` is
``linear(x.reshape(L * B, E)).view(L, B, E)``. ``linear`` acts on the last axis alone, so
that is ``linear(x)`` over ``[L, B, E]``: the same values, without a view that merges the
token axis with the batch axis. The analysis follows such a merge only for a token axis of
image tokens alone (a fold); with the rows of a joint sequence in it (a timestep or text
token in front of the patch tokens, as nn.TransformerEncoder-based DiTs have) the merge had
no reading, and now it is not there.

Only a ``view`` / ``reshape`` to ``[rows, features]`` that merges leading axes of ``x`` into
the rows and the others into the features (``[L, B, H, d] -> [L * B, H * d]``: the features
are then merged alone first), one ``linear`` as its only reader, and a view back to the same
leading axes as the linear's only reader are rewritten.
"""
from __future__ import annotations

from math import prod

import torch
import torch.fx as fx

from .attention_pattern import _fake
from .node_shapes import static_shape

aten = torch.ops.aten

__all__ = ["unflatten_projected_rows"]

_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _only_reader(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def unflatten_projected_rows(gm: fx.GraphModule) -> int:
    """Rewrite every ``view(linear(view(x, [prod(lead), E])), [*lead, F])`` as ``linear`` over ``x``
    with its leading axes kept; returns how many."""
    graph, count = gm.graph, 0
    for flat in list(graph.nodes):
        if flat.op != "call_function" or flat.target not in _VIEWS:
            continue
        x, linear = flat.args[0], _only_reader(flat)
        if not isinstance(x, fx.Node) or linear is None or linear.target is not aten.linear.default \
                or linear.args[0] is not flat:
            continue
        back = _only_reader(linear)
        if back is None or back.target not in _VIEWS:
            continue
        xs, fs, ls, bs = static_shape(x), static_shape(flat), static_shape(linear), static_shape(back)
        if None in (xs, fs, ls, bs) or len(fs) != 2:
            continue
        lead = next((j for j in range(2, len(xs)) if prod(xs[:j]) == fs[0] and prod(xs[j:]) == fs[1]), None)
        if lead is None or bs != (*xs[:lead], ls[-1]):
            continue
        with graph.inserting_before(back):
            if lead < len(xs) - 1:  # the feature axes merged alone ([L, B, H, d] -> [L, B, H * d])
                features = [*xs[:lead], fs[1]]
                x = graph.call_function(aten.reshape.default, (x, features))
                _fake(x, aten.reshape.default, x.args[0], features)
            rows = graph.call_function(aten.linear.default, (x, *linear.args[1:]), dict(linear.kwargs))
        _fake(rows, aten.linear.default, x, *linear.args[1:], **linear.kwargs)
        rows.meta.update({k: v for k, v in linear.meta.items() if k in ("stack_trace", "nn_module_stack")})
        back.replace_all_uses_with(rows)
        for node in (back, linear, flat):
            graph.erase_node(node)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count
