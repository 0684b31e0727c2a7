"""Turning image batches in ``[-1, 1]`` into viewable grids (for previews and reports)."""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["to_uint8", "image_grid", "save_image_grid"]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[n, 3, H, W]`` floats in ``[-1, 1]`` -> uint8 ``[n, 3, H, W]`` in ``[0, 255]`` (clamped)."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(images: torch.Tensor, nrow: int, scale: int = 1) -> torch.Tensor:
    """Tile ``[n, 3, H, W]`` images in ``[-1, 1]`` into one uint8 ``[rows*H*scale, nrow*W*scale, 3]`` image.

    Missing cells of the last row are black; ``scale`` repeats pixels (nearest neighbour)."""
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    cells = torch.zeros((rows * nrow, c, h, w), dtype=torch.uint8)
    cells[:n] = to_uint8(images)
    grid = cells.view(rows, nrow, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, nrow * w, c)
    return grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int, scale: int = 2) -> Path:
    """Write :func:`image_grid` of ``images`` to ``path`` as a PNG; returns the path."""
    from PIL import Image

    path = Path(path)
    Image.fromarray(image_grid(images, nrow, scale).numpy()).save(path)
    return path
