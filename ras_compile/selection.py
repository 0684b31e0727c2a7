"""Choosing the next active set (spec §3): score, share across the batch, rank, split.

These run after every step that precedes a sparse step, between two launches of
the model. They stay on the tensors' device and never read a tensor value on the
host (no ``.item()``, ``.tolist()``, ``nonzero`` or branching on values): a host
read would make the CPU wait for the GPU once per step and leave it idle while
the next step's launches could already be queued. Only shapes and Python
arguments steer control flow.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch

_NAMED_METRICS = ("std", "l2norm", "random")
_SHARES = ("per_sample", "cfg", "batch")
_RULES = ("paper", "official")


def score_tokens(patches: torch.Tensor, metric: str | Callable[[torch.Tensor], torch.Tensor],
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-token score ``[B, N]`` float32 from the merged prediction ``patches`` ``[B, N, S, C]``.

    ``S`` is the latent positions of a token's patch (``p*p``; 1 for token-shaped
    latents) and ``C`` the channels. ``"std"`` is the official default: the spread
    of a position's channels, averaged over the patch, so every patch size gives one
    number per token. ``C == 1`` gives zeros rather than the NaN of an unbiased std
    of one value, which would otherwise poison the ranking. The score is computed
    in float32 because half-precision std of small velocities loses the ordering.
    """
    if not isinstance(patches, torch.Tensor) or patches.dim() != 4:
        shape = list(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__
        raise ValueError(f"score_tokens expects patches of shape [B, N, S, C], got {shape}")
    batch, num_tokens, _, channels = patches.shape
    x = patches.to(torch.float32)
    if callable(metric):
        name = getattr(metric, "__name__", repr(metric))
        scores = metric(patches)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (batch, num_tokens):
            got = list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"metric {name} must return scores of shape [B, N] = [{batch}, {num_tokens}], got {got}")
        return scores.to(torch.float32)
    if metric == "std":
        if channels == 1:
            return torch.zeros(batch, num_tokens, dtype=torch.float32, device=patches.device)
        return torch.std(x, dim=-1).mean(dim=-1)
    if metric == "l2norm":
        return torch.linalg.vector_norm(x, dim=-1).mean(dim=-1)
    if metric == "random":
        return torch.rand(batch, num_tokens, generator=generator, dtype=torch.float32, device=patches.device)
    raise ValueError(f"metric={metric!r} is unknown: use one of {', '.join(map(repr, _NAMED_METRICS))} or a "
                     "callable mapping [B, N, S, C] to [B, N]")


def share_scores(scores: torch.Tensor, share: str) -> torch.Tensor:
    """Make rows that must share an active set carry the same scores.

    Rows that share a set also share the drop counts they started with (zeros), so
    equal scores give equal selections and the rows stay in lock step. Averaging
    rather than picking one row lets both guidance halves inform the choice (spec
    §4: the mean over the group is an allowed stand-in for the guided velocity).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"share_scores expects scores of shape [B, N], got "
                         f"{list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    batch = scores.shape[0]
    if share == "per_sample":
        return scores
    if share == "batch":
        return scores.mean(dim=0, keepdim=True).expand_as(scores).contiguous()
    if share == "cfg":
        if batch % 2:
            raise ValueError(f"share_active_set='cfg' needs an even batch laid out as [uncond; cond] halves, got "
                             f"batch {batch}; this batch is not guidance halves, use share_active_set='per_sample'")
        half = batch // 2
        mean = (scores[:half] + scores[half:]) / 2
        return torch.cat([mean, mean], dim=0)
    raise ValueError(f"share_active_set={share!r} is unknown: use one of {', '.join(map(repr, _SHARES))}")


def select_active(scores: torch.Tensor, drops: torch.Tensor, k: int, *, rule: str, starvation_scale: float,
                  high_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The next active set ``[B, k]`` (int64, ascending per row) and the updated drop counts.

    Ranking value ``R = score * exp(sign * starvation_scale * drops)``:

    - ``rule="paper"``, sign ``-1``: with the default ``high_ratio=1`` the dropped
      tokens are the highest R, so every drop lowers a token's R and moves it
      towards the kept end; no token can be left out for long (the bound is proved
      in ``tests/test_selection.py``). With ``high_ratio < 1`` the low-end drops are
      not protected by this sign: a low-R token dropped from the low end only sinks
      further.
    - ``rule="official"``, sign ``+1`` (microsoft/RAS ``ras_selection``): a dropped
      token's R grows, so under ``high_ratio=1`` it is dropped again; with static
      scores the first dropped set is dropped forever.

    The ``N - k`` dropped tokens are ``round(high_ratio * (N - k))`` from the top of
    the ranking and the rest from the bottom; the kept ones are the middle. (The
    official code truncates both parts with ``int()``, so it can drop fewer than
    asked, and its ``indices[-0:]`` turns zero high-end drops into "drop all"; both
    differ here on purpose.) The sort is stable, so ties go by token position and
    equal rows give equal sets. A uniform offset on ``drops`` (the official code
    starts them at ``-len(sigmas)``) scales every R alike and changes nothing.

    R is float32 (float64 if the scores are): ``exp(s * D)`` overflows float32 only
    past ``s * D > 88``, far beyond any sampling loop at the usual ``s = 0.1``.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"select_active expects scores of shape [B, N], got "
                         f"{list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    if not isinstance(drops, torch.Tensor) or drops.shape != scores.shape:
        raise ValueError(f"select_active expects drops with the scores' shape {list(scores.shape)}, got "
                         f"{list(drops.shape) if isinstance(drops, torch.Tensor) else type(drops).__name__}")
    if drops.dtype == torch.bool or drops.is_complex():
        raise ValueError(f"select_active expects drops as float or integer counts, got {drops.dtype}")
    batch, num_tokens = scores.shape
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= num_tokens:
        raise ValueError(f"k={k!r} is invalid: must be an int with 1 <= k <= N = {num_tokens}")
    if rule not in _RULES:
        raise ValueError(f"rule={rule!r} is unknown: use one of {', '.join(map(repr, _RULES))}")
    if not _is_real(starvation_scale) or not math.isfinite(starvation_scale) or starvation_scale < 0:
        raise ValueError(f"starvation_scale={starvation_scale!r} is invalid: must be a finite number >= 0")
    if not _is_real(high_ratio) or not 0 <= high_ratio <= 1:
        raise ValueError(f"high_ratio={high_ratio!r} is invalid: must be a number with 0 <= high_ratio <= 1")

    dtype = torch.promote_types(scores.dtype, torch.float32) if scores.is_floating_point() else torch.float32
    sign = -1.0 if rule == "paper" else 1.0
    ranking = scores.to(dtype) * torch.exp((sign * starvation_scale) * drops.to(dtype))
    order = torch.sort(ranking, dim=1, stable=True).indices          # ascending R

    k = int(k)
    num_dropped = num_tokens - k
    num_high = round(high_ratio * num_dropped)
    num_low = num_dropped - num_high
    kept = order[:, num_low:num_tokens - num_high]                     # the middle k of the ranking
    index = torch.sort(kept, dim=1).values                             # position order: better locality

    dropped = torch.ones(batch, num_tokens, dtype=torch.bool, device=scores.device)
    dropped.scatter_(1, index, False)
    return index, drops + dropped.to(drops.dtype)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
