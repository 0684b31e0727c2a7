"""K projection + per-head norm fused with the cache write (stage 4, Lower).

Models with a q/k-norm (SD3.5, Flux, CogVideoX, ...) normalise every head of K before
attention. On a sparse step the active rows of K are

    out = x[b, i, :] @ weight.T + bias                       # [D_out] = heads x head_dim
    cache[b, index[b, i], :] = norm(out per head) (* norm_weight (+ norm_bias))

`linear_norm_scatter_` does it in one kernel: the Triton GeMM of `linear_scatter.py`
with the per-head norm applied to the fp32 accumulator in the epilogue, before the one
rounding and the scatter store. The epilogue needs a tile that holds whole heads, so
the kernel runs with configs whose BLOCK_N is a multiple of `head_dim`
(`norm_configs`). RoPE is not fused (it stays after the cache write, see
docs/kernels.md).

* `norm="rms"`: `h * rsqrt(mean(h**2) + eps)`, then `* norm_weight` if given.
* `norm="layer"`: `(h - mean(h)) * rsqrt(var(h) + eps)` (biased variance), then
  `* norm_weight` and `+ norm_bias` if given.

The statistics and the affine step are computed in fp32 and rounded once to the cache
dtype. (A model that rounds the normalised value to 16 bits before multiplying by a
16-bit weight rounds twice; the fused result then differs from it by about one ulp.)

Entry points, as for `linear_scatter_`:

* `linear_norm_scatter_(x, weight, bias, index, cache, *, norm, norm_weight,
  norm_bias, eps, head_dim, rows=None)`: the public function, returns `cache`.
* `torch.ops.ras_compile.linear_norm_scatter_`: a `torch.library.triton_op`
  (CUDA: the Triton kernel through `wrap_triton`; elsewhere the ATen reference),
  traceable by `torch.compile(fullgraph=True)`.
* `linear_norm_scatter_triton_(..., config=None)`: the raw launcher (CUDA tensors, or
  CPU tensors under `TRITON_INTERPRET=1`).

Everything `linear_scatter_` says about untouched rows, duplicate indices, index range
checks, aliasing and strides holds here too. `head_dim` must be a power of two (a
Triton block dimension) of at most `MAX_NORM_HEAD_DIM` (256, the widest tile) and
divide D_out.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import linear_scatter as _ls
from .linear_scatter import MAX_NORM_HEAD_DIM, NORM_CODES, HeadNorm, norm_configs

__all__ = [
    "linear_norm_scatter_",
    "linear_norm_scatter_reference_",
    "linear_norm_scatter_triton_",
    "norm_head_dim_supported",
    "norm_configs",
    "MAX_NORM_HEAD_DIM",
]

NORM_KINDS = tuple(NORM_CODES)  # ("rms", "layer")


def _need(cond, msg):
    if not cond:
        raise ValueError(f"linear_norm_scatter_: {msg}")


def norm_head_dim_supported(head_dim: int, d_out: int) -> bool:
    """True when the kernel can normalise heads of `head_dim` columns in a `d_out`-wide
    output: a power of two, at most MAX_NORM_HEAD_DIM, dividing `d_out`."""
    return (isinstance(head_dim, int) and 0 < head_dim <= MAX_NORM_HEAD_DIM
            and head_dim & (head_dim - 1) == 0 and d_out % head_dim == 0)


def _check_norm(x, weight, norm, norm_weight, norm_bias, eps, head_dim) -> None:
    """The norm arguments (the projection's are checked by linear_scatter_'s checks).
    Metadata only: works on fake tensors."""
    need = _need
    need(norm in NORM_KINDS, f"`norm` must be one of {NORM_KINDS}, got {norm!r}")
    need(isinstance(head_dim, int) and not isinstance(head_dim, bool),
         f"`head_dim` must be an int, got {type(head_dim).__name__}")
    need(isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0,
         f"`eps` must be a float >= 0, got {eps!r}")
    D_out = weight.shape[0]
    need(0 < head_dim <= MAX_NORM_HEAD_DIM and head_dim & (head_dim - 1) == 0,
         f"`head_dim` must be a power of two in [1, {MAX_NORM_HEAD_DIM}], got {head_dim}")
    need(D_out % head_dim == 0, f"`head_dim`={head_dim} must divide D_out={D_out} (the output is whole heads)")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is None:
            continue
        need(isinstance(t, torch.Tensor), f"`{name}` must be a Tensor or None, got {type(t).__name__}")
        need(t.dim() == 1 and t.shape[0] == head_dim,
             f"`{name}` must be 1-D [head_dim={head_dim}], got shape {tuple(t.shape)}")
        need(t.dtype in (x.dtype, torch.float32),
             f"`{name}` must have the dtype of `x` ({x.dtype}) or float32, got {t.dtype}")
        need(t.device == x.device, f"`{name}` is on {t.device} but `x` is on {x.device}")
    need(norm_bias is None or norm == "layer", "`norm_bias` is only allowed with norm='layer', got norm='rms'")


def _renamed(check, *args) -> None:
    """Run one of linear_scatter_'s checks, its ValueError under this op's name."""
    try:
        check(*args)
    except ValueError as e:
        raise ValueError(str(e).replace("linear_scatter_:", "linear_norm_scatter_:", 1)) from None


def _check_all(x, weight, bias, index, cache, rows, norm, norm_weight, norm_bias, eps, head_dim) -> None:
    _renamed(_ls._check_inputs, x, weight, bias, index, cache, rows)
    _check_norm(x, weight, norm, norm_weight, norm_bias, eps, head_dim)


# --------------------------------------------------------------------------- ATen reference

def head_norm(out: torch.Tensor, norm: str, norm_weight, norm_bias, eps: float, head_dim: int) -> torch.Tensor:
    """The per-head norm of `out` ([..., D_out]) in fp32, returned in fp32 with `out`'s shape.

    RMSNorm is written as the decomposed op sequence diffusers' RMSNorm traces to
    (`h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)`), so in fp32 it gives that
    graph's values; LayerNorm is `F.layer_norm` in fp32.
    """
    h = out.float().unflatten(-1, (-1, head_dim))
    w = None if norm_weight is None else norm_weight.float()
    if norm == "layer":
        h = F.layer_norm(h, (head_dim,), w, None if norm_bias is None else norm_bias.float(), eps)
    else:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        if w is not None:
            h = h * w
    return h.flatten(-2)


def _reference_impl(x, weight, bias, index, cache, rows, norm, norm_weight, norm_bias, eps, head_dim):
    if rows is not None:
        x = torch.gather(x, 1, rows.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    out = head_norm(F.linear(x, weight, bias), norm, norm_weight, norm_bias, eps, head_dim).to(cache.dtype)
    cache.scatter_(1, index.unsqueeze(-1).expand(-1, -1, cache.shape[2]), out)


def linear_norm_scatter_reference_(x, weight, bias, index, cache, *, norm, norm_weight=None, norm_bias=None,
                                   eps=1e-6, head_dim, rows=None):
    """The ATen reference: what the op runs off CUDA. Writes `cache` in place, returns it."""
    _check_all(x, weight, bias, index, cache, rows, norm, norm_weight, norm_bias, eps, head_dim)
    _reference_impl(x, weight, bias, index, cache, rows, norm, norm_weight, norm_bias, eps, head_dim)
    return cache


# --------------------------------------------------------------------------- Triton launcher

def linear_norm_scatter_triton_(x, weight, bias, index, cache, *, norm, norm_weight=None, norm_bias=None,
                                eps=1e-6, head_dim, rows=None, config=None, variant=None):
    """Run the Triton kernel with the norm epilogue directly (no torch.library op): CUDA
    tensors, or CPU tensors when `TRITON_INTERPRET=1` was set before import. `config`
    pins one block configuration (its BLOCK_N must be a multiple of `head_dim`).
    `variant`: the kernel, as for `linear_scatter_triton_`. Writes `cache` in place and
    returns it."""
    _check_all(x, weight, bias, index, cache, rows, norm, norm_weight, norm_bias, eps, head_dim)
    if x.device.type != "cuda" and not _ls.triton_interpreting():
        raise ValueError(
            f"linear_norm_scatter_triton_: tensors are on {x.device}; the Triton kernel needs CUDA tensors, "
            "or TRITON_INTERPRET=1 set before ras_compile.kernels is imported (CPU interpreter)")
    if config is not None:
        block_n = (config.kwargs if hasattr(config, "kwargs") else config)["BLOCK_N"]
        _need(block_n % head_dim == 0, f"`config` BLOCK_N={block_n} must be a multiple of head_dim={head_dim}")
    _ls._launch(x, weight, bias, index, cache, rows, config=config, variant=variant,
                norm=HeadNorm(norm, norm_weight, norm_bias, float(eps), head_dim))
    return cache


# --------------------------------------------------------------------------- custom op

def _op_body(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], index: torch.Tensor,
             cache: torch.Tensor, rows: Optional[torch.Tensor], norm: str, norm_weight: Optional[torch.Tensor],
             norm_bias: Optional[torch.Tensor], eps: float, head_dim: int) -> None:
    _check_all(x, weight, bias, index, cache, rows, norm, norm_weight, norm_bias, eps, head_dim)
    if cache.device.type == "cuda" and _ls.triton is not None:
        _ls._launch(x, weight, bias, index, cache, rows, wrap=torch.library.wrap_triton,
                    norm=HeadNorm(norm, norm_weight, norm_bias, eps, head_dim))
    else:
        _reference_impl(x, weight, bias, index, cache, rows, norm, norm_weight, norm_bias, eps, head_dim)


if hasattr(torch.library, "triton_op"):
    _linear_norm_scatter_op = torch.library.triton_op("ras_compile::linear_norm_scatter_",
                                                      mutates_args={"cache"})(_op_body)
else:  # pragma: no cover - torch < 2.6: opaque custom op; the kernel runs, Inductor cannot see it
    def _opaque_body(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], index: torch.Tensor,
                     cache: torch.Tensor, rows: Optional[torch.Tensor], norm: str,
                     norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor], eps: float,
                     head_dim: int) -> None:
        _check_all(x, weight, bias, index, cache, rows, norm, norm_weight, norm_bias, eps, head_dim)
        if cache.device.type == "cuda" and _ls.triton is not None:
            _ls._launch(x, weight, bias, index, cache, rows, norm=HeadNorm(norm, norm_weight, norm_bias, eps,
                                                                           head_dim))
        else:
            _reference_impl(x, weight, bias, index, cache, rows, norm, norm_weight, norm_bias, eps, head_dim)

    _linear_norm_scatter_op = torch.library.custom_op("ras_compile::linear_norm_scatter_",
                                                      mutates_args={"cache"})(_opaque_body)

    @_linear_norm_scatter_op.register_fake
    def _(x, weight, bias, index, cache, rows, norm, norm_weight, norm_bias, eps, head_dim):
        _check_all(x, weight, bias, index, cache, rows, norm, norm_weight, norm_bias, eps, head_dim)


def linear_norm_scatter_(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], index: torch.Tensor,
                         cache: torch.Tensor, *, norm: str, norm_weight: Optional[torch.Tensor] = None,
                         norm_bias: Optional[torch.Tensor] = None, eps: float = 1e-6, head_dim: int,
                         rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`cache[b, index[b, i], :] = norm_per_head(x[b, src(b, i), :] @ weight.T + bias)`, in place; returns `cache`.

    Args:
        x, weight, bias, index, cache, rows: as for `linear_scatter_`.
        norm: "rms" (RMSNorm) or "layer" (LayerNorm), over each head's `head_dim`
            contiguous output columns.
        norm_weight: `[head_dim]` affine weight or None (dtype of `x` or float32).
        norm_bias: `[head_dim]` affine bias or None; only with norm="layer".
        eps: added to the mean square (rms) or the variance (layer).
        head_dim: a power of two <= 256 that divides D_out.

    GeMM, bias, norm and affine in fp32, one rounding to the cache dtype. Bad arguments
    raise ValueError naming the argument.
    """
    # Types and the norm arguments first: the op's schema would reject them with a
    # TypeError. (The shape checks run in the op: formatting a dynamic k into a message
    # here would specialise it under torch.compile.)
    _renamed(_ls._check_types, x, weight, bias, index, cache, rows)
    _check_norm(x, weight, norm, norm_weight, norm_bias, eps, head_dim)
    torch.ops.ras_compile.linear_norm_scatter_(x, weight, bias, index, cache, rows, norm, norm_weight, norm_bias,
                                               float(eps), head_dim)
    return cache
