"""A model's own state and mode, and calls the module cannot serve (found by probes).

* Per-token features copied into a module buffer in the forward (a feature hook, a
  DeepCache-style store) would keep only what a sparse step computed: refused, naming the
  buffer. Per-channel state (a step counter, a running mean) is left as it is.
* A model left in ``train()`` mode runs its dropout at random: warned once.
* ``F.pad`` by nothing before the patch embedding (``F.pad(x, (0, (-W) % p, 0, (-H) % p))`` on a
  latent the patch divides) is followed.
* A ``forward(x, t, **kwargs)`` called without the default latent name is told which
  arguments the call has.
* Parameters, buffers or submodules replaced after the capture (LoRA adapters wrapping a linear, a
  parameter assigned) are seen: the module captures again, with a warning; changes in place
  (``load_state_dict``) need no new capture; ``ras_reset_captures()`` forgets every graph.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ras_compile import RASCallError, RASPolicy, UnsupportedModelError, ras_compile
from sparse_checks import assert_sparse_after_dense_equals_the_model

C, D, HEADS, H, W, P = 4, 16, 2, 8, 12, 2
N = (H // P) * (W // P)
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())


class StateDiT(nn.Module):
    def __init__(self, form: str = "plain", dropout: float = 0.0):
        super().__init__()
        self.form = form
        self.embed, self.qkv = nn.Conv2d(C, D, P, stride=P), nn.Linear(D, 3 * D)
        self.drop, self.out = nn.Dropout(dropout), nn.Linear(D, P * P * C)
        self.register_buffer("last_feat", torch.zeros(2, N, D))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, latent, timestep):
        b = latent.shape[0]
        if self.form == "pad":
            latent = F.pad(latent, (0, (-latent.shape[-1]) % P, 0, (-latent.shape[-2]) % P))
        x = self.embed(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
        q, k, v = (t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        x = x + self.drop(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        if self.form == "feature_store":
            self.last_feat.copy_(x)  # the tokens kept for the next call
        if self.form == "counter":
            self.calls += 1
        x = self.out(x).view(b, H // P, W // P, P, P, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, C, H, W)


class KwargsDiT(StateDiT):
    def forward(self, x, t, **kwargs):
        return super().forward(x, t)


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(latent=torch.randn(2, C, H, W, generator=g), timestep=torch.tensor([500.0, 300.0]))


def _model(**kw) -> StateDiT:
    torch.manual_seed(0)
    return StateDiT(**kw).eval()


def test_per_token_features_written_into_a_buffer_are_refused_naming_it():
    ras = ras_compile(_model(form="feature_store"), POLICY, backend=None)
    with pytest.raises(UnsupportedModelError) as info:
        ras(**_inputs())
    assert "into the model's state ('b_last_feat', a buffer)" in str(info.value)
    assert info.value.op == "aten.copy_.default"


def test_a_step_counter_buffer_counts_every_call():
    model, eager = _model(form="counter"), _model(form="counter")
    ras = ras_compile(model, POLICY, backend=None)
    with torch.no_grad():
        for _ in range(3):
            ras(**_inputs())
            eager(**_inputs())
    assert model.calls.item() == eager.calls.item() == 3


def test_a_model_in_train_mode_is_warned_once():
    torch.manual_seed(0)
    model = StateDiT(dropout=0.1)  # never .eval()
    ras = ras_compile(model, POLICY, backend=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ras(**_inputs())
        ras(**_inputs(1))
    messages = [str(w.message) for w in caught if "training mode" in str(w.message)]
    assert len(messages) == 1 and "model.eval()" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # eval mode: no such warning
        ras_compile(_model(dropout=0.1), POLICY, backend=None)(**_inputs())


def test_a_pad_by_nothing_before_the_patch_embedding_is_followed():
    model = _model(form="pad")
    ras = ras_compile(model, POLICY, backend=None)
    assert ras.ras_analysis(**_inputs()).num_tokens == N
    assert_sparse_after_dense_equals_the_model(model, ras, _inputs(), torch.tensor([[0, 5, 9], [2, 3, 23]]))


def test_a_call_without_the_default_latent_name_says_which_arguments_it_has():
    torch.manual_seed(0)
    ras = ras_compile(KwargsDiT().eval(), POLICY, backend=None)
    with pytest.raises(RASCallError, match=r"the call has no argument 'hidden_states', the latent argument "
                                           r"\(it has x, t\); pass latent_arg="):
        ras(x=torch.randn(2, C, H, W), t=torch.tensor([500.0, 300.0]))
    ok = ras_compile(KwargsDiT().eval(), POLICY, backend=None, latent_arg="x", timestep_arg="t")
    assert ok(x=torch.randn(2, C, H, W), t=torch.tensor([500.0, 300.0])).shape == (2, C, H, W)


class LowRank(nn.Module):
    """A LoRA-style wrapper: the linear it replaces plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.down, self.up = nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


FULL = RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=())  # sparse steps on every token: equal


def _loop_calls(ras, model, steps: int):
    """``steps`` calls at falling timesteps; each must return what the model returns now."""
    for step in range(steps):
        kw = dict(_inputs(step), timestep=torch.tensor([500.0, 300.0]) * (1 - step / 10))
        with torch.no_grad():
            torch.testing.assert_close(ras(**kw), model(**kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", ["parameter", "submodule", "buffer"])
def test_objects_replaced_after_the_capture_are_seen_by_a_new_capture(change):
    model = _model(form="counter" if change == "buffer" else "plain")  # the graph reads the buffer it replaces
    ras = ras_compile(model, FULL, backend=None)
    _loop_calls(ras, model, 2)
    torch.manual_seed(1)
    if change == "parameter":
        model.out.weight = nn.Parameter(torch.randn_like(model.out.weight))
    elif change == "submodule":
        model.qkv = LowRank(model.qkv)
    else:
        model.calls = torch.zeros(())  # a registered buffer, assigned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loop_calls(ras, model, 2)
    assert sum("replaced since its graphs were captured" in str(w.message) for w in caught) == 1
    assert [s.mode for s in ras.ras_controller.stats][-2:] == ["dense", "sparse"]  # new graphs: dense first


def test_weights_loaded_in_place_need_no_new_capture():
    model = _model()
    ras = ras_compile(model, FULL, backend=None)
    _loop_calls(ras, model, 2)
    torch.manual_seed(2)
    model.load_state_dict(StateDiT().state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no recapture warning
        _loop_calls(ras, model, 1)
    assert len(ras._captures) == 1


def test_reset_captures_forgets_every_graph():
    model = _model()
    ras = ras_compile(model, FULL, backend=None)
    _loop_calls(ras, model, 2)
    ras.ras_reset_captures()
    assert not ras._captures
    _loop_calls(ras, model, 1)  # captured again; its first step dense, so it equals the model
    assert len(ras._captures) == 1 and ras.ras_controller.stats[-1].mode == "dense"


def test_a_buffer_the_forward_assigns_itself_needs_no_new_capture():
    """OmniGen's RoPE assigns ``self.inv_freq = ...`` on every call: the graph computes it and reads
    no buffer it replaces, so calls of the model itself in between change nothing."""

    class Assigns(StateDiT):
        def __init__(self):
            super().__init__()
            self.register_buffer("inv_freq", torch.ones(D), persistent=False)

        def forward(self, latent, timestep):
            self.inv_freq = 1.0 / (10000 ** (torch.arange(0, 2 * D, 2).float() / (2 * D)))  # as OmniGen does
            return super().forward(latent, timestep) * self.inv_freq[:C, None, None].mean()

    torch.manual_seed(0)
    model = Assigns().eval()
    ras = ras_compile(model, FULL, backend=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _loop_calls(ras, model, 3)  # the model itself runs between the calls
    assert [s.mode for s in ras.ras_controller.stats] == ["dense", "sparse", "sparse"]
