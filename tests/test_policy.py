"""RASPolicy: validation names the field, valid values survive, the value is immutable."""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ras_compile.policy import RASPolicy

SETTINGS = dict(deadline=None, max_examples=40)


def test_defaults_are_the_papers():
    p = RASPolicy()
    assert (p.sample_ratio, p.warmup_steps, p.reset_steps, p.end_step) == (0.5, 4, (12, 20), None)
    assert (p.schedule, p.num_steps, p.metric, p.starvation_scale) == ("static", None, "std", 0.1)
    assert (p.starvation_rule, p.high_ratio, p.share_active_set) == ("paper", 1.0, "per_sample")
    assert (p.kv_cache, p.on_unsupported, p.seed, p.token_multiple, p.tubes) == (True, "raise", 0, 1, "auto")
    assert (p.skip_num_step, p.skip_num_step_length, p.dynamic_drop_multiple) == (0, 1, 64)


INVALID = [
    ("sample_ratio", 0), ("sample_ratio", 0.0), ("sample_ratio", -0.5), ("sample_ratio", 1.5),
    ("sample_ratio", math.nan), ("sample_ratio", math.inf), ("sample_ratio", "0.5"), ("sample_ratio", True),
    ("sample_ratio", None),
    ("warmup_steps", -1), ("warmup_steps", 2.0), ("warmup_steps", True), ("warmup_steps", "4"), ("warmup_steps", None),
    ("reset_steps", 12), ("reset_steps", "12,20"), ("reset_steps", (12, -1)), ("reset_steps", (12.0,)),
    ("reset_steps", (True,)), ("reset_steps", None),
    ("end_step", -1), ("end_step", 3.5), ("end_step", False),
    ("schedule", "linear"), ("schedule", None), ("schedule", "Static"),
    ("num_steps", 0), ("num_steps", -3), ("num_steps", 28.0), ("num_steps", True),
    ("skip_num_step", 1.5), ("skip_num_step", True), ("skip_num_step", None),
    ("skip_num_step_length", 0), ("skip_num_step_length", -2), ("skip_num_step_length", 2.0),
    ("dynamic_drop_multiple", 0), ("dynamic_drop_multiple", 64.0),
    ("metric", "var"), ("metric", None), ("metric", 3),
    ("starvation_scale", -0.1), ("starvation_scale", math.nan), ("starvation_scale", math.inf),
    ("starvation_scale", True), ("starvation_scale", "0.1"),
    ("starvation_rule", "sign"), ("starvation_rule", None),
    ("high_ratio", -0.1), ("high_ratio", 1.01), ("high_ratio", math.nan), ("high_ratio", False),
    ("share_active_set", "guidance"), ("share_active_set", None),
    ("kv_cache", 1), ("kv_cache", "yes"), ("kv_cache", None),
    ("on_unsupported", "warn"), ("on_unsupported", False),
    ("tubes", "always"), ("tubes", False), ("tubes", None),
    ("seed", -1), ("seed", 2**64), ("seed", 1.0), ("seed", True), ("seed", None),
    ("token_multiple", 0), ("token_multiple", -64), ("token_multiple", 64.0), ("token_multiple", True),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_raises_naming_field_value_and_what_is_allowed(field, value):
    with pytest.raises(ValueError) as info:
        RASPolicy(**{field: value})
    message = str(info.value)
    assert message.startswith(f"RASPolicy.{field}={value!r} is invalid: "), message
    assert re.search(r"must (be|satisfy)", message), message


def test_dynamic_schedule_demands_num_steps():
    with pytest.raises(ValueError, match=r"RASPolicy\.num_steps=None is invalid: .*set num_steps"):
        RASPolicy(schedule="dynamic")
    assert RASPolicy(schedule="dynamic", num_steps=28).num_steps == 28


VALID = [
    ("sample_ratio", 1.0), ("sample_ratio", 1), ("sample_ratio", 0.125), ("sample_ratio", np.float64(0.25)),
    ("warmup_steps", 0), ("warmup_steps", 7), ("warmup_steps", np.int64(3)),
    ("reset_steps", ()), ("reset_steps", (3,)),
    ("end_step", None), ("end_step", 0), ("end_step", 100),
    ("schedule", "static"), ("num_steps", 1), ("num_steps", 50),
    ("skip_num_step", -128), ("skip_num_step", 0), ("skip_num_step", 64),
    ("skip_num_step_length", 1), ("skip_num_step_length", 5), ("dynamic_drop_multiple", 1),
    ("metric", "std"), ("metric", "l2norm"), ("metric", "random"),
    ("starvation_scale", 0), ("starvation_scale", 0.0), ("starvation_scale", 2.5),
    ("starvation_rule", "paper"), ("starvation_rule", "official"),
    ("high_ratio", 0), ("high_ratio", 0.3), ("high_ratio", 1),
    ("share_active_set", "per_sample"), ("share_active_set", "cfg"), ("share_active_set", "batch"),
    ("kv_cache", False), ("on_unsupported", "fallback"), ("on_unsupported", "raise"),
    ("tubes", "auto"), ("tubes", "never"),
    ("seed", 0), ("seed", 2**64 - 1), ("token_multiple", 1), ("token_multiple", 64),
]


@pytest.mark.parametrize("field,value", VALID, ids=[f"{f}={v!r}" for f, v in VALID])
def test_valid_value_round_trips(field, value):
    p = RASPolicy(**{field: value})
    assert getattr(p, field) == value
    assert dataclasses.replace(p) == p and hash(dataclasses.replace(p)) == hash(p)


def test_numbers_are_stored_as_plain_python_types():
    p = RASPolicy(sample_ratio=1, warmup_steps=np.int64(3), high_ratio=1, starvation_scale=0)
    assert type(p.sample_ratio) is float and type(p.high_ratio) is float and type(p.starvation_scale) is float
    assert type(p.warmup_steps) is int


def test_callable_metric_is_accepted_and_kept():
    def flat(patches):
        return patches.mean((-1, -2))
    assert RASPolicy(metric=flat).metric is flat


@pytest.mark.parametrize("given_steps,stored", [
    ([20, 12, 12], (12, 20)), ({5, 1}, (1, 5)), (range(3), (0, 1, 2)), ((s for s in (9, 2)), (2, 9)),
    ([np.int64(4)], (4,)), ([], ()),
])
def test_reset_steps_become_a_sorted_tuple_of_unique_ints(given_steps, stored):
    p = RASPolicy(reset_steps=given_steps)
    assert p.reset_steps == stored and type(p.reset_steps) is tuple
    assert all(type(s) is int for s in p.reset_steps)


def test_policy_is_frozen():
    p = RASPolicy()
    for field in dataclasses.fields(RASPolicy):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(p, field.name, getattr(p, field.name))


policies = st.builds(
    RASPolicy,
    sample_ratio=st.floats(0.01, 1.0),
    warmup_steps=st.integers(0, 6),
    reset_steps=st.lists(st.integers(0, 40), max_size=4),
    end_step=st.none() | st.integers(0, 40),
    starvation_scale=st.floats(0, 1),
    high_ratio=st.floats(0, 1),
    starvation_rule=st.sampled_from(["paper", "official"]),
    token_multiple=st.integers(1, 8),
)


@settings(**SETTINGS)
@given(a=policies)
def test_equal_fields_give_equal_hashable_policies(a):
    b = RASPolicy(**{f.name: getattr(a, f.name) for f in dataclasses.fields(RASPolicy)})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert "RASPolicy(" in repr(a) and f"sample_ratio={a.sample_ratio!r}" in repr(a)


@pytest.mark.parametrize("step", [-1, 1.0, True, None])
def test_step_queries_reject_bad_steps(step):
    p = RASPolicy()
    with pytest.raises(ValueError, match="step="):
        p.is_dense_step(step)
    with pytest.raises(ValueError, match="step="):
        p.active_tokens(step, 16)


@pytest.mark.parametrize("num_tokens", [0, -4, 16.0, True])
def test_active_tokens_rejects_bad_token_counts(num_tokens):
    with pytest.raises(ValueError, match="num_tokens="):
        RASPolicy().active_tokens(5, num_tokens)
