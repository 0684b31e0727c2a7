"""The TMA variant of the linear-scatter kernel (Hopper's tensor-memory accelerator).

Same function as `linear_scatter._linear_scatter_kernel` (project the active rows,
optional per-head norm, store each row at its cache position), with the two GeMM
operands read through tensor descriptors made inside the kernel
(`tl.make_tensor_descriptor`): on sm90 the copy engine moves whole `[BLOCK_M, BLOCK_K]`
/ `[BLOCK_N, BLOCK_K]` tiles into shared memory, without the per-element address and
mask arithmetic of pointer loads, and zero-fills what lies outside the tensor (so no
masks and no wrapped rows). The cache store stays a pointer store: its rows are
scattered, and Hopper's TMA has no row scatter.

Why a second kernel: on an H100 the pointer kernel's GeMM reached 460-565 TFLOP/s where
cuBLAS reached 650-680, which left FLUX.1-dev's width (D 3072) at 1.12x over GeMM +
`index_copy_` against issue 4's 1.15x (benchmarks/results/linear_scatter_nvidia_h100_80gb_hbm3.md).
TMA loads and a persistent schedule are what Triton's own Hopper matmuls use to get
near cuBLAS. **Not yet measured on a GPU**: `variant()` defaults to the pointer kernel
until `benchmarks/bench_linear_scatter.py --variants` has run (docs/kernels.md).

Why descriptors made on the device and not on the host (`TensorDescriptor.from_tensor`):
inside a `triton_op`, torch 2.13's tracing drops host-side descriptor arguments from the
kernel call it records (tests/test_kernels.py shows the graph's arguments), and their
block shapes would be fixed before autotuning. Device-side descriptors need a small
global scratch buffer per launch; Inductor's launcher installs Triton's allocator
itself, and `launch_tma` installs one for the launches Triton makes (direct calls, the
op called eagerly).

Eligibility (`tma_ineligible_reason`): no gather prologue (TMA cannot gather rows on
Hopper), `x` and `weight` contiguous along D_in, every other stride and the storage
offsets 16-byte aligned (the descriptor's rule), a CUDA device of compute capability 9
or more. Anything else runs the pointer kernel, with identical results up to
accumulation order.

Schedule: programs walk the tiles `t = pid, pid + P, pid + 2P, ...` of all batch
elements (grouped order inside each batch element), `P` the grid size. `"tma"`
launches one program per tile (each does one); `"tma_persistent"` launches one per SM:
one wave, no tail, and the flattened loop lets the next tile's loads overlap this
tile's epilogue.
"""
from __future__ import annotations

import functools
import os

import torch

from . import linear_scatter as _ls

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton missing
    triton = tl = None

__all__ = ["VARIANTS", "variant", "tma_ineligible_reason", "device_supports_tma", "num_sms", "tma_kernel_args",
           "launch_tma"]

VARIANTS = ("pointer", "tma", "tma_persistent")
_ENV = "RAS_COMPILE_KV_KERNEL"


def variant() -> str:
    """The kernel CUDA launches use: `$RAS_COMPILE_KV_KERNEL`, default "pointer".

    Read on every launch (the op body runs when a graph is traced, so set it before the
    first compile; a compiled graph keeps the kernel it traced)."""
    value = os.environ.get(_ENV, "pointer").strip().lower() or "pointer"
    if value not in VARIANTS:
        raise ValueError(f"{_ENV}={value!r} is not a kernel variant; use one of {', '.join(VARIANTS)}")
    return value


def _aligned(n_elements, element_size: int) -> bool:
    return (n_elements * element_size) % 16 == 0


def device_supports_tma(device: torch.device) -> bool:
    """Compute capability 9.0 or more (TMA is Hopper's). Interpreter: always."""
    if _ls._INTERPRET:
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``: the persistent grid's size (4 in the interpreter)."""
    if _ls._INTERPRET or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def tma_ineligible_reason(x, weight, rows) -> str | None:
    """Why the TMA kernel cannot run these operands (None: it can). Metadata only."""
    if triton is None or not hasattr(tl, "make_tensor_descriptor"):
        return "this Triton has no tl.make_tensor_descriptor (Triton >= 3.4)"
    if rows is not None:
        return "the gather prologue reads scattered rows, which Hopper's TMA cannot load"
    size = x.element_size()
    if x.stride(2) != 1 or weight.stride(1) != 1:
        return "x and weight must be contiguous along D_in"
    # D_in-sized strides first: a symbolic stride (a dynamic k) is then only read where the
    # static ones passed, and k * D_in * size is a multiple of 16 whenever D_in * size is.
    for name, t, strides in (("x", x, (x.stride(1), x.stride(0))), ("weight", weight, (weight.stride(0),))):
        if not all(_aligned(s, size) for s in strides) or not _aligned(t.storage_offset(), size):
            return f"{name}'s strides and storage offset must be multiples of 16 bytes"
    if not device_supports_tma(x.device):
        return f"{x.device} has no TMA (compute capability 9.0 or more)"
    return None


def tma_configs(dtype: torch.dtype, head_dim: int = 1) -> list:
    """Autotune candidates: the pointer kernel's (Hopper tiles; with a per-head norm, the
    tiles holding whole heads), less, for fp32 operands, BLOCK_K above 32: a TMA box row
    holds at most 128 bytes under 128-byte swizzling. The interpreter: its one config."""
    configs = _ls.norm_configs(head_dim) if head_dim > 1 else (
        [_ls.INTERPRET_CONFIG] if _ls._INTERPRET else list(_ls.HOPPER_CONFIGS))
    if dtype == torch.float32 and not _ls._INTERPRET:
        configs = [c for c in configs if c.kwargs["BLOCK_K"] <= 32]
    return configs


if triton is not None and hasattr(tl, "make_tensor_descriptor"):
    @triton.jit
    def _linear_scatter_tma_kernel(
        x_ptr, w_ptr, bias_ptr, index_ptr, cache_ptr, nw_ptr, nb_ptr,
        M, D_OUT, D_IN, M_BUCKET, BATCH,
        stride_xb, stride_xm, stride_wn,
        stride_bias, stride_ib, stride_im,
        stride_cb, stride_cn, stride_cd,
        stride_nw, stride_nb, eps,
        HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        NORM: tl.constexpr = 0, HEAD_DIM: tl.constexpr = 1,
        HAS_NORM_WEIGHT: tl.constexpr = False, HAS_NORM_BIAS: tl.constexpr = False,
    ):
        # x is [BATCH, M, D_IN] and weight [D_OUT, D_IN], both contiguous along D_IN.
        # Reads past M, D_OUT or D_IN come back as zeros.
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[BATCH, M, D_IN], strides=[stride_xb, stride_xm, 1],
                                           block_shape=[1, BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[D_OUT, D_IN], strides=[stride_wn, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(D_OUT, BLOCK_N)
        tiles_per_batch = num_pid_m * num_pid_n
        num_tiles = tiles_per_batch * BATCH
        num_pid_in_group = GROUP_M * num_pid_n
        k_tiles = tl.cdiv(D_IN, BLOCK_K)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
            pid_b = tile // tiles_per_batch
            pid = tile % tiles_per_batch
            group_id = pid // num_pid_in_group
            first_pid_m = group_id * GROUP_M
            group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
            pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
            pid_n = (pid % num_pid_in_group) // group_size_m
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N

            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for kk in range(0, k_tiles):
                a = x_desc.load([pid_b, off_m, kk * BLOCK_K]).reshape(BLOCK_M, BLOCK_K)
                w = w_desc.load([off_n, kk * BLOCK_K])
                if UPCAST:  # the interpreter's numpy dot has no bfloat16 (see linear_scatter.py)
                    a = a.to(tl.float32)
                    w = w.to(tl.float32)
                if FP32_IEEE:
                    acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, tl.trans(w), acc)

            offs_m = off_m + tl.arange(0, BLOCK_M)
            offs_n = off_n + tl.arange(0, BLOCK_N)
            mask_m = offs_m < M
            mask_n = offs_n < D_OUT
            if HAS_BIAS:
                bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0)
                acc += bias.to(tl.float32)[None, :]
            if NORM != 0:
                # Whole heads per tile (BLOCK_N and D_OUT multiples of HEAD_DIM): the zero
                # columns past D_OUT are whole heads too, and the store drops them.
                acc = _ls._head_norm(acc, nw_ptr, nb_ptr, offs_n, stride_nw, stride_nb, eps,
                                     NORM, HEAD_DIM, HAS_NORM_WEIGHT, HAS_NORM_BIAS, BLOCK_M, BLOCK_N)
            pid_b64 = pid_b.to(tl.int64)
            dst = tl.load(index_ptr + pid_b64 * stride_ib + offs_m * stride_im, mask=mask_m, other=0)
            c_ptrs = (cache_ptr + pid_b64 * stride_cb + dst[:, None] * stride_cn
                      + offs_n[None, :].to(tl.int64) * stride_cd)
            tl.store(c_ptrs, acc.to(cache_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @functools.lru_cache(maxsize=None)
    def _tma_autotuned(dtype: torch.dtype, head_dim: int):
        """One autotuner per operand dtype class and head dim (their candidate lists differ);
        keyed like the pointer kernel's."""
        return triton.autotune(configs=tma_configs(dtype, head_dim), key=["D_OUT", "D_IN", "M_BUCKET"])(
            _linear_scatter_tma_kernel)
else:  # pragma: no cover
    _linear_scatter_tma_kernel = None
    _tma_autotuned = None


def _install_allocator(device: torch.device) -> None:
    """Device-side descriptors live in a global scratch buffer that Triton asks its
    allocator for at launch. Inductor's launcher installs one before each of its
    launches; launches Triton makes itself (a direct call, or the op called eagerly, where
    `wrap_triton` calls the kernel) need one too. This installs a torch allocation on the
    current device of `device`'s type (where Triton launches), and only where no
    allocator is set: one a user or Inductor installed stays."""
    if not hasattr(triton, "set_allocator"):
        return
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # another Triton layout: install ours
        pass
    kind = device.type
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=kind))


def tma_kernel_args(x, weight, bias, index, cache, norm, *, upcast: bool, fp32_ieee: bool) -> tuple[tuple, dict]:
    """The TMA kernel's positional arguments and flags (everything but the tiling)."""
    B, M = index.shape
    D_out, D_in = weight.shape
    epi = _ls.EpilogueArgs.of(bias, norm, x, upcast=upcast, fp32_ieee=fp32_ieee)
    args = (
        x, weight, epi.bias, index, cache, epi.norm_weight, epi.norm_bias,
        M, D_out, D_in, _ls._bucket(M), B,
        x.stride(0), x.stride(1), weight.stride(0),
        epi.stride_bias, index.stride(0), index.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2),
        epi.stride_nw, epi.stride_nb, epi.eps,
    )
    return args, epi.flags


def launch_tma(x, weight, bias, index, cache, *, persistent: bool, fp32_ieee: bool, upcast: bool,
               norm=None, config=None, wrap=None, num_programs=None) -> None:
    """Launch the TMA kernel (operands already validated and `tma_ineligible_reason` None).

    `config`: None (autotune over `tma_configs`), or a triton.Config / dict with
    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M (+ num_warps, num_stages). `persistent`: one
    program per SM (`num_programs` overrides the count) instead of one per tile.
    `wrap`: torch.library.wrap_triton inside the op, None for a direct launch. Both install
    Triton's allocator for the descriptors' scratch (see `_install_allocator`)."""
    B, M = index.shape
    D_out = weight.shape[0]
    args, flags = tma_kernel_args(x, weight, bias, index, cache, norm, upcast=upcast, fp32_ieee=fp32_ieee)
    programs = (num_programs or num_sms(x.device)) if persistent else None

    def grid(meta):
        if programs is not None:
            return (programs,)
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(D_out, meta["BLOCK_N"]) * B,)

    _install_allocator(x.device)  # harmless at trace time; Inductor's launches set their own
    wrap = wrap or (lambda kernel: kernel)
    if config is None:
        head_dim = norm.head_dim if norm is not None else 1
        wrap(_tma_autotuned(torch.float32 if x.dtype == torch.float32 else torch.bfloat16, head_dim))[grid](
            *args, **flags)
        return
    wrap(_linear_scatter_tma_kernel)[grid](*args, **flags, **_ls.config_meta(config))
