"""Stage 4 (Lower): own Triton kernels, registered as torch.library ops.

`linear_scatter_` fuses the K/V projection of the active tokens with the per-layer
cache write (`cache[b, index[b, i]] = x[b, i] @ W.T + bias`). See docs/kernels.md.
"""
from .linear_scatter import (
    HOPPER_CONFIGS,
    INTERPRET_CONFIG,
    linear_scatter_,
    linear_scatter_reference_,
    linear_scatter_triton_,
    triton_interpreting,
)

__all__ = [
    "linear_scatter_",
    "linear_scatter_reference_",
    "linear_scatter_triton_",
    "triton_interpreting",
    "HOPPER_CONFIGS",
    "INTERPRET_CONFIG",
]
