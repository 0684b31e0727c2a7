"""What a sparse step returns for the tokens it does not compute (``RASPolicy.stale_token_order``).

RAS returns an inactive token's last computed output (order 0, the paper). Order 1
continues each token's change between its last two computed outputs, linearly in the
step number: the step cache's extrapolation (``step_cache.py``) applied per token, so a
token left out for several steps moves on instead of standing still.

This works on the merged prediction outside the graph: the graph's output cache keeps
each token's last *computed* value (what the next sparse step merges), and the history
here keeps the one before it and the steps both were computed at. Everything is tensor
arithmetic on the prediction's device; nothing is read on the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def element_tokens(sample_shape: torch.Size, patches: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The token of every element of one sample's prediction, shaped ``sample_shape`` (int64).

    ``patches`` cuts a ``[1, *sample_shape]`` prediction into ``[1, N, S, C]`` (token, position in
    its patch, channel), as ``runtime.prediction_patches`` does; applied to the elements' own
    indices, it says which token each element belongs to."""
    numel = int(torch.Size(sample_shape).numel())
    cut = patches(torch.arange(numel).reshape(1, *sample_shape))
    num_tokens, per_token = cut.shape[1], cut.shape[2] * cut.shape[3]
    tokens = torch.full((numel,), -1, dtype=torch.int64)
    tokens[cut.reshape(-1)] = torch.arange(num_tokens).repeat_interleave(per_token)
    if bool((tokens < 0).any()):  # once per capture, on the CPU: not a per-step host read
        raise ValueError("the prediction has elements that belong to no token; stale-token extrapolation "
                         "needs every element of the prediction to be one token's")
    return tokens.reshape(sample_shape)


@dataclass
class TokenHistory:
    """Per element, the last two computed values of its token, and per token the steps they came from."""

    last: torch.Tensor            # [B, *sample]: the last computed value
    previous: torch.Tensor        # [B, *sample]: the one before (meaningless where previous_step < 0)
    last_step: torch.Tensor       # [B, N] float
    previous_step: torch.Tensor   # [B, N] float, -1 where the token was computed once only


def start(prediction: torch.Tensor, step: int, num_tokens: int) -> TokenHistory:
    """The history after a step that computed every token (a dense step)."""
    steps = torch.full((prediction.shape[0], num_tokens), float(step), device=prediction.device)
    return TokenHistory(prediction.clone(), prediction.clone(), steps, torch.full_like(steps, -1.0))


def estimate(history: TokenHistory, tokens: torch.Tensor, step: int) -> torch.Tensor:
    """Every token's output at ``step``, continued linearly from its last two computed values (its last
    value where it was computed once only), in the prediction's dtype."""
    gap = history.last_step - history.previous_step
    known = history.previous_step >= 0
    slope = torch.where(known, (step - history.last_step) / torch.where(known, gap, torch.ones_like(gap)),
                        torch.zeros_like(gap))
    wide = torch.promote_types(history.last.dtype, torch.float32)
    last = history.last.to(wide)
    moved = last + (last - history.previous.to(wide)) * slope[:, tokens]
    return moved.to(history.last.dtype)


def merge(prediction: torch.Tensor, active: torch.Tensor, history: TokenHistory, tokens: torch.Tensor,
          step: int) -> tuple[torch.Tensor, TokenHistory]:
    """A sparse step's prediction with its inactive tokens extrapolated, and the history updated with the
    tokens it computed. ``active`` is ``[B, N]`` bool."""
    computed = active[:, tokens]  # [B, *sample]
    merged = torch.where(computed, prediction, estimate(history, tokens, step))
    updated = TokenHistory(
        last=torch.where(computed, prediction, history.last),
        previous=torch.where(computed, history.last, history.previous),
        last_step=torch.where(active, torch.full_like(history.last_step, float(step)), history.last_step),
        previous_step=torch.where(active, history.last_step, history.previous_step))
    return merged, updated
