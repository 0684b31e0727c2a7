"""LoRA adapters loaded into a compiled transformer after its graphs were captured (PEFT).

``add_adapter`` (what ``pipe.load_lora_weights`` does) wraps each targeted linear in a LoRA layer:
its weight is then registered at ``...base_layer.weight``, though the layer still answers
``.weight`` with it. The captured graphs read the old linear, so the module must capture again
(model_objects.py): the next call equals the model with the adapter, with a warning. A change of
the adapter's scale replaces nothing; ``ras_reset_captures()`` picks it up.
"""
from __future__ import annotations

import warnings

import torch
from peft import LoraConfig

from ras_compile import RASPolicy, ras_compile
from ras_compile.tiny_models import example_inputs, tiny_sd3_transformer

FULL = RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=())


def _call(ras, model, kw, step):
    kw = dict(kw, timestep=kw["timestep"] * (1 - step / 10))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(ras(**kw)[0], model(**kw)[0], rtol=1e-5, atol=1e-5)
    return [str(w.message) for w in caught]


def test_an_adapter_added_after_the_capture_is_computed_by_the_next_call():
    model = tiny_sd3_transformer()
    kw = example_inputs(model)
    ras = ras_compile(model, FULL, backend=None)
    assert not any("replaced" in m for m in _call(ras, model, kw, 0))
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"]))
    messages = _call(ras, model, kw, 1)  # the adapter changes the output: the old graph would not
    assert any("attn.to_q.weight' (and maybe more) was replaced" in m for m in messages), messages
    assert not any("replaced" in m for m in _call(ras, model, kw, 2))  # captured once more, then kept
    assert [s.mode for s in ras.ras_controller.stats][-2:] == ["dense", "sparse"]


def test_a_new_adapter_scale_is_seen_after_reset_captures():
    model = tiny_sd3_transformer()
    kw = example_inputs(model)
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"]))
    ras = ras_compile(model, FULL, backend=None)
    _call(ras, model, kw, 0)
    model.set_adapters(["default"], weights=[3.0])  # a Python number in each LoRA layer: not a tensor the graph reads
    ras.ras_reset_captures()
    _call(ras, model, kw, 1)
