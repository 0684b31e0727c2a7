"""Scoring reads the merged prediction per token, whatever the latent's axis order."""
from __future__ import annotations

import pytest
import torch

from ras_compile.passes.latent_grid import TokenGrid
from ras_compile.passes.token_axis import TokenAnalysis
from ras_compile.runtime import prediction_patches


def _token_ids(grid: TokenGrid) -> torch.Tensor:
    """For every latent position, the id of the token (row-major patch) that holds it."""
    ids = torch.zeros(grid.spatial_shape, dtype=torch.long)
    for index in torch.cartesian_prod(*[torch.arange(s) for s in grid.spatial_shape]).reshape(-1, len(grid.spatial_shape)):
        cell = [int(i) // p for i, p in zip(index, grid.patch_size)]
        token = 0
        for c, g in zip(cell, grid.grid_shape):
            token = token * g + c
        ids[tuple(int(i) for i in index)] = token
    return ids


@pytest.mark.parametrize("latent_shape,grid_axes,patch", [
    ((2, 4, 8, 12), (2, 3), (2, 2)),          # [B, C, H, W]
    ((2, 4, 3, 8, 6), (2, 3, 4), (1, 2, 2)),  # [B, C, F, H, W]
    ((2, 3, 4, 8, 6), (1, 3, 4), (1, 2, 2)),  # [B, F, C, H, W] (CogVideoX)
    ((2, 4, 24), (2,), (1,)),                 # [B, C, L] (audio)
    ((2, 4, 8, 12), (3, 2), (2, 2)),          # column-major tokens: width, then height
])
def test_every_patch_position_lands_on_its_token(latent_shape, grid_axes, patch):
    grid = TokenGrid(latent_shape, grid_axes, patch)
    ids = _token_ids(grid).float()  # over the grid axes in token order: put them in the latent's order
    ids = ids.permute(sorted(range(len(grid_axes)), key=grid_axes.__getitem__))
    channel_axes = grid.channel_axes
    # a prediction whose every channel holds the token id of its position (+1000 in sample 1)
    view = [1] * len(latent_shape)
    for axis in grid_axes:
        view[axis] = latent_shape[axis]
    prediction = ids.reshape(view).expand(latent_shape).clone()
    prediction[1] += 1000
    analysis = TokenAnalysis(grid.num_tokens, latent_shape[0], grid, "latent", "source")
    patches = prediction_patches(prediction, analysis)
    channels = 1
    for a in channel_axes:
        channels *= latent_shape[a]
    assert patches.shape == (latent_shape[0], grid.num_tokens, int(torch.tensor(patch).prod()), channels)
    expected = torch.arange(grid.num_tokens, dtype=torch.float).reshape(1, -1, 1, 1) + torch.tensor([0.0, 1000.0]).reshape(2, 1, 1, 1)
    assert torch.equal(patches, expected.expand_as(patches))
