"""``benchmarks/bench_score.py``: the measures on hand cases, and one small run end to end on a
tiny reference DiT saved to a temporary folder."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmark_scripts import load_benchmark
from ras_compile.reference import model as reference_model

bs = load_benchmark("bench_score", register=True)


def test_patch_tokens_keeps_each_patch_together():
    v = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = bs.patch_tokens(v, 2)
    assert tokens.shape == (2, 6, 4, 3)
    # token 4 is patch row 1, column 1: pixels (2..3, 2..3) of every channel
    torch.testing.assert_close(tokens[1, 4, :, 2], v[1, 2, 2:4, 2:4].reshape(4))


def test_patch_tokens_cuts_the_reference_prediction_as_ras_does():
    """The benchmark scores what RAS would rank: its patches equal the runtime's own cut of
    the reference DiT's prediction (``prediction_patches`` with the pass's analysis)."""
    from ras_compile import RASPolicy, ras_compile
    from ras_compile.runtime import prediction_patches

    m = reference_model.build_reference_model(0, init="diffusers", num_attention_heads=2, attention_head_dim=8,
                                              num_layers=1, sample_size=8).eval()
    x = torch.randn(2, 3, 8, 8)
    analysis = ras_compile(m, RASPolicy(), backend=None).ras_analysis(
        hidden_states=x, timestep=torch.full((2,), 500.0), class_labels=torch.tensor([0, 1]))
    v = torch.randn(2, 3, 8, 8)
    assert torch.equal(bs.patch_tokens(v, m.config.patch_size), prediction_patches(v, analysis))


def test_captured_share_and_spearman_hand_cases():
    error = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert float(bs.captured_share(error, error, 2)) == pytest.approx(0.7)
    assert float(bs.captured_share(error, -error, 2)) == pytest.approx(0.3)
    assert float(bs.spearman(error, 2 * error + 1)) == pytest.approx(1.0)
    assert float(bs.spearman(error, -error)) == pytest.approx(-1.0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 16), k=st.integers(1, 16))
def test_no_score_captures_more_than_the_oracle(seed, k):
    gen = torch.Generator().manual_seed(seed)
    error, score = torch.rand(3, 16, generator=gen), torch.randn(3, 16, generator=gen)
    assert (bs.captured_share(error, score, k) <= bs.captured_share(error, error, k) + 1e-6).all()
    assert torch.allclose(bs.captured_share(error, score, 16), torch.ones(3))


def test_a_small_run_end_to_end(tmp_path):
    folder = tmp_path / "model"
    reference_model.build_reference_model(0, init="diffusers", num_attention_heads=2, attention_head_dim=8,
                                          num_layers=1, sample_size=8).save_pretrained(folder)
    result = bs.main(["--model", str(folder), "--samples", "3", "--steps", "4", "--ratios", "0.5", "0.25",
                      "--out", str(tmp_path / "out"), "--name", "score"])
    assert result["steps_scored"] == 2 and result["tokens"] == 16
    rows = {(r["score"], r["ratio"]): r for r in result["rows"]}
    assert {name for name, _ in rows} == set(bs.SCORES)
    for ratio in (0.5, 0.25):
        oracle = rows["oracle", ratio]
        assert oracle["spearman"] == pytest.approx(1.0)
        assert all(0 <= rows[name, ratio]["captured"] <= oracle["captured"] + 1e-9 for name in bs.SCORES)
    assert json.loads((tmp_path / "out" / "score.json").read_text())["rows"] == result["rows"]
    assert "| previous change |" in (tmp_path / "out" / "score.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--steps", "2"], "at least 3 steps"),
    (["--ratios", "0"], "--ratios"),
    (["--model", "/nonexistent/folder"], "no reference DiT weights"),
])
def test_bad_arguments_exit_with_one_line(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        bs.main(["--samples", "2", "--out", str(tmp_path), *args])
