"""Hooks on the model: stateful diffusers hooks (step caches) are refused before capture, because a
one-graph capture would freeze their per-call decisions; torch forward hooks are captured with a
warning, and a pure one gives the hooked model's values."""
from __future__ import annotations

import warnings

import pytest
import torch
from diffusers.hooks import (FirstBlockCacheConfig, TaylorSeerCacheConfig, apply_first_block_cache,
                             apply_taylorseer_cache)

from conformance_models import _flux_build, _flux_inputs
from ras_compile import RASPolicy, UnsupportedModelError, explain, ras_compile
from ras_compile.hooks import stateful_diffusers_hooks, torch_forward_hooks
from ras_compile.tiny_models import example_inputs, tiny_dit_transformer


def _flux_with(cache: str):
    model = _flux_build(0).eval()
    if cache == "fbc":
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.05))
    else:
        apply_taylorseer_cache(model, TaylorSeerCacheConfig(cache_interval=2))
    return model, _flux_inputs(model, 2, 0)


@pytest.mark.parametrize("cache, hook", [("fbc", "FBCHeadBlockHook"), ("taylorseer", "TaylorSeerCacheHook")])
def test_a_diffusers_step_cache_is_refused_with_what_to_do(cache, hook):
    model, inputs = _flux_with(cache)
    assert any(cls == hook for _, _, cls in stateful_diffusers_hooks(model))
    with pytest.raises(UnsupportedModelError) as info:
        ras_compile(model, RASPolicy(sample_ratio=0.5), backend=None)(**inputs)
    message = str(info.value)
    assert hook in message and "frozen at capture time" in message and "model.disable_cache()" in message
    assert "RASPolicy(step_cache_interval=2)" in message  # the step cache that does stack
    with pytest.raises(UnsupportedModelError, match=hook):  # explain says the same
        explain(model, inputs, RASPolicy(sample_ratio=0.5), verbose=False)


def test_without_the_cache_the_same_model_is_rewritten_and_equals_dense():
    model = _flux_build(0).eval()
    inputs = _flux_inputs(model, 2, 0)
    model.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    with pytest.raises(UnsupportedModelError, match="FBCHeadBlockHook"):
        ras_compile(model, RASPolicy(sample_ratio=1.0), backend=None)(**inputs)
    model.disable_cache()  # the advice the refusal gives
    assert stateful_diffusers_hooks(model) == []
    with torch.no_grad():
        expected = model(**inputs)[0]
        got = ras_compile(model, RASPolicy(sample_ratio=1.0), backend=None)(**inputs)[0]
    torch.testing.assert_close(got, expected)


def test_fallback_runs_the_hooked_model_dense():
    model, inputs = _flux_with("fbc")
    ras = ras_compile(model, RASPolicy(on_unsupported="fallback"), backend=None)
    with pytest.warns(UserWarning, match="FBCHeadBlockHook"), torch.no_grad(), model.cache_context("cond"):
        ras(**inputs)
    assert ras.ras_controller.stats[-1].mode == "fallback"


def test_a_pure_torch_forward_hook_is_captured_with_a_warning():
    model = tiny_dit_transformer(sample_size=8).eval()
    inputs = example_inputs(model, batch=2, height=8, width=8)
    handle = model.transformer_blocks[0].register_forward_hook(lambda module, args, out: out * 0.5)
    try:
        assert torch_forward_hooks(model) == ["transformer_blocks.0"]
        with torch.no_grad():
            expected = model(**inputs)[0]
            ras = ras_compile(model, RASPolicy(sample_ratio=1.0), backend=None)
            with pytest.warns(UserWarning, match="transformer_blocks.0 run once"):
                got = ras(**inputs)[0]
        torch.testing.assert_close(got, expected)  # the hook's scale is in the captured graph
    finally:
        handle.remove()
    assert torch_forward_hooks(model) == []


def test_a_model_without_hooks_captures_without_a_warning():
    model = tiny_dit_transformer(sample_size=8).eval()
    inputs = example_inputs(model, batch=1, height=8, width=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            ras_compile(model, RASPolicy(sample_ratio=0.5), backend=None)(**inputs)


def test_hooks_on_the_ras_module_itself_run_on_every_call():
    model = tiny_dit_transformer(sample_size=8).eval()
    inputs = example_inputs(model, batch=1, height=8, width=8)
    ras = ras_compile(model, RASPolicy(sample_ratio=0.5), backend=None)
    calls = []
    ras.register_forward_hook(lambda module, args, out: calls.append(1))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(3):
            ras(**inputs)
    assert len(calls) == 3
    assert not any("run once" in str(w.message) for w in caught)  # not the inner model's hooks: no capture warning
