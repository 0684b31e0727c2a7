"""The step plan: which steps are dense and how many image tokens a sparse step keeps.

Everything here is a pure function of plain numbers (or of a policy's fields), so
the plan can be printed, tested and reasoned about before any model runs. The
runtime asks the policy, the policy asks these functions; nothing here keeps state.

Two ratio schedules exist (spec §3.5):

- static: every sparse step keeps ``round(sample_ratio * N)`` tokens;
- the official linear dynamic schedule of microsoft/RAS
  (``src/ras/utils/ras_manager.py``, ``generate_skip_token_list``), reimplemented
  here from its observed behaviour, see :func:`official_dynamic_dropped_tokens`.

Both end with :func:`round_active_tokens`, which snaps k to a multiple of
``token_multiple``: every distinct k is one more kernel shape to compile or tune,
so a policy can trade a little ratio accuracy for few sizes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # the policy imports this module; only type checkers need the reverse
    from .policy import RASPolicy

OFFICIAL_DROP_MULTIPLE = 64
"""The official dynamic schedule floors every dropped count to a multiple of 64."""


def is_dense_step(step: int, *, warmup_steps: int, reset_steps: Iterable[int], end_step: int | None) -> bool:
    """Whether 0-based ``step`` runs every token.

    Warm-up steps fix the layout before any selection can be trusted, reset steps
    refresh every cache so errors of stale tokens cannot accumulate, and steps from
    ``end_step`` on are dense because the last steps shape fine detail everywhere.
    Unlike the official manager (``is_RAS_step`` uses ``<= end_step`` while
    ``is_next_RAS_step`` uses ``<``), ``end_step`` itself is dense in both senses.
    """
    return step < warmup_steps or step in reset_steps or (end_step is not None and step >= end_step)


def is_predicted_step(step: int, *, warmup_steps: int, reset_steps: Iterable[int], end_step: int | None,
                      interval: int) -> bool:
    """Whether 0-based ``step`` is skipped by a step cache of ``interval``: the model is not run at all and
    the step's prediction is extrapolated from the last computed steps (``ras_compile.step_cache``).

    Dense steps are always computed. After each dense step (and from step 0 when there is no warm-up) the
    first sparse step is computed, then one in every ``interval``: with interval 2 after a dense step at
    ``d``, steps ``d + 1, d + 3, ...`` run and ``d + 2, d + 4, ...`` are predicted. So every run of steps
    between dense ones starts from a computed step, and ``interval=1`` predicts nothing.
    """
    if interval == 1 or is_dense_step(step, warmup_steps=warmup_steps, reset_steps=reset_steps, end_step=end_step):
        return False
    last_dense = max([r for r in reset_steps if r < step] + [warmup_steps - 1])
    return (step - last_dense - 1) % interval != 0


PAPER_PLAN_STEPS = 28
"""The loop length RASPolicy's default dense steps (warm-up 4, resets at 12 and 20) are made for."""


def scaled_plan(num_steps: int, warmup_steps: int = 4, reset_steps: Iterable[int] = (12, 20),
                plan_steps: int = PAPER_PLAN_STEPS) -> tuple[int, tuple[int, ...]]:
    """A dense-step plan made for ``plan_steps`` steps (by default RASPolicy's: warm-up 4, resets at 12
    and 20 of 28) scaled to a ``num_steps``-step loop, so the dense steps cover the same part of it.

    Returns ``(warmup_steps, reset_steps)`` for :class:`~ras_compile.RASPolicy`: the warm-up is
    ``max(1, round(warmup_steps * num_steps / plan_steps))``; a reset ``r`` becomes
    ``round(r * num_steps / plan_steps)``, kept only if it falls after the warm-up (a reset right at its
    end would refresh caches that are already fresh: it is dropped too) and before the end.
    ``scaled_plan(28)`` is ``(4, (12, 20))``; ``scaled_plan(14)`` is ``(2, (6, 10))``.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} is invalid: must be an integer >= 1")
    if int(plan_steps) != plan_steps or plan_steps < 1:
        raise ValueError(f"plan_steps={plan_steps!r} is invalid: must be an integer >= 1")
    scale = num_steps / plan_steps
    warmup = max(1, round(warmup_steps * scale))
    resets = {round(r * scale) for r in reset_steps}
    return warmup, tuple(sorted(r for r in resets if warmup < r < num_steps))


def static_active_tokens(sample_ratio: float, num_tokens: int) -> int:
    """``round(sample_ratio * N)`` clamped to ``1..N``.

    The official static schedule computes the dropped count as
    ``int((1 - sample_ratio) * N)``, whose float truncation sometimes keeps one token
    more than intended (``int(0.7 * 10) == 6``); rounding the kept count avoids that.
    At least one token is kept so a sparse step always has a query row.
    """
    return min(num_tokens, max(1, round(sample_ratio * num_tokens)))


def official_dynamic_dropped_tokens(step: int, num_tokens: int, *, sample_ratio: float, num_steps: int,
                                    warmup_steps: int, skip_num_step: int, skip_num_step_length: int,
                                    drop_multiple: int = OFFICIAL_DROP_MULTIPLE) -> int:
    """Dropped tokens at ``step`` under the official linear schedule, before any clamping.

    What microsoft/RAS (``ras_manager.generate_skip_token_list``) does, restated:

    - the mean dropped count is ``avg = int((1 - sample_ratio) * N)`` (truncated);
    - steps are grouped in runs of ``L = skip_num_step_length``; step ``t`` is in
      group ``g = t // L``;
    - the groups are centred on ``c = ((num_steps + warmup_steps) // L) // 2``, the
      group in the middle of the RAS steps ``[warmup_steps, num_steps)``;
    - the count is ``avg + skip_num_step * (g - c)``: it moves by ``skip_num_step``
      (either sign) each group, so the schedule is linear and symmetric about the
      middle, which is what keeps its mean near ``avg``;
    - it is then floored to a multiple of 64 (Python ``//``, so towards minus
      infinity); flooring only ever drops fewer tokens than the linear value.

    The official code asserts ``0 <= count <= N`` instead of clamping, and it sets
    warm-up and reset steps to 0 in the list; the caller decides density separately
    and clamps. The formula is defined for every ``step``, so an ``end_step`` or a
    loop longer than ``num_steps`` never indexes past a list (an official crash).
    """
    group = step // skip_num_step_length
    centre = ((num_steps + warmup_steps) // skip_num_step_length) // 2
    linear = int((1 - sample_ratio) * num_tokens) + skip_num_step * (group - centre)
    return (linear // drop_multiple) * drop_multiple


def spread_dynamic_schedule(sample_ratio: float, num_tokens: int, steps_after_warmup: int,
                            spread: float = 0.5) -> dict:
    """`RASPolicy` fields for a dynamic schedule with mean ratio ``sample_ratio``.

    The dropped count grows linearly over the ``steps_after_warmup`` steps (a change every
    step, or every few steps where there are fewer tokens to move than steps) by
    ``spread`` times the smaller of the mean dropped count ``(1 - r) N`` and the mean kept
    count: with the default 0.5 the count spans about 0.75x-1.25x of that smaller count
    around its mean, and a low ratio's few kept tokens never run out. Counts are floored
    to multiples of ``N // 64`` (the official 64 of 4096 tokens, scaled). Pass
    ``num_steps`` with the fields: the schedule is centred on the loop.

    What the benchmarks mean by "the dynamic schedule at ratio r" (the official code
    takes ``--skip_num_step`` as a bare token count, which fits one resolution only)."""
    if not 0 < sample_ratio <= 1 or num_tokens < 1 or steps_after_warmup < 0 or spread < 0:
        raise ValueError(f"spread_dynamic_schedule needs 0 < sample_ratio <= 1, num_tokens >= 1, "
                         f"steps_after_warmup >= 0 and spread >= 0, got {sample_ratio}, {num_tokens}, "
                         f"{steps_after_warmup}, {spread}")
    average_dropped = int((1 - sample_ratio) * num_tokens)
    change = spread * min(average_dropped, num_tokens - average_dropped)  # over the whole loop
    changes = max(1, steps_after_warmup - 1)  # count changes between the first and the last step
    skip, length = 0, 1  # no room to move: a constant count
    if change >= 1:
        # The smoothest (skip, length) whose total change, skip * changes / length, is within
        # 10 % (or one token) of `change`: several tokens every step, or a few every few steps.
        candidates = [(max(1, round(change * n / changes)), n) for n in range(1, changes + 1)]
        error = lambda c: abs(c[0] * changes / c[1] - change)  # noqa: E731
        skip, length = next((c for c in candidates if error(c) <= max(1.0, 0.1 * change)),
                            min(candidates, key=error))
    return dict(schedule="dynamic", skip_num_step=skip, skip_num_step_length=length,
                dynamic_drop_multiple=max(1, num_tokens // 64))


def round_active_tokens(k: int, num_tokens: int, token_multiple: int) -> int:
    """Snap k down to a multiple of ``token_multiple`` without leaving ``[max(1, m), N]``.

    Rounding down keeps the promised speed-up; the floor of one multiple keeps a
    sparse step from collapsing to nothing; the ceiling of N keeps the index valid
    when the multiple exceeds the token count (tiny latents).
    """
    k = (k // token_multiple) * token_multiple
    return min(num_tokens, max(k, token_multiple, 1))


def sparse_step_active_tokens(policy: RASPolicy, step: int, num_tokens: int) -> int:
    """k for a sparse step at ``step``; whether the step is sparse is not asked here.

    The dynamic count is clamped to ``0..N-1`` dropped tokens (the official code
    asserts instead): a negative count keeps every token, a count of N would leave
    no query row.
    """
    if policy.schedule == "dynamic":
        dropped = official_dynamic_dropped_tokens(
            step, num_tokens, sample_ratio=policy.sample_ratio, num_steps=policy.num_steps,
            warmup_steps=policy.warmup_steps, skip_num_step=policy.skip_num_step,
            skip_num_step_length=policy.skip_num_step_length, drop_multiple=policy.dynamic_drop_multiple)
        k = num_tokens - min(num_tokens - 1, max(0, dropped))
    else:
        k = static_active_tokens(policy.sample_ratio, num_tokens)
    return round_active_tokens(k, num_tokens, policy.token_multiple)


def active_tokens_per_step(policy: RASPolicy, num_steps: int, num_tokens: int) -> tuple[int, ...]:
    """Image tokens computed at each of ``num_steps`` steps (N on dense steps, 0 on steps a step cache
    predicts, see :func:`is_predicted_step`).

    This is the plan when every step runs as scheduled; the runtime may still turn a
    planned sparse or predicted step dense (empty caches, e.g. ``warmup_steps=0``, or no
    computed output to extrapolate from), never the reverse.
    """
    def computed(t: int) -> int:
        if policy.is_dense_step(t):
            return num_tokens
        if policy.is_predicted_step(t):
            return 0
        return sparse_step_active_tokens(policy, t, num_tokens)

    return tuple(computed(t) for t in range(num_steps))


def dense_flop_fraction(policy: RASPolicy, num_steps: int, num_image_tokens: int, num_other_tokens: int = 0) -> float:
    """Transformer FLOPs of the plan as a fraction of an all-dense loop: a lower bound on time.

    Generalises spec §5, ``(6 + 22 * (r N + T) / (N + T)) / 28``, to any plan: a step
    computing k image tokens and the T never-dropped other tokens costs
    ``(k + T) / (N + T)`` of a dense step. That is exact for every token-wise
    operation and, with attention recovery, for attention too (its cost scales with
    the number of query rows, keys always cover all N + T tokens). A step a step
    cache predicts runs no token and costs nothing. It ignores the selection itself,
    cache writes, gathers, the step cache's extrapolation and anything outside the
    transformer (text encoders, VAE), so a real run is slower than this bound says.
    """
    if num_steps < 1 or num_image_tokens < 1 or num_other_tokens < 0:
        raise ValueError(f"dense_flop_fraction needs num_steps >= 1, num_image_tokens >= 1 and "
                         f"num_other_tokens >= 0, got {num_steps}, {num_image_tokens}, {num_other_tokens}")
    total = num_image_tokens + num_other_tokens
    plan = active_tokens_per_step(policy, num_steps, num_image_tokens)
    return sum((k + num_other_tokens) / total for k in plan if k > 0) / num_steps


def flop_bound_speedup(policy: RASPolicy, num_steps: int, num_image_tokens: int, num_other_tokens: int = 0) -> float:
    """The best speed-up the plan can give if time were proportional to FLOPs (see
    :func:`dense_flop_fraction` for what is and is not counted)."""
    return 1.0 / dense_flop_fraction(policy, num_steps, num_image_tokens, num_other_tokens)
