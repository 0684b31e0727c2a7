"""The step cache stacked on RAS: a skipped step's outputs, extrapolated from computed steps.

A step cache (TaylorSeer, FORA, First Block Cache) skips whole denoising steps and
stands in a prediction made from earlier ones. Diffusers' step caches are hooks on
the model's blocks, inside the forward that RAS captures as one graph, so they
cannot be stacked on it (``hooks.check_capturable_hooks`` refuses them). This one
lives outside the graph: the policy says which steps are predicted
(``schedule.is_predicted_step``), the controller keeps the outputs of the last
computed steps, and on a predicted step the runtime returns their polynomial
extrapolation instead of running the model. Nothing here reads a tensor value on
the host, so a predicted step never waits for the device.
"""
from __future__ import annotations

from typing import Sequence

import torch

History = Sequence[tuple[int, Sequence]]
"""``(step, outputs)`` of computed steps, oldest first; ``outputs`` is the graph's flat output list."""


def lagrange_weights(points: Sequence[int], at: int) -> list[float]:
    """Weights ``w`` with ``sum(w[i] * f(points[i]))`` the value at ``at`` of the polynomial of degree
    ``len(points) - 1`` through the points: exact for every polynomial of that degree. The weights sum
    to 1, so a constant sequence extrapolates to itself. ``points`` must be distinct."""
    if not points or len(set(points)) != len(points):
        raise ValueError(f"lagrange_weights needs distinct points, got {list(points)}")
    weights = []
    for i, p in enumerate(points):
        w = 1.0
        for j, q in enumerate(points):
            if j != i:
                w *= (at - q) / (p - q)
        weights.append(w)
    return weights


def extrapolate(history: History, step: int, order: int) -> list:
    """The outputs at ``step`` extrapolated from the last ``order + 1`` computed steps of ``history``
    (fewer when fewer were computed), as a polynomial in the step number.

    Floating-point tensors are combined in at least float32 and returned in their own dtype; every other output
    (integer tensors, Python values, None) is the last computed step's. Tensors are always new, so the
    caller may change what it gets without touching the history.
    """
    if not history:
        raise ValueError("extrapolate needs at least one computed step")
    if order < 0:
        raise ValueError(f"order={order} must be >= 0")
    used = list(history)[-(order + 1):]
    steps = [s for s, _ in used]
    if step <= steps[-1]:
        raise ValueError(f"step {step} must come after the last computed step {steps[-1]}")
    weights = lagrange_weights(steps, step)
    outputs = []
    for i, last in enumerate(used[-1][1]):
        if isinstance(last, torch.Tensor) and last.is_floating_point():
            if len(used) == 1:
                outputs.append(last.clone())
                continue
            wide = torch.promote_types(last.dtype, torch.float32)
            total = torch.zeros(last.shape, dtype=wide, device=last.device)
            for w, (_, outs) in zip(weights, used):
                total.add_(outs[i].to(wide), alpha=w)
            outputs.append(total.to(last.dtype))
        else:
            outputs.append(last.clone() if isinstance(last, torch.Tensor) else last)
    return outputs


def kept_outputs(outputs: Sequence) -> list:
    """A copy of a computed step's flat outputs for the history: the caller (and, under CUDA graphs, the next
    replay) may overwrite the tensors it was given."""
    return [o.detach().clone() if isinstance(o, torch.Tensor) else o for o in outputs]
