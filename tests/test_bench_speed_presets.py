"""benchmarks/bench_speed.py's model presets: every family runs a tiny loop, every real config builds on meta."""

from __future__ import annotations

import json

import pytest
import torch

from benchmark_scripts import load_benchmark
from ras_compile.tiny_models import example_inputs, packed_image_ids


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_speed", "bench_speed_under_test")


def spec_of(bench, argv: list[str]) -> dict:
    args = bench.parse_args(argv)
    return dict(model=args.model, quick=args.quick, **{k: getattr(args, k) for k in bench.GEOMETRY_KEYS},
                seed=args.seed, device="cpu", dtype="float32")


# (preset, parameters it must have, within 10 %: the released checkpoints' transformer sizes)
REAL = [("sd3-medium", 2.03e9), ("flux-dev", 11.9e9), ("pixart-sigma", 0.611e9), ("lumina-next", 1.75e9)]


@pytest.mark.parametrize("name, parameters", REAL)
def test_real_presets_build_on_meta_with_the_released_sizes(bench, name, parameters):
    spec = spec_of(bench, ["--model", name])
    with torch.device("meta"):  # nothing may be allocated even if construct forgot its own device
        model = bench.construct(spec, device="meta")
    params = list(model.parameters())
    assert all(p.is_meta for p in params) and all(b.is_meta for b in model.buffers())
    count = sum(p.numel() for p in params)
    assert abs(count / parameters - 1) < 0.1, f"{name}: {count / 1e9:.3f} B parameters"
    cfg = bench.model_config(spec)
    assert cfg["image_tokens"] == 4096  # 1024x1024 pixels, VAE factor 8, patch 2 (Flux: 2x2 packing)
    assert cfg["parameters"] == count and cfg["real_shapes"]


def test_real_configs_are_the_released_ones(bench):
    cfg = {name: bench.model_config(spec_of(bench, ["--model", name])) for name, _ in REAL}
    flux = cfg["flux-dev"]
    assert (flux["num_layers"], flux["num_single_layers"], flux["num_attention_heads"], flux["attention_head_dim"],
            flux["in_channels"], flux["joint_attention_dim"], flux["pooled_projection_dim"],
            flux["guidance_embeds"], list(flux["axes_dims_rope"]), flux["text_tokens"], flux["batch"]) == \
        (19, 38, 24, 128, 64, 4096, 768, True, [16, 56, 56], 512, 1)
    sd3 = cfg["sd3-medium"]
    assert (sd3["num_layers"], sd3["num_attention_heads"], sd3["attention_head_dim"], sd3["sample_size"],
            sd3["text_tokens"], sd3["flop_other_tokens"]) == (24, 24, 64, 128, 333, 333)
    pixart = cfg["pixart-sigma"]
    assert (pixart["num_layers"], pixart["num_attention_heads"], pixart["attention_head_dim"],
            pixart["in_channels"], pixart["out_channels"], pixart["caption_channels"], pixart["sample_size"],
            pixart["use_additional_conditions"], pixart["text_tokens"], pixart["flop_other_tokens"]) == \
        (28, 16, 72, 4, 8, 4096, 128, False, 300, 0)
    lumina = cfg["lumina-next"]
    assert (lumina["hidden_size"], lumina["num_layers"], lumina["num_attention_heads"], lumina["num_kv_heads"],
            lumina["patch_size"], lumina["in_channels"], lumina["cross_attention_dim"], lumina["sample_size"]) == \
        (2304, 24, 32, 8, 2, 4, 2048, 128)


def test_default_preset_keeps_its_result_names(bench):
    assert bench.parse_args([]).name == "cpu_sd3_scaled"
    assert bench.parse_args(["--quick"]).name == "cpu_sd3_quick"
    assert bench.parse_args(["--model", "flux-dev", "--device", "cuda"]).name == "cuda_flux_dev"
    assert bench.parse_args(["--model", "flux-dev", "--device", "cuda"]).dtype == "bfloat16"
    assert bench.parse_args(["--model", "sd3-medium", "--device", "cuda"]).name == "cuda_sd3_medium"
    assert bench.parse_args(["--model", "pixart", "--quick"]).name == "cpu_pixart_quick"
    for name in ("sd3", "flux", "pixart", "lumina"):  # the CPU presets: about 1024 image tokens
        assert bench.model_config(spec_of(bench, ["--model", name]))["image_tokens"] == 1024


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd3", "flux", "pixart", "lumina"])
def test_quick_run_of_every_family(bench, name, tmp_path, monkeypatch):
    # --in-process points Inductor at a temporary cache through the environment: undone after the test
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    torch._dynamo.reset()
    argv = ["--model", name, "--quick", "--in-process", "--backend", "eager", "--ratios", "0.5", "--repeats", "1",
            "--steps", "3", "--warmup-steps", "1", "--reset-steps", "--no-caches", "--no-plot", "--threads", "1",
            "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / f"cpu_{name}_quick.json").read_text())
    results = {r["config"]: r for r in report["results"]}
    assert list(results) == ["eager", "compiled", "ras_r0.5"]
    assert all(r["ok"] for r in results.values()), [r.get("error") for r in results.values()]
    cfg = report["model"]
    assert cfg["preset"] == name and cfg["image_tokens"] == 64 and cfg["text_tokens"] == 16
    assert cfg["flop_other_tokens"] == (16 if name in ("sd3", "flux") else 0)
    ras = results["ras_r0.5"]
    assert ras["step_labels"] == ["dense", "sparse", "sparse"]
    assert ras["active_tokens"][1:] == [32, 32]  # half of the 64 image tokens in the sparse steps
    assert 1 < ras["flop_bound_speedup"] < 2
    assert ras["max_abs_diff_vs_compiled"] < 10 and results["eager"]["max_abs_diff_vs_compiled"] < 1e-3
    md = (tmp_path / f"cpu_{name}_quick.md").read_text()
    assert md.startswith("# RAS speed benchmark") and cfg["class"] in md
    assert "python benchmarks/bench_speed.py --model " + name in md  # the command that produced it


def test_example_inputs_for_packed_and_rope_families():
    from diffusers import FluxTransformer2DModel, LuminaNextDiT2DModel

    torch.manual_seed(0)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    inputs = example_inputs(flux, batch=2, height=8, width=12, text_len=5)
    assert inputs["hidden_states"].shape == (2, 24, 16)  # 4x6 tokens of 2x2 packed 4-channel pixels
    assert torch.equal(inputs["img_ids"], packed_image_ids(4, 6)) and inputs["img_ids"][7].tolist() == [0, 1, 1]
    assert inputs["txt_ids"].shape == (5, 3) and inputs["guidance"].shape == (2,)
    with torch.no_grad():
        assert flux(**inputs)[0].shape == (2, 24, 16)
    with pytest.raises(ValueError, match="divisible by 2"):
        example_inputs(flux, height=7, width=8)

    lumina = LuminaNextDiT2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1,
                                  num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                                  cross_attention_dim=32).eval()
    inputs = example_inputs(lumina, batch=2, height=8, width=8, text_len=5)
    assert inputs["encoder_mask"].shape == (2, 5) and inputs["image_rotary_emb"].shape == (4, 4, 8)
    assert inputs["cross_attention_kwargs"] == {"base_sequence_length": 16}
    with torch.no_grad():
        out = lumina(**inputs)[0]
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()


def test_the_baseline_is_rechecked_last_by_default_but_not_in_quick_mode(bench):
    names = lambda argv: [c["config"] for c in bench.configurations(bench.parse_args(argv))]  # noqa: E731
    assert names(["--ratios", "0.5", "--no-caches"]) == ["eager", "compiled", "ras_r0.5", "compiled_again"]
    assert names(["--ratios", "0.5", "--no-caches", "--no-recheck-baseline"]) == ["eager", "compiled", "ras_r0.5"]
    assert names(["--quick", "--ratios", "0.5", "--no-caches"]) == ["eager", "compiled", "ras_r0.5"]
    assert names(["--quick", "--ratios", "0.5", "--recheck-baseline"])[-1] == "compiled_again"
    assert names(["--ratios", "0.5", "--configs", "ras_r0.5"]) == ["eager", "compiled", "ras_r0.5"]
    assert names(["--ratios", "0.5", "--configs", "compiled_again", "ras2g_r0.5"]) == [
        "eager", "compiled", "ras2g_r0.5", "compiled_again"]


@pytest.mark.slow
def test_recheck_reports_the_baseline_drift_and_both_speedups(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    torch._dynamo.reset()
    argv = ["--quick", "--in-process", "--backend", "eager", "--ratios", "0.5", "--repeats", "1", "--steps", "3",
            "--warmup-steps", "1", "--reset-steps", "--no-caches", "--no-plot", "--threads", "1",
            "--recheck-baseline", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "cpu_sd3_quick.json").read_text())
    results = {r["config"]: r for r in report["results"]}
    assert list(results)[-1] == "compiled_again" and results["compiled_again"]["ok"]
    drift = report["summary"]["baseline_drift"]
    assert drift == pytest.approx(results["compiled_again"]["steady_s"] / results["compiled"]["steady_s"] - 1)
    assert results["compiled_again"]["max_abs_diff_vs_compiled"] == 0.0  # the same loop, the same latents
    ras = results["ras_r0.5"]
    assert ras["speedup_vs_compiled_again"] == pytest.approx(
        results["compiled_again"]["steady_s"] / ras["steady_s"])
    assert ras["fraction_of_bound_vs_compiled_again"] == pytest.approx(
        ras["speedup_vs_compiled_again"] / ras["flop_bound_speedup"])
    md = (tmp_path / "cpu_sd3_quick.md").read_text()
    assert "Baseline recheck" in md and f"{100 * drift:+.1f} %" in md


def _quick_variant_run(bench, tmp_path, monkeypatch, variant: str) -> dict:
    """A 6-step quick run of ras_r0.5 and ``variant`` (a configuration that exists only when named),
    in process with the eager backend; the results by configuration."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    torch._dynamo.reset()
    assert variant not in [c["config"] for c in bench.configurations(bench.parse_args(["--ratios", "0.5"]))]
    argv = ["--quick", "--in-process", "--backend", "eager", "--ratios", "0.5", "--repeats", "1", "--steps", "6",
            "--warmup-steps", "1", "--reset-steps", "--no-caches", "--no-plot", "--threads", "1",
            "--configs", "ras_r0.5", variant, "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    return {r["config"]: r for r in json.loads((tmp_path / "cpu_sd3_quick.json").read_text())["results"]}


def test_dynamic_schedule_configuration_runs_its_own_plan(bench, tmp_path, monkeypatch):
    """rasdyn_r0.5 (named only): the count changes every sparse step around the mean, the
    FLOP bound is its own plan's, and it compiles once like the static configuration."""
    results = _quick_variant_run(bench, tmp_path, monkeypatch, "rasdyn_r0.5")
    dyn, static = results["rasdyn_r0.5"], results["ras_r0.5"]
    assert dyn["ok"] and dyn["schedule"] == "dynamic" and static["schedule"] == "static"
    sparse = dyn["active_tokens"][1:]
    assert len(set(sparse)) > 1 and sparse == sorted(sparse, reverse=True)  # fewer tokens as the loop goes on
    assert static["active_tokens"][1:] == [32] * 5
    assert sum(sparse) / len(sparse) == pytest.approx(32, abs=1)  # the mean stays at the ratio
    assert dyn["flop_bound_speedup"] == pytest.approx(6 / (1 + sum((k + 16) / 80 for k in sparse)))


def test_step_cache_configuration_predicts_its_steps_and_counts_them_free(bench, tmp_path, monkeypatch):
    """rassc2_r0.5 (named only): RAS with its step cache stacked; the predicted steps appear in the
    plan with no active token, and the FLOP bound counts them as free."""
    results = _quick_variant_run(bench, tmp_path, monkeypatch, "rassc2_r0.5")
    stacked, ras = results["rassc2_r0.5"], results["ras_r0.5"]
    assert stacked["ok"] and stacked["step_cache_interval"] == 2 and ras["step_cache_interval"] == 1
    assert stacked["active_tokens"] == [64, 32, 0, 32, 0, 32]  # dense, then sparse / predicted in turn
    assert stacked["predicted_steps"] == 2 and stacked["sparse_steps"] == 3
    assert stacked["flop_bound_speedup"] == pytest.approx(6 / (1 + 3 * (32 + 16) / 80))
    assert stacked["flop_bound_speedup"] > ras["flop_bound_speedup"]
    assert "1D 3S 2P" in (tmp_path / "cpu_sd3_quick.md").read_text()
