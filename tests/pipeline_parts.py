"""Parts the pipeline tests share: a tiny random-weight VAE (no weights can be downloaded here)."""
from __future__ import annotations

import torch


def tiny_vae():
    """A 2-level ``AutoencoderKL`` with 4 latent channels, built from seed 0 without touching the
    global RNG stream of the test."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             layers_per_block=1, norm_num_groups=8).eval()
