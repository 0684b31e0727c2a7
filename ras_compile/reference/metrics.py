"""Image-quality metrics: PSNR, SSIM (Gaussian window) and the Frechet distance of features.

All take image batches ``[n, C, H, W]`` in ``[-1, 1]`` (``data_range = 2``) unless told
otherwise and return one value per image (PSNR, SSIM) or one number (Frechet distance).
"""
from __future__ import annotations

import math

import torch

__all__ = ["psnr", "ssim", "gaussian_window", "frechet_distance", "feature_statistics"]


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image peak signal-to-noise ratio in dB, ``[n]`` (``inf`` where the images are equal)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)
    return (10 * torch.log10(data_range ** 2 / mse)).float()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """A normalised 2-D Gaussian window ``[size, size]``."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window: int = 11, sigma: float = 1.5
         ) -> torch.Tensor:
    """Per-image structural similarity, ``[n]``: the mean over channels and positions of the
    SSIM map (Wang et al. 2004: Gaussian window, K1 = 0.01, K2 = 0.03, no padding).

    The window shrinks to the image if the image is smaller than ``window``."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    size = min(window, a.shape[-1], a.shape[-2])
    w = gaussian_window(size, sigma).to(a.device)[None, None].expand(c, 1, size, size)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(dim=1).float()


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[d]`` and (unbiased) covariance ``[d, d]`` of ``features`` ``[n, d]``, in float64."""
    f = features.double()
    mu = f.mean(dim=0)
    centred = f - mu
    return mu, centred.T @ centred / max(1, f.shape[0] - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[n, d]`` (as in FID):
    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``.

    The trace of the matrix square root is computed as that of ``(S_a^(1/2) S_b S_a^(1/2))^(1/2)``,
    which is symmetric, so only symmetric eigendecompositions are needed."""
    mu_a, s_a = feature_statistics(feats_a)
    mu_b, s_b = feature_statistics(feats_b)
    root_a = _sqrt_psd(s_a)
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    d = (mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * cross
    value = float(d.clamp_min(0))
    return value if math.isfinite(value) else float("nan")
