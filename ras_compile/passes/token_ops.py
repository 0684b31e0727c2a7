"""Tensor functions the rewritten graphs call to move image-token rows.

They are plain torch code so Dynamo traces straight through them and Inductor
fuses them with their neighbours. Every function works on an arbitrary
(batch axis, token axis) pair so that the passes never need to permute a
tensor into a canonical layout first.

A *position map* ``pos`` is an int64 tensor ``[B, L']``: row ``j`` of the sparse
token axis of sample ``b`` holds dense row ``pos[b, j]``. For the image-only axis
it is the active index itself; for a joint axis (text + image) it is the text
rows followed or preceded by the shifted active index (see ``dense_positions``).
"""
from __future__ import annotations

import torch

from ..kernels.linear_norm_scatter import linear_norm_scatter_
from ..kernels.linear_scatter import linear_scatter_


def dense_positions(index: torch.Tensor, offset: int, dense_length: int, num_tokens: int) -> torch.Tensor:
    """Dense row of every sparse row of an axis whose image tokens sit at ``[offset, offset + num_tokens)``."""
    if offset == 0 and dense_length == num_tokens:
        return index
    batch = index.shape[0]
    parts = []
    if offset > 0:
        parts.append(torch.arange(offset, device=index.device, dtype=index.dtype).expand(batch, offset))
    parts.append(index + offset)
    tail = dense_length - offset - num_tokens
    if tail > 0:
        parts.append(
            torch.arange(offset + num_tokens, dense_length, device=index.device, dtype=index.dtype).expand(batch, tail)
        )
    return torch.cat(parts, dim=1)


def tube_positions(index: torch.Tensor, outer: int, num_tokens: int) -> torch.Tensor:
    """Dense rows of the active tokens on an axis that holds ``outer`` blocks of the image tokens
    (rows ``(o, token)``, a video's frames kept in the sequence): ``o * num_tokens + index[b, i]``
    for every block ``o``, blocks in order, so the sparse axis holds rows ``(o, i)``."""
    blocks = torch.arange(outer, device=index.device, dtype=index.dtype) * num_tokens
    return (blocks[None, :, None] + index[:, None, :]).reshape(index.shape[0], outer * index.shape[1])


def sample_rows(pos: torch.Tensor, samples: tuple[int, ...]) -> torch.Tensor:
    """Rows ``samples`` of per-sample positions ``pos``: the positions of a tensor whose batch row ``j``
    holds latent sample ``samples[j]`` (a per-sample loop's piece, a doubled batch)."""
    lo = samples[0]
    if samples == tuple(range(lo, lo + len(samples))):
        return pos[lo:lo + len(samples)]
    return pos[list(samples)]


def repeat_rows(pos: torch.Tensor, group: int) -> torch.Tensor:
    """``pos`` with every sample's row repeated ``group`` times: the position map of a batch
    axis into which a view folded a per-sample axis (``[B, H, N, d] -> [B * H, N, d]``)."""
    return pos.repeat_interleave(group, dim=0)


def _batch_arange(pos: torch.Tensor) -> torch.Tensor:
    return torch.arange(pos.shape[0], device=pos.device).unsqueeze(1)


def gather_tokens(x: torch.Tensor, pos: torch.Tensor, batch_dim: int | None, token_dim: int, rank: int) -> torch.Tensor:
    """Rows ``pos`` of ``x`` along ``token_dim``, per sample.

    ``x`` may be a side input that only broadcasts against the token tensor it
    joins (a ``[1, N, D]`` position table, a ``[N, d]`` RoPE table): it is first
    given the joined tensor's ``rank`` and its batch axis is expanded to ``B``.
    """
    while x.dim() < rank:
        x = x.unsqueeze(0)
    if batch_dim is None:  # a batch of one whose tensors carry no batch axis
        return x.movedim(token_dim, 0)[pos[0]].movedim(0, token_dim)
    moved = x.movedim((batch_dim, token_dim), (0, 1))
    batch = pos.shape[0]
    if moved.shape[0] != batch:
        moved = moved.expand(batch, *moved.shape[1:])
    gathered = moved[_batch_arange(pos), pos]
    return gathered.movedim((0, 1), (batch_dim, token_dim))


def gather_folded_rows(x: torch.Tensor, index: torch.Tensor, dim: int, rank: int, inner: int,
                       token_major: bool = False) -> torch.Tensor:
    """The active rows of ``x`` along an axis that folds the token axis into the batch axis:
    axis ``dim`` holds rows ``(sample, token, inner)`` row-major (``inner`` rows per token;
    ``(token, sample, inner)`` if ``token_major``), and the result keeps rows
    ``(b, index[b, i], j)`` in the same order.

    ``x`` is first given ``rank`` dimensions (a side input broadcast against the token tensor)."""
    while x.dim() < rank:
        x = x.unsqueeze(0)
    batch, num_tokens = index.shape[0], x.shape[dim] // (index.shape[0] * inner)
    sample = torch.arange(batch, device=index.device, dtype=index.dtype).unsqueeze(1)
    if token_major:  # sparse rows (i, b): dense row index[b, i] * B + b
        token_rows = (index * batch + sample).t().unsqueeze(2) * inner
    else:            # sparse rows (b, i): dense row b * N + index[b, i]
        token_rows = (sample * num_tokens + index).unsqueeze(2) * inner
    rows = (token_rows + torch.arange(inner, device=index.device, dtype=index.dtype)).reshape(-1)
    return x.index_select(dim, rows)


def scatter_tokens_(cache: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, batch_dim: int | None, token_dim: int) -> torch.Tensor:
    """Write ``rows`` into ``cache`` at dense rows ``pos`` (in place) and return ``cache``.

    Duplicate positions in ``pos`` must carry identical rows (padding a bucket by
    repeating an index does); which duplicate lands is then irrelevant.
    """
    if batch_dim is None:
        cache.movedim(token_dim, 0)[pos[0]] = rows.movedim(token_dim, 0).to(cache.dtype)
        return cache
    target = cache.movedim((batch_dim, token_dim), (0, 1))
    source = rows.movedim((batch_dim, token_dim), (0, 1))
    target[_batch_arange(pos), pos] = source.to(cache.dtype)
    return cache


def _grid_batch_dim(batch_dim: int | None, token_dim: int, grid_rank: int) -> int | None:
    """The batch axis once a grid's ``grid_rank`` axes from ``token_dim`` are flattened into one."""
    return batch_dim if batch_dim is None or batch_dim < token_dim else batch_dim - (grid_rank - 1)


def gather_grid_tokens(x: torch.Tensor, pos: torch.Tensor, batch_dim: int | None, token_dim: int,
                       grid: tuple[int, ...], rank: int) -> torch.Tensor:
    """The active tokens of ``x`` whose tokens sit on a grid of axes ``token_dim ..`` of dense sizes
    ``grid`` (``TokenLayout.grid``), in the sparse grid form: those axes become ``(k, 1, ...)``.

    ``x`` may broadcast against the grid (a ``[1, C, 1, w]`` table): it is given ``rank``
    dimensions and its grid axes are expanded to full size first."""
    while x.dim() < rank:
        x = x.unsqueeze(0)
    g = len(grid)
    sizes = [-1] * rank
    sizes[token_dim:token_dim + g] = grid
    flat = x.expand(sizes).flatten(token_dim, token_dim + g - 1)
    rows = gather_tokens(flat, pos, _grid_batch_dim(batch_dim, token_dim, g), token_dim, rank - g + 1)
    return rows.unflatten(token_dim, (pos.shape[1],) + (1,) * (g - 1))


def scatter_grid_tokens_(cache: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, batch_dim: int | None,
                         token_dim: int, grid_rank: int) -> torch.Tensor:
    """``scatter_tokens_`` for a token grid: ``rows`` in the sparse grid form ``(k, 1, ...)`` are
    written into ``cache`` (the full grid, allocated contiguous) in place; returns ``cache``."""
    end = token_dim + grid_rank - 1
    shape = list(cache.shape)
    target = cache.view(shape[:token_dim] + [-1] + shape[end + 1:])  # a view: the writes land in the cache
    scatter_tokens_(target, rows.flatten(token_dim, end), pos, _grid_batch_dim(batch_dim, token_dim, grid_rank),
                    token_dim)
    return cache


def fill_cache_(cache: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Dense-step cache fill: the whole value becomes the cache."""
    cache.copy_(value)
    return cache


def project_into_cache_(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pos: torch.Tensor,
                        cache: torch.Tensor) -> torch.Tensor:
    """``cache[b, pos[b, i]] = x[b, i] @ weight.T + bias`` in place (the fused K/V projection); returns ``cache``.

    ``cache`` is ``[B, L, D_out]`` in the projection's own layout. On CUDA the op is the
    Triton GeMM with a scatter epilogue; elsewhere its ATen reference.
    """
    return linear_scatter_(x, weight, bias, pos, cache)


def project_norm_into_cache_(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pos: torch.Tensor,
                             cache: torch.Tensor, norm: str, norm_weight: torch.Tensor | None,
                             norm_bias: torch.Tensor | None, eps: float, head_dim: int) -> torch.Tensor:
    """``cache[b, pos[b, i]] = norm_per_head(x[b, i] @ weight.T + bias)`` in place (the fused K
    projection with its q/k-norm); returns ``cache``.

    ``cache`` is ``[B, L, D_out]`` in the projection's own layout, holding normalised
    heads of ``head_dim`` columns. On CUDA the op is the Triton GeMM with a norm and
    scatter epilogue; elsewhere its ATen reference.
    """
    return linear_norm_scatter_(x, weight, bias, pos, cache, norm=norm, norm_weight=norm_weight,
                                norm_bias=norm_bias, eps=eps, head_dim=head_dim)
