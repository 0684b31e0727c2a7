"""Tests for the K projection + per-head norm + cache write op
(`ras_compile.kernels.linear_norm_scatter_`).

As in test_kernels.py (both use tests/interpreter.py), two processes: this pytest process checks the op's ATen path on
CPU, `torch.compile(fullgraph=True)` and the argument checks; the Triton kernel runs in
the interpreter in a subprocess, `python tests/test_linear_norm_scatter.py --interpret`
with `TRITON_INTERPRET=1` (the variable must be set before the kernel is decorated).

The reference is independent of the op: `F.linear` in fp32, a view to heads,
`F.rms_norm` / `F.layer_norm`, one rounding, index assignment row by row.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmark_scripts import load_benchmark
import ras_compile.kernels as kernels
from interpreter import run_checks, run_in_interpreter
from op_checks import (assert_compiled_matches_eager, assert_dynamic_k_compiles_once,
                       assert_one_graph_without_breaks, recorded_kernel_calls, traced_targets)
from ras_compile.kernels import linear_norm_scatter_, linear_norm_scatter_reference_

REPO = Path(__file__).resolve().parents[1]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
EPS = 1e-5
# Against an fp32 reference rounded once (the normalised outputs are of order 1 to 5).
TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@dataclass
class Case:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    index: torch.Tensor
    cache: torch.Tensor
    rows: torch.Tensor | None
    norm: str
    norm_weight: torch.Tensor | None
    norm_bias: torch.Tensor | None
    head_dim: int

    @property
    def args(self):
        return self.x, self.weight, self.bias, self.index, self.cache

    @property
    def kwargs(self):
        return dict(norm=self.norm, norm_weight=self.norm_weight, norm_bias=self.norm_bias, eps=EPS,
                    head_dim=self.head_dim, rows=self.rows)

    def clone(self) -> "Case":
        c = lambda t: None if t is None else t.clone()  # noqa: E731
        return Case(c(self.x), c(self.weight), c(self.bias), c(self.index), c(self.cache), c(self.rows), self.norm,
                    c(self.norm_weight), c(self.norm_bias), self.head_dim)

    def expected(self) -> torch.Tensor:
        """Plain torch: fp32 linear, heads, F.rms_norm / F.layer_norm, one rounding, rows assigned."""
        x = self.x if self.rows is None else torch.stack([self.x[b, self.rows[b]] for b in range(len(self.x))])
        f = lambda t: None if t is None else t.float()  # noqa: E731
        out = F.linear(x.float(), self.weight.float(), f(self.bias))
        heads = out.view(*out.shape[:-1], -1, self.head_dim)
        if self.norm == "rms":
            heads = F.rms_norm(heads, (self.head_dim,), f(self.norm_weight), EPS)
        else:
            heads = F.layer_norm(heads, (self.head_dim,), f(self.norm_weight), f(self.norm_bias), EPS)
        out = heads.flatten(-2).to(self.cache.dtype)
        want = self.cache.clone()
        for b in range(self.index.shape[0]):
            want[b, self.index[b]] = out[b]
        return want


@st.composite
def cases(draw, dtypes=DTYPES, max_n: int = 24, max_heads: int = 4, d_in_multiple: int = 1,
          gather: bool | None = None) -> Case:
    """``d_in_multiple`` 8 keeps the operands' rows 16-byte aligned (the TMA kernels);
    ``gather`` None draws the gather prologue or not."""
    dtype = draw(st.sampled_from(dtypes))
    head_dim = draw(st.sampled_from([4, 8, 16, 32]))
    heads = draw(st.integers(1, max_heads))
    B = draw(st.integers(1, 2))
    N = draw(st.integers(1, max_n))
    k = draw(st.integers(1, N))
    D_in = draw(st.integers(1, 40 // d_in_multiple)) * d_in_multiple
    D_out = heads * head_dim
    pattern = draw(st.sampled_from(["sorted", "unsorted", "padded"]))
    n_valid = draw(st.integers(1, k)) if pattern == "padded" else k
    norm = draw(st.sampled_from(["rms", "layer"]))
    affine = draw(st.booleans())
    gather = draw(st.booleans()) if gather is None else gather
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def index_row():
        if pattern == "padded":
            valid = torch.randperm(N, generator=g)[:n_valid]
            return torch.cat([valid, valid[-1:].expand(k - n_valid)])
        perm = torch.randperm(N, generator=g)[:k]
        return perm.sort().values if pattern == "sorted" else perm

    index = torch.stack([index_row() for _ in range(B)])
    if gather:
        M = draw(st.integers(1, max_n))
        rows = torch.randint(0, M, (B, k), generator=g)
        rows[:, n_valid:] = rows[:, n_valid - 1: n_valid]
        x = torch.randn(B, M, D_in, generator=g)
    else:
        rows = None
        x = torch.randn(B, k, D_in, generator=g)
        x[:, n_valid:] = x[:, n_valid - 1: n_valid]  # identical rows behind duplicate indices
    weight = torch.randn(D_out, D_in, generator=g) / max(D_in, 1) ** 0.5
    bias = torch.randn(D_out, generator=g) if draw(st.booleans()) else None
    norm_weight = torch.randn(head_dim, generator=g) if affine else None
    norm_bias = torch.randn(head_dim, generator=g) if affine and norm == "layer" else None
    cache = torch.randn(B, N, D_out, generator=g)
    to = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return Case(to(x), to(weight), to(bias), index, to(cache), rows, norm, to(norm_weight), to(norm_bias), head_dim)


def check_result(case: Case, got: torch.Tensor) -> None:
    """Active rows match the reference; every other cache row is bitwise unchanged."""
    want = case.expected()
    touched = torch.zeros(case.cache.shape[:2], dtype=torch.bool)
    touched.scatter_(1, case.index, True)
    assert torch.equal(got[~touched], case.cache[~touched]), "rows not in index were modified"
    rtol, atol = TOL[case.cache.dtype]
    torch.testing.assert_close(got[touched].float(), want[touched].float(), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- interpreter checks
# Run by `python tests/test_linear_norm_scatter.py --interpret` under TRITON_INTERPRET=1.

@settings(max_examples=int(os.environ.get("RAS_KERNEL_EXAMPLES", "60")), **SETTINGS)
@given(case=cases(), wide=st.booleans())
def interpreted_kernel_matches_reference(case: Case, wide: bool):
    """The default config (BLOCK_N = max(head_dim, 16)) or a tile of several heads (64 wide)."""
    config = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, GROUP_M=2) if wide and case.head_dim <= 64 else None
    got = case.clone()
    out = kernels.linear_norm_scatter_triton_(*got.args, **got.kwargs, config=config)
    assert out is got.cache
    check_result(case, got.cache)


@settings(max_examples=int(os.environ.get("RAS_KERNEL_EXAMPLES", "60")) // 2, **SETTINGS)
@given(case=cases(d_in_multiple=8, gather=False), wide=st.booleans(),
       variant=st.sampled_from(["tma", "tma_persistent"]))
def interpreted_tma_kernels_match_reference(case: Case, wide: bool, variant: str):
    """The norm epilogue in the TMA kernels (aligned operands, no gather)."""
    config = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, GROUP_M=2) if wide and case.head_dim <= 64 else None
    got = case.clone()
    kernels.linear_norm_scatter_triton_(*got.args, **got.kwargs, config=config, variant=variant)
    check_result(case, got.cache)


def interpreted_strided_and_fp32_norm_params():
    """Strided operands and fp32 norm weight / bias with a 16-bit projection."""
    g = torch.Generator().manual_seed(3)
    B, k, N, D_in, hd, heads = 2, 7, 11, 12, 16, 3
    D_out = hd * heads
    case = Case(torch.randn(B, D_in, k, generator=g).transpose(1, 2).bfloat16(),
                torch.randn(D_in, D_out, generator=g).t().bfloat16(), None,
                torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B)]),
                torch.randn(B, N, 2 * D_out, generator=g).bfloat16()[:, :, ::2], None, "layer",
                torch.randn(2 * hd, generator=g)[::2], torch.randn(hd, generator=g), hd)
    before = case.clone()
    kernels.linear_norm_scatter_triton_(*case.args, **case.kwargs)
    check_result(before, case.cache)


def run_interpreter_checks() -> int:
    return run_checks((interpreted_strided_and_fp32_norm_params, interpreted_kernel_matches_reference,
                       interpreted_tma_kernels_match_reference))


def test_triton_kernel_in_interpreter():
    run_in_interpreter(__file__)


# --------------------------------------------------------------------------- ATen path (CPU op)

@settings(max_examples=40, **SETTINGS)
@given(case=cases())
def test_op_on_cpu_matches_reference(case: Case):
    for impl in (linear_norm_scatter_, linear_norm_scatter_reference_):
        got = case.clone()
        out = impl(*got.args, **got.kwargs)
        assert out is got.cache
        check_result(case, got.cache)


def test_the_reference_can_fail():
    """The check catches a wrong norm: rms results are not layer-norm results."""
    g = torch.Generator().manual_seed(0)
    case = Case(torch.randn(1, 3, 8, generator=g), torch.randn(16, 8, generator=g), torch.randn(16, generator=g),
                torch.tensor([[2, 0, 1]]), torch.zeros(1, 4, 16), None, "layer", None, None, 8)
    got = case.clone()
    linear_norm_scatter_(*got.args, **dict(got.kwargs, norm="rms"))
    with pytest.raises(AssertionError):
        check_result(case, got.cache)


# --------------------------------------------------------------------------- validation

def _good(**over):
    args = dict(x=torch.randn(2, 3, 4), weight=torch.randn(16, 4), bias=torch.randn(16),
                index=torch.tensor([[0, 1, 2], [3, 4, 5]]), cache=torch.zeros(2, 6, 16), norm="layer",
                norm_weight=torch.randn(8), norm_bias=torch.randn(8), eps=1e-6, head_dim=8, rows=None)
    args.update(over)
    return args


BAD_INPUTS = {
    "norm-kind": (dict(norm="group"), "`norm`.*'group'"),
    "head-dim-not-dividing": (dict(head_dim=32, norm_weight=None, norm_bias=None), "`head_dim`=32"),
    "head-dim-not-pow2": (dict(weight=torch.randn(12, 4), bias=None, cache=torch.zeros(2, 6, 12), head_dim=6,
                               norm_weight=None, norm_bias=None), "`head_dim`.*6"),
    "head-dim-too-big": (dict(weight=torch.randn(512, 4), bias=None, cache=torch.zeros(2, 6, 512), head_dim=512,
                              norm_weight=None, norm_bias=None), "`head_dim`.*512"),
    "head-dim-type": (dict(head_dim=8.0), "`head_dim`"),
    "eps-negative": (dict(eps=-1.0), "`eps`.*-1.0"),
    "norm-weight-shape": (dict(norm_weight=torch.randn(16)), "`norm_weight`.*\\(16,\\)"),
    "norm-weight-dtype": (dict(norm_weight=torch.randn(8).double()), "`norm_weight`.*float64"),
    "norm-bias-shape": (dict(norm_bias=torch.randn(4)), "`norm_bias`"),
    "norm-bias-with-rms": (dict(norm="rms"), "`norm_bias`.*rms"),
    "norm-weight-device": (dict(norm_weight=torch.randn(8, device="meta")), "`norm_weight`.*meta"),
    "x-rank": (dict(x=torch.randn(3, 4)), "linear_norm_scatter_: `x`"),
    "index-dtype": (dict(index=torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)), "`index`"),
    "cache-dout": (dict(cache=torch.zeros(2, 6, 8)), "`cache`"),
    "weight-type": (dict(weight=[[1.0]]), "`weight`"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise_value_error_naming_the_argument(name):
    over, pattern = BAD_INPUTS[name]
    for fn in (linear_norm_scatter_, kernels.linear_norm_scatter_triton_, linear_norm_scatter_reference_):
        args = _good(**over)
        x, w, b, index, cache = (args.pop(n) for n in ("x", "weight", "bias", "index", "cache"))
        with pytest.raises(ValueError, match=pattern):
            fn(x, w, b, index, cache, **args)


def test_triton_launcher_refuses_cpu_tensors_outside_the_interpreter():
    if kernels.triton_interpreting():
        pytest.skip("this process runs the interpreter")
    args = _good()
    positional = [args.pop(n) for n in ("x", "weight", "bias", "index", "cache")]
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.linear_norm_scatter_triton_(*positional, **args)


# --------------------------------------------------------------------------- torch.compile

def _cache_update(x, w, b, index, cache, nw, nb):
    h = torch.tanh(x)  # something before and after the op, so the op sits inside a graph
    linear_norm_scatter_(h, w, b, index, cache, norm="layer" if nb is not None else "rms", norm_weight=nw,
                         norm_bias=nb, eps=EPS, head_dim=8)
    return cache * 2 + 1


def _compile_inputs(seed=0, k=5, layer=True):
    g = torch.Generator().manual_seed(seed)
    B, N, D_in, D_out = 2, 12, 16, 24
    return dict(x=torch.randn(B, k, D_in, generator=g), w=torch.randn(D_out, D_in, generator=g),
                b=torch.randn(D_out, generator=g),
                index=torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B)]),
                cache=torch.randn(B, N, D_out, generator=g), nw=torch.randn(8, generator=g),
                nb=torch.randn(8, generator=g) if layer else None)


@pytest.mark.parametrize("backend,layer", [("inductor", False), ("aot_eager", True), ("aot_eager", False)])
def test_op_in_fullgraph_compile_matches_eager(backend, layer):
    assert_compiled_matches_eager(_cache_update, _compile_inputs(layer=layer), backend, rtol=1e-5, atol=1e-5)


def test_op_compiles_without_graph_breaks():
    assert_one_graph_without_breaks(_cache_update, _compile_inputs())


def test_dynamic_k_compiles_once():
    assert_dynamic_k_compiles_once(_cache_update, _compile_inputs)


def _fake_cuda_operands() -> tuple:
    """x, w, b, index, cache, norm weight as fake CUDA tensors (no GPU needed): 2 heads of 64."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        t = dict(device="cuda", dtype=torch.bfloat16)
        x, w, b = torch.empty(2, 9, 16, **t), torch.empty(128, 16, **t), torch.empty(128, **t)
        index = torch.empty(2, 9, device="cuda", dtype=torch.long)
        cache, nw = torch.empty(2, 12, 128, **t), torch.empty(64, **t)
    return x, w, b, index, cache, nw


def _rms_op_then_add(x, w, b, index, cache, nw):
    torch.ops.ras_compile.linear_norm_scatter_(x, w, b, index, cache, None, "rms", nw, None, 1e-6, 64)
    return cache + 1


def test_cuda_branch_traces_to_the_triton_kernel_without_a_gpu():
    """With fake CUDA tensors the functionalized graph holds the Triton kernel call, no ATen norm or scatter."""
    targets = traced_targets(_rms_op_then_add, *_fake_cuda_operands())
    assert any("triton_kernel_wrapper" in t for t in targets), targets
    assert not any(s in t for t in targets for s in ("scatter", "addmm", "linear", "rsqrt", "mean")), targets


@pytest.mark.parametrize("variant", ["pointer", "tma", "tma_persistent"])
def test_every_kernel_variant_is_recorded_with_its_operands_and_writes_only_the_cache(variant, monkeypatch):
    """As for linear_scatter_ (test_kernels.py): compiled for a faked sm90 GPU, the norm
    kernel's call carries every operand and torch's IR analysis finds it writes only the cache."""
    import ras_compile.kernels.linear_scatter_tma as tma

    monkeypatch.setenv("RAS_COMPILE_KV_KERNEL", variant)
    monkeypatch.setattr(tma, "device_supports_tma", lambda device: True)
    monkeypatch.setattr(tma, "num_sms", lambda device: 132)
    (call,) = recorded_kernel_calls(_rms_op_then_add, monkeypatch, *_fake_cuda_operands())
    assert {"x_ptr", "w_ptr", "nw_ptr", "cache_ptr"} <= set(call["kwargs"])
    assert call["kwargs"]["NORM"] == 1 and call["kwargs"]["HEAD_DIM"] == 64
    assert call["tensors_to_clone"] == ["cache_ptr"]


def test_norm_configs_hold_whole_heads():
    for head_dim in (64, 128):
        configs = kernels.norm_configs(head_dim)
        assert configs and all(c.kwargs["BLOCK_N"] % head_dim == 0 for c in configs)


# --------------------------------------------------------------------------- the benchmark's CPU side

def _bench_module():
    return load_benchmark("bench_linear_scatter")


def test_benchmark_norm_baseline_and_table_on_cpu():
    """The benchmark's unfused baseline computes what the op computes, its table renders,
    and without CUDA it exits with a message (the timings themselves need a GPU)."""
    bench = _bench_module()
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 5, 16, generator=g), torch.randn(32, 16, generator=g), torch.randn(32, generator=g)
    index, nw = torch.stack([torch.randperm(9, generator=g)[:5] for _ in range(2)]), torch.randn(16, generator=g)
    cache = torch.randn(2, 9, 32, generator=g)
    want = linear_norm_scatter_(x, w, b, index, cache.clone(), norm="rms", norm_weight=nw, eps=1e-6, head_dim=16)
    torch.testing.assert_close(bench.aten_norm(x, w, b, index, cache.clone(), nw, 16), want, rtol=1e-5, atol=1e-5)
    row = dict(D=1536, head_dim=128, k=512, N=4096, B=2, dtype="bfloat16",
               us=dict(gemm=1.0, aten_norm=3.0, fused_norm=2.0, inductor_norm=2.5), speedup_vs_aten=1.5,
               speedup_vs_inductor=1.25)
    table = bench._norm_markdown(dict(gpu="GPU", torch="t", triton="tr"), [row])
    assert "| 1536 | 128 | 512 | 1.0 | 3.0 | 2.5 | 2.0 | 1.50 | 1.25 |" in table
    row["us"]["fused_norm_tma"] = 1.5
    row["variant_speedup_vs_aten"] = {"tma": 2.0}
    table = bench._norm_markdown(dict(gpu="GPU", torch="t", triton="tr"), [row])
    assert "| fused norm tma | x tma |" in table and "| 1.50 | 1.25 | 1.5 | 2.00 |" in table
    if not torch.cuda.is_available():
        assert bench.main(["--quick", "--norm-only"]) == 2


def test_benchmark_table_has_a_column_pair_per_kernel_variant():
    """The plain rows' table: the shipped columns, then fused time, speed-up and TFLOP/s per variant timed."""
    bench = _bench_module()
    us = dict(gemm=10.0, aten=20.0, fused=16.0, aten_gather=30.0, fused_gather=15.0, fused_tma=12.5,
              fused_tma_persistent=10.0)
    row = dict(D=3072, k=2048, N=4096, B=2, dtype="bfloat16", us=us, speedup_vs_aten=1.25,
               speedup_gather_vs_aten=2.0, gemm_tflops=600.0, fused_tflops=500.0, speedup_vs_aten_eager=0.9,
               variant_speedup_vs_aten={"tma": 1.6, "tma_persistent": 2.0},
               variant_tflops={"tma": 550.0, "tma_persistent": 640.0})
    table = bench._markdown(dict(gpu="GPU", torch="t", triton="tr", cuda="c"), [row])
    assert "| fused tma | x tma | tma TFLOP/s | fused tma_persistent | x tma_persistent |" in table
    assert "| 600 | 500 | 0.90 | 12.5 | 1.60 | 550 | 10.0 | 2.00 | 640 |" in table


if __name__ == "__main__":
    if "--interpret" in sys.argv:
        sys.exit(run_interpreter_checks())
    sys.exit(pytest.main([__file__, "-q"]))
