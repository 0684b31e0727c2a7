"""Fused "project the active rows, write them into the cache" kernel (stage 4, Lower).

On a sparse step every attention layer computes K and V for the k active tokens only
and writes them into that layer's cache at the active positions:

    cache[b, index[b, i], :] = x[b, i, :] @ weight.T + bias

As `linear` followed by `index_copy_` the k rows make a round trip through memory (the
GeMM writes them, the copy reads them back and writes them again). Inductor cannot fuse
a scatter into the epilogue of its own matmul (pytorch#143130, #142315), so this module
brings its own Triton GeMM whose epilogue stores each output row straight at its cache
position. An optional row-gather prologue (`rows`) reads the A operand as
`x[b, rows[b, i], :]`, so gather + GeMM + scatter can also be one kernel.

Three entry points:

* `linear_scatter_(x, weight, bias, index, cache, rows=None)`: the public function,
  returns `cache`. It calls the custom op.
* `torch.ops.ras_compile.linear_scatter_`: a `torch.library.triton_op` (schema below)
  that is traceable by `torch.compile(fullgraph=True)`. CUDA tensors launch the Triton
  kernel through `torch.library.wrap_triton` (Inductor sees and autotunes the kernel);
  every other device runs the ATen reference (`F.linear` + `scatter_`). The device
  check is what lets the op trace on CPU: fake-tensor tracing runs the op's body, and a
  kernel launch on a CPU tensor would fail there.
* `linear_scatter_triton_(...)`: the raw Triton launcher, without the op. Tests run it
  on CPU tensors under `TRITON_INTERPRET=1`; on a GPU it is the kernel without
  torch.library in between (useful for benchmarks).

Semantics shared by all three (see docs/kernels.md):

* Rows of `cache` not named by `index` are never read or written.
* Duplicate entries in `index`: every duplicate is written, in an unspecified order.
  When the duplicated positions come from identical rows of the A operand (the usual
  case: a bucket of k padded by repeating a valid index together with its row), every
  write carries the same value, so the result is well defined. With different rows the
  winner is unspecified.
* `index` (and `rows`) values are not range-checked: checking would need a
  device-to-host sync on every call. An out-of-range value is an out-of-bounds memory
  access in the kernel (on CPU, ATen raises IndexError).
* `x` must not overlap `cache` in memory (the kernel reads x while it writes cache,
  and the autotuner re-runs the kernel).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

try:  # Triton is optional (Linux-only dependency); the CPU reference path needs none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = [
    "linear_scatter_",
    "linear_scatter_reference_",
    "linear_scatter_triton_",
    "HOPPER_CONFIGS",
    "INTERPRET_CONFIG",
    "triton_available",
    "triton_interpreting",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    """True when Triton is installed, so CUDA tensors can run the fused kernel."""
    return triton is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (`TRITON_INTERPRET=1`).

    Decided once, when this module is imported: `triton.jit` picks interpreter or
    compiler at decoration time, so flipping the variable later changes nothing.
    """
    return _INTERPRET


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- validation

def _need(cond, msg):
    if not cond:
        raise ValueError(f"linear_scatter_: {msg}")


def _check_types(x, weight, bias, index, cache, rows) -> None:
    for name, t in (("x", x), ("weight", weight), ("index", index), ("cache", cache)):
        _need(isinstance(t, torch.Tensor), f"`{name}` must be a Tensor, got {type(t).__name__}")
    for name, t in (("bias", bias), ("rows", rows)):
        _need(t is None or isinstance(t, torch.Tensor),
              f"`{name}` must be a Tensor or None, got {type(t).__name__}")


def _check_inputs(x, weight, bias, index, cache, rows) -> None:
    """Raise ValueError naming the offending argument. Metadata only: works on fake
    tensors, never syncs (index values are not range-checked, see module docstring)."""
    need = _need
    _check_types(x, weight, bias, index, cache, rows)

    need(x.dim() == 3, f"`x` must be 3-D [B, k, D_in] (or [B, M, D_in] with `rows`), got shape {tuple(x.shape)}")
    need(weight.dim() == 2, f"`weight` must be 2-D [D_out, D_in], got shape {tuple(weight.shape)}")
    need(index.dim() == 2, f"`index` must be 2-D [B, k], got shape {tuple(index.shape)}")
    need(cache.dim() == 3, f"`cache` must be 3-D [B, N, D_out], got shape {tuple(cache.shape)}")
    if bias is not None:
        need(bias.dim() == 1, f"`bias` must be 1-D [D_out], got shape {tuple(bias.shape)}")
    if rows is not None:
        need(rows.dim() == 2, f"`rows` must be 2-D [B, k], got shape {tuple(rows.shape)}")

    B, k = index.shape
    D_out, D_in = weight.shape
    need(x.shape[0] == B, f"`x` has batch {x.shape[0]} but `index` has batch {B}")
    need(cache.shape[0] == B, f"`cache` has batch {cache.shape[0]} but `index` has batch {B}")
    if rows is None:
        need(x.shape[1] == k, f"`x` has {x.shape[1]} rows but `index` has {k} entries per batch "
             "(pass `rows` to gather x rows)")
    else:
        need(tuple(rows.shape) == tuple(index.shape),
             f"`rows` must have the shape of `index` {tuple(index.shape)}, got {tuple(rows.shape)}")
    need(x.shape[2] == D_in, f"`x` has D_in={x.shape[2]} but `weight` has D_in={D_in}")
    need(cache.shape[2] == D_out, f"`cache` has D_out={cache.shape[2]} but `weight` has D_out={D_out}")
    if bias is not None:
        need(bias.shape[0] == D_out, f"`bias` has {bias.shape[0]} entries but `weight` has D_out={D_out}")

    need(x.dtype in _SUPPORTED_DTYPES, f"`x` must be float16, bfloat16 or float32, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("cache", cache)):
        if t is not None:
            need(t.dtype == x.dtype, f"`{name}` must have the dtype of `x` ({x.dtype}), got {t.dtype}")
    need(index.dtype == torch.int64, f"`index` must be int64, got {index.dtype}")
    if rows is not None:
        need(rows.dtype == torch.int64, f"`rows` must be int64, got {rows.dtype}")

    for name, t in (("weight", weight), ("bias", bias), ("index", index), ("cache", cache), ("rows", rows)):
        if t is not None:
            need(t.device == x.device, f"`{name}` is on {t.device} but `x` is on {x.device}")


# --------------------------------------------------------------------------- ATen reference

def linear_scatter_reference_(x, weight, bias, index, cache, rows=None):
    """The ATen reference: what the op runs off CUDA. Writes `cache` in place, returns it."""
    _check_inputs(x, weight, bias, index, cache, rows)
    _reference_impl(x, weight, bias, index, cache, rows)
    return cache


def _reference_impl(x, weight, bias, index, cache, rows):
    if rows is not None:
        x = torch.gather(x, 1, rows.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    out = F.linear(x, weight, bias)
    # scatter_ writes only the named rows; duplicates follow scatter_'s rules (one of
    # the writes wins), matching the kernel's contract.
    cache.scatter_(1, index.unsqueeze(-1).expand(-1, -1, cache.shape[2]), out)


# --------------------------------------------------------------------------- Triton kernel

def _config(bm, bn, bk, group_m, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


if triton is not None:
    # Hopper (sm90) candidates, 16-bit operands in mind: the large tiles feed wgmma
    # (num_warps 4/8 = 1/2 warpgroups), the small ones cover small k (a sparse step
    # with few active tokens) and small D_out. BLOCK_K 64 with 3-4 stages keeps the
    # pipeline inside the 228 KB of shared memory at 16 bits; configs that do not fit
    # (fp32 operands) fail to compile and the autotuner drops them. Shapes after the
    # Triton matmul tutorial's CUDA list plus BLOCK_K=64 variants.
    HOPPER_CONFIGS = [
        _config(128, 256, 64, 8, 8, 4),
        _config(256, 128, 64, 8, 8, 3),
        _config(128, 256, 64, 8, 8, 3),
        _config(128, 128, 64, 8, 8, 3),
        _config(128, 128, 64, 8, 4, 4),
        _config(64, 256, 64, 8, 4, 4),
        _config(64, 128, 64, 8, 4, 4),
        _config(128, 64, 64, 8, 4, 4),
        _config(128, 128, 32, 8, 4, 4),
        _config(64, 128, 32, 8, 4, 4),
        _config(64, 64, 32, 8, 4, 5),
        _config(32, 64, 32, 8, 2, 5),
    ]
    # The interpreter runs every program in numpy: one small config, no autotuning
    # (a single config is never benchmarked). 16 is tl.dot's minimum block size.
    INTERPRET_CONFIG = _config(16, 32, 16, 2, 4, 1)

    @triton.jit
    def _head_norm(acc, nw_ptr, nb_ptr, offs_n, stride_nw, stride_nb, eps,
                   NORM: tl.constexpr, HEAD_DIM: tl.constexpr,
                   HAS_NORM_WEIGHT: tl.constexpr, HAS_NORM_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # Per-head norm of an fp32 tile whose BLOCK_N columns are BLOCK_N // HEAD_DIM
        # whole heads: NORM 1 = RMSNorm, 2 = LayerNorm (biased variance), over each
        # head's HEAD_DIM columns, then the optional [HEAD_DIM] affine weight / bias.
        h = tl.reshape(acc, (BLOCK_M, BLOCK_N // HEAD_DIM, HEAD_DIM))
        if NORM == 2:
            h = h - (tl.sum(h, axis=2) / HEAD_DIM)[:, :, None]
        var = tl.sum(h * h, axis=2) / HEAD_DIM
        h = h * tl.rsqrt(var + eps)[:, :, None]
        out = tl.reshape(h, (BLOCK_M, BLOCK_N))
        col = offs_n % HEAD_DIM
        if HAS_NORM_WEIGHT:
            out = out * tl.load(nw_ptr + col * stride_nw).to(tl.float32)[None, :]
        if HAS_NORM_BIAS:
            out = out + tl.load(nb_ptr + col * stride_nb).to(tl.float32)[None, :]
        return out

    @triton.jit
    def _linear_scatter_kernel(
        x_ptr, w_ptr, bias_ptr, rows_ptr, index_ptr, cache_ptr, nw_ptr, nb_ptr,
        M, D_OUT, D_IN, M_BUCKET,
        stride_xb, stride_xm, stride_xk,
        stride_wn, stride_wk,
        stride_bias,
        stride_rb, stride_rm,
        stride_ib, stride_im,
        stride_cb, stride_cn, stride_cd,
        stride_nw, stride_nb, eps,
        HAS_BIAS: tl.constexpr, HAS_ROWS: tl.constexpr,
        UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        NORM: tl.constexpr = 0, HEAD_DIM: tl.constexpr = 1,
        HAS_NORM_WEIGHT: tl.constexpr = False, HAS_NORM_BIAS: tl.constexpr = False,
    ):
        # One program computes a BLOCK_M x BLOCK_N tile of one batch element's output.
        # Axis 0 walks tiles in grouped order (GROUP_M row-tiles share the weight
        # column-tiles while they are in L2), axis 1 is the batch.
        pid = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(D_OUT, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < D_OUT
        # Operand loads are unmasked along M and N: out-of-range rows / columns of a
        # ragged edge tile read a valid row / column instead (wrapped), and the masked
        # store drops them. Unmasked, contiguous loads keep the software pipeline and
        # the vectorised copies that masks along M / N would break up.
        offs_mw = offs_m % M
        offs_nw = offs_n % D_OUT

        # Prologue: which x rows feed this tile (int64 offsets: a big cache or x can
        # exceed 2**31 elements).
        if HAS_ROWS:
            src = tl.load(rows_ptr + pid_b * stride_rb + offs_mw * stride_rm)
        else:
            src = offs_mw.to(tl.int64)
        a_ptrs = x_ptr + pid_b * stride_xb + src[:, None] * stride_xm + offs_k[None, :] * stride_xk
        # weight is [D_out, D_in]; read it as the [D_in, D_out] B operand.
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_nw[None, :].to(tl.int64) * stride_wn

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, tl.cdiv(D_IN, BLOCK_K)):
            k_left = D_IN - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if UPCAST:
                # The interpreter's dot is numpy matmul, and numpy has no bfloat16
                # (Triton stores it as uint16 there): compute in fp32. Exact for the
                # products, like tensor cores.
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            if FP32_IEEE:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
            a_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

        # Epilogue: bias in fp32, one rounding to the cache dtype, rows stored at their
        # cache positions.
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        if NORM != 0:
            # Per-head norm (linear_norm_scatter_): BLOCK_N is a multiple of HEAD_DIM
            # and D_OUT of HEAD_DIM, so every tile holds whole heads (the wrapped
            # columns of a ragged edge tile are whole heads too; the store drops them).
            acc = _head_norm(acc, nw_ptr, nb_ptr, offs_n, stride_nw, stride_nb, eps,
                             NORM, HEAD_DIM, HAS_NORM_WEIGHT, HAS_NORM_BIAS, BLOCK_M, BLOCK_N)
        dst = tl.load(index_ptr + pid_b * stride_ib + offs_mw * stride_im)
        c_ptrs = (cache_ptr + pid_b * stride_cb + dst[:, None] * stride_cn
                  + offs_n[None, :].to(tl.int64) * stride_cd)
        tl.store(c_ptrs, acc.to(cache_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    # Keyed on the GeMM's fixed dimensions and on the row count rounded up to a power of
    # two (M_BUCKET, unused by the kernel body): a few hundred active rows want smaller
    # tiles than a few thousand (enough programs to fill the SMs), while a schedule whose
    # k changes every step re-tunes only once per power of two. Triton adds the tensors'
    # dtypes to the key. Re-running the kernel while benchmarking is harmless: it is
    # idempotent (it only writes cache rows computed from x, which it never writes).
    _linear_scatter_autotuned = triton.autotune(
        configs=[INTERPRET_CONFIG] if _INTERPRET else HOPPER_CONFIGS,
        key=["D_OUT", "D_IN", "M_BUCKET"],
    )(_linear_scatter_kernel)
else:  # pragma: no cover
    HOPPER_CONFIGS = []
    INTERPRET_CONFIG = None
    _linear_scatter_kernel = _linear_scatter_autotuned = _head_norm = None


# --------------------------------------------------------------------------- per-head norm epilogue

NORM_CODES = {"rms": 1, "layer": 2}  # the kernel's NORM constexpr (0: no norm)
MAX_NORM_HEAD_DIM = 256  # the widest tile of HOPPER_CONFIGS: one head must fit in a tile


@dataclasses.dataclass(frozen=True)
class HeadNorm:
    """The per-head norm epilogue's arguments: `kind` "rms" or "layer" over each head's
    `head_dim` contiguous output columns, optional `[head_dim]` affine `weight` / `bias`."""

    kind: str
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float
    head_dim: int


def norm_configs(head_dim: int) -> list:
    """Autotune candidates for the norm epilogue at `head_dim`: the configs whose tile
    holds whole heads (BLOCK_N a multiple of `head_dim`). The interpreter's single
    config has BLOCK_N = max(head_dim, 16) (16: tl.dot's minimum block size)."""
    if _INTERPRET:
        return [_config(16, max(head_dim, 16), 16, 2, 4, 1)]
    return [c for c in HOPPER_CONFIGS if c.kwargs["BLOCK_N"] % head_dim == 0]


@functools.lru_cache(maxsize=None)
def _norm_autotuned(head_dim: int):
    """One autotuner per head dim, over `norm_configs(head_dim)` (same key as the plain kernel)."""
    return triton.autotune(configs=norm_configs(head_dim), key=["D_OUT", "D_IN", "M_BUCKET"])(
        _linear_scatter_kernel)


def _bucket(m: int) -> int:
    """``m`` rounded up to a power of two (at least 64): the autotuner's row-count key.
    A symbolic ``m`` (a dynamic row count under torch.compile) gets one shared key, so
    reading it never adds a guard."""
    if not isinstance(m, int):
        return 0
    return max(64, 1 << (m - 1).bit_length())


def _choose_variant(x, weight, rows, variant):
    """The kernel to launch: `variant` if given (ValueError when these operands cannot
    use it), else `linear_scatter_tma.variant()` ($RAS_COMPILE_KV_KERNEL), falling back
    to the pointer kernel where the TMA kernel is not eligible (gather prologue,
    unaligned strides, no sm90): same results, so the fallback is silent."""
    from . import linear_scatter_tma as tma

    explicit = variant is not None
    variant = tma.variant() if variant is None else variant
    if variant not in tma.VARIANTS:
        raise ValueError(f"linear_scatter_: unknown kernel variant {variant!r}; use one of {', '.join(tma.VARIANTS)}")
    if variant == "pointer":
        return variant
    reason = tma.tma_ineligible_reason(x, weight, rows)
    if reason is None:
        return variant
    if explicit:
        raise ValueError(f"linear_scatter_: the {variant!r} kernel cannot run these operands: {reason}")
    return "pointer"


def _launch(x, weight, bias, index, cache, rows, *, config=None, wrap=None, norm=None, variant=None):
    """Launch the kernel. `wrap` is torch.library.wrap_triton inside the op (so that
    torch.compile sees the kernel), identity otherwise. `config`: a triton.Config or a
    dict of BLOCK_M/BLOCK_N/BLOCK_K/GROUP_M (+ num_warps, num_stages) to bypass
    autotuning. `norm`: a `HeadNorm` for the per-head norm epilogue
    (linear_norm_scatter_), None for the plain projection. `variant`: "pointer",
    "tma" or "tma_persistent" (see `_choose_variant`; None: the configured default)."""
    if triton is None:
        raise RuntimeError("linear_scatter_: Triton is not installed; only the CPU reference path is available")
    B, M = index.shape
    D_out = weight.shape[0]
    if B == 0 or M == 0 or D_out == 0:
        return
    precision = precision_flags(x.dtype)
    variant = _choose_variant(x, weight, rows, variant)
    if variant != "pointer":
        from .linear_scatter_tma import launch_tma

        launch_tma(x, weight, bias, index, cache, persistent=variant == "tma_persistent", norm=norm, config=config,
                   wrap=wrap, **precision)
        return
    args, flags = pointer_kernel_args(x, weight, bias, index, cache, rows, norm, **precision)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(D_out, meta["BLOCK_N"]), B)

    wrap = wrap or (lambda kernel: kernel)
    if config is None:
        tuned = _linear_scatter_autotuned if norm is None else _norm_autotuned(norm.head_dim)
        wrap(tuned)[grid](*args, **flags)
        return
    wrap(_linear_scatter_kernel)[grid](*args, **flags, **config_meta(config))


def precision_flags(dtype: torch.dtype) -> dict:
    """The kernels' UPCAST / FP32_IEEE flags as keyword arguments (`upcast`, `fp32_ieee`):
    fp32 operands follow PyTorch's own matmul setting (IEEE unless TF32 is allowed), so the
    fused op matches F.linear on the same device; the interpreter computes 16-bit tiles in
    fp32 (numpy has no bfloat16) and everything in plain fp32."""
    if _INTERPRET:
        return dict(upcast=dtype != torch.float32, fp32_ieee=True)
    return dict(upcast=False, fp32_ieee=dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)


def config_meta(config) -> dict:
    """A pinned configuration (a triton.Config, or a dict of BLOCK_M/BLOCK_N/BLOCK_K/GROUP_M
    with optional num_warps / num_stages) as launch keyword arguments."""
    if isinstance(config, triton.Config):
        return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    return dict(config)


@dataclasses.dataclass(frozen=True)
class EpilogueArgs:
    """The epilogue's operands as both kernels take them: the bias and the norm's affine
    tensors (`placeholder` where absent, never read then), their strides (0 where absent),
    eps, and the epilogue's flags."""

    bias: torch.Tensor
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    stride_bias: int
    stride_nw: int
    stride_nb: int
    eps: float
    flags: dict

    @classmethod
    def of(cls, bias, norm, placeholder: torch.Tensor, *, upcast: bool, fp32_ieee: bool) -> "EpilogueArgs":
        nw = norm.weight if norm is not None else None
        nb = norm.bias if norm is not None else None
        flags = dict(HAS_BIAS=bias is not None, UPCAST=upcast, FP32_IEEE=fp32_ieee,
                     NORM=NORM_CODES[norm.kind] if norm is not None else 0,
                     HEAD_DIM=norm.head_dim if norm is not None else 1,
                     HAS_NORM_WEIGHT=nw is not None, HAS_NORM_BIAS=nb is not None)
        pick = lambda t: placeholder if t is None else t  # noqa: E731
        stride = lambda t: 0 if t is None else t.stride(0)  # noqa: E731
        return cls(pick(bias), pick(nw), pick(nb), stride(bias), stride(nw), stride(nb),
                   float(norm.eps) if norm is not None else 0.0, flags)


def pointer_kernel_args(x, weight, bias, index, cache, rows, norm, *, upcast: bool, fp32_ieee: bool
                        ) -> tuple[tuple, dict]:
    """The pointer kernel's positional arguments and flags (everything but the tiling)."""
    B, M = index.shape
    D_out, D_in = weight.shape
    epi = EpilogueArgs.of(bias, norm, x, upcast=upcast, fp32_ieee=fp32_ieee)
    args = (
        x, weight, epi.bias, rows if rows is not None else index, index, cache, epi.norm_weight, epi.norm_bias,
        M, D_out, D_in, _bucket(M),
        x.stride(0), x.stride(1), x.stride(2),
        weight.stride(0), weight.stride(1),
        epi.stride_bias,
        rows.stride(0) if rows is not None else 0, rows.stride(1) if rows is not None else 0,
        index.stride(0), index.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2),
        epi.stride_nw, epi.stride_nb, epi.eps,
    )
    return args, dict(epi.flags, HAS_ROWS=rows is not None)


def linear_scatter_triton_(x, weight, bias, index, cache, rows=None, *, config=None, variant=None):
    """Run the Triton kernel directly (no torch.library op): CUDA tensors, or CPU tensors
    when `TRITON_INTERPRET=1` was set before this module was imported. `config` pins one
    block configuration instead of autotuning (tests use it to cover several tilings).
    `variant` ("pointer", "tma", "tma_persistent") picks the kernel; None: the
    configured default (docs/kernels.md). Writes `cache` in place and returns it."""
    _check_inputs(x, weight, bias, index, cache, rows)
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError(
            f"linear_scatter_triton_: tensors are on {x.device}; the Triton kernel needs CUDA tensors, "
            "or TRITON_INTERPRET=1 set before ras_compile.kernels is imported (CPU interpreter)"
        )
    _launch(x, weight, bias, index, cache, rows, config=config, variant=variant)
    return cache


# --------------------------------------------------------------------------- custom op

def _op_body(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], index: torch.Tensor,
             cache: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
    _check_inputs(x, weight, bias, index, cache, rows)
    if cache.device.type == "cuda" and triton is not None:
        _launch(x, weight, bias, index, cache, rows, wrap=torch.library.wrap_triton)
    else:
        _reference_impl(x, weight, bias, index, cache, rows)


if hasattr(torch.library, "triton_op"):
    _linear_scatter_op = torch.library.triton_op("ras_compile::linear_scatter_", mutates_args={"cache"})(_op_body)
else:  # pragma: no cover - torch < 2.6: opaque custom op; the kernel runs, Inductor cannot see it
    def _opaque_body(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], index: torch.Tensor,
                     cache: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
        _check_inputs(x, weight, bias, index, cache, rows)
        if cache.device.type == "cuda" and triton is not None:
            _launch(x, weight, bias, index, cache, rows)
        else:
            _reference_impl(x, weight, bias, index, cache, rows)

    _linear_scatter_op = torch.library.custom_op("ras_compile::linear_scatter_", mutates_args={"cache"})(_opaque_body)

    @_linear_scatter_op.register_fake
    def _(x, weight, bias, index, cache, rows=None):
        _check_inputs(x, weight, bias, index, cache, rows)


def linear_scatter_(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], index: torch.Tensor,
                    cache: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`cache[b, index[b, i], :] = x[b, src(b, i), :] @ weight.T + bias`, in place; returns `cache`.

    Args:
        x: `[B, k, D_in]`, or `[B, M, D_in]` (any M) when `rows` is given.
        weight: `[D_out, D_in]`, the dtype of `x`.
        bias: `[D_out]` or None, the dtype of `x`.
        index: `[B, k]` int64, the cache row each output row is written to.
        cache: `[B, N, D_out]`, the dtype of `x`; only rows named by `index` change.
        rows: optional `[B, k]` int64 gather prologue: output row i reads
            `x[b, rows[b, i], :]` (src(b, i) = rows[b, i]) instead of `x[b, i, :]`.

    fp16 / bf16 / fp32, accumulation in fp32, one rounding at the end. Duplicate
    `index` entries: see the module docstring (identical source rows -> well defined).
    Index values are not range-checked (no device sync). Inputs are validated with
    ValueErrors naming the argument. Any strides are accepted.
    """
    # Types first: the op's schema would reject a non-tensor with a TypeError before the
    # op body (which checks the rest) runs.
    _check_types(x, weight, bias, index, cache, rows)
    torch.ops.ras_compile.linear_scatter_(x, weight, bias, index, cache, rows)
    return cache
