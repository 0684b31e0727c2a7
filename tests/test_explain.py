"""``explain`` reports what the pass does to a model, and its numbers are consistent."""
from __future__ import annotations

import pytest
import torch

from plain_dits import PlainDiT
from ras_compile import RASPolicy, UnsupportedModelError, explain
from ras_compile.tiny_models import example_inputs, tiny_sd3_transformer


def test_explain_names_source_rewritten_attention_and_densified_sink(capsys):
    model = tiny_sd3_transformer(num_layers=2)
    result = explain(model, example_inputs(model, batch=2, height=16, width=16, text_len=7), RASPolicy(sample_ratio=0.5))
    printed = capsys.readouterr().out
    assert result.num_tokens == 64 and result.patch_size == (2, 2) and result.grid_shape == (8, 8)
    assert len(result.attention_cached_kv) == 2
    assert all(name in printed for name in result.attention_cached_kv)
    assert "unpatchify" in printed and result.source in printed
    assert result.counts["attention_cached_kv"] == 2 and result.counts["densified"] == 1
    assert result.active_tokens == 32
    # every K and V projection reaches attention through layout changes only: fusible on CUDA
    assert len(result.fusible_projections) == 4 and "fused with the cache write on CUDA: 4 of 4" in printed
    # a sparse step at half the tokens costs between the image share and the whole (text tokens stay)
    assert 0.5 < result.flop_fraction < 0.65


def test_flop_fraction_is_one_at_ratio_one_and_grows_with_the_ratio():
    model = PlainDiT(depth=2)
    inputs = {"hidden_states": torch.randn(1, 4, 16, 16), "timestep": torch.ones(1)}
    fractions = [explain(model, inputs, ratio=r, verbose=False).flop_fraction for r in (0.125, 0.25, 0.5, 1.0)]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert fractions[0] < 0.2  # no text tokens: the sparse step scales with the image tokens


def test_explain_raises_for_a_refused_model_even_with_fallback_policy():
    inputs = {"hidden_states": torch.randn(1, 4, 8, 8), "timestep": torch.ones(1)}
    with pytest.raises(UnsupportedModelError, match="cumsum"):
        explain(PlainDiT(token_mixer="cumsum"), inputs, RASPolicy(on_unsupported="fallback"), verbose=False)
