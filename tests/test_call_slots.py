"""Pipelines that call the model twice per step (conditional and unconditional passes as
separate calls at the same timestep, as Wan or QwenImage's true CFG do).

With ``calls_per_step=2`` each call of a step has its own caches, drop counts and active
set, so the module behaves exactly like two independent RAS modules, one per pass. With
the default 1 the repeated timestep is reported, never silently shared.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from families import Case, flow_sigmas, prediction_of, timestep_for
from ras_compile import RASPolicy, ras_compile

SD3 = Case("sd3", layers=2, heads=2, head_dim=8, patch=2, height=8, width=12, batch=1)
POLICY = dict(sample_ratio=0.5, warmup_steps=2, reset_steps=(5,))
STEPS = 8


def _two_call_loop(call_cond, call_uncond, kwargs, negative):
    """A true-CFG loop: the two passes are separate calls at the same timestep."""
    latent = kwargs["hidden_states"]
    sigmas = flow_sigmas(STEPS)
    for i in range(STEPS):
        t = timestep_for(sigmas[i], SD3.batch)
        cond = prediction_of(call_cond(**dict(kwargs, hidden_states=latent, timestep=t)))
        uncond = prediction_of(call_uncond(**dict(kwargs, hidden_states=latent, timestep=t, **negative)))
        latent = latent + (sigmas[i + 1] - sigmas[i]) * (uncond + 4.0 * (cond - uncond))
    return latent


def test_two_calls_per_step_equal_two_independent_modules():
    model = SD3.build()
    kwargs = SD3.inputs(model)
    negative = {name: torch.randn_like(kwargs[name]) for name in ("encoder_hidden_states", "pooled_projections")}
    ras = ras_compile(model, RASPolicy(**POLICY, calls_per_step=2), backend=None)
    got = _two_call_loop(ras, ras, kwargs, negative)
    cond, uncond = (ras_compile(model, RASPolicy(**POLICY), backend=None) for _ in range(2))
    want = _two_call_loop(cond, uncond, kwargs, negative)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for slot, reference in zip(ras.ras_controllers, (cond, uncond)):
        assert [(s.step, s.mode, s.active_tokens) for s in slot.stats] == \
               [(s.step, s.mode, s.active_tokens) for s in reference.ras_controller.stats]
    modes = [s.mode for s in ras.ras_controllers[1].stats]
    assert modes.count("sparse") == STEPS - 3  # the unconditional pass is sparse too, on its own caches


def test_one_call_per_step_warns_about_a_repeated_timestep_once():
    model = SD3.build()
    kwargs = SD3.inputs(model)
    ras = ras_compile(model, RASPolicy(**POLICY), backend=None)
    t = timestep_for(1.0, SD3.batch)
    ras(**dict(kwargs, timestep=t))
    with pytest.warns(UserWarning, match=r"calls_per_step=2"):
        ras(**dict(kwargs, timestep=t))
    with _no_warning():
        ras(**dict(kwargs, timestep=timestep_for(0.9, SD3.batch)))
        ras(**dict(kwargs, timestep=timestep_for(0.9, SD3.batch)))  # warned once per module


def test_a_forced_step_at_the_same_timestep_is_not_a_second_call():
    model = SD3.build()
    kwargs = SD3.inputs(model)
    ras = ras_compile(model, RASPolicy(**POLICY), backend=None)
    dense = prediction_of(ras(**kwargs))
    ras.ras_controller.override_next_step("sparse", torch.tensor([[0, 3, 5]]))
    with _no_warning():
        sparse = prediction_of(ras(**kwargs))
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)


def test_calls_per_step_is_validated():
    with pytest.raises(ValueError, match="calls_per_step"):
        RASPolicy(calls_per_step=0)


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield
