"""``benchmarks/bench_quality.py``: the Pareto rule, the configuration plan, and one quick run end to end.

The end-to-end run uses tiny stand-in weights (a one-layer reference DiT with diffusers'
initialisation and an untrained evaluator) saved to a temporary folder, and the cheap
``eager`` backend; it takes about half a minute on 2 cores.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmark_scripts import load_benchmark
from ras_compile import RASPolicy

bq = load_benchmark("bench_quality", register=True)


# -- the Pareto rule ------------------------------------------------------------------------------
def test_pareto_front_hand_cases():
    # throughput up, FD down
    pts = [(10.0, 5.0), (20.0, 6.0), (15.0, 7.0), (5.0, 4.0), (20.0, 6.0)]
    assert bq.pareto_front(pts, (True, False)) == [True, True, False, True, True]  # equal points both stay
    # accuracy up: (15, 0.9) beats (10, 0.8) on both
    assert bq.pareto_front([(10.0, 0.8), (15.0, 0.9), (20.0, 0.5)], (True, True)) == [False, True, True]
    # a NaN metric is never on the front and dominates nothing
    assert bq.pareto_front([(10.0, float("nan")), (1.0, 9.0)], (True, False)) == [False, True]
    # equal in one coordinate, better in the other: dominated
    assert bq.pareto_front([(10.0, 1.0), (10.0, 2.0)], (True, False)) == [True, False]
    assert bq.pareto_front([], (True, False)) == []


def _dominates(a, b, maximize):
    s = [1 if m else -1 for m in maximize]
    a, b = [x * k for x, k in zip(a, s)], [x * k for x, k in zip(b, s)]
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(finite, finite), max_size=12), st.tuples(st.booleans(), st.booleans()))
def test_pareto_front_properties(points, maximize):
    flags = bq.pareto_front(points, maximize)
    front = [p for p, f in zip(points, flags) if f]
    assert bool(front) == bool(points)
    for p, f in zip(points, flags):
        if f:  # nothing dominates a front point
            assert not any(_dominates(q, p, maximize) for q in points)
        else:  # and every other point is dominated by a front point (domination is transitive)
            assert any(_dominates(q, p, maximize) for q in front)


# -- the plan -------------------------------------------------------------------------------------
def test_base_policy_scales_the_papers_dense_steps_to_the_loop():
    assert bq.base_policy(0.5, 28, guided=True) == RASPolicy(sample_ratio=0.5, warmup_steps=4, reset_steps=(12, 20),
                                                             num_steps=28, share_active_set="cfg")
    p14 = bq.base_policy(0.25, 14, guided=False)
    assert (p14.warmup_steps, p14.reset_steps, p14.share_active_set) == (2, (6, 10), "per_sample")
    assert [t for t in range(40) if bq.base_policy(0.5, 40, True).is_dense_step(t)] == [0, 1, 2, 3, 4, 5, 17, 29]


def test_plan_maps_every_ablation_to_policy_fields():
    configs = bq.plan_configs((0.5, 0.25), (20, 28), (10, 14), 0.5, 28, [a for a in bq.ABLATIONS if a != "metric_std"],
                              guided=True, num_tokens=256)
    by = {c.name: c for c in configs}
    # dense at every step count RAS uses, flagged as references when not asked for
    assert {c.steps for c in configs if c.kind == "dense"} == {10, 14, 20, 28}
    assert by["dense_s28"].reference_only and not by["dense_s10"].reference_only
    base = by["abl_metric_std"].policy
    assert base == RASPolicy(sample_ratio=0.5, warmup_steps=4, reset_steps=(12, 20), num_steps=28,
                             share_active_set="cfg")
    assert by["abl_metric_std"].same_run_as == "ras_r0.5_s28"  # equal policies run once
    changed = {name: {f for f in base.__dataclass_fields__ if getattr(by[f"abl_{name}"].policy, f) != getattr(base, f)}
               for name in bq.ABLATIONS if name != "metric_std"}
    assert changed == {"metric_l2norm": {"metric"}, "metric_random": {"metric"}, "kv_cache_off": {"kv_cache"},
                       "reset_off": {"reset_steps"}, "starvation_official": {"starvation_rule"},
                       "starvation_none": {"starvation_scale"},
                       "schedule_dynamic": {"schedule", "skip_num_step", "dynamic_drop_multiple"},
                       "warmup_2": {"warmup_steps"}, "warmup_8": {"warmup_steps"}, "end_step": {"end_step"},
                       "high_ratio_half": {"high_ratio"}, "share_per_sample": {"share_active_set"},
                       "step_cache_2": {"step_cache_interval"}, "step_cache_3": {"step_cache_interval"},
                       "step_cache_2_reuse": {"step_cache_interval", "step_cache_order"},
                       "stale_linear": {"stale_token_order"}}
    assert by["abl_end_step"].policy.end_step == 24 and by["abl_warmup_8"].policy.warmup_steps == 8
    assert [by["abl_end_step"].policy.is_dense_step(t) for t in range(22, 28)] == [False, False] + [True] * 4
    dyn = by["abl_schedule_dynamic"].policy
    ks = [dyn.active_tokens(t, 256) for t in range(4, 28) if not dyn.is_dense_step(t)]
    assert ks[0] > ks[-1] and abs(sum(ks) / len(ks) - 128) < 16  # linear around the static count
    assert by["check_ras_r1_s28"].policy.sample_ratio == 1.0
    assert all(c.same_run_as is None for c in configs if c.table != "table6")


def test_a_fixed_warmup_replaces_the_scaled_one_and_keeps_the_resets_after_it():
    assert bq.dense_plan(14) == (2, (6, 10)) and bq.dense_plan(14, 3) == (3, (6, 10))
    assert bq.dense_plan(14, 8) == (8, (10,))  # reset 6 would fall in the warm-up
    configs = bq.plan_configs((0.5,), (8, 14), (4,), 0.5, 14, ["warmup_8", "metric_random"], guided=True,
                              num_tokens=64, warmup_steps=3)
    by = {c.name: c for c in configs}
    assert by["ras_r0.5_s8"].policy.warmup_steps == 3 and by["ras_r0.5_s8"].policy.reset_steps == (6,)
    assert by["abl_metric_random"].policy.warmup_steps == 3 and by["abl_warmup_8"].policy.warmup_steps == 8
    assert by["check_ras_r1_s14"].policy.warmup_steps == 3
    assert bq.parse_args(["--warmup-steps", "2"]).warmup_steps == 2 and bq.parse_args([]).warmup_steps is None
    with pytest.raises(SystemExit):
        bq.parse_args(["--warmup-steps", "0"])


def test_step_cache_rows_join_table_2_alone_and_stacked_on_every_ratio():
    configs = bq.plan_configs((0.5, 0.25), (14, 28), (10,), 0.5, 28, [], guided=True, num_tokens=256,
                              step_cache_intervals=(2, 3))
    by = {c.name: c for c in configs}
    for n in (2, 3):
        for s in (14, 28):
            alone = by[f"sc{n}_s{s}"]
            assert alone.table == "table2" and alone.policy.sample_ratio == 1.0
            assert alone.policy == bq.base_policy(1.0, s, True, step_cache_interval=n)
            for r in (0.5, 0.25):
                stacked = by[f"ras_r{r:g}_sc{n}_s{s}"]
                assert stacked.policy == bq.base_policy(r, s, True, step_cache_interval=n) and stacked.ratio == r
    assert not any("sc" in c.name for c in bq.plan_configs((0.5,), (28,), (10,), 0.5, 28, [], True, 256))
    stale = {c.name: c.policy for c in bq.plan_configs((0.5,), (28,), (10,), 0.5, 28, [], True, 256,
                                                       step_cache_intervals=(2,), stale_linear=True)}
    assert stale["ras_r0.5_st1_s28"] == bq.base_policy(0.5, 28, True, stale_token_order=1)
    assert stale["ras_r0.5_st1_sc2_s28"] == bq.base_policy(0.5, 28, True, stale_token_order=1, step_cache_interval=2)
    assert bq.parse_args(["--stale-linear"]).stale_linear and not bq.parse_args([]).stale_linear
    assert bq.parse_args([]).step_cache_intervals == ()
    assert bq.parse_args(["--step-cache-intervals", "2", "4"]).step_cache_intervals == [2, 4]
    with pytest.raises(SystemExit):
        bq.parse_args(["--step-cache-intervals", "1"])


def test_converged_reference_is_planned_first_and_outside_the_tables():
    configs = bq.plan_configs((0.5,), (8,), (4,), 0.5, 8, ["metric_random"], guided=False, num_tokens=64,
                              converged_steps=32)
    assert configs[0].name == "converged_s32" and configs[0].table == "converged" and configs[0].kind == "dense"
    assert all(c.same_run_as != "converged_s32" for c in configs)
    assert [c.name for c in bq.plan_configs((0.5,), (8,), (4,), 0.5, 8, [], False, 64)][0] == "dense_s4"  # none


def test_converged_steps_must_exceed_every_step_count():
    assert bq.parse_args([]).converged_steps == bq.DEFAULTS["converged_steps"]
    assert bq.parse_args(["--quick"]).converged_steps == bq.QUICK["converged_steps"]
    assert bq.parse_args(["--converged-steps", "0"]).converged_steps == 0
    for bad in ("40", "12", "-1"):  # 40: the default RAS steps reach 40
        with pytest.raises(SystemExit):
            bq.parse_args(["--converged-steps", bad])


def _config(name, kind, steps, samples_per_s, **metrics):
    c = bq.Config(name, "table2", kind, steps, name)
    c.result = {"timing": {"samples_per_s": samples_per_s}, "metrics": metrics}
    return c


def test_ras_beats_dense_only_with_more_steps_at_least_as_fast_and_better():
    dense = [_config("d8", "dense", 8, 8.0, psnr_converged_db=20.0), _config("d14", "dense", 14, 5.0,
                                                                            psnr_converged_db=25.0)]
    ras = [_config("r14", "ras", 14, 8.5, psnr_converged_db=23.0),   # beats d8: more steps, faster, better
           _config("r8", "ras", 8, 9.0, psnr_converged_db=21.0),     # faster and better than d8, same steps: no
           _config("r28", "ras", 28, 4.0, psnr_converged_db=30.0)]   # better than d14 but slower: no
    assert bq.ras_dominates_dense(ras, dense, "psnr_converged_db", True) == [("r14", "d8")]
    assert bq.ras_dominates_dense(ras, dense, "fd", False) == []  # no such metric here: NaN dominates nothing


def test_table6_rows_list_the_dense_rows_with_fewer_steps_they_beat_on_the_converged_front():
    dense = [_config("dense_s8", "dense", 8, 8.0, psnr_converged_db=20.0),
             _config("dense_s14", "dense", 14, 5.0, psnr_converged_db=25.0)]
    fast = bq.Config("abl_fast", "table6", "ras", 14, "fast")
    fast.result = {"timing": {"samples_per_s": 9.0}, "metrics": {"psnr_converged_db": 21.0}}
    slow = bq.Config("abl_slow", "table6", "ras", 14, "slow")
    slow.result = {"timing": {"samples_per_s": 4.0}, "metrics": {"psnr_converged_db": 30.0}}
    bq.compute_pareto([*dense, fast, slow])
    assert fast.result["beats_dense_converged"] == ["dense_s8"]  # faster and closer than dense 8
    assert slow.result["beats_dense_converged"] == []  # closer than dense 14, but slower; same steps anyway
    assert [d.result["pareto"]["psnr_converged"] for d in dense] == [True, True]
    assert dense[0].result["pareto"]["fd"] is None  # no FD in this run: that front is not marked


def test_paired_noise_uses_per_sample_differences():
    per_sample = {"a": {"accuracy": torch.tensor([1.0, 1.0, 0.0, 1.0])},
                  "b": {"accuracy": torch.tensor([1.0, 0.0, 0.0, 0.0])}}
    d = torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert bq.paired_noise("accuracy", "a", "b", None, None, per_sample) == pytest.approx(2 * float(d.std()) / 2)
    assert math.isnan(bq.paired_noise("fd", "a", "b", None, None, per_sample))  # no features
    assert math.isnan(bq.paired_noise("psnr_db", "a", "b", None, None, per_sample))  # no such values


def test_paired_mean_difference():
    a, b = torch.tensor([30.0, 32.0, 34.0, math.inf]), torch.tensor([29.0, 30.0, 31.0, 20.0])
    diff, se, dropped = bq.paired_mean_difference(a, b)
    assert diff == pytest.approx(2.0) and dropped == 1  # the inf pair is left out
    assert se == pytest.approx(1.0 / math.sqrt(3))  # std of (1, 2, 3) over sqrt(3)
    assert bq.paired_mean_difference(a[:1], b[:1])[1] != bq.paired_mean_difference(a[:1], b[:1])[1]  # one: nan
    assert math.isnan(bq.paired_mean_difference(a[3:], b[3:])[0])


# -- end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from ras_compile.reference.evaluator import build_classifier, save_classifier
    from ras_compile.reference.model import build_reference_model

    root = tmp_path_factory.mktemp("bench_quality")
    build_reference_model(init="diffusers", num_layers=1, num_attention_heads=1,
                          attention_head_dim=16).save_pretrained(root / "model")
    save_classifier(build_classifier(width=8), root / "classifier.safetensors")
    out = root / "out"
    bq.main(["--quick", "--model", str(root / "model"), "--classifier", str(root / "classifier.safetensors"),
             "--backend", "eager", "--out", str(out), "--name", "q", "--ratios", "0.5", "0.25",
             "--step-cache-intervals", "2", "--stale-linear"])
    return out, json.loads((out / "q.json").read_text())


@pytest.mark.slow
def test_quick_run_writes_every_configuration_and_metric(quick_run):
    out, report = quick_run
    assert (out / "q.md").is_file() and (out / "q.png").stat().st_size > 1000
    assert report["plot"] is True
    names = {c["name"] for c in report["configs"]}
    assert names == {"converged_s16", "dense_s4", "dense_s8", "ras_r0.5_s8", "ras_r0.25_s8", "abl_metric_std",
                     "abl_metric_random", "abl_kv_cache_off", "check_ras_r1_s8", "sc2_s8", "ras_r0.5_sc2_s8",
                     "ras_r0.25_sc2_s8", "ras_r0.5_st1_s8", "ras_r0.25_st1_s8", "ras_r0.5_st1_sc2_s8",
                     "ras_r0.25_st1_sc2_s8"}
    assert report["configs"][0]["name"] == "converged_s16"  # the references run first
    assert set(report["table2_order"]) == {c["name"] for c in report["configs"] if c["table"] == "table2"}
    for c in report["configs"]:
        assert set(c["metrics"]) == {"accuracy", "fd", "fd_std", "psnr_db", "ssim", "psnr_converged_db"}, c["name"]
        assert 0 <= c["metrics"]["accuracy"] <= 1 and math.isfinite(c["metrics"]["fd"])
        assert c["timing"]["samples_per_s"] > 0
        if c["table"] == "converged":  # no reference of its own
            assert c["metrics"]["psnr_db"] is None and c["metrics"]["psnr_converged_db"] is None
            continue
        assert c["metrics"]["psnr_db"] is not None  # a dense reference exists at every step count
        assert math.isfinite(c["metrics"]["psnr_converged_db"])  # and nothing equals the 16-step samples
        if c["kind"] == "ras":
            stats = c["ras_stats"]
            assert stats["sparse_steps_per_loop"] > 0 and stats["fallback_steps_per_loop"] == 0
            assert stats["mean_sparse_active_fraction"] == pytest.approx(c["ratio"], abs=1 / 256)
            predicted = sum(RASPolicy(**c["policy"]).is_predicted_step(t) for t in range(c["steps"]))
            assert stats["predicted_steps_per_loop"] == predicted and (predicted > 0) == ("sc2" in c["name"])
            assert c["policy"]["sample_ratio"] == c["ratio"]
    by = {c["name"]: c for c in report["configs"]}
    assert by["abl_metric_random"]["policy"]["metric"] == "random"
    assert by["abl_kv_cache_off"]["policy"]["kv_cache"] is False
    assert by["abl_metric_std"]["same_run_as"] == "ras_r0.5_s8"
    # throughput order
    thr = [by[n]["timing"]["samples_per_s"] for n in report["table2_order"]]
    assert thr == sorted(thr, reverse=True)
    md = (out / "q.md").read_text()
    for text in ("Table 2", "Table 6", "Stand-in model", "converged reference", "PSNR conv",
                 "AMD" if "AMD" in report["machine"]["cpu_model"] else "CPU",
                 report["machine"]["torch"], "Does not reproduce here", "Pareto"):
        assert text in md


@pytest.mark.slow
def test_quick_run_psnr_and_pareto_flags_agree_with_the_numbers(quick_run):
    _, report = quick_run
    by = {c["name"]: c for c in report["configs"]}
    for name in ("dense_s4", "dense_s8"):  # dense against itself
        assert float(by[name]["metrics"]["psnr_db"]) == math.inf and by[name]["metrics"]["ssim"] == pytest.approx(1)
    assert float(by["check_ras_r1_s8"]["metrics"]["psnr_db"]) > 60  # ratio 1.0 reproduces dense
    assert float(by["ras_r0.25_s8"]["metrics"]["psnr_db"]) < 200  # a real sparse run differs
    # Euler converges: more dense steps come closer to the 16-step reference
    assert by["dense_s8"]["metrics"]["psnr_converged_db"] > by["dense_s4"]["metrics"]["psnr_converged_db"]
    rows = [c for c in report["configs"] if c["table"] == "table2"]
    for key, metric, high, _ in bq.FRONTS:
        expected = bq.pareto_front([(c["timing"]["samples_per_s"], c["metrics"][metric]) for c in rows], (True, high))
        assert [c["pareto"][key] for c in rows] == expected, key
    claims = [c for c in report["claims"] if "std selection beats random" in c["claim"]]
    std, rnd = by["abl_metric_std"]["metrics"], by["abl_metric_random"]["metrics"]
    by_measure = {c["measure"]: c for c in claims}
    assert set(by_measure) == {"fd", "psnr_db"}  # judged on both
    assert by_measure["fd"]["holds"] == (std["fd"] < rnd["fd"])
    assert by_measure["psnr_db"]["holds"] == (std["psnr_db"] > rnd["psnr_db"])
    assert by_measure["psnr_db"]["psnr_difference_db"] == pytest.approx(std["psnr_db"] - rnd["psnr_db"], abs=1e-4)
    assert {"measure", "holds", "measured"} <= set(next(c for c in report["claims"] if "Pareto" in c["claim"]))
    for start, rows in (("a step cache stacked on RAS", ("sc2_s8", "ras_r0.5_sc2_s8", "ras_r0.25_sc2_s8",
                                                          "ras_r0.5_st1_sc2_s8", "ras_r0.25_st1_sc2_s8")),
                        ("RAS with its stale tokens continued", ("ras_r0.5_st1_s8", "ras_r0.25_st1_s8",
                                                                 "ras_r0.5_st1_sc2_s8", "ras_r0.25_st1_sc2_s8"))):
        variant = [c for c in report["claims"] if c["claim"].startswith(start)]
        assert {c["measure"] for c in variant} == {"fd", "accuracy", "psnr_converged_db"}
        for c, (key, *_rest) in zip(variant, bq.FRONTS):
            on = [n for n in rows if by[n]["pareto"][key]]
            assert c["holds"] == bool(on) and all(by[n]["label"] in c["measured"] for n in on)
    table2 = [c for c in report["claims"] if c["claim"].startswith("RAS with more steps")]
    assert {c["measure"] for c in table2} == {"fd", "accuracy", "psnr_converged_db"}  # every front
    for c in table2:  # each listed pair: RAS with more steps, at least as fast
        for w in c["pairs"]:
            assert by[w["ras"]]["steps"] > by[w["dense"]]["steps"]
            assert by[w["ras"]]["timing"]["samples_per_s"] >= by[w["dense"]]["timing"]["samples_per_s"]
        assert c["holds"] == bool(c["pairs"])


def test_missing_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="ras_compile.reference.train"):
        bq.main(["--quick", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path)])


def test_default_guidance_scale_is_the_reference_dits_named_one():
    from ras_compile.reference import DEFAULT_GUIDANCE_SCALE

    assert bq.parse_args([]).guidance_scale == DEFAULT_GUIDANCE_SCALE
    assert bq.parse_args(["--guidance-scale", "1"]).guidance_scale == 1.0
