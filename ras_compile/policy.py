"""``RASPolicy``: every RAS setting in one immutable, validated value.

The policy is the whole user-facing configuration (the torchao config-dataclass
style): the compiled module, the controller and the step plan all read it and
nothing else. It is frozen and hashable so a compiled artefact can be keyed by it,
and it is validated on construction so a typo fails at the call that made it, with
the field, the value and what is allowed, instead of deep inside a sampling loop.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

from . import schedule as _schedule

_METRICS = ("std", "l2norm", "random")
_SCHEDULES = ("static", "dynamic")
_STARVATION_RULES = ("paper", "official")
_SHARES = ("per_sample", "cfg", "batch")
_ON_UNSUPPORTED = ("raise", "fallback")
MAX_STEP_CACHE_ORDER = 2


def _invalid(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"RASPolicy.{field}={value!r} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
    # bool is an Integral in Python; True as a step count is a bug, not a 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class RASPolicy:
    """How Region-Adaptive Sampling runs (semantics: ``spec/RAS.md``; steps are 0-based).

    sample_ratio: fraction of image tokens computed in a sparse step (static
        schedule) or its target mean (dynamic schedule), ``0 < r <= 1``. 1.0 makes
        every sparse step compute all tokens: the output equals the dense model's.
    warmup_steps: leading dense steps that fix the layout. 0 is allowed (the
        official code crashes); the first step then still runs dense because no
        cache exists yet.
    reset_steps: dense steps that refresh every cache, e.g. ``(12, 20)`` of 28.
        Any iterable of non-negative ints; stored sorted and de-duplicated.
    end_step: steps ``>= end_step`` are dense (None: no such tail).
    schedule: ``"static"`` or ``"dynamic"`` (the official linear schedule, see
        ``schedule.official_dynamic_dropped_tokens``; needs ``num_steps``).
    num_steps: the sampling loop's length. Only the dynamic schedule needs it
        (the schedule is centred on it); when given, the controller does not select
        an active set after the last step.
    skip_num_step: dynamic schedule: change of the dropped count per group of
        steps, either sign (official ``--skip_num_step``).
    skip_num_step_length: dynamic schedule: steps per group, ``>= 1`` (official
        ``--skip_num_step_length``; the official 0 meaning "static" is
        ``schedule="static"`` here).
    dynamic_drop_multiple: dynamic schedule: dropped counts are floored to a
        multiple of this; the official code hard-codes 64, which drops nothing
        below 64 tokens, so tiny latents may want a smaller value.
    metric: token score: ``"std"`` (default), ``"l2norm"``, ``"random"`` or a
        callable ``[B, N, S, C] -> [B, N]`` (see ``selection.score_tokens``).
    starvation_scale: ``s`` in ``R = score * exp(+-s * D)``, finite, ``>= 0``.
    starvation_rule: ``"paper"`` (``exp(-s D)``: a token's chance of being
        computed grows the longer it is dropped) or ``"official"`` (``exp(+s D)``,
        microsoft/RAS: dropped tokens tend to stay dropped; for comparisons).
    high_ratio: fraction of the dropped tokens taken from the high end of the
        ranking, the rest from the low end, ``0 <= h <= 1``.
    share_active_set: ``"per_sample"`` (one set per batch row), ``"cfg"`` (rows
        ``i`` and ``i + B/2`` share one: diffusers' ``[uncond; cond]`` guidance
        batch) or ``"batch"`` (one set for all rows).
    kv_cache: attention of active tokens also reads the cached K/V of inactive
        tokens (attention recovery); False restricts it to active tokens, the
        paper's ablation.
    tubes: ``"auto"`` (default) lets the analysis read a video DiT's tokens as
        tubes (one patch position through every frame, selected as a whole) where
        that reading runs more of the graph on the active tokens than the
        per-frame reading; ``"never"`` keeps the per-frame reading, refusing models
        only the tube reading can serve (see docs/how-it-works.md). Changes the
        captured graphs.
    on_unsupported: ``"raise"`` or ``"fallback"`` (run the dense compiled model
        with a warning) when a model cannot be rewritten.
    seed: seed of the ``"random"`` metric's generator, ``0 <= seed < 2**64``.
    token_multiple: a sparse step's k is rounded down to a multiple of this
        (never below it, never above N) so few kernel sizes get compiled.
    calls_per_step: how many times the pipeline calls the model per denoising
        step. 1 (default) for pipelines that batch guidance (SD3, Flux, PixArt);
        2 for pipelines that run the conditional and unconditional passes as
        separate calls at the same timestep (Wan, QwenImage or Flux true CFG): each
        call of a step then gets its own caches, drop counts and active set
        (``RASModule.ras_controllers[i]``), which the two passes must not share.
    step_cache_interval: a step cache stacked on RAS (TaylorSeer's idea applied to
        the whole model output). After each dense step the first sparse step is
        computed, then one in every ``step_cache_interval``; the steps between are
        not run at all: their prediction is extrapolated from the last computed
        steps (``schedule.is_predicted_step``, ``step_cache.extrapolate``). Dense
        steps are always computed. 1 (default): no step cache, every step runs.
    step_cache_order: the extrapolation's polynomial order over the last
        ``order + 1`` computed steps: 0 reuses the last prediction, 1 (default)
        continues the change between the last two, 2 fits a parabola through the
        last three. Fewer computed steps lower the order to what they allow.
    stale_token_order: what a sparse step returns for the tokens it does not
        compute: 0 (default, the paper) their last computed output; 1 continues
        each token's change between its last two computed outputs, linearly in the
        step number (``stale_tokens.py``; a token computed once only reuses it).
    """

    sample_ratio: float = 0.5
    warmup_steps: int = 4
    reset_steps: tuple[int, ...] = (12, 20)
    end_step: int | None = None
    schedule: str = "static"
    num_steps: int | None = None
    skip_num_step: int = 0
    skip_num_step_length: int = 1
    dynamic_drop_multiple: int = _schedule.OFFICIAL_DROP_MULTIPLE
    metric: str | Callable = "std"
    starvation_scale: float = 0.1
    starvation_rule: str = "paper"
    high_ratio: float = 1.0
    share_active_set: str = "per_sample"
    kv_cache: bool = True
    tubes: str = "auto"
    on_unsupported: str = "raise"
    seed: int = 0
    token_multiple: int = 1
    calls_per_step: int = 1
    step_cache_interval: int = 1
    step_cache_order: int = 1
    stale_token_order: int = 0

    def __post_init__(self) -> None:
        # frozen: normalised values go in through object.__setattr__
        def store(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if not _is_real(self.sample_ratio) or not 0 < self.sample_ratio <= 1:
            raise _invalid("sample_ratio", self.sample_ratio, "must be a finite number with 0 < sample_ratio <= 1")
        store("sample_ratio", float(self.sample_ratio))

        for name, low in (("warmup_steps", 0), ("skip_num_step_length", 1), ("dynamic_drop_multiple", 1),
                          ("token_multiple", 1), ("calls_per_step", 1), ("step_cache_interval", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise _invalid(name, value, f"must be an int >= {low}")
            store(name, int(value))

        store("reset_steps", self._normalised_reset_steps(self.reset_steps))

        if not _is_int(self.step_cache_order) or not 0 <= self.step_cache_order <= MAX_STEP_CACHE_ORDER:
            raise _invalid("step_cache_order", self.step_cache_order,
                           f"must be an int from 0 to {MAX_STEP_CACHE_ORDER} (0 reuses the last prediction, "
                           "1 extrapolates linearly, 2 quadratically; higher orders amplify the noise of "
                           "the differences more than they follow the trajectory)")
        store("step_cache_order", int(self.step_cache_order))

        if not _is_int(self.stale_token_order) or self.stale_token_order not in (0, 1):
            raise _invalid("stale_token_order", self.stale_token_order,
                           "must be 0 (inactive tokens return their last computed output, the paper) or 1 "
                           "(continue each token's change between its last two computed outputs)")
        store("stale_token_order", int(self.stale_token_order))

        for name, low in (("end_step", 0), ("num_steps", 1)):
            value = getattr(self, name)
            if value is not None:
                if not _is_int(value) or value < low:
                    raise _invalid(name, value, f"must be None or an int >= {low}")
                store(name, int(value))

        if not _is_int(self.skip_num_step):
            raise _invalid("skip_num_step", self.skip_num_step, "must be an int (negative shrinks the dropped "
                                                                 "count over the loop, positive grows it)")
        store("skip_num_step", int(self.skip_num_step))

        for name, choices in (("schedule", _SCHEDULES), ("starvation_rule", _STARVATION_RULES),
                              ("share_active_set", _SHARES), ("on_unsupported", _ON_UNSUPPORTED)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in choices:
                raise _invalid(name, value, f"must be one of {', '.join(map(repr, choices))}")

        if self.schedule == "dynamic" and self.num_steps is None:
            raise _invalid("num_steps", None, "schedule='dynamic' is centred on the loop length; "
                                              "set num_steps to the number of denoising steps")

        if not (callable(self.metric) or (isinstance(self.metric, str) and self.metric in _METRICS)):
            raise _invalid("metric", self.metric, f"must be one of {', '.join(map(repr, _METRICS))} or a callable "
                                                  "mapping patches [B, N, S, C] to scores [B, N]")

        if not _is_real(self.starvation_scale) or self.starvation_scale < 0:
            raise _invalid("starvation_scale", self.starvation_scale, "must be a finite number >= 0")
        store("starvation_scale", float(self.starvation_scale))

        if not _is_real(self.high_ratio) or not 0 <= self.high_ratio <= 1:
            raise _invalid("high_ratio", self.high_ratio, "must be a finite number with 0 <= high_ratio <= 1")
        store("high_ratio", float(self.high_ratio))

        if not isinstance(self.kv_cache, bool):
            raise _invalid("kv_cache", self.kv_cache, "must be True or False")

        if not isinstance(self.tubes, str) or self.tubes not in ("auto", "never"):
            raise _invalid("tubes", self.tubes, "must be 'auto' or 'never'")

        if not _is_int(self.seed) or not 0 <= self.seed < 2**64:
            raise _invalid("seed", self.seed, "must be an int with 0 <= seed < 2**64")
        store("seed", int(self.seed))

    @staticmethod
    def _normalised_reset_steps(value: Any) -> tuple[int, ...]:
        allowed = "must be an iterable of ints >= 0 (step numbers, 0-based), e.g. (12, 20)"
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise _invalid("reset_steps", value, allowed)
        steps = tuple(value)
        if not all(_is_int(s) and s >= 0 for s in steps):
            raise _invalid("reset_steps", value, allowed)
        return tuple(sorted({int(s) for s in steps}))

    def is_dense_step(self, step: int) -> bool:
        """Whether 0-based ``step`` is planned dense (warm-up, reset, or from ``end_step`` on)."""
        _check_step(step)
        return _schedule.is_dense_step(int(step), warmup_steps=self.warmup_steps, reset_steps=self.reset_steps,
                                       end_step=self.end_step)

    def is_predicted_step(self, step: int) -> bool:
        """Whether 0-based ``step`` is skipped by the step cache (``step_cache_interval > 1``): not run, its
        prediction extrapolated from the last computed steps."""
        _check_step(step)
        return _schedule.is_predicted_step(int(step), warmup_steps=self.warmup_steps, reset_steps=self.reset_steps,
                                           end_step=self.end_step, interval=self.step_cache_interval)

    def active_tokens(self, step: int, num_tokens: int) -> int:
        """k, the image tokens computed if ``step`` is sparse, ``1 <= k <= num_tokens``."""
        _check_step(step)
        if not _is_int(num_tokens) or num_tokens < 1:
            raise ValueError(f"num_tokens={num_tokens!r} is invalid: must be an int >= 1")
        return _schedule.sparse_step_active_tokens(self, int(step), int(num_tokens))


def _check_step(step: Any) -> None:
    if not _is_int(step) or step < 0:
        raise ValueError(f"step={step!r} is invalid: must be an int >= 0 (0-based step number)")
