"""Tests for the fused GeMM + cache-scatter op (`ras_compile.kernels.linear_scatter_`).

Two processes:

* pytest (this process): the op's ATen path on CPU against an fp32 reference, the op
  inside `torch.compile(fullgraph=True)`, the untouched-rows and duplicate-index
  properties, input validation, and (only where CUDA exists) the kernel on the GPU.
* the Triton interpreter: `test_triton_kernel_in_interpreter` runs this file as a
  script, `python tests/test_kernels.py --interpret`, with `TRITON_INTERPRET=1` in a
  fresh process. The variable must be set before `@triton.jit` decorates the kernel,
  and another test module may have imported the kernels first in this process, hence
  the subprocess. Run that command by hand to debug the kernel on CPU.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ras_compile.kernels as kernels
from interpreter import run_checks, run_in_interpreter
from op_checks import (assert_compiled_matches_eager, assert_dynamic_k_compiles_once,
                       assert_one_graph_without_breaks, recorded_kernel_calls, traced_targets)
from ras_compile.kernels import linear_scatter_, linear_scatter_reference_

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Relative/absolute tolerances against an fp32 reference rounded once to the dtype: the
# kernel also rounds once, so the two differ by accumulation order (fp32) plus at most
# an ulp or two of the output dtype.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Block configurations the interpreter checks draw from: several tiles per dimension
# (masks on every edge, grouped ordering with ragged groups) and one tile for all.
INTERPRET_CONFIGS = [
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2),
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=3),
    dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=1),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    None,  # the default path (the autotuner with the interpreter's single config)
]


# --------------------------------------------------------------------------- cases

@dataclass
class Case:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    index: torch.Tensor
    cache: torch.Tensor
    rows: torch.Tensor | None
    pattern: str

    @property
    def args(self):
        return self.x, self.weight, self.bias, self.index, self.cache, self.rows

    def source_rows(self) -> torch.Tensor:
        """The A operand as the kernel reads it: [B, k, D_in]."""
        if self.rows is None:
            return self.x
        return torch.gather(self.x, 1, self.rows.unsqueeze(-1).expand(-1, -1, self.x.shape[2]))

    def expected(self) -> torch.Tensor:
        """Reference result: fp32 GeMM, one rounding, rows written in index order."""
        out = F.linear(self.source_rows().float(), self.weight.float(),
                       None if self.bias is None else self.bias.float()).to(self.cache.dtype)
        want = self.cache.clone()
        for b in range(self.index.shape[0]):
            want[b, self.index[b]] = out[b]
        return want


def _index_rows(g: torch.Generator, N: int, k: int, pattern: str, n_valid: int) -> torch.Tensor:
    if pattern == "padded":
        # A bucket of k: n_valid distinct positions, padded by repeating the last one.
        valid = torch.randperm(N, generator=g)[:n_valid]
        return torch.cat([valid, valid[-1:].expand(k - n_valid)])
    perm = torch.randperm(N, generator=g)[:k]
    return perm.sort().values if pattern == "sorted" else perm


@st.composite
def cases(draw, dtypes=DTYPES, max_n: int = 70, max_d: int = 80, d_in_multiple: int = 1,
          gather: bool | None = None) -> Case:
    """``d_in_multiple`` 8 keeps x's and weight's rows 16-byte aligned at every dtype (what
    the TMA kernels need); ``gather`` None draws the gather prologue or not."""
    dtype = draw(st.sampled_from(dtypes))
    B = draw(st.integers(1, 3))
    N = draw(st.integers(1, max_n))
    k = draw(st.integers(1, N))
    D_in = draw(st.integers(1, max_d // d_in_multiple)) * d_in_multiple
    D_out = draw(st.integers(1, max_d))
    pattern = draw(st.sampled_from(["sorted", "unsorted", "padded"]))
    n_valid = draw(st.integers(1, k)) if pattern == "padded" else k
    has_bias = draw(st.booleans())
    gather = draw(st.booleans()) if gather is None else gather
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    index = torch.stack([_index_rows(g, N, k, pattern, n_valid) for _ in range(B)])
    if gather:
        M = draw(st.integers(1, max_n))
        rows = torch.randint(0, M, (B, k), generator=g)
        rows[:, n_valid:] = rows[:, n_valid - 1: n_valid]  # padding repeats the source row too
        x = torch.randn(B, M, D_in, generator=g)
    else:
        rows = None
        x = torch.randn(B, k, D_in, generator=g)
        x[:, n_valid:] = x[:, n_valid - 1: n_valid]  # identical rows behind duplicate indices
    weight = torch.randn(D_out, D_in, generator=g) / max(D_in, 1) ** 0.5
    bias = torch.randn(D_out, generator=g) if has_bias else None
    cache = torch.randn(B, N, D_out, generator=g)
    to = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return Case(to(x), to(weight), to(bias), index, to(cache), rows, pattern)


def check_result(case: Case, got: torch.Tensor) -> None:
    """Active rows match the reference; every other cache row is bitwise unchanged."""
    want = case.expected()
    touched = torch.zeros(case.cache.shape[:2], dtype=torch.bool)
    touched.scatter_(1, case.index, True)
    assert torch.equal(got[~touched], case.cache[~touched]), "rows not in index were modified"
    rtol, atol = TOL[case.cache.dtype]
    torch.testing.assert_close(got[touched].float(), want[touched].float(), rtol=rtol, atol=atol)


def _clone(case: Case) -> Case:
    return Case(*(None if t is None else t.clone() for t in case.args), case.pattern)


# --------------------------------------------------------------------------- interpreter checks
# Run by `python tests/test_kernels.py --interpret` under TRITON_INTERPRET=1. The names
# do not start with test_: pytest must not run them in its own (compiled-Triton) process.

@settings(max_examples=int(os.environ.get("RAS_KERNEL_EXAMPLES", "100")), **SETTINGS)
@given(case=cases(), config=st.sampled_from(INTERPRET_CONFIGS))
def interpreted_kernel_matches_reference(case: Case, config):
    got = _clone(case)
    out = kernels.linear_scatter_triton_(*got.args, config=config)
    assert out is got.cache
    check_result(case, got.cache)


@settings(max_examples=int(os.environ.get("RAS_KERNEL_EXAMPLES", "100")) // 2, **SETTINGS)
@given(case=cases(d_in_multiple=8, gather=False), config=st.sampled_from(INTERPRET_CONFIGS),
       variant=st.sampled_from(["tma", "tma_persistent"]))
def interpreted_tma_kernels_match_reference(case: Case, config, variant: str):
    """The TMA kernels (descriptor loads; one program per tile, or a persistent grid of 4
    programs walking several tiles each) on aligned operands without the gather."""
    got = _clone(case)
    out = kernels.linear_scatter_triton_(*got.args, config=config, variant=variant)
    assert out is got.cache
    check_result(case, got.cache)


def interpreted_tma_refusals_and_fallback():
    """Asked for by name, the TMA kernel refuses what it cannot load and says why; chosen
    through $RAS_COMPILE_KV_KERNEL it falls back to the pointer kernel (same result)."""
    g = torch.Generator().manual_seed(3)
    B, k, N, D_out = 2, 7, 20, 24
    index = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B)])
    bad = {
        "gather": Case(torch.randn(B, 11, 16, generator=g), torch.randn(D_out, 16, generator=g), None, index,
                       torch.randn(B, N, D_out, generator=g), torch.randint(0, 11, (B, k), generator=g), "unsorted"),
        "16 bytes": Case(torch.randn(B, k, 5, generator=g), torch.randn(D_out, 5, generator=g), None, index,
                         torch.randn(B, N, D_out, generator=g), None, "unsorted"),
        "contiguous": Case(torch.randn(B, 16, k, generator=g).transpose(1, 2), torch.randn(D_out, 16, generator=g),
                           None, index, torch.randn(B, N, D_out, generator=g), None, "unsorted"),
    }
    for needle, case in bad.items():
        for variant in ("tma", "tma_persistent"):
            try:
                kernels.linear_scatter_triton_(*_clone(case).args, variant=variant)
            except ValueError as e:
                assert needle in str(e) and variant in str(e), str(e)
            else:
                raise AssertionError(f"{variant} accepted operands it cannot load ({needle})")
        previous = os.environ.get("RAS_COMPILE_KV_KERNEL")
        os.environ["RAS_COMPILE_KV_KERNEL"] = "tma_persistent"
        try:
            got = _clone(case)
            kernels.linear_scatter_triton_(*got.args)
        finally:
            if previous is None:
                del os.environ["RAS_COMPILE_KV_KERNEL"]
            else:
                os.environ["RAS_COMPILE_KV_KERNEL"] = previous
        check_result(case, got.cache)


def interpreted_duplicates_write_identical_values():
    """Identical source rows give the same output wherever they sit in the tiles, so a
    padded bucket's duplicate writes all carry the same value, in every kernel variant.
    Up to accumulation-order noise here: the interpreter's dot is numpy's BLAS, whose
    fp32 sgemm takes row-dependent code paths (measured: differences of a few fp32 ulps
    of the largest output). On a GPU every row goes through the same
    instruction sequence; `test_duplicates_bitwise_on_cuda` checks it is bitwise."""
    g = torch.Generator().manual_seed(0)
    for dtype, variant in [(d, v) for d in DTYPES for v in ("pointer", "tma", "tma_persistent")]:
        for config in INTERPRET_CONFIGS[:3]:
            B, k, N, D_in, D_out = 2, 40, 50, 40, 45
            x = torch.randn(B, k, D_in, generator=g).to(dtype)
            x[:, 1::3] = x[:, :1]  # row 0 repeated at positions in several tiles
            w = torch.randn(D_out, D_in, generator=g).to(dtype)
            bias = torch.randn(D_out, generator=g).to(dtype)
            index = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B)])
            cache = torch.zeros(B, N, D_out, dtype=dtype)
            kernels.linear_scatter_triton_(x, w, bias, index, cache, config=config, variant=variant)
            out = cache.gather(1, index.unsqueeze(-1).expand(-1, -1, D_out))
            eps = torch.finfo(dtype).eps  # accumulation-order noise, relative to the largest output
            torch.testing.assert_close(out[:, 1::3], out[:, :1].expand_as(out[:, 1::3]), rtol=eps,
                                       atol=4 * eps * out.abs().max().item(),
                                       msg=lambda m: f"{dtype} {variant} {config}: {m}")


def interpreted_strided_inputs():
    """Non-contiguous x, weight, bias, index, rows and cache (the kernel takes any strides)."""
    g = torch.Generator().manual_seed(1)
    B, k, N, D_in, D_out = 2, 19, 33, 24, 40
    w = torch.randn(D_in, D_out, generator=g).t()
    index = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B)]).t().contiguous().t()
    bias = torch.randn(3 * D_out, generator=g)[::3]
    M = 23
    x = torch.randn(B, D_in, M, generator=g).transpose(1, 2)
    rows = torch.randint(0, M, (k, B), generator=g).t()
    big = torch.randn(B, N, 2 * D_out, generator=g)
    before = big.clone()
    case = Case(x, w, bias, index, big[:, :, ::2], rows, "unsorted")
    want = case.expected()
    kernels.linear_scatter_triton_(*case.args)
    torch.testing.assert_close(case.cache, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(big[:, :, 1::2], before[:, :, 1::2]), "wrote between the strided cache's columns"


def interpreted_edge_sizes():
    """k = 0 and D_in = 0 (bias only, or zeros) do what the reference does."""
    B, N, D_out = 2, 5, 3
    cache = torch.randn(B, N, D_out)
    before = cache.clone()
    kernels.linear_scatter_triton_(torch.randn(B, 0, 4), torch.randn(D_out, 4), None,
                                   torch.zeros(B, 0, dtype=torch.long), cache)
    assert torch.equal(cache, before)
    bias = torch.randn(D_out)
    index = torch.tensor([[4, 1], [0, 2]])
    kernels.linear_scatter_triton_(torch.randn(B, 2, 0), torch.randn(D_out, 0), bias, index, cache)
    want = before.clone()
    want[0, [4, 1]] = bias
    want[1, [0, 2]] = bias
    assert torch.equal(cache, want)


def run_interpreter_checks() -> int:
    return run_checks((interpreted_edge_sizes, interpreted_strided_inputs,
                       interpreted_duplicates_write_identical_values, interpreted_tma_refusals_and_fallback,
                       interpreted_kernel_matches_reference, interpreted_tma_kernels_match_reference))


def test_triton_kernel_in_interpreter():
    run_in_interpreter(__file__)


# --------------------------------------------------------------------------- ATen path (CPU op)

@settings(max_examples=60, **SETTINGS)
@given(case=cases())
def test_op_on_cpu_matches_reference(case: Case):
    for impl in (linear_scatter_, linear_scatter_reference_):
        got = _clone(case)
        out = impl(*got.args)
        assert out is got.cache
        check_result(case, got.cache)


def test_rows_not_in_index_are_untouched():
    g = torch.Generator().manual_seed(0)
    cache = torch.full((2, 10, 6), float("nan"))
    index = torch.tensor([[7, 2, 5], [0, 9, 3]])
    linear_scatter_(torch.randn(2, 3, 4, generator=g), torch.randn(6, 4, generator=g), None, index, cache)
    written = torch.zeros(2, 10, dtype=torch.bool).scatter_(1, index, True)
    assert not cache[written].isnan().any()
    assert cache[~written].isnan().all()


def test_padded_duplicates_give_the_unpadded_result():
    """A bucket padded by repeating a valid index (and its x row) writes what the
    unpadded call writes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, generator=g)
    w, b = torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
    index = torch.tensor([[4, 0, 6], [1, 2, 3]])
    cache = torch.randn(2, 7, 5, generator=g)
    want = linear_scatter_(x, w, b, index, cache.clone())
    pad = 4
    x_pad = torch.cat([x, x[:, -1:].expand(-1, pad, -1)], 1)
    index_pad = torch.cat([index, index[:, -1:].expand(-1, pad)], 1)
    got = linear_scatter_(x_pad, w, b, index_pad, cache.clone())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # The same with the gather prologue: rows padded with the source row of the last entry.
    rows = torch.tensor([[2, 0, 1], [1, 1, 0]])
    want = linear_scatter_(x, w, b, index, cache.clone(), rows=rows)
    rows_pad = torch.cat([rows, rows[:, -1:].expand(-1, pad)], 1)
    got = linear_scatter_(x, w, b, index_pad, cache.clone(), rows=rows_pad)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_gather_prologue_reads_the_named_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 4, generator=g)
    w = torch.randn(3, 4, generator=g)
    rows, index = torch.tensor([[5, 0, 5]]), torch.tensor([[1, 3, 2]])
    cache = linear_scatter_(x, w, None, index, torch.zeros(1, 4, 3), rows=rows)
    torch.testing.assert_close(cache[0, 1], x[0, 5] @ w.T)
    torch.testing.assert_close(cache[0, 3], x[0, 0] @ w.T)
    torch.testing.assert_close(cache[0, 2], x[0, 5] @ w.T)
    assert torch.equal(cache[0, 0], torch.zeros(3))


# --------------------------------------------------------------------------- validation

def _good(**over):
    args = dict(x=torch.randn(2, 3, 4), weight=torch.randn(5, 4), bias=torch.randn(5),
                index=torch.tensor([[0, 1, 2], [3, 4, 5]]), cache=torch.zeros(2, 6, 5), rows=None)
    args.update(over)
    return args


BAD_INPUTS = {
    "x-rank": (dict(x=torch.randn(3, 4)), "`x`"),
    "x-rows": (dict(x=torch.randn(2, 4, 4)), "`x`"),
    "x-batch": (dict(x=torch.randn(1, 3, 4)), "`x`"),
    "x-din": (dict(x=torch.randn(2, 3, 7)), "`x`"),
    "x-dtype": (dict(x=torch.randn(2, 3, 4).double()), "`x`"),
    "weight-rank": (dict(weight=torch.randn(5, 4, 1)), "`weight`"),
    "weight-dtype": (dict(weight=torch.randn(5, 4).half()), "`weight`"),
    "bias-shape": (dict(bias=torch.randn(4)), "`bias`"),
    "bias-dtype": (dict(bias=torch.randn(5).bfloat16()), "`bias`"),
    "index-dtype": (dict(index=torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)), "`index`"),
    "index-rank": (dict(index=torch.tensor([0, 1, 2])), "`index`"),
    "index-type": (dict(index=[[0, 1, 2], [3, 4, 5]]), "`index`"),
    "cache-dout": (dict(cache=torch.zeros(2, 6, 4)), "`cache`"),
    "cache-batch": (dict(cache=torch.zeros(3, 6, 5)), "`cache`"),
    "cache-dtype": (dict(cache=torch.zeros(2, 6, 5).half()), "`cache`"),
    "rows-shape": (dict(rows=torch.tensor([[0, 1], [0, 1]])), "`rows`"),
    "rows-dtype": (dict(rows=torch.tensor([[0, 1, 2], [0, 1, 2]], dtype=torch.int32)), "`rows`"),
    "device": (dict(cache=torch.zeros(2, 6, 5, device="meta")), "`cache`"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise_value_error_naming_the_argument(name):
    over, arg = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=arg):
        linear_scatter_(**_good(**over))
    with pytest.raises(ValueError, match=arg):
        kernels.linear_scatter_triton_(**_good(**over))


def test_triton_launcher_refuses_cpu_tensors_outside_the_interpreter():
    if kernels.triton_interpreting():
        pytest.skip("this process runs the interpreter")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.linear_scatter_triton_(**_good())


# --------------------------------------------------------------------------- torch.compile

def _cache_update(x, w, b, index, cache, rows):
    h = torch.tanh(x)  # something before and after the op, so the op sits inside a graph
    torch.ops.ras_compile.linear_scatter_(h, w, b, index, cache, rows)
    return cache * 2 + 1


def _compile_inputs(seed=0, k=5, gather=False, bias=True):
    g = torch.Generator().manual_seed(seed)
    B, N, D_in, D_out = 2, 12, 16, 24
    M = 9 if gather else k
    return dict(x=torch.randn(B, M, D_in, generator=g), w=torch.randn(D_out, D_in, generator=g),
                b=torch.randn(D_out, generator=g) if bias else None,
                index=torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B)]),
                cache=torch.randn(B, N, D_out, generator=g),
                rows=torch.randint(0, M, (B, k), generator=g) if gather else None)


@pytest.mark.parametrize("backend,gather,bias", [("inductor", True, True), ("aot_eager", False, False),
                                                 ("aot_eager", True, True)])
def test_op_in_fullgraph_compile_matches_eager(backend, gather, bias):
    assert_compiled_matches_eager(_cache_update, _compile_inputs(gather=gather, bias=bias), backend)


def test_op_compiles_without_graph_breaks():
    assert_one_graph_without_breaks(_cache_update, _compile_inputs())


def test_public_function_and_dynamic_k_under_compile():
    """The public wrapper (returns cache) traces too, and a dynamic k compiles once."""
    def f(x, w, b, index, cache, rows):
        return linear_scatter_(x, w, b, index, cache, rows).sum(-1)

    assert_dynamic_k_compiles_once(f, _compile_inputs)


def test_cuda_branch_traces_to_the_triton_kernel_without_a_gpu():
    """With fake CUDA tensors (no GPU needed), AOTAutograd's functionalization
    decomposes the op into the Triton kernel call that Inductor would compile, and the
    CPU ATen ops never appear: the device branch takes the kernel path."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 9, 16, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(24, 16, device="cuda", dtype=torch.bfloat16)
        b = torch.empty(24, device="cuda", dtype=torch.bfloat16)
        index = torch.empty(2, 5, device="cuda", dtype=torch.long)
        rows = torch.empty(2, 5, device="cuda", dtype=torch.long)
        cache = torch.empty(2, 12, 24, device="cuda", dtype=torch.bfloat16)
        torch.ops.ras_compile.linear_scatter_(x, w, b, index, cache, rows)  # the fake kernel runs

    def f(x, w, b, index, cache, rows):
        torch.ops.ras_compile.linear_scatter_(x, w, b, index, cache, rows)
        return cache + 1

    targets = traced_targets(f, x, w, b, index, cache, rows)
    assert any("triton_kernel_wrapper" in t for t in targets), targets
    assert not any("scatter" in t or "addmm" in t or "linear" in t for t in targets), targets


def _fake_cuda_operands(d_in: int = 16):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return dict(x=torch.empty(2, 9, d_in, device="cuda", dtype=torch.bfloat16),
                    w=torch.empty(24, d_in, device="cuda", dtype=torch.bfloat16),
                    b=torch.empty(24, device="cuda", dtype=torch.bfloat16),
                    index=torch.empty(2, 9, device="cuda", dtype=torch.long),
                    cache=torch.empty(2, 12, 24, device="cuda", dtype=torch.bfloat16))


@pytest.mark.parametrize("variant", ["pointer", "tma", "tma_persistent"])
def test_every_kernel_variant_is_recorded_with_its_operands_and_writes_only_the_cache(variant, monkeypatch):
    """Under torch.compile for an sm90 GPU (faked: no GPU here), each variant's kernel call
    carries x and weight (a host-side TMA descriptor would be dropped from the recorded call,
    which is why the TMA kernels make theirs on the device), and torch's analysis of the
    kernel's Triton IR finds that it writes the cache alone: no defensive copies of x or
    the weight in the compiled graph."""
    import ras_compile.kernels.linear_scatter_tma as tma

    monkeypatch.setenv("RAS_COMPILE_KV_KERNEL", variant)
    monkeypatch.setattr(tma, "device_supports_tma", lambda device: True)
    monkeypatch.setattr(tma, "num_sms", lambda device: 132)
    ops = _fake_cuda_operands()

    def f(x, w, b, index, cache):
        torch.ops.ras_compile.linear_scatter_(x, w, b, index, cache)
        return cache + 1

    calls = recorded_kernel_calls(f, monkeypatch, *ops.values())
    assert len(calls) == 1
    kwargs = calls[0]["kwargs"]
    assert {"x_ptr", "w_ptr", "bias_ptr", "index_ptr", "cache_ptr"} <= set(kwargs), sorted(kwargs)
    assert calls[0]["tensors_to_clone"] == ["cache_ptr"]
    grid = calls[0]["grid"][0]
    if variant == "tma_persistent":
        assert grid == (132, 1, 1)  # one program per SM
    elif variant == "tma":
        assert "BATCH" in kwargs and grid[1:] == (1, 1)  # one program per tile of every batch element


def test_tma_request_falls_back_where_the_operands_do_not_fit(monkeypatch):
    """$RAS_COMPILE_KV_KERNEL=tma with rows of 20 bytes (D_in 10 at bf16) traces the pointer kernel."""
    import ras_compile.kernels.linear_scatter_tma as tma

    monkeypatch.setenv("RAS_COMPILE_KV_KERNEL", "tma")
    monkeypatch.setattr(tma, "device_supports_tma", lambda device: True)
    ops = _fake_cuda_operands(d_in=10)

    def f(x, w, b, index, cache):
        torch.ops.ras_compile.linear_scatter_(x, w, b, index, cache)
        return cache + 1

    (call,) = recorded_kernel_calls(f, monkeypatch, *ops.values())
    assert "stride_xk" in call["kwargs"]  # the pointer kernel's signature


def test_the_descriptor_scratch_allocator_is_installed_only_where_none_is_set(monkeypatch):
    """launch_tma's allocator (what Triton's own launches of the TMA kernels need for the
    device-side descriptors) allocates on the launch's device type, and never replaces an
    allocator a user or Inductor set."""
    import triton
    from triton.runtime import _allocation

    from ras_compile.kernels.linear_scatter_tma import _install_allocator

    token = _allocation._allocator.set(_allocation._NULL_ALLOCATOR)
    try:
        _install_allocator(torch.device("cpu"))
        ours = _allocation._allocator.get()
        buffer = ours(256, 128, None)
        assert buffer.device.type == "cpu" and buffer.numel() == 256
        mine = lambda size, alignment, stream: torch.empty(size, dtype=torch.int8)  # noqa: E731
        triton.set_allocator(mine)
        _install_allocator(torch.device("cpu"))
        assert _allocation._allocator.get() is mine
    finally:
        _allocation._allocator.reset(token)


def test_unknown_kernel_variant_is_refused_naming_the_setting(monkeypatch):
    from ras_compile.kernels import linear_scatter_tma as tma
    from ras_compile.kernels.linear_scatter import _choose_variant

    monkeypatch.setenv("RAS_COMPILE_KV_KERNEL", "wgmma")
    with pytest.raises(ValueError, match="RAS_COMPILE_KV_KERNEL='wgmma'.*pointer, tma, tma_persistent"):
        tma.variant()
    monkeypatch.setenv("RAS_COMPILE_KV_KERNEL", " TMA ")
    assert tma.variant() == "tma"
    monkeypatch.delenv("RAS_COMPILE_KV_KERNEL")
    assert tma.variant() == "pointer"
    x = torch.empty(1, 2, 8)
    with pytest.raises(ValueError, match="unknown kernel variant 'fast'"):
        _choose_variant(x, torch.empty(4, 8), None, "fast")


def test_tma_eligibility_reasons():
    """Metadata-only reasons, checked in the order a user would fix them."""
    from ras_compile.kernels.linear_scatter_tma import tma_ineligible_reason

    x, w = torch.empty(2, 5, 16, dtype=torch.bfloat16), torch.empty(8, 16, dtype=torch.bfloat16)
    assert "gather" in tma_ineligible_reason(x, w, torch.zeros(2, 5, dtype=torch.long))
    assert "contiguous" in tma_ineligible_reason(x.transpose(1, 2).contiguous().transpose(1, 2), w, None)
    assert "16 bytes" in tma_ineligible_reason(torch.empty(2, 5, 12, dtype=torch.bfloat16), w[:, :12], None)
    assert "16 bytes" in tma_ineligible_reason(torch.empty(2 * 5 * 16 + 1, dtype=torch.bfloat16)[1:].view(2, 5, 16),
                                               w, None)
    assert "no TMA" in tma_ineligible_reason(x, w, None)  # a CPU tensor outside the interpreter


if __name__ == "__main__":
    if "--interpret" in sys.argv:
        sys.exit(run_interpreter_checks())
    sys.exit(pytest.main([__file__, "-q"]))
