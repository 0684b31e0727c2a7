"""The step cache stacked on RAS (``RASPolicy.step_cache_interval``): which steps it predicts,
how it extrapolates, and that over whole loops RAS with it equals independent references."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from families import Case, cases, euler_loop, flow_sigmas, prediction_of, timestep_for
from reference import EagerRASReference
from ras_compile import RASPolicy, ras_compile
from ras_compile.controller import RASController
from ras_compile.schedule import active_tokens_per_step, dense_flop_fraction, is_dense_step, is_predicted_step
from ras_compile.step_cache import extrapolate, lagrange_weights

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- the plan ---------------------------------------------------------------------------------------
@st.composite
def plans(draw):
    steps = draw(st.integers(1, 40))
    return dict(warmup_steps=draw(st.integers(0, 6)),
                reset_steps=tuple(sorted(draw(st.sets(st.integers(0, steps), max_size=4)))),
                end_step=draw(st.none() | st.integers(0, steps)),
                interval=draw(st.integers(1, 5))), steps


@settings(max_examples=300, deadline=None)
@given(plan=plans())
def test_the_first_step_after_each_dense_step_runs_then_one_in_every_interval(plan):
    fields, steps = plan
    dense = dict(fields)
    interval = dense.pop("interval")
    since_dense = 0  # steps since the last dense step (or since the loop's start)
    for t in range(steps):
        predicted = is_predicted_step(t, **fields)
        if is_dense_step(t, **dense):
            assert not predicted
            since_dense = 0
            continue
        assert predicted == (since_dense % interval != 0), (t, fields)
        since_dense += 1
    if interval == 1:
        assert not any(is_predicted_step(t, **fields) for t in range(steps))


def test_the_paper_plan_with_interval_two():
    policy = RASPolicy(step_cache_interval=2)  # warm-up 4, resets 12 and 20
    predicted = [t for t in range(28) if policy.is_predicted_step(t)]
    assert predicted == [5, 7, 9, 11, 14, 16, 18, 22, 24, 26]
    plan = active_tokens_per_step(RASPolicy(sample_ratio=0.5, step_cache_interval=2), 28, 100)
    assert plan[:8] == (100, 100, 100, 100, 50, 0, 50, 0)
    assert [t for t, k in enumerate(plan) if k == 0] == predicted


@pytest.mark.parametrize("ratio, interval, text", [(1.0, 2, 0), (0.5, 2, 16), (0.25, 3, 77), (0.5, 1, 16)])
def test_predicted_steps_cost_nothing_in_the_flop_bound(ratio, interval, text):
    n, steps = 1024, 28
    policy = RASPolicy(sample_ratio=ratio, step_cache_interval=interval)
    expected = 0.0
    for t in range(steps):
        if policy.is_dense_step(t):
            expected += 1
        elif not policy.is_predicted_step(t):
            expected += (round(ratio * n) + text) / (n + text)
    assert math.isclose(dense_flop_fraction(policy, steps, n, text), expected / steps, rel_tol=1e-12)


@pytest.mark.parametrize("field, value, message", [
    ("step_cache_interval", 0, "must be an int >= 1"),
    ("step_cache_interval", 2.0, "must be an int >= 1"),
    ("step_cache_order", 3, "must be an int from 0 to 2"),
    ("step_cache_order", -1, "must be an int from 0 to 2"),
    ("step_cache_order", True, "must be an int from 0 to 2"),
])
def test_bad_step_cache_fields_name_the_field_and_what_is_allowed(field, value, message):
    with pytest.raises(ValueError, match=f"RASPolicy.{field}=.*{message}"):
        RASPolicy(**{field: value})


# -- the extrapolation ------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(points=st.lists(st.integers(0, 60), min_size=1, max_size=3, unique=True).map(sorted),
       ahead=st.integers(1, 5), coefficients=st.lists(st.floats(-3, 3), min_size=3, max_size=3))
def test_lagrange_weights_are_exact_for_polynomials_of_their_degree(points, ahead, coefficients):
    degree = len(points) - 1
    poly = lambda x: sum(c * x ** i for i, c in enumerate(coefficients[:degree + 1]))  # noqa: E731
    at = points[-1] + ahead
    weights = lagrange_weights(points, at)
    assert math.isclose(sum(weights), 1.0, rel_tol=1e-9, abs_tol=1e-9)
    scale = 1 + sum(abs(w) * abs(poly(p)) for w, p in zip(weights, points))
    assert abs(sum(w * poly(p) for w, p in zip(weights, points)) - poly(at)) <= 1e-9 * scale


@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_extrapolate_follows_a_polynomial_trajectory_of_its_order(order, dtype):
    base = torch.randn(2, 3, 4, dtype=torch.float64)
    f = lambda s: base * (1 + 0.5 * s * (order >= 1) + 0.1 * s * s * (order >= 2))  # noqa: E731
    history = [(s, [f(s).to(dtype), torch.tensor([s]), "label", None]) for s in (2, 4, 5)]
    out = extrapolate(history, 7, order)
    assert out[0].dtype == dtype
    tol = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out[0].double(), f(7), rtol=tol, atol=tol)
    assert out[1].tolist() == [5] and out[2:] == ["label", None]  # the last step's non-float outputs
    out[0].add_(1)  # new tensors: the history is untouched
    assert torch.equal(history[-1][1][0], f(5).to(dtype))


def test_extrapolate_uses_what_was_computed_and_refuses_bad_calls():
    a, b = torch.zeros(3), torch.ones(3)
    torch.testing.assert_close(extrapolate([(1, [b])], 3, order=2)[0], b)  # one step: reuse it
    torch.testing.assert_close(extrapolate([(0, [a]), (1, [b])], 3, order=2)[0], 3 * b)  # two: a line
    torch.testing.assert_close(extrapolate([(0, [a]), (1, [b])], 3, order=0)[0], b)
    with pytest.raises(ValueError, match="at least one computed step"):
        extrapolate([], 3, 1)
    with pytest.raises(ValueError, match="must come after the last computed step 1"):
        extrapolate([(0, [a]), (1, [b])], 1, 1)
    with pytest.raises(ValueError, match="distinct points"):
        lagrange_weights([1, 1], 2)


# -- the controller ---------------------------------------------------------------------------------
def test_the_set_is_chosen_before_each_sparse_step_and_drops_count_sparse_steps_only():
    policy = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=(), step_cache_interval=3)
    controller = RASController(policy)
    n, modes, selected_at = 8, [], []
    for step in range(8):
        mode, index = controller.begin_step(1.0 - step / 8, "capture", n, 1, torch.device("cpu"))
        modes.append(mode)
        if mode != "predicted":
            controller.record_outputs([torch.full((1, 4), float(step))])
        else:
            assert index is None and controller.stats[-1].active_tokens == 0
            assert controller.predicted_outputs()[0].shape == (1, 4)
        before = controller.next_index
        controller.end_step(mode, torch.rand(1, n, 1, 2))
        if controller.next_index is not None and controller.next_index is not before:
            selected_at.append(step)
    assert modes == ["dense", "sparse", "predicted", "predicted", "sparse", "predicted", "predicted", "sparse"]
    assert selected_at == [0, 3, 6]  # the step right before each sparse step, computed or predicted
    assert int(controller.drops.sum()) == 3 * 4  # 4 of 8 tokens dropped in each of 3 sparse steps


def test_a_new_generation_or_input_signature_forgets_the_history():
    controller = RASController(RASPolicy(warmup_steps=1, reset_steps=(), step_cache_interval=2))
    cpu = torch.device("cpu")

    def run(t, owner="a"):
        mode, _ = controller.begin_step(t, owner, 4, 1, cpu)
        if mode != "predicted":
            controller.record_outputs([torch.zeros(1)])
        controller.end_step(mode, torch.rand(1, 4, 1, 1))
        return mode

    assert [run(t) for t in (0.9, 0.8, 0.7)] == ["dense", "sparse", "predicted"]
    assert run(0.6, owner="b") == "dense"  # new caches: the other signature's outputs are not this one's
    assert run(1.0) == "dense"              # the timestep jumped back: a new generation
    assert run(0.9) == "sparse" and run(0.8) == "predicted"


@pytest.mark.parametrize("order", [0, 1, 2])
def test_the_step_cache_keeps_order_plus_one_outputs_and_nothing_without_it(order):
    for interval, kept in ((1, ()), (2, (5, 7, 8)[-(order + 1):])):  # computed: 0, 1, 3, 5, 7 (reset), 8
        controller = RASController(RASPolicy(warmup_steps=1, reset_steps=(7,), step_cache_interval=interval,
                                             step_cache_order=order))
        for step in range(10):
            mode, _ = controller.begin_step(1 - step / 10, "a", 4, 1, torch.device("cpu"))
            if mode != "predicted":
                controller.record_outputs([torch.zeros(1)])
            controller.end_step(mode, torch.rand(1, 4, 1, 1))
        assert controller.kept_steps == kept


def test_an_override_runs_a_predicted_step():
    controller = RASController(RASPolicy(warmup_steps=1, reset_steps=(), step_cache_interval=2))
    for step, expected in enumerate(["dense", "sparse", "dense"]):
        if step == 2:
            controller.override_next_step("dense")
        mode, _ = controller.begin_step(1 - step / 4, "a", 4, 1, torch.device("cpu"))
        assert mode == expected
        controller.record_outputs([torch.zeros(1)])
        controller.end_step(mode, torch.rand(1, 4, 1, 1))


# -- whole loops ------------------------------------------------------------------------------------
def _extrapolated(computed: list[tuple[int, torch.Tensor]], step: int, order: int) -> torch.Tensor:
    """The reference's own extrapolation, written out per order (no shared code)."""
    used = computed[-(order + 1):]
    if len(used) == 1:
        return used[0][1]
    if len(used) == 2:
        (s0, f0), (s1, f1) = used
        return f1 + (f1 - f0) * (step - s1) / (s1 - s0)
    (s0, f0), (s1, f1), (s2, f2) = used
    return (f0 * (step - s1) * (step - s2) / ((s0 - s1) * (s0 - s2))
            + f1 * (step - s0) * (step - s2) / ((s1 - s0) * (s1 - s2))
            + f2 * (step - s0) * (step - s1) / ((s2 - s0) * (s2 - s1)))


@settings(max_examples=6, **SETTINGS)
@given(case=cases(), interval=st.integers(2, 3), order=st.integers(0, 2))
def test_ratio_one_with_a_step_cache_equals_the_dense_model_with_extrapolated_steps(case, interval, order):
    """At ratio 1 the step cache is all RAS changes: computed steps equal the model, predicted steps
    its extrapolation, over a loop whose latent follows what was returned."""
    model = case.build()
    policy = RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=(5,), step_cache_interval=interval,
                       step_cache_order=order)
    ras = ras_compile(model, policy, backend=None)
    computed = []
    got = list(euler_loop(ras, case, steps=8))
    for (step, kwargs, prediction), stats in zip(got, ras.ras_controller.stats):
        assert stats.mode == ("predicted" if policy.is_predicted_step(step) else
                              "dense" if policy.is_dense_step(step) else "sparse")
        if stats.mode == "predicted":
            expected = _extrapolated(computed, step, order)
        else:
            expected = prediction_of(model(**kwargs))
            computed.append((step, expected))
        torch.testing.assert_close(prediction, expected, rtol=1e-5, atol=1e-5)
    assert "predicted" in [s.mode for s in ras.ras_controller.stats]


def _compare_with_reference(case: Case, policy: RASPolicy, backend, steps: int = 9) -> list[str]:
    model = case.build()
    ras = ras_compile(model, policy, backend=backend)
    reference = EagerRASReference(model, case.num_tokens, case.patch, case.image_rows)
    computed = []
    for step, kwargs, got in euler_loop(ras, case, steps):
        stats = ras.ras_controller.stats[-1]
        if stats.mode == "predicted":
            expected = _extrapolated(computed, step, policy.step_cache_order)
        else:
            active = ras.ras_controller.last_index if stats.mode == "sparse" else None
            expected = reference.step(kwargs, active)
            computed.append((step, expected))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    return [s.mode for s in ras.ras_controller.stats]


@settings(max_examples=6, **SETTINGS)
@given(case=cases(), ratio=st.sampled_from([0.25, 0.5]), order=st.integers(0, 2))
def test_ras_with_a_step_cache_equals_the_eager_reference_with_extrapolated_steps(case, ratio, order):
    """Sparse steps after predicted ones read the K/V and outputs the last computed steps left in the
    caches, and their active set is chosen from the predicted step's output."""
    policy = RASPolicy(sample_ratio=ratio, warmup_steps=2, reset_steps=(6,), step_cache_interval=2,
                       step_cache_order=order)
    modes = _compare_with_reference(case, policy, backend=None)
    assert modes == ["dense", "dense", "sparse", "predicted", "sparse", "predicted", "dense", "sparse", "predicted"]


@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_ras_with_a_step_cache_through_aot_eager_compiles_once(family):
    case = Case(family, layers=1, heads=2, head_dim=8, patch=2, height=8, width=12, batch=2)
    policy = RASPolicy(sample_ratio=0.5, warmup_steps=2, reset_steps=(6,), step_cache_interval=2)
    torch._dynamo.reset()
    counters.clear()
    _compare_with_reference(case, policy, backend="aot_eager")
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_predicted_steps_return_the_models_output_structure_and_each_call_slot_predicts_its_own():
    case = Case("sd3", layers=1, heads=2, head_dim=8, patch=2, height=8, width=8, batch=1)
    model = case.build()
    policy = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=(), step_cache_interval=2, calls_per_step=2)
    ras = ras_compile(model, policy, backend=None)
    sigmas = flow_sigmas(4)
    outputs = {0: [], 1: []}
    for i in range(4):
        for slot, seed in ((0, 0), (1, 1)):  # two passes a step at the same timestep, different inputs
            kwargs = dict(case.inputs(model, seed=seed), timestep=timestep_for(sigmas[i], 1), return_dict=True)
            out = ras(**kwargs)
            assert type(out).__name__ == "Transformer2DModelOutput"
            outputs[slot].append(out.sample)
    for slot in (0, 1):
        assert [s.mode for s in ras.ras_controllers[slot].stats] == ["dense", "sparse", "predicted", "sparse"]
        assert ras.ras_controllers[slot].kept_steps == (1, 3)  # order 1: the last two computed steps only
        a, b = outputs[slot][0], outputs[slot][1]
        torch.testing.assert_close(outputs[slot][2], 2 * b - a)  # computed at 0 and 1, predicted at 2
    assert not torch.allclose(outputs[0][2], outputs[1][2])
