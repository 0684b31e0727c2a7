"""The correctness properties of the pass, on random small DiT, PixArt and SD3 models.

a. ratio 1.0 equals the unmodified model over a whole sampling loop;
b. a sparse step right after the dense step on the same input equals the dense output, for any active set;
c. over whole loops at ratios below 1 the compiled model equals an independent eager reference.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from families import Case, cases, euler_loop, prediction_of
from reference import EagerRASReference
from ras_compile import RASPolicy, ras_compile

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=6, **SETTINGS)
@given(case=cases())
def test_ratio_one_equals_dense_model_over_a_loop(case: Case):
    model = case.build()
    ras = ras_compile(model, RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=(3,)), backend=None)
    dense = [(k, p) for _, k, p in euler_loop(model, case, steps=5)]
    sparse = [(k, p) for _, k, p in euler_loop(ras, case, steps=5)]
    assert [s.mode for s in ras.ras_controller.stats] == ["dense", "sparse", "sparse", "dense", "sparse"]
    for (_, expected), (_, got) in zip(dense, sparse):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=10, **SETTINGS)
@given(case=cases(), data=st.data())
def test_sparse_step_after_dense_step_returns_dense_output(case: Case, data):
    model = case.build()
    ras = ras_compile(model, RASPolicy(sample_ratio=0.5), backend=None)
    kwargs = case.inputs(model)
    dense = prediction_of(ras(**kwargs))
    k = data.draw(st.integers(1, case.num_tokens), label="k")
    rows = [sorted(data.draw(st.permutations(range(case.num_tokens)), label="perm")[:k]) for _ in range(case.batch)]
    ras.ras_controller.override_next_step("sparse", torch.tensor(rows))
    sparse = prediction_of(ras(**kwargs))
    assert ras.ras_controller.stats[-1].mode == "sparse"
    assert ras.ras_controller.stats[-1].active_tokens == k
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def _compare_with_reference(case: Case, policy: RASPolicy, backend, steps: int = 7):
    model = case.build()
    ras = ras_compile(model, policy, backend=backend)
    reference = EagerRASReference(model, case.num_tokens, case.patch, case.image_rows)
    modes = []
    for _, kwargs, got in euler_loop(ras, case, steps):
        stats = ras.ras_controller.stats[-1]
        modes.append(stats.mode)
        active = ras.ras_controller.last_index if stats.mode == "sparse" else None
        expected = reference.step(kwargs, active)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert "sparse" in modes and "dense" in modes
    return modes


@settings(max_examples=8, **SETTINGS)
@given(case=cases(), ratio=st.sampled_from([0.25, 0.5, 0.75]), share=st.sampled_from(["per_sample", "batch"]))
def test_loop_equals_eager_reference(case: Case, ratio: float, share: str):
    policy = RASPolicy(sample_ratio=ratio, warmup_steps=2, reset_steps=(4,), share_active_set=share)
    modes = _compare_with_reference(case, policy, backend=None)
    assert modes == ["dense", "dense", "sparse", "sparse", "dense", "sparse", "sparse"]


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3"])
def test_loop_equals_eager_reference_through_aot_eager(family):
    case = Case(family, layers=2, heads=2, head_dim=8, patch=2, height=8, width=8 if family == "dit" else 12,
                batch=2)
    _compare_with_reference(case, RASPolicy(sample_ratio=0.5, warmup_steps=2, reset_steps=(4,)), "aot_eager")


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3"])
def test_loop_equals_eager_reference_through_inductor(family):
    case = Case(family, layers=1, heads=2, head_dim=8, patch=2, height=8, width=8 if family == "dit" else 12,
                batch=2)
    _compare_with_reference(case, RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=(4,)), "inductor",
                            steps=6)
