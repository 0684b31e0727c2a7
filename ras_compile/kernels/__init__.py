"""Stage 4 (Lower): own Triton kernels, registered as torch.library ops.

`linear_scatter_` fuses the K/V projection of the active tokens with the per-layer
cache write (`cache[b, index[b, i]] = x[b, i] @ W.T + bias`); `linear_norm_scatter_`
adds a per-head RMSNorm / LayerNorm to the epilogue (K paths with a q/k-norm). See
docs/kernels.md.
"""
from .linear_scatter import (
    HOPPER_CONFIGS,
    INTERPRET_CONFIG,
    linear_scatter_,
    linear_scatter_reference_,
    linear_scatter_triton_,
    triton_interpreting,
)
from .linear_norm_scatter import (
    MAX_NORM_HEAD_DIM,
    linear_norm_scatter_,
    linear_norm_scatter_reference_,
    linear_norm_scatter_triton_,
    norm_configs,
    norm_head_dim_supported,
)

__all__ = [
    "linear_scatter_",
    "linear_scatter_reference_",
    "linear_scatter_triton_",
    "linear_norm_scatter_",
    "linear_norm_scatter_reference_",
    "linear_norm_scatter_triton_",
    "norm_configs",
    "norm_head_dim_supported",
    "MAX_NORM_HEAD_DIM",
    "triton_interpreting",
    "HOPPER_CONFIGS",
    "INTERPRET_CONFIG",
]
