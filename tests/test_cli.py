"""The ``ras-compile`` command line: each command in quick mode, and its one-line errors.

Cheap backends (``eager`` / ``aot_eager``) and tiny sizes keep the file near a minute on 2 cores.
Most tests call ``main([...])`` in-process; two go through ``python -m ras_compile``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from ras_compile.cli import demo_grid_size, main
from ras_compile.tiny_models import tiny_dit_transformer


def _one_line_error(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ras-compile {command}".strip()) and "error:" in lines[0], err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_dit")
    tiny_dit_transformer(sample_size=8).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_demo_writes_a_png_grid_and_a_table(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["demo", "--quick", "--steps", "5", "--backend", "eager", "--ratios", "0.5", "--no-progress",
                 "--classes", "circle", "heart", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG"
        # a dense row, then an image row and a heat-map row for the one ratio; three columns
        assert image.size == demo_grid_size(num_samples=3, num_ras=1, image_size=32)
    assert "dense" in printed and "RAS r=0.5" in printed and "PSNR" in printed and "speed-up" in printed
    assert "trained weights from" in printed and "STAND-IN" not in printed  # the shipped reference weights
    # each row names its FLOP bound: 5 steps scale to warm-up 1 and resets 2 and 4 (3 dense, 2 sparse at 0.5)
    from ras_compile import RASPolicy
    from ras_compile.schedule import flop_bound_speedup, scaled_plan

    warmup, resets = scaled_plan(5)
    bound = flop_bound_speedup(RASPolicy(sample_ratio=0.5, warmup_steps=warmup, reset_steps=resets, num_steps=5),
                               5, 256)
    row = next(line for line in printed.splitlines() if line.startswith("RAS r=0.5"))
    assert "FLOP bound" in printed and f"{bound:.2f}x" in row.split()
    assert "best of 1 after" in printed  # --quick times once


@pytest.mark.slow
def test_demo_stacks_the_step_cache_and_counts_only_computed_tokens(tmp_path, capsys, monkeypatch):
    """--step-cache-interval 2 over 8 steps (warm-up 1, resets 3 and 6): steps 2 and 5 are predicted."""
    from ras_compile import cli

    seen = []
    real = cli.draw_demo_grid
    monkeypatch.setattr(cli, "draw_demo_grid", lambda rows, **kw: seen.extend(rows) or real(rows, **kw))
    out = tmp_path / "grid.png"
    assert main(["demo", "--quick", "--steps", "8", "--backend", "eager", "--ratios", "0.5", "--no-progress",
                 "--classes", "circle", "--step-cache-interval", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("RAS r=0.5+sc2"))
    assert "3D 3S 2P" in row
    heat = next(r["heat"] for r in seen if "heat" in r) * 8  # steps each token was computed
    # 3 dense steps compute every token, 3 sparse steps half of them, the 2 predicted steps none
    assert heat.min() >= 3 and heat.max() <= 6 and heat.sum() == pytest.approx(3 * 256 + 3 * 128)


@pytest.mark.slow
def test_demo_without_weights_says_it_uses_a_random_weight_stand_in(tmp_path, capsys, monkeypatch):
    from ras_compile.reference import model as reference_model

    monkeypatch.setattr(reference_model, "WEIGHTS_DIR", tmp_path / "no_weights")
    out = tmp_path / "grid.png"
    assert main(["demo", "--quick", "--steps", "3", "--backend", "eager", "--ratios", "0.5", "--no-progress",
                 "--classes", "circle", "--guidance", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM-WEIGHT STAND-IN" in printed and "not the trained reference model" in printed and out.exists()


def test_demo_grid_size_grows_with_samples_and_ratios():
    w1, h1 = demo_grid_size(8, 1)
    w2, h2 = demo_grid_size(9, 2)
    assert w2 - w1 == 32 * 3 and h2 - h1 == 2 * 32 * 3


@pytest.mark.slow
def test_explain_names_the_rewritten_attention_nodes(capsys):
    assert main(["explain", "--model", "sd3", "--ratio", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert "attention over cached K/V (2): scaled_dot_product_attention, scaled_dot_product_attention_1" in printed
    assert "sparse step at ratio 0.25" in printed and "token source" in printed


@pytest.mark.slow
def test_explain_and_bench_a_local_model_folder(dit_folder, tmp_path, capsys):
    assert main(["explain", "--model", str(dit_folder)]) == 0
    printed = capsys.readouterr().out
    assert "DiTTransformer2DModel" in printed and "scaled_dot_product_attention" in printed

    out = tmp_path / "bench"
    assert main(["bench", "--model", str(dit_folder), "--quick", "--steps", "4", "--backend", "eager",
                 "--out", str(out)]) == 0
    report = json.loads((out / f"{dit_folder.name}.json").read_text())
    configs = {r["config"]: r for r in report["results"]}
    assert set(configs) == {"eager", "compiled", "ras_r0.5"}
    assert "S" in "".join(s[0].upper() for s in configs["ras_r0.5"]["step_labels"])  # sparse steps ran
    assert 0 < configs["ras_r0.5"]["sparse_flop_fraction"] < 1
    assert (out / f"{dit_folder.name}.md").read_text().startswith("# RAS speed benchmark")


@pytest.mark.slow
def test_bench_preset_runs_bench_speed(tmp_path, capsys):
    out = tmp_path / "preset"
    assert main(["bench", "--quick", "--steps", "3", "--repeats", "1", "--no-caches", "--backend", "eager",
                 "--out", str(out)]) == 0
    report = json.loads((out / "cpu_sd3_quick.json").read_text())
    assert [r["config"] for r in report["results"]] == ["eager", "compiled", "ras_r0.5"]
    assert all(r["ok"] for r in report["results"])
    assert (out / "cpu_sd3_quick.md").is_file()


@pytest.mark.parametrize("argv, command, needle", [
    (["demo", "--ratios", "1.5"], "demo", "0 < ratio <= 1"),
    (["demo", "--steps", "zero"], "demo", "--steps"),
    (["demo", "--classes", "dragon"], "demo", "unknown class 'dragon'"),
    (["demo", "--out", "grid.jpg"], "demo", "must end in .png"),
    (["explain", "--model", "no/such/thing/here"], "explain", "not a hub id"),
    (["explain", "--backend", "inductor"], "", "unrecognized arguments"),
    (["bench", "--backend", "tensorrt"], "bench", "invalid choice"),
    (["bench", "--subfolder", "x"], "bench", "--subfolder needs --model"),
    ([], "", "choose a command"),
])
def test_bad_arguments_exit_non_zero_with_one_line(argv, command, needle, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = _one_line_error(captured.err, command)
    assert needle in line and captured.out == ""


def test_a_folder_without_a_model_is_one_line(tmp_path, capsys):
    assert main(["explain", "--model", str(tmp_path)]) == 2
    assert "has no config.json" in _one_line_error(capsys.readouterr().err, "explain")


def test_help_lists_every_option_with_a_help_text(capsys):
    from ras_compile.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in [("", parser), *commands.items()]:
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help text"
    assert main(["demo", "--help"]) == 0
    assert "--ratios" in capsys.readouterr().out


def _run_module(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ras_compile", *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=240)


def test_hub_id_offline_fails_with_a_clear_message(tmp_path):
    proc = _run_module("bench", "--model", "org/name", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    line = _one_line_error(proc.stderr, "bench")
    assert "cannot reach the Hugging Face Hub to fetch org/name" in line and "pass a local folder" in line


@pytest.mark.slow
def test_console_module_runs_explain():
    proc = _run_module("explain", "--model", "dit", "--ratio", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert "attention over cached K/V (2)" in proc.stdout


def test_a_forward_needing_inputs_the_config_cannot_give_is_refused_in_one_line(tmp_path, capsys):
    from diffusers import Lumina2Transformer2DModel

    Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1,
                              num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, cap_feat_dim=16,
                              axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32)).save_pretrained(tmp_path)
    assert main(["explain", "--model", str(tmp_path)]) == 2
    line = _one_line_error(capsys.readouterr().err, "explain")
    assert "needs" in line and "from Python with your own inputs" in line
