"""A latent passed as a list of per-sample tensors (ras_compile/sample_lists.py).

Z-Image and similar DiTs take ``x = [latent_0, ..., latent_{B-1}]`` and return a list. A list of
one shape runs as one batch: the model sees its list, the caller gets lists back, and the
properties of the batched path hold (a sparse step after a dense step equals the model for any
active set). Captions of different lengths after the image tokens are padded per sample as the
model pads them. Samples of different shapes are refused with what to do instead.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ras_compile import RASPolicy, UnsupportedModelError, ras_compile
from ras_compile.sample_lists import SampleList, batch_sample_list, unstack_outputs
from sparse_checks import assert_sparse_after_dense_equals_the_model, compiled_once, random_active_sets

C, D, HEADS, H, W, P, TC = 4, 16, 2, 8, 8, 2, 6
N = (H // P) * (W // P)
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


class ListDiT(nn.Module):
    """Per-sample latents ``[C, H, W]`` and captions ``[T_i, TC]``: each sample patchified on its own,
    the rows of all samples embedded at once (``cat`` then ``split``), padded into a batch, then joint
    attention over ``[image, caption]`` with a key mask for the padded caption rows; returns a list
    (or ``{"sample": list}``). ``time_per_sample``: the timestep embedding is added in the per-sample
    loop (``x_i + linear(t[i])``), not to the padded batch."""

    def __init__(self, as_dict: bool = False, time_per_sample: bool = False):
        super().__init__()
        self.as_dict, self.time_per_sample = as_dict, time_per_sample
        self.embed, self.text = nn.Linear(C * P * P, D), nn.Linear(TC, D)
        self.time = nn.Linear(1, D)
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(2))
        self.out = nn.Linear(D, C * P * P)

    @staticmethod
    def _patches(x):  # [C, h, w] -> [n, C * P * P]
        c, h, w = x.shape
        return x.view(c, h // P, P, w // P, P).permute(1, 3, 2, 4, 0).reshape(-1, c * P * P)

    def forward(self, x, t, caps):
        rows = [self._patches(xi) for xi in x]
        n = [len(r) for r in rows]
        img = list(self.embed(torch.cat(rows)).split(n))
        if self.time_per_sample:  # each sample's tokens shifted by its own timestep's embedding, in the loop
            img = pad_sequence([im + self.time(t[i, None].float() / 1000) for i, im in enumerate(img)], batch_first=True)
        else:
            img = pad_sequence(img, batch_first=True) + self.time(t[:, None, None].float() / 1000)
        cap = [self.text(c) for c in caps]
        seq = pad_sequence([torch.cat([img[i, :n[i]], cap[i]]) for i in range(len(x))], batch_first=True)
        lengths = [a + len(c) for a, c in zip(n, caps)]
        keep = torch.zeros(len(x), seq.shape[1], dtype=torch.bool)
        for i, length in enumerate(lengths):
            keep[i, :length] = True
        for qkv in self.qkv:
            q, k, v = (a.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2) for a in qkv(seq).chunk(3, -1))
            seq = seq + F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None]).transpose(1, 2).flatten(2)
        out = self.out(seq)
        outs = [out[i, :n[i]].view(xi.shape[1] // P, xi.shape[2] // P, P, P, C).permute(4, 0, 2, 1, 3)
                .reshape(xi.shape) for i, xi in enumerate(x)]
        return {"sample": outs} if self.as_dict else outs


def _model(as_dict=False, time_per_sample=False):
    torch.manual_seed(0)
    return ListDiT(as_dict, time_per_sample).eval()


def _inputs(seed, lengths=(3, 9), kind=list):
    g = torch.Generator().manual_seed(seed)
    return dict(x=kind(torch.randn(len(lengths), C, H, W, generator=g).unbind(0)),
                t=torch.full((len(lengths),), 700.0), caps=[torch.randn(n, TC, generator=g) for n in lengths])


def test_a_latent_list_runs_as_one_batch_and_comes_back_as_a_list():
    model = _model()
    ras = ras_compile(model, POLICY, backend=None, latent_arg="x")
    analysis = ras.ras_analysis(**_inputs(0))
    assert (analysis.num_tokens, analysis.batch_size) == (N, 2)
    assert len(analysis.attention) == 2  # both joint attentions run over cached K/V
    got = ras(**_inputs(0))
    with torch.no_grad():
        want = model(**_inputs(0))
    assert type(got) is list and len(got) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("time_per_sample", [False, True])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_sparse_step_after_dense_step_equals_the_model_with_captions_of_different_lengths(time_per_sample, data):
    model, ras = compiled_once((__name__, "list", time_per_sample), lambda: _model(time_per_sample=time_per_sample),
                               POLICY)
    lengths = (3, 9)  # one capture: the caption lengths are part of the signature
    assert_sparse_after_dense_equals_the_model(model, ras, _inputs(data.draw(st.integers(0, 3)), lengths),
                                               random_active_sets(data, N))


def test_outputs_in_a_dict_and_a_tuple_latent_keep_their_containers():
    model = _model(as_dict=True)
    ras = ras_compile(model, POLICY, backend=None, latent_arg="x")
    kw = _inputs(1, kind=tuple)
    ras.ras_controller.override_next_step("dense")
    ras(**kw)
    index = torch.tensor([[0, 5, 9], [1, 2, 15]])
    ras.ras_controller.override_next_step("sparse", index)
    got = ras(**kw)
    with torch.no_grad():
        want = model(**kw)
    assert type(got) is dict and type(got["sample"]) is list and len(got["sample"]) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_compiled_loop_at_ratio_one_equals_the_model():
    model = _model()
    ras = ras_compile(model, RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=()), backend="aot_eager",
                      latent_arg="x")
    kw = _inputs(2)
    for step in range(3):
        kw["t"] = torch.full((2,), 700.0 - 200 * step)
        with torch.no_grad():
            torch.testing.assert_close(ras(**kw), model(**kw), rtol=1e-5, atol=1e-5)
    assert [s.mode for s in ras.ras_controller.stats] == ["dense", "sparse", "sparse"]


def test_a_replaced_weight_is_seen_through_the_per_sample_wrapper_and_nothing_else_recaptures():
    model = _model()
    ras = ras_compile(model, RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=()), backend=None, latent_arg="x")
    kw = _inputs(2)
    for step, replace in enumerate([False, False, True, False]):
        if replace:
            model.out.weight = nn.Parameter(torch.randn_like(model.out.weight))
        kw["t"] = torch.full((2,), 700.0 - 100 * step)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.testing.assert_close(ras(**kw), model(**kw), rtol=1e-5, atol=1e-5)
        assert any("model's 'out.weight'" in str(w.message) for w in caught) == replace
    assert [s.mode for s in ras.ras_controller.stats] == ["dense", "sparse", "dense", "sparse"]


def test_samples_of_different_shapes_are_refused_with_what_to_do():
    model = _model()
    kw = _inputs(0)
    kw["x"] = [kw["x"][0], torch.randn(C, H, W + P)]
    with pytest.raises(UnsupportedModelError, match="different shapes.*call the model once per resolution"):
        ras_compile(model, POLICY, backend=None, latent_arg="x").ras_analysis(**kw)


def test_samples_of_different_shapes_fall_back_to_the_model():
    model = _model()
    kw = _inputs(0)
    kw["x"] = [kw["x"][0], torch.randn(C, H, W + P)]
    ras = ras_compile(model, RASPolicy(on_unsupported="fallback"), backend=None, latent_arg="x")
    with pytest.warns(UserWarning, match="different shapes.*Running the dense compiled model instead"):
        got = ras(**kw)
    with torch.no_grad():
        want = model(**kw)
    assert [g.shape for g in got] == [(C, H, W), (C, H, W + P)]
    torch.testing.assert_close(got, want)
    assert ras.ras_controller.stats[-1].mode == "fallback"


def test_stacking_and_unstacking_round_trip_nested_outputs():
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    a, b = torch.randn(2, 3), torch.randn(2, 3)
    samples = SampleList(list, 2)
    call, found = batch_sample_list({"x": [a, b], "t": 1}, "x")
    assert found == samples and torch.equal(call["x"], torch.stack([a, b])) and call["t"] == 1
    assert batch_sample_list({"x": a}, "x") == ({"x": a}, None)
    for structure, stacked in [((torch.stack([a, b]), a), (((0,), list),)),
                               (Transformer2DModelOutput(sample=torch.stack([a, b])), ((("sample",), tuple),)),
                               ({"out": [torch.stack([a, b])]}, ((("out", 0), list),))]:
        back = unstack_outputs(structure, stacked)
        assert type(back) is type(structure)
    back = unstack_outputs(Transformer2DModelOutput(sample=torch.stack([a, b])), ((("sample",), tuple),))
    assert type(back.sample) is tuple and torch.equal(back.sample[1], b) and torch.equal(back[0][0], a)
    nested = unstack_outputs({"out": [torch.stack([a, b])]}, ((("out", 0), list),))
    assert type(nested["out"][0]) is list and torch.equal(nested["out"][0][0], a)
    assert type(unstack_outputs(torch.stack([a, b]), (((), list),))) is list


@pytest.mark.parametrize("width,batch", [(16, 2), (14, 2), (14, 1)])
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_z_image_with_a_prompt_and_a_negative_prompt_of_other_lengths(width, batch, data):
    """Z-Image's pipeline passes one caption per sample, each as long as its prompt (guidance: prompt and
    negative prompt in one batch); its image tokens come first, so they keep their rows. At width 14 the
    image has 28 tokens, padded to 32 with copies of the last one that its pad token then replaces. A batch
    of one (Z-Image-Turbo runs without guidance) is a list of one."""
    from conformance_models import _z_image_build

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        caps = [torch.randn(7, 32, generator=g), torch.randn(40, 32, generator=g)]  # 32 and 64 rows
        return dict(x=list(torch.randn(batch, 4, 1, 8, width, generator=g).unbind(0)),
                    t=torch.full((batch,), 0.3), cap_feats=caps[:batch], return_dict=False)

    model, ras = compiled_once((__name__, "z_image", width, batch), lambda: _z_image_build(0, frame_positions=128),
                               POLICY)
    assert_sparse_after_dense_equals_the_model(model, ras, inputs(data.draw(st.integers(0, 3))),
                                               random_active_sets(data, 4 * width // 2, batch))
