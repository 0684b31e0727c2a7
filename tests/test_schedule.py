"""The step plan: dense steps, static k, and the official linear dynamic schedule.

The dynamic schedule is checked against ``official_skip_token_list`` below, a
transcription of the *procedure* of microsoft/RAS
``src/ras/utils/ras_manager.py::generate_skip_token_list`` (nested loops that
append one count per step, then zero the warm-up and reset steps). It shares no
code with ``ras_compile.schedule``, which computes the same count in closed form.
"""
from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings, strategies as st

from ras_compile.policy import RASPolicy
from ras_compile.schedule import (active_tokens_per_step, dense_flop_fraction, flop_bound_speedup,
                                  official_dynamic_dropped_tokens, round_active_tokens, scaled_plan,
                                  spread_dynamic_schedule, static_active_tokens)

SETTINGS = dict(deadline=None, max_examples=60)


def official_skip_token_list(num_tokens, sample_ratio, num_steps, warmup_steps, reset_steps,
                             skip_num_step, skip_num_step_length, multiple=64):
    """Dropped tokens per step, following the official loop structure step by step."""
    avg = int((1 - sample_ratio) * num_tokens)
    counts = []
    for i in range(0, num_steps // skip_num_step_length + 1):
        for j in range(skip_num_step_length):
            if i * skip_num_step_length + j >= num_steps:
                break
            count = avg + skip_num_step * (i - (((num_steps + warmup_steps) // skip_num_step_length) // 2))
            counts.append((count // multiple) * multiple)
    for t in range(warmup_steps):
        counts[t] = 0
    for t in reset_steps:
        counts[t] = 0
    return counts


# -- dense steps -------------------------------------------------------------------------------

@settings(**SETTINGS)
@given(warmup=st.integers(0, 8), resets=st.sets(st.integers(0, 50), max_size=5),
       end=st.none() | st.integers(0, 50), num_steps=st.integers(1, 50), num_tokens=st.integers(1, 300),
       ratio=st.floats(0.01, 0.99))
def test_dense_exactly_at_warmup_resets_and_from_end_step(warmup, resets, end, num_steps, num_tokens, ratio):
    policy = RASPolicy(sample_ratio=ratio, warmup_steps=warmup, reset_steps=resets, end_step=end)
    expected_dense = (set(range(warmup)) | resets) & set(range(num_steps))
    if end is not None:
        expected_dense |= set(range(end, num_steps))
    assert {t for t in range(num_steps) if policy.is_dense_step(t)} == expected_dense

    plan = active_tokens_per_step(policy, num_steps, num_tokens)
    assert len(plan) == num_steps
    k = policy.active_tokens(num_steps, num_tokens)
    assert all(plan[t] == (num_tokens if t in expected_dense else k) for t in range(num_steps))


def test_spec_example_sd3_28_steps():
    policy = RASPolicy()
    dense = [t for t in range(28) if policy.is_dense_step(t)]
    assert dense == [0, 1, 2, 3, 12, 20]
    assert RASPolicy(end_step=25).is_dense_step(25) and not RASPolicy(end_step=25).is_dense_step(24)
    assert not RASPolicy(warmup_steps=0, reset_steps=()).is_dense_step(0)  # the runtime forces it, not the plan


# -- static k ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio,num_tokens,multiple,k", [
    (0.5, 4096, 1, 2048), (0.125, 4096, 1, 512), (0.25, 4096, 1, 1024), (0.3, 10, 1, 3), (0.7, 10, 1, 7),
    (1.0, 7, 1, 7), (0.01, 10, 1, 1), (0.5, 1, 1, 1), (0.99, 3, 1, 3),
    (0.3, 4096, 64, 1216),   # round(1228.8) = 1229, down to a multiple of 64
    (0.01, 4096, 64, 64),    # round(40.96) = 41 would round down to 0: never below one multiple
    (0.5, 50, 100, 50),      # a multiple larger than N: never above N
    (0.5, 16, 4, 8), (0.6, 16, 4, 8),  # round(9.6) = 10 -> 8
])
def test_static_active_tokens_exact(ratio, num_tokens, multiple, k):
    policy = RASPolicy(sample_ratio=ratio, token_multiple=multiple)
    assert policy.active_tokens(5, num_tokens) == k
    assert policy.active_tokens(17, num_tokens) == k  # static: the same at every step


@settings(**SETTINGS)
@given(ratio=st.floats(0.001, 1.0), num_tokens=st.integers(1, 10_000), multiple=st.integers(1, 256))
def test_static_k_is_the_largest_allowed_multiple_not_above_the_ratio(ratio, num_tokens, multiple):
    k = RASPolicy(sample_ratio=ratio, token_multiple=multiple).active_tokens(4, num_tokens)
    target = min(num_tokens, max(1, round(ratio * num_tokens)))
    assert 1 <= k <= num_tokens
    assert static_active_tokens(ratio, num_tokens) == target
    if multiple > num_tokens:
        assert k == num_tokens
    elif target < multiple:
        assert k == multiple
    else:
        assert k % multiple == 0 and target - multiple < k <= target


def test_round_active_tokens_bounds():
    assert round_active_tokens(0, 10, 1) == 1
    assert round_active_tokens(130, 4096, 64) == 128
    assert round_active_tokens(5000, 4096, 1) == 4096


# -- official dynamic schedule -----------------------------------------------------------------

def test_dynamic_schedule_hand_computed_sd3_example():
    """N = 4096, r = 0.5, 28 steps, warm-up 4, resets 12 and 20, skip_num_step 100 every 4 steps.

    avg = 2048, centre group c = ((28 + 4) // 4) // 2 = 4; group g = t // 4 drops
    2048 + 100 (g - 4), floored to 64: g=1 1748 -> 1728, g=2 1848 -> 1792,
    g=3 1948 -> 1920, g=4 2048, g=5 2148 -> 2112, g=6 2248 -> 2240.
    """
    policy = RASPolicy(schedule="dynamic", num_steps=28, skip_num_step=100, skip_num_step_length=4)
    dropped = {1: 1728, 2: 1792, 3: 1920, 4: 2048, 5: 2112, 6: 2240}
    plan = active_tokens_per_step(policy, 28, 4096)
    for t in range(28):
        expected = 4096 if t < 4 or t in (12, 20) else 4096 - dropped[t // 4]
        assert plan[t] == expected, t


dynamic_cases = st.fixed_dictionaries(dict(
    num_tokens=st.sampled_from([256, 1024, 4096, 1000]),
    sample_ratio=st.floats(0.1, 0.9),
    num_steps=st.integers(2, 50),
    warmup_steps=st.integers(0, 8),
    skip_num_step=st.integers(-200, 200),
    skip_num_step_length=st.integers(1, 12),
))


@settings(**SETTINGS)
@given(case=dynamic_cases, resets=st.sets(st.integers(0, 49), max_size=3))
def test_dynamic_counts_follow_the_official_list(case, resets):
    assume(case["warmup_steps"] < case["num_steps"])
    resets = {r for r in resets if r < case["num_steps"]}
    n = case["num_tokens"]
    policy = RASPolicy(schedule="dynamic", reset_steps=resets, **{k: v for k, v in case.items() if k != "num_tokens"})
    official = official_skip_token_list(reset_steps=resets, **case)
    for t in range(case["num_steps"]):
        if policy.is_dense_step(t):
            assert official[t] == 0  # the official list marks dense steps by dropping nothing
            continue
        k = policy.active_tokens(t, n)
        assert 1 <= k <= n
        if 0 <= official[t] < n:   # where the official code would not fail its range assertion
            assert k == n - official[t]
            assert (n - k) % 64 == 0
        else:                       # we clamp where it asserts
            assert k == (n if official[t] < 0 else 1)


@settings(**SETTINGS)
@given(case=dynamic_cases)
def test_dynamic_counts_change_monotonically_by_group(case):
    assume(case["warmup_steps"] < case["num_steps"])
    n = case["num_tokens"]
    policy = RASPolicy(schedule="dynamic", reset_steps=(), **{k: v for k, v in case.items() if k != "num_tokens"})
    dropped = [n - policy.active_tokens(t, n) for t in range(case["warmup_steps"], case["num_steps"])]
    pairs = list(zip(dropped, dropped[1:]))
    if case["skip_num_step"] >= 0:
        assert all(a <= b for a, b in pairs)
    else:
        assert all(a >= b for a, b in pairs)


@settings(**SETTINGS)
@given(case=dynamic_cases)
def test_dynamic_mean_is_what_the_official_centring_guarantees(case):
    """What the official schedule guarantees about its average, exactly.

    With no reset steps and no clamping, the linear (unfloored) counts over the RAS
    steps ``[warmup, num_steps)`` average to within ``|skip_num_step| / 2`` of
    ``avg = int((1 - r) N)``: the centre group ``((num_steps + warmup) // L) // 2``
    sits within half a group of the mean group index of those steps. Flooring to 64
    then lowers each count by 0..63, so the mean dropped count lies in
    ``(avg - |skip_num_step| / 2 - 64, avg + |skip_num_step| / 2]``: the official code
    never promises the requested ratio exactly, and on average computes a little
    more than asked. Reset steps can shift the mean further (they remove steps
    from one side of the centre); nothing is promised then.
    """
    w, num_steps, n, step = case["warmup_steps"], case["num_steps"], case["num_tokens"], case["skip_num_step"]
    assume(w < num_steps)
    avg = int((1 - case["sample_ratio"]) * n)
    fields = {k: v for k, v in case.items() if k != "num_tokens"}
    linear = RASPolicy(schedule="dynamic", reset_steps=(), dynamic_drop_multiple=1, **fields)
    floored = RASPolicy(schedule="dynamic", reset_steps=(), **fields)
    unfloored_counts = [official_dynamic_dropped_tokens(
        t, n, sample_ratio=case["sample_ratio"], num_steps=num_steps, warmup_steps=w, skip_num_step=step,
        skip_num_step_length=case["skip_num_step_length"], drop_multiple=1) for t in range(w, num_steps)]
    assume(all(0 <= c < n for c in unfloored_counts))  # no clamping anywhere
    linear_dropped = [n - linear.active_tokens(t, n) for t in range(w, num_steps)]
    assert linear_dropped == unfloored_counts
    mean_linear = sum(linear_dropped) / len(linear_dropped)
    assert abs(mean_linear - avg) <= abs(step) / 2 + 1e-9
    mean_floored = sum(n - floored.active_tokens(t, n) for t in range(w, num_steps)) / len(linear_dropped)
    assert avg - abs(step) / 2 - 64 < mean_floored <= avg + abs(step) / 2 + 1e-9


def test_dynamic_with_zero_step_is_the_floored_static_count():
    policy = RASPolicy(schedule="dynamic", num_steps=28, skip_num_step=0)
    # int(0.7 * 1000) = 700 dropped, floored to 640: the official dynamic path keeps 360, not 300
    assert RASPolicy(schedule="dynamic", num_steps=28, sample_ratio=0.3).active_tokens(9, 1000) == 360
    assert policy.active_tokens(9, 4096) == 2048
    assert policy.active_tokens(9, 63) == 63  # fewer than 64 tokens: 64-flooring drops none


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
def test_end_step_and_steps_beyond_num_steps_do_not_crash(schedule):
    """The official code indexes its per-step list at step + 1, past the end when
    end_step > num_steps; here every step has a count."""
    policy = RASPolicy(schedule=schedule, num_steps=10, end_step=15, warmup_steps=2, reset_steps=(5,),
                       skip_num_step=64, skip_num_step_length=2)
    plan = active_tokens_per_step(policy, 20, 1024)
    assert len(plan) == 20 and all(1 <= k <= 1024 for k in plan)
    assert [t for t in range(20) if plan[t] == 1024 and policy.is_dense_step(t)] == [0, 1, 5] + list(range(15, 20))
    for t in range(30):
        assert 1 <= policy.active_tokens(t, 1024) <= 1024


# -- FLOP bound ---------------------------------------------------------------------------------

def test_flop_fraction_reproduces_the_spec_formula():
    n, text, r = 4096, 333, 0.5
    policy = RASPolicy(sample_ratio=r)  # warm-up 4, resets 12 and 20: 6 dense steps of 28
    spec = (6 + 22 * (r * n + text) / (n + text)) / 28
    assert math.isclose(dense_flop_fraction(policy, 28, n, text), spec, rel_tol=1e-12)
    assert math.isclose(flop_bound_speedup(policy, 28, n, text), 1 / spec, rel_tol=1e-12)
    assert dense_flop_fraction(RASPolicy(sample_ratio=1.0), 28, n, text) == 1.0
    assert flop_bound_speedup(RASPolicy(sample_ratio=0.125), 28, n, 0) == pytest.approx(28 / (6 + 22 / 8))
    with pytest.raises(ValueError):
        dense_flop_fraction(policy, 0, n, text)


def test_scaled_plan_hand_cases():
    assert scaled_plan(28) == (4, (12, 20))  # RASPolicy's defaults at their own length
    assert scaled_plan(28) == (RASPolicy().warmup_steps, RASPolicy().reset_steps)
    assert scaled_plan(14) == (2, (6, 10))
    assert scaled_plan(20) == (3, (9, 14))
    assert scaled_plan(40) == (6, (17, 29))
    assert scaled_plan(8) == (1, (3, 6))
    assert scaled_plan(1) == (1, ())  # resets at 0 fall in the warm-up
    assert scaled_plan(30, 4, (12, 20), plan_steps=30) == (4, (12, 20))
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_steps"):
            scaled_plan(bad)


@settings(**SETTINGS)
@given(st.integers(1, 400))
def test_scaled_plan_keeps_the_dense_share_and_makes_a_valid_policy(num_steps):
    warmup, resets = scaled_plan(num_steps)
    assert warmup >= 1 and all(warmup < r < num_steps for r in resets) and list(resets) == sorted(set(resets))
    assert abs(warmup - 4 * num_steps / 28) <= 0.5 or warmup == 1  # the warm-up covers 1/7 of the loop
    policy = RASPolicy(warmup_steps=warmup, reset_steps=resets, num_steps=num_steps)
    dense = sum(policy.is_dense_step(t) for t in range(num_steps))
    assert dense <= warmup + 2 and dense >= min(num_steps, warmup)


def test_spread_dynamic_schedule_hand_cases():
    # The reference DiT's 256 tokens at ratio 0.5 over 24 steps after the warm-up (bench_quality's row).
    assert spread_dynamic_schedule(0.5, 256, 24) == dict(schedule="dynamic", skip_num_step=3, skip_num_step_length=1,
                                                          dynamic_drop_multiple=4)
    # SD3-medium's 4096 tokens: the official multiple of 64, 1024 tokens moved over 23 changes.
    assert spread_dynamic_schedule(0.5, 4096, 24)["skip_num_step"] == 45
    assert spread_dynamic_schedule(0.5, 4096, 24)["dynamic_drop_multiple"] == 64
    # 8 kept tokens of 64: 4 tokens to move over 45 changes, one every 9 steps (5, within a token).
    assert spread_dynamic_schedule(0.125, 64, 46)["skip_num_step"] == 1
    assert spread_dynamic_schedule(0.125, 64, 46)["skip_num_step_length"] == 9
    assert spread_dynamic_schedule(1.0, 64, 5)["skip_num_step"] == 0  # nothing dropped: a constant count
    for bad in [(0.0, 64, 5), (0.5, 0, 5), (0.5, 64, -1), (1.5, 64, 5)]:
        with pytest.raises(ValueError, match="spread_dynamic_schedule needs"):
            spread_dynamic_schedule(*bad)


@settings(**SETTINGS)
@given(ratio=st.sampled_from([0.125, 0.25, 0.5, 0.75]), num_tokens=st.sampled_from([64, 256, 1024, 4096]),
       num_steps=st.integers(8, 50))
def test_spread_dynamic_schedule_spreads_around_the_ratio(ratio, num_tokens, num_steps):
    """Over the steps after the warm-up the count falls from above r N to below it, by about
    half the smaller of the mean dropped and kept counts (never clamped at 1 or N), and the
    steps' mean stays near r N."""
    warmup = 4
    policy = RASPolicy(sample_ratio=ratio, warmup_steps=warmup, reset_steps=(), num_steps=num_steps,
                       **spread_dynamic_schedule(ratio, num_tokens, num_steps - warmup))
    ks = active_tokens_per_step(policy, num_steps, num_tokens)[warmup:]
    assert list(ks) == sorted(ks, reverse=True) and 1 < ks[-1] and ks[0] < num_tokens
    dropped = int((1 - ratio) * num_tokens)
    room = min(dropped, num_tokens - dropped)
    multiple = max(1, num_tokens // 64)
    assert ks[0] - ks[-1] == pytest.approx(room / 2, abs=2 * multiple + policy.skip_num_step)
    assert sum(ks) / len(ks) == pytest.approx(ratio * num_tokens, abs=multiple + policy.skip_num_step)
