"""GPU checks of the fused K/V-projection + cache-scatter kernel.

CI has no GPU, so these live outside ``tests/`` (nothing there is skipped). Run them
in a session with a CUDA device: ``python -m pytest benchmarks/gpu_checks -q``.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from triton.runtime.errors import OutOfResources
from hypothesis import given, reject, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
from test_kernels import (DTYPES, SETTINGS, TOL, Case, _cache_update, _compile_inputs,  # noqa: E402
                          cases, check_result, kernels, linear_scatter_)

if not torch.cuda.is_available():
    raise SystemExit("benchmarks/gpu_checks needs a CUDA device")

@settings(max_examples=40, **SETTINGS)
@given(case=cases(), config=st.sampled_from(range(len(kernels.HOPPER_CONFIGS))))
def test_kernel_on_cuda_matches_reference(case: Case, config: int):
    """Every Hopper tiling, pinned (autotuning every example would compile all of them
    for every new shape, which took minutes)."""
    on = Case(*(None if t is None else t.cuda() for t in case.args), case.pattern)
    try:
        kernels.linear_scatter_triton_(*on.args, config=kernels.HOPPER_CONFIGS[config])
    except OutOfResources:  # a 16-bit tiling with fp32 operands: the autotuner drops these too
        reject()
    check_result(case, on.cache.cpu())


@settings(max_examples=4, **SETTINGS)
@given(case=cases())
def test_op_on_cuda_autotunes_and_matches_reference(case: Case):
    on = Case(*(None if t is None else t.cuda() for t in case.args), case.pattern)
    linear_scatter_(*on.args)
    check_result(case, on.cache.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicates_bitwise_on_cuda(dtype):
    """The contract padded buckets rely on: identical x rows, wherever they sit in the
    tiles, produce bitwise identical outputs."""
    g = torch.Generator().manual_seed(0)
    B, k, N, D_in, D_out = 2, 300, 512, 200, 330
    x = torch.randn(B, k, D_in, generator=g).to(dtype)
    x[:, 1::7] = x[:, :1]
    w = torch.randn(D_out, D_in, generator=g).to(dtype)
    index = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B)])
    cache = kernels.linear_scatter_triton_(x.cuda(), w.cuda(), None, index.cuda(),
                                           torch.zeros(B, N, D_out, dtype=dtype, device="cuda")).cpu()
    out = cache.gather(1, index.unsqueeze(-1).expand(-1, -1, D_out))
    assert torch.equal(out[:, 1::7], out[:, :1].expand_as(out[:, 1::7]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_op_under_inductor_on_cuda(dtype):
    torch._dynamo.reset()
    inputs = {n: None if t is None else (t.cuda().to(dtype) if t.is_floating_point() else t.cuda())
              for n, t in _compile_inputs(gather=True).items()}
    eager_in = {n: None if t is None else t.clone() for n, t in inputs.items()}
    want = _cache_update(**eager_in)
    got = torch.compile(_cache_update, backend="inductor", fullgraph=True)(**inputs)
    torch.testing.assert_close(got, want, rtol=TOL[dtype][0], atol=TOL[dtype][1])




# --------------------------------------------------------------------------- the TMA variants

TMA_VARIANTS = ["tma", "tma_persistent"]


@settings(max_examples=24, **SETTINGS)
@given(case=cases(d_in_multiple=8, gather=False), config=st.sampled_from(range(len(kernels.HOPPER_CONFIGS))),
       variant=st.sampled_from(TMA_VARIANTS))
def test_tma_kernels_on_cuda_match_reference(case: Case, config: int, variant: str):
    """Descriptor loads on sm90, every Hopper tiling pinned (as above)."""
    on = Case(*(None if t is None else t.cuda() for t in case.args), case.pattern)
    try:
        kernels.linear_scatter_triton_(*on.args, config=kernels.HOPPER_CONFIGS[config], variant=variant)
    except OutOfResources:
        reject()
    check_result(case, on.cache.cpu())


@pytest.mark.parametrize("variant", TMA_VARIANTS)
def test_tma_duplicates_bitwise_on_cuda(variant):
    g = torch.Generator().manual_seed(0)
    B, k, N, D_in, D_out = 2, 300, 512, 200, 330
    x = torch.randn(B, k, D_in, generator=g).bfloat16()
    x[:, 1::7] = x[:, :1]
    w = torch.randn(D_out, D_in, generator=g).bfloat16()
    index = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B)])
    cache = kernels.linear_scatter_triton_(x.cuda(), w.cuda(), None, index.cuda(),
                                           torch.zeros(B, N, D_out, dtype=torch.bfloat16, device="cuda"),
                                           variant=variant).cpu()
    out = cache.gather(1, index.unsqueeze(-1).expand(-1, -1, D_out))
    assert torch.equal(out[:, 1::7], out[:, :1].expand_as(out[:, 1::7]))


@pytest.mark.parametrize("variant", TMA_VARIANTS)
def test_tma_op_called_eagerly_on_cuda(variant, monkeypatch):
    """The op outside torch.compile with $RAS_COMPILE_KV_KERNEL set: wrap_triton calls the
    kernel, and the allocator launch_tma installs provides the descriptors' scratch."""
    monkeypatch.setenv("RAS_COMPILE_KV_KERNEL", variant)
    g = torch.Generator().manual_seed(5)
    B, k, N, D = 2, 300, 512, 256
    case = Case(torch.randn(B, k, D, generator=g).bfloat16(), (torch.randn(D, D, generator=g) / 16).bfloat16(),
                torch.randn(D, generator=g).bfloat16(),
                torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B)]),
                torch.randn(B, N, D, generator=g).bfloat16(), None, "unsorted")
    on = Case(*(None if t is None else t.cuda() for t in case.args), case.pattern)
    linear_scatter_(*on.args)
    check_result(case, on.cache.cpu())


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("variant", TMA_VARIANTS)
def test_tma_op_under_inductor_on_cuda(variant, mode, monkeypatch):
    """$RAS_COMPILE_KV_KERNEL picks the TMA kernel inside an Inductor graph (Inductor's
    launcher provides the descriptors' scratch), and under CUDA graphs."""
    monkeypatch.setenv("RAS_COMPILE_KV_KERNEL", variant)
    torch._dynamo.reset()
    inputs = {n: None if t is None else (t.cuda().bfloat16() if t.is_floating_point() else t.cuda())
              for n, t in _compile_inputs(gather=False).items()}
    want = _cache_update(**{n: None if t is None else t.clone() for n, t in inputs.items()})
    compiled = torch.compile(_cache_update, backend="inductor", fullgraph=True, mode=mode)
    for _ in range(3):  # CUDA graphs: warm-up, record, replay
        got = compiled(**{n: None if t is None else t.clone() for n, t in inputs.items()})
    torch.testing.assert_close(got, want, rtol=TOL[torch.bfloat16][0], atol=TOL[torch.bfloat16][1])
