"""The compiled module as a user sees it: signature, outputs, steps, refusals, several models."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from families import Case, flow_sigmas, prediction_of, timestep_for
from plain_dits import PlainDiT
from ras_compile import RASCallError, RASPolicy, UnsupportedModelError, ras_compile

SD3 = Case("sd3", layers=1, heads=2, head_dim=8, patch=2, height=8, width=12, batch=2)


def _run_loop(ras, kwargs, steps):
    latent = kwargs["hidden_states"]
    sigmas = flow_sigmas(steps)
    for i in range(steps):
        pred = prediction_of(ras(**dict(kwargs, hidden_states=latent, timestep=timestep_for(sigmas[i], latent.shape[0]))))
        latent = latent + (sigmas[i + 1] - sigmas[i]) * pred
    return latent


def test_outputs_keep_the_models_types():
    model = SD3.build()
    ras = ras_compile(model, RASPolicy(), backend=None)
    kwargs = SD3.inputs(model)
    out = ras(**dict(kwargs, return_dict=True))
    assert type(out) is type(model(**dict(kwargs, return_dict=True)))
    torch.testing.assert_close(out.sample, model(**kwargs)[0])
    tup = ras(**kwargs)
    assert isinstance(tup, tuple) and len(tup) == 1


def test_positional_and_keyword_calls_agree_and_attributes_are_the_models():
    model = PlainDiT()
    ras = ras_compile(model, RASPolicy(), backend=None)
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 999.0)
    torch.testing.assert_close(ras(x, t), model(x, t))
    torch.testing.assert_close(ras(hidden_states=x, timestep=t), model(x, t))
    assert ras.patch == model.patch and ras.model is model


def test_schedule_of_modes_and_active_counts_over_a_loop():
    model = SD3.build()
    policy = RASPolicy(sample_ratio=0.25, warmup_steps=2, reset_steps=(5,), end_step=8)
    ras = ras_compile(model, policy, backend=None)
    _run_loop(ras, SD3.inputs(model), steps=10)
    stats = ras.ras_controller.stats
    n = SD3.num_tokens
    assert [s.step for s in stats] == list(range(10))
    for s in stats:
        dense = s.step < 2 or s.step == 5 or s.step >= 8
        assert s.mode == ("dense" if dense else "sparse"), s
        assert s.active_tokens == (n if dense else policy.active_tokens(s.step, n))
    assert stats[0].reason == "warm-up" and stats[5].reason == "reset step" and stats[9].reason == "after end step"


def test_a_new_generation_starts_when_the_timestep_goes_up_and_on_reset():
    model = SD3.build()
    ras = ras_compile(model, RASPolicy(warmup_steps=1, reset_steps=()), backend=None)
    kwargs = SD3.inputs(model)
    _run_loop(ras, kwargs, steps=3)
    assert [s.mode for s in ras.ras_controller.stats] == ["dense", "sparse", "sparse"]
    _run_loop(ras, kwargs, steps=2)  # timestep back at 1000: step 0 again
    assert [s.mode for s in ras.ras_controller.stats] == ["dense", "sparse"]
    ras.ras_controller.reset()
    ras(**dict(kwargs, timestep=timestep_for(0.1, SD3.batch)))
    assert ras.ras_controller.stats[0].step == 0 and ras.ras_controller.stats[0].mode == "dense"


def test_pipelines_that_count_time_upwards_are_followed_too():
    model = PlainDiT()
    ras = ras_compile(model, RASPolicy(warmup_steps=1, reset_steps=()), backend=None)
    x = torch.randn(1, 4, 8, 8)
    for t in (0.0, 0.25, 0.5, 0.75, 0.0, 0.5):  # Lumina-style: 0 -> 1, then a new generation
        ras(x, torch.full((1,), t))
    assert [s.step for s in ras.ras_controller.stats] == [0, 1]
    assert [s.mode for s in ras.ras_controller.stats] == ["dense", "sparse"]


class _TimestepsDiT(PlainDiT):
    def forward(self, hidden_states, timesteps):  # HiDream's name
        return super().forward(hidden_states, timesteps)


class _TDiT(PlainDiT):
    def forward(self, x, t):  # Z-Image's names
        return super().forward(x, t)


@pytest.mark.parametrize("cls,latent,time", [(_TimestepsDiT, "hidden_states", "timesteps"), (_TDiT, "x", "t")])
def test_the_timestep_argument_is_found_under_its_common_names(cls, latent, time):
    ras = ras_compile(cls(), RASPolicy(warmup_steps=1, reset_steps=()), backend=None)
    x = torch.randn(1, 4, 8, 8)
    for t in (900.0, 600.0, 300.0, 900.0, 600.0):  # the timestep going back up starts a new generation
        ras(**{latent: x, time: torch.full((1,), t)})
    assert [s.step for s in ras.ras_controller.stats] == [0, 1]
    assert [s.timestep for s in ras.ras_controller.stats] == [900.0, 600.0]


class _KwargsDiT(PlainDiT):
    """A forward that takes everything by keyword (wrappers, adapters)."""

    time_name = "timestep"

    def forward(self, *args, **kwargs):
        return super().forward(kwargs["hidden_states"], kwargs[self.time_name])


@pytest.mark.parametrize("time", ["timestep", "t"])
def test_a_forward_taking_keywords_only_finds_its_latent_and_timestep_in_the_call(time):
    model = type("_Named", (_KwargsDiT,), {"time_name": time})()
    ras = ras_compile(model, RASPolicy(warmup_steps=1, reset_steps=()), backend=None)
    x = torch.randn(1, 4, 8, 8)
    for t in (900.0, 600.0, 300.0, 900.0, 600.0):  # the timestep going back up starts a new generation
        got = ras(**{"hidden_states": x, time: torch.full((1,), t)})
    assert [s.timestep for s in ras.ras_controller.stats] == [900.0, 600.0]
    assert [s.mode for s in ras.ras_controller.stats] == ["dense", "sparse"]
    ras.ras_controller.reset()
    dense = ras(**{"hidden_states": x, time: torch.full((1,), 900.0)})
    with torch.no_grad():
        torch.testing.assert_close(dense, model(**{"hidden_states": x, time: torch.full((1,), 900.0)}))
    ras.ras_controller.override_next_step("sparse", torch.tensor([[0, 3, 5]]))
    torch.testing.assert_close(ras(**{"hidden_states": x, time: torch.full((1,), 900.0)}), dense, rtol=1e-5, atol=1e-5)
    assert got.shape == x.shape


def test_a_keywords_only_forward_called_without_the_latent_says_which_argument_is_missing():
    ras = ras_compile(_KwargsDiT(), RASPolicy(), backend=None, latent_arg="x")
    with pytest.raises(RASCallError, match=r"the call has no argument 'x', the latent argument \(it has "
                                           r"hidden_states, timestep\)"):
        ras(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.full((1,), 900.0))


def test_resolution_change_between_generations_recaptures_and_stays_exact():
    model = SD3.build()
    ras = ras_compile(model, RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=()), backend=None)
    for height, width in [(8, 12), (12, 8), (8, 12)]:
        case = Case("sd3", 1, 2, 8, 2, height, width, 2)
        kwargs = case.inputs(model)
        torch.testing.assert_close(_run_loop(ras, kwargs, 3), _run_loop(model, kwargs, 3), rtol=1e-5, atol=1e-5)
        assert [s.mode for s in ras.ras_controller.stats] == ["dense", "sparse", "sparse"]


def test_only_the_most_recent_signatures_keep_their_graphs_and_caches(monkeypatch):
    import ras_compile.runtime as runtime

    monkeypatch.setattr(runtime, "MAX_CAPTURES", 2)
    model = SD3.build()
    ras = ras_compile(model, RASPolicy(warmup_steps=1, reset_steps=()), backend=None)
    for height in (8, 12, 16, 8):
        kwargs = Case("sd3", 1, 2, 8, 2, height, 12, 2).inputs(model)
        torch.testing.assert_close(prediction_of(ras(**kwargs)), prediction_of(model(**kwargs)))
    assert len(ras._captures) == 2


def test_resolution_change_inside_a_generation_runs_dense_instead_of_reading_stale_caches():
    model = SD3.build()
    ras = ras_compile(model, RASPolicy(warmup_steps=1, reset_steps=()), backend=None)
    small = SD3.inputs(model)
    ras(**dict(small, timestep=timestep_for(1.0, 2)))
    big = Case("sd3", 1, 2, 8, 2, 12, 12, 2).inputs(model)
    out = ras(**dict(big, timestep=timestep_for(0.9, 2)))
    assert ras.ras_controller.stats[-1].mode == "dense"
    assert ras.ras_controller.stats[-1].reason == "caches empty"
    torch.testing.assert_close(prediction_of(out), prediction_of(model(**dict(big, timestep=timestep_for(0.9, 2)))))


def test_two_compiled_models_in_one_process_keep_separate_state():
    model_a, model_b = SD3.build(), Case("sd3", 1, 2, 8, 2, 8, 12, 2, seed=1).build()
    ras_a = ras_compile(model_a, RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=()), backend=None)
    ras_b = ras_compile(model_b, RASPolicy(sample_ratio=0.25, warmup_steps=2, reset_steps=()), backend=None)
    kw_a, kw_b = SD3.inputs(model_a, seed=1), SD3.inputs(model_b, seed=2)
    solo = ras_compile(model_a, RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=()), backend=None)
    expected = _run_loop(solo, kw_a, 4)
    latents_a, latents_b = kw_a["hidden_states"], kw_b["hidden_states"]
    sigmas = flow_sigmas(4)
    for i in range(4):  # interleaved calls, as two pipelines in one server would make
        pa = prediction_of(ras_a(**dict(kw_a, hidden_states=latents_a, timestep=timestep_for(sigmas[i], 2))))
        pb = prediction_of(ras_b(**dict(kw_b, hidden_states=latents_b, timestep=timestep_for(sigmas[i], 2))))
        latents_a = latents_a + (sigmas[i + 1] - sigmas[i]) * pa
        latents_b = latents_b + (sigmas[i + 1] - sigmas[i]) * pb
    torch.testing.assert_close(latents_a, expected)
    assert [s.active_tokens for s in ras_b.ras_controller.stats][2:] == [SD3.num_tokens // 4] * 2


def test_kv_cache_off_lets_active_tokens_attend_only_to_each_other():
    model = PlainDiT()
    x, t = torch.randn(1, 4, 8, 8), torch.full((1,), 999.0)
    with_cache = ras_compile(model, RASPolicy(kv_cache=True), backend=None)
    without = ras_compile(model, RASPolicy(kv_cache=False), backend=None)
    idx = torch.tensor([[0, 5, 9, 15]])
    outs = []
    for ras in (with_cache, without):
        ras(x, t)
        ras.ras_controller.override_next_step("sparse", idx)
        outs.append(ras(x, t))
    torch.testing.assert_close(outs[0], model(x, t))  # full K/V from the cache: the dense output
    assert not torch.allclose(outs[1], model(x, t), atol=1e-4)  # attends to 4 tokens only


def test_a_plain_pytorch_dit_nobody_wrote_rules_for_is_handled():
    model = PlainDiT(depth=3, patch=2)
    ras = ras_compile(model, RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=()), backend="aot_eager")
    x, t = torch.randn(2, 4, 8, 12), torch.full((2,), 999.0)
    analysis = ras.ras_analysis(x, t)
    assert analysis.num_tokens == 24 and len(analysis.attention) == 3
    dense = ras(x, t)
    ras.ras_controller.override_next_step("sparse", torch.tensor([[1, 2, 3], [4, 20, 23]]))
    torch.testing.assert_close(ras(x, t), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mixer,densified", [("mean", 3), ("conv", 3), ("linear_attention", 5)])
def test_token_mixing_ops_are_densified_and_keep_the_dense_equivalence(mixer, densified):
    model = PlainDiT(token_mixer=mixer, depth=2)
    ras = ras_compile(model, RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=()), backend="aot_eager")
    x, t = torch.randn(2, 4, 8, 12), torch.full((2,), 999.0)
    analysis = ras.ras_analysis(x, t)
    # the mixer's inputs in each of the 2 blocks (K and V for linear attention), and the unpatchify
    assert analysis.counts["densified"] == densified
    dense = ras(x, t)
    torch.testing.assert_close(dense, model(x, t))
    ras.ras_controller.override_next_step("sparse", torch.tensor([[0, 7, 9, 23], [2, 3, 4, 5]]))
    torch.testing.assert_close(ras(x, t), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mixer,op,why", [("cummax", "aten.cummax.default", "no token rule"),
                                          ("gram", "aten.matmul.default", "two token axes")])
def test_an_op_the_pass_cannot_decide_is_refused_with_node_op_and_reason(mixer, op, why):
    ras = ras_compile(PlainDiT(token_mixer=mixer), RASPolicy(), backend=None)
    with pytest.raises(UnsupportedModelError) as info:
        ras(torch.randn(1, 4, 8, 8), torch.full((1,), 999.0))
    assert info.value.op == op and info.value.node
    assert why in str(info.value) and "on_unsupported='fallback'" in str(info.value)


def test_fallback_runs_the_dense_model_with_a_warning():
    model = PlainDiT(token_mixer="cummax")
    ras = ras_compile(model, RASPolicy(on_unsupported="fallback"), backend=None)
    x, t = torch.randn(1, 4, 8, 8), torch.full((1,), 999.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ras(x, t)
    assert any("dense" in str(w.message) and "cummax" in str(w.message) for w in caught)
    torch.testing.assert_close(out, model(x, t))
    assert ras.ras_controller.stats[-1].mode == "fallback"


def test_bad_arguments_get_clear_errors():
    model = PlainDiT()
    with pytest.raises(TypeError, match="RASPolicy"):
        ras_compile(model, {"sample_ratio": 0.5})
    with pytest.raises(ValueError, match="backend"):
        ras_compile(model, RASPolicy(), backend="tensorrt-please")
    with pytest.raises(ValueError, match="latent_arg='x'"):
        ras_compile(model, RASPolicy(), latent_arg="x")
    with pytest.raises(ValueError, match="dense_graph='yes'"):
        ras_compile(model, RASPolicy(), dense_graph="yes")
    with pytest.MonkeyPatch.context() as mp:  # a bad kernel variant fails at ras_compile, not at the first compile
        mp.setenv("RAS_COMPILE_KV_KERNEL", "fastest")
        with pytest.raises(ValueError, match="RAS_COMPILE_KV_KERNEL='fastest'"):
            ras_compile(model, RASPolicy(), backend=None)
        ras_compile(model, RASPolicy(), backend=None, fuse_kv_projection=False)  # the kernels are off: not read
    ras = ras_compile(model, RASPolicy(), backend=None)
    with pytest.raises(RASCallError, match="does not accept"):
        ras(torch.randn(1, 4, 8, 8), torch.ones(1), torch.ones(1))
    with pytest.raises(RASCallError, match="dense step"):
        ras.ras_controller.override_next_step("sparse", torch.tensor([[0, 1]]))
        ras(torch.randn(1, 4, 8, 8), torch.ones(1))
    ras.ras_controller.reset()
    ras(torch.randn(1, 4, 8, 8), torch.ones(1))
    with pytest.raises(RASCallError, match=r"\[0, 16\)"):
        ras.ras_controller.override_next_step("sparse", torch.tensor([[0, 16]]))
        ras(torch.randn(1, 4, 8, 8), torch.ones(1))
    with pytest.raises(RASCallError, match="repeats a token id"):
        ras.ras_controller.override_next_step("sparse", torch.tensor([[3, 5, 3]]))
        ras(torch.randn(1, 4, 8, 8), torch.ones(1))


@pytest.mark.parametrize("policy", [RASPolicy(), RASPolicy(on_unsupported="fallback")])
def test_a_call_the_model_itself_fails_on_names_the_models_error_not_a_capture_limit(policy):
    ras = ras_compile(PlainDiT(), policy, backend=None)
    with pytest.raises(RASCallError, match=r"own forward fails on this call.*double.*fix the call"):
        ras(torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.ones(1))  # float64 into float32 weights
    ras(torch.randn(1, 4, 8, 8), torch.ones(1))  # the right call then runs


@dataclasses.dataclass
class _Prediction:  # a model's own output class, unknown to torch.export until registered
    sample: torch.Tensor


class _DataclassOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = PlainDiT().eval()

    def forward(self, x, t):
        return _Prediction(self.model(x, t))


def test_an_output_class_export_cannot_return_is_refused_with_how_to_register_it_and_then_runs():
    torch.manual_seed(0)
    model = _DataclassOut().eval()
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 999.0)
    with pytest.raises(UnsupportedModelError, match=r"returns a _Prediction object.*register_dataclass\(_Prediction\)"):
        ras_compile(model, RASPolicy(), backend=None)(x, t)
    torch.utils._pytree.register_dataclass(_Prediction)  # as the message says
    out = ras_compile(model, RASPolicy(), backend=None)(x, t)
    assert isinstance(out, _Prediction)
    torch.testing.assert_close(out.sample, model(x, t).sample)


def test_an_override_in_any_order_is_the_sorted_active_set():
    model = PlainDiT()
    ras = ras_compile(model, RASPolicy(), backend=None)
    x = torch.randn(1, 4, 8, 8)
    outs = []
    for ids in ([9, 2, 14, 5], [2, 5, 9, 14]):
        ras.ras_controller.reset()
        ras(x, torch.ones(1))
        ras.ras_controller.override_next_step("sparse", torch.tensor(ids))
        outs.append(ras(x * 0.5, torch.ones(1)))
        assert ras.ras_controller.last_index.tolist() == [[2, 5, 9, 14]]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_dense_steps_through_the_sparse_graph_equal_a_separate_dense_graph(family):
    """The default runs dense steps through the sparse graph with every token active;
    ``dense_graph=True`` runs a separate dense graph. Whole loops agree, and the dense
    steps of both equal the unmodified model."""
    case = Case(family, layers=2, heads=2, head_dim=8, patch=2, height=12, width=16, batch=2)
    model = case.build()
    policy = RASPolicy(sample_ratio=0.4, warmup_steps=2, reset_steps=(5,))
    runs = {flag: ras_compile(model, policy, backend=None, dense_graph=flag) for flag in (False, True)}
    kwargs = case.inputs(model)
    sigmas = flow_sigmas(8)
    latents = {flag: kwargs["hidden_states"] for flag in runs}
    for i in range(8):
        preds = {}
        for flag, ras in runs.items():
            call = dict(kwargs, hidden_states=latents[flag], timestep=timestep_for(sigmas[i], 2))
            preds[flag] = prediction_of(ras(**call))
            if ras.ras_controller.stats[-1].mode == "dense":
                with torch.no_grad():
                    torch.testing.assert_close(preds[flag], prediction_of(model(**call)), rtol=1e-5, atol=1e-5)
            velocity = preds[flag][:, :latents[flag].shape[1]]  # PixArt also predicts a variance
            latents[flag] = latents[flag] + (sigmas[i + 1] - sigmas[i]) * velocity
        torch.testing.assert_close(preds[False], preds[True], rtol=1e-5, atol=1e-5)
    modes = [s.mode for s in runs[False].ras_controller.stats]
    assert modes == [s.mode for s in runs[True].ras_controller.stats] and {"dense", "sparse"} <= set(modes)


def test_compile_mode_is_validated_and_reaches_inductor(monkeypatch):
    model = PlainDiT()
    with pytest.raises(ValueError, match="compile_mode='fast'"):
        ras_compile(model, RASPolicy(), compile_mode="fast")
    with pytest.raises(ValueError, match="needs backend='inductor'"):
        ras_compile(model, RASPolicy(), backend="aot_eager", compile_mode="reduce-overhead")
    seen = []
    real_compile = torch.compile

    def spy(gm, **kwargs):
        seen.append(kwargs.get("mode"))
        return real_compile(gm, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    case = Case("dit", layers=1, heads=2, head_dim=8, patch=2, height=8, width=8, batch=1)
    model = case.build()
    kwargs = case.inputs(model)
    policy = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())
    # On the CPU "reduce-overhead" is Inductor without CUDA graphs: same values as eager graphs
    ras, ref = ras_compile(model, policy, compile_mode="reduce-overhead"), ras_compile(model, policy, backend=None)
    for sigma in (1.0, 0.75, 0.5):
        call = dict(kwargs, timestep=timestep_for(sigma, 1))
        torch.testing.assert_close(prediction_of(ras(**call)), prediction_of(ref(**call)), rtol=1e-4, atol=1e-4)
    assert seen and set(seen) == {"reduce-overhead"}
    assert [s.mode for s in ras.ras_controller.stats] == ["dense", "sparse", "sparse"]


class _ResidualsDiT(torch.nn.Module):
    """A token-latent model ([B, N, C]) that returns per-block features in a list (a ControlNet's
    residuals), or a prediction beside such a list (``features=True``: REPA-style)."""

    def __init__(self, features: bool):
        super().__init__()
        from plain_dits import Block

        self.features = features
        self.embed, self.time = torch.nn.Linear(4, 16), torch.nn.Linear(1, 16)
        self.blocks = torch.nn.ModuleList(Block(16, 2, None, "sdpa") for _ in range(2))
        self.out = torch.nn.Linear(16, 4)

    def forward(self, hidden_states, timestep):
        x, emb = self.embed(hidden_states), self.time(timestep.reshape(-1, 1) / 1000.0)
        residuals = []
        for block in self.blocks:
            x = block(x, emb, (4, 4))
            residuals.append(x)
        return (self.out(x), residuals) if self.features else (tuple(residuals),)


def test_per_block_features_in_a_list_are_not_taken_for_the_prediction():
    torch.manual_seed(0)
    kw = dict(hidden_states=torch.randn(2, 16, 4), timestep=torch.tensor([800.0, 300.0]))
    with pytest.raises(UnsupportedModelError, match="lists of per-block features .* not a prediction"):
        ras_compile(_ResidualsDiT(False).eval(), RASPolicy(), backend=None)(**kw)
    model = _ResidualsDiT(True).eval()
    ras = ras_compile(model, RASPolicy(), backend=None)
    assert ras.ras_analysis(**kw).output_leaf == 0  # the prediction, not a block's features
    ras.ras_controller.override_next_step("dense")
    ras(**kw)
    ras.ras_controller.override_next_step("sparse", torch.tensor([[1, 4, 9], [0, 2, 15]]))
    got, want = ras(**kw), model(**kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
