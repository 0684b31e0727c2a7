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
    with pytest.raises(UnsupportedModelError, match="cummax"):
        explain(PlainDiT(token_mixer="cummax"), inputs, RASPolicy(on_unsupported="fallback"), verbose=False)


def test_fake_inputs_sit_on_the_device_of_the_graphs_weights():
    """A CUDA model's FLOPs are counted with CUDA fake inputs (CPU ones would meet CUDA
    weights in the first op); the meta device stands in for CUDA here."""
    from types import SimpleNamespace

    from torch._subclasses.fake_tensor import FakeTensorMode

    from ras_compile.explain import _fake_inputs

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4, device="meta")

        def forward(self, x, ras_index):
            return self.lin(x)

    gm = torch.fx.symbolic_trace(Tiny())
    next(n for n in gm.graph.nodes if n.name == "x").meta["val"] = torch.empty(2, 3, 4, device="meta")
    x, index = _fake_inputs(gm, SimpleNamespace(caches=[], batch_size=2), 3, FakeTensorMode(allow_non_fake_inputs=True))
    assert x.device.type == "meta" and tuple(x.shape) == (2, 3, 4)
    assert index.device.type == "meta" and tuple(index.shape) == (2, 3)


def test_explain_counts_flops_through_a_host_read_in_the_forward():
    """A forward that reads a conditioning tensor on the host (Open-Sora STDiT3's ``height[0].item()``)
    runs compiled, so explain must count its FLOPs too: on fake tensors the read is a symbol."""

    class HostRead(PlainDiT):
        def forward(self, hidden_states, timestep, height):
            return super().forward(hidden_states, timestep) * (height[0].item() / 64.0)

    torch.manual_seed(0)
    kw = dict(hidden_states=torch.randn(2, 4, 8, 12), timestep=torch.full((2,), 999.0),
              height=torch.full((2,), 64.0))
    report = explain(HostRead().eval(), kw, RASPolicy(sample_ratio=0.5), verbose=False)
    assert 0.3 < report.flop_fraction < 1.0
