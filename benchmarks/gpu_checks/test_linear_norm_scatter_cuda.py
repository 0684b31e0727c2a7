"""GPU checks of the K projection + per-head norm + cache-scatter kernel
(``linear_norm_scatter_``). Not run yet: written in a session without a GPU.

Run them in a session with a CUDA device: ``python -m pytest benchmarks/gpu_checks -q``.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import given, reject, settings
from hypothesis import strategies as st
from triton.runtime.errors import OutOfResources

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
from test_linear_norm_scatter import (SETTINGS, TOL, Case, _cache_update, _compile_inputs,  # noqa: E402
                                      cases, check_result, kernels, linear_norm_scatter_)

if not torch.cuda.is_available():
    raise SystemExit("benchmarks/gpu_checks needs a CUDA device")


def _cuda(case: Case) -> Case:
    on = lambda t: None if t is None else t.cuda()  # noqa: E731
    return Case(on(case.x), on(case.weight), on(case.bias), on(case.index), on(case.cache), on(case.rows), case.norm,
                on(case.norm_weight), on(case.norm_bias), case.head_dim)


@settings(max_examples=40, **SETTINGS)
@given(case=cases(), config=st.data())
def test_kernel_on_cuda_matches_reference(case: Case, config):
    """Every Hopper tiling that holds whole heads of the case's head dim, pinned."""
    configs = kernels.norm_configs(case.head_dim)
    pick = configs[config.draw(st.integers(0, len(configs) - 1))]
    on = _cuda(case)
    try:
        kernels.linear_norm_scatter_triton_(*on.args, **on.kwargs, config=pick)
    except OutOfResources:
        reject()
    check_result(case, on.cache.cpu())


@settings(max_examples=4, **SETTINGS)
@given(case=cases())
def test_op_on_cuda_autotunes_and_matches_reference(case: Case):
    on = _cuda(case)
    linear_norm_scatter_(*on.args, **on.kwargs)
    check_result(case, on.cache.cpu())


@pytest.mark.parametrize("head_dim", [64, 128])
def test_real_head_dims_on_cuda(head_dim):
    g = torch.Generator().manual_seed(head_dim)
    B, k, N, D = 2, 300, 512, 1536
    x = torch.randn(B, k, D, generator=g).bfloat16()
    w = (torch.randn(D, D, generator=g) / D ** 0.5).bfloat16()
    nw = torch.randn(head_dim, generator=g).bfloat16()
    index = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B)])
    case = Case(x, w, None, index, torch.zeros(B, N, D).bfloat16(), None, "rms", nw, None, head_dim)
    on = _cuda(case)
    linear_norm_scatter_(*on.args, **on.kwargs)
    check_result(case, on.cache.cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_op_under_inductor_on_cuda(dtype):
    torch._dynamo.reset()
    inputs = {n: None if t is None else (t.cuda().to(dtype) if t.is_floating_point() else t.cuda())
              for n, t in _compile_inputs().items()}
    eager_in = {n: None if t is None else t.clone() for n, t in inputs.items()}
    want = _cache_update(**eager_in)
    got = torch.compile(_cache_update, backend="inductor", fullgraph=True)(**inputs)
    torch.testing.assert_close(got, want, rtol=TOL[dtype][0], atol=TOL[dtype][1])


@settings(max_examples=16, **SETTINGS)
@given(case=cases(d_in_multiple=8, gather=False), config=st.data(), variant=st.sampled_from(["tma", "tma_persistent"]))
def test_tma_kernels_on_cuda_match_reference(case: Case, config, variant: str):
    """The norm epilogue in the TMA kernels, whole-head tilings pinned."""
    configs = kernels.norm_configs(case.head_dim)
    pick = configs[config.draw(st.integers(0, len(configs) - 1))]
    on = _cuda(case)
    try:
        kernels.linear_norm_scatter_triton_(*on.args, **on.kwargs, config=pick, variant=variant)
    except OutOfResources:
        reject()
    check_result(case, on.cache.cpu())
