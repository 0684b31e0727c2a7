"""GPU checks of the whole pass on CUDA: Inductor graphs with the fused K/V projection.

CI has no GPU, so these live outside ``tests/``. Run them in a session with a CUDA
device: ``python -m pytest benchmarks/gpu_checks -q``. They check on the GPU what
tests/test_fused_projection.py and tests/test_properties.py check on the CPU: the
properties hold when ``fuse_kv_projection="auto"`` turns the Triton kernel on.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
from conformance_models import FAMILIES  # noqa: E402

from ras_compile import RASPolicy, ras_compile  # noqa: E402

if not torch.cuda.is_available():
    raise SystemExit("benchmarks/gpu_checks needs a CUDA device")

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
DEV = "cuda"
BATCH = 2


def _out(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _on_cuda(kwargs, dtype):
    return {k: (v.to(DEV, dtype) if torch.is_tensor(v) and v.is_floating_point() else
                v.to(DEV) if torch.is_tensor(v) else v) for k, v in kwargs.items()}


@pytest.mark.parametrize("name,dtype", [("sd3", torch.float32), ("flux", torch.bfloat16)])
def test_sparse_step_after_dense_equals_dense_on_cuda_with_fused_projections(name, dtype):
    family = FAMILIES[name]
    model = family.build(0).to(DEV, dtype)
    ras = ras_compile(model, RASPolicy(sample_ratio=0.5), latent_arg=family.latent_arg)  # inductor, auto fusion
    kwargs = _on_cuda(family.inputs(model, BATCH, 0), dtype)
    dense = _out(ras(**kwargs))
    assert ras.ras_analysis(**kwargs).counts["kv_projections_fused"] > 0
    n = family.num_tokens
    g = torch.Generator().manual_seed(1)
    index = torch.stack([torch.randperm(n, generator=g)[: n // 3].sort().values for _ in range(BATCH)]).to(DEV)
    ras.ras_controller.override_next_step("sparse", index)
    sparse = _out(ras(**kwargs))
    with torch.no_grad():
        eager = _out(model(**kwargs))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(sparse.float(), dense.float(), **tol)
    torch.testing.assert_close(dense.float(), eager.float(), **tol)


def test_fused_equals_unfused_on_cuda_bf16_loop():
    family = FAMILIES["sd3"]
    model = family.build(0).to(DEV, torch.bfloat16)
    policy = RASPolicy(sample_ratio=0.25, warmup_steps=2)
    mods = [ras_compile(model, policy, latent_arg=family.latent_arg, fuse_kv_projection=f) for f in (False, True)]
    kwargs = _on_cuda(family.inputs(model, BATCH, 0), torch.bfloat16)
    outs = []
    for ras in mods:
        res = []
        for step, t in enumerate(torch.linspace(1000, 100, 6)):
            kw = dict(kwargs, timestep=torch.full((BATCH,), float(t), device=DEV))
            res.append(_out(ras(**kw)).float())
        outs.append(torch.stack(res))
    assert mods[1].ras_controller.stats[-1].mode == "sparse"
    torch.testing.assert_close(outs[1], outs[0], rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("step_cache_interval", [1, 2])
def test_cuda_graphs_reduce_overhead_loop_equals_the_default_mode(step_cache_interval):
    """compile_mode="reduce-overhead" replays CUDA graphs that write the caches in place:
    a whole loop must give the default mode's values, with one recording per k. With the
    step cache the kept outputs must be copies: the next replay overwrites a replay's outputs."""
    family = FAMILIES["sd3"]
    model = family.build(0).to(DEV, torch.float32)
    policy = RASPolicy(sample_ratio=0.25, warmup_steps=2, reset_steps=(5,), step_cache_interval=step_cache_interval)
    mods = [ras_compile(model, policy, latent_arg=family.latent_arg, compile_mode=m)
            for m in (None, "reduce-overhead")]
    kwargs = _on_cuda(family.inputs(model, BATCH, 0), torch.float32)
    outs = []
    for ras in mods:
        res = []
        for t in torch.linspace(1000, 100, 8):
            kw = dict(kwargs, timestep=torch.full((BATCH,), float(t), device=DEV))
            res.append(_out(ras(**kw)).float().clone())
        outs.append(torch.stack(res))
    modes = [s.mode for s in mods[1].ras_controller.stats]
    assert modes.count("sparse") >= (4 if step_cache_interval == 1 else 2)
    assert ("predicted" in modes) == (step_cache_interval > 1)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
