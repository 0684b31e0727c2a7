"""What RAS keeps between steps (issue 5.4: no full-size activation copies beyond the caches
the method needs), over architectures of every attention layout.

The persistent state of a compiled model is its caches: one K and one V cache per
attention that reads cached K/V (shaped like that attention's keys: the image tokens, plus
the text tokens where they share the sequence), one activation cache per value the
output needs densified, and nothing else; they are allocated once per input signature
and call slot and reused in place by every later step.
"""
from __future__ import annotations

import pytest
import torch

from conformance_models import FAMILIES
from ras_compile import RASPolicy, explain, ras_compile

# joint (text + image in one sequence), cross-attention, joint with RoPE, grouped-query
# heads, video tokens
NAMES = ["sd3", "pixart", "flux", "lumina_next", "wan"]
BATCH = 2


def _prediction(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


@pytest.mark.parametrize("name", NAMES)
def test_the_caches_are_k_and_v_per_cached_attention_and_the_densified_outputs_only(name):
    family = FAMILIES[name]
    model = family.build(0)
    inputs = family.inputs(model, BATCH, 0)
    result = explain(model, inputs, RASPolicy(sample_ratio=0.5), latent_arg=family.latent_arg, verbose=False)
    kinds = [cache_name.rsplit("_", 1)[-1] for cache_name, _, _ in result.caches]
    assert set(kinds) <= {"key", "value", "activation"}, result.caches
    attentions = len(result.attention_cached_kv)
    assert attentions > 0 and kinds.count("key") == kinds.count("value") == attentions
    assert kinds.count("activation") == result.counts["densified"]
    full = family.num_tokens + family.context_before + family.context_after
    for cache_name, shape, _ in result.caches:
        if cache_name.endswith(("_key", "_value")):
            # [B, heads, L, head_dim] or [B, L, D]: L covers the image tokens (and the text sharing them)
            length = shape[2] if len(shape) == 4 else shape[1]
            assert shape[0] == BATCH and length in (family.num_tokens, full), (cache_name, shape)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_caches_are_allocated_once_and_written_in_place_by_every_step(name):
    family = FAMILIES[name]
    model = family.build(0)
    ras = ras_compile(model, RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=(3,)), backend=None,
                      latent_arg=family.latent_arg)
    inputs = family.inputs(model, BATCH, 0)
    t0 = inputs[family.timestep_arg]
    pointers = None
    for step in range(4):  # dense, sparse, sparse, dense (the reset)
        _prediction(ras(**dict(inputs, **{family.timestep_arg: t0 * (1 - 0.2 * step)})))
        (captured,) = ras._captures.values()
        (caches,) = captured.caches.values()
        assert [tuple(c.shape) for c in caches] == [tuple(c.shape) for c in captured.analysis.caches]
        now = [c.data_ptr() for c in caches]
        assert pointers is None or now == pointers, f"step {step} reallocated the caches"
        pointers = now
    assert [s.mode for s in ras.ras_controller.stats] == ["dense", "sparse", "sparse", "dense"]


def test_sd3_medium_caches_at_the_real_shapes():
    """SD3-medium at 1024x1024 (a meta-device build of bench_speed's preset, nothing allocated):
    per block one K and one V cache over the joint sequence, 4096 image + 333 text tokens,
    and the densified output; 1246.7 MiB in bf16 at batch 2 (docs/benchmarks.md)."""
    from benchmark_scripts import load_benchmark
    from ras_compile.tiny_models import example_inputs

    bench = load_benchmark("bench_speed", "bench_speed_for_caches")
    args = bench.parse_args(["--model", "sd3-medium"])
    spec = dict(model=args.model, quick=False, **{k: getattr(args, k) for k in bench.GEOMETRY_KEYS}, seed=0,
                device="meta", dtype="bfloat16")
    model = bench.construct(spec, device="meta").to(torch.bfloat16)
    inputs = example_inputs(model, batch=BATCH, height=spec["latent"], width=spec["latent"], seed=0,
                            text_len=spec["text_tokens"])
    inputs = {k: v.to("meta", torch.bfloat16 if v.is_floating_point() else v.dtype) if isinstance(v, torch.Tensor)
              else v for k, v in inputs.items()}
    result = explain(model, inputs, RASPolicy(sample_ratio=0.5), verbose=False)
    cfg = model.config
    tokens, text = (spec["latent"] // cfg.patch_size) ** 2, spec["text_tokens"]
    kv = cfg.num_layers * 2 * BATCH * cfg.num_attention_heads * (tokens + text) * cfg.attention_head_dim
    out = BATCH * tokens * cfg.patch_size ** 2 * cfg.out_channels
    assert {tuple(s) for n, s, _ in result.caches if n.endswith("_key")} == {
        (BATCH, cfg.num_attention_heads, tokens + text, cfg.attention_head_dim)}
    total = sum(torch.Size(s).numel() for _, s, _ in result.caches)
    assert total == kv + out
    assert 2 * total / 2**20 == pytest.approx(1246.7, abs=0.05)
