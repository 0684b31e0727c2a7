"""The static shape of a graph value, shared by the passes that rewrite by shapes."""
from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["static_shape"]


def static_shape(node) -> tuple[int, ...] | None:
    """``node``'s tensor shape when every size is a plain integer; None for a symbolic size, a
    non-tensor value or anything that is not a node."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor) or not all(isinstance(d, int) for d in val.shape):
        return None
    return tuple(val.shape)
