"""Forms of a forward that newer DiTs use and the capture normalises before the token analysis.

A small DiT in plain PyTorch (``FormDiT``) written in one of :data:`FORMS`:

- ``einsum_patchify``: patches cut by ``torch.einsum("nchpwq->nhwcpq")`` and a linear (PRX),
  lowered to ``permute`` (passes/einsum_permute.py);
- ``qkv_select``: ``qkv[0], qkv[1], qkv[2]`` of a packed projection (``aten.select``);
- ``group_norm_in``: a GroupNorm over the latent before the patch embedding (DreamLite),
  which mixes positions but runs on the full latent;
- ``masked_update``: ``x[mask] *= 0.5`` with a per-token boolean mask (GLM-Image's dropped
  prior tokens), rewritten to ``where`` (passes/masked_update.py);
- ``flex``: attention through ``flex_attention`` with no mask (AnyFlow-FAR), rewritten to
  SDPA (passes/flex_attention.py);
- ``memo_attribute`` / ``memo_lru``: a position table memoised in Python on first call (a
  plain helper object's attribute, Bria-FIBO-2; ``functools.lru_cache`` on a method,
  NucleusMoE), which a capture must not leave holding fake tensors (fake_leaks.py);
- ``channel_cat``: conditioning channels concatenated to the latent before the patch
  embedding (MiniMax-Music-3, ACE-Step);
- ``conv_transpose_out``: the unpatchify as a transposed convolution (ACE-Step);
- ``movedim``: ``movedim`` / ``swapaxes`` instead of ``permute`` / ``transpose``, in the patch
  embedding and on the token axis (U-DiT-style code), which export keeps as their own ops;
- ``fp32_island``: the attention inside ``torch.autocast(enabled=False)`` (Helios computes its
  RoPE grid so), exported as one higher-order region node, which the capture inlines;
- ``unfold_patchify`` / ``tensor_unfold_patchify`` / ``pixel_unshuffle_patchify``: patches cut by
  ``F.unfold(x, P, stride=P)``, ``x.unfold(2, P, P).unfold(3, P, P)`` or ``nn.PixelUnshuffle(P)``
  and a linear (ViT ports), and ``fold_out``: the unpatchify as ``F.fold``; lowered to views
  and a permute (passes/patch_views.py).

Each keeps the properties every supported model keeps: the compiled dense step equals the
model, and a sparse step right after a dense step equals it for any active set.
"""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ras_compile import RASPolicy, UnsupportedModelError, ras_compile
from ras_compile.fake_leaks import forget_capture_memos, snapshot
from ras_compile.leaf_names import named_leaves
from ras_compile.passes.einsum_permute import lead_einsum_batch_axes, lower_einsum_permutes
from sparse_checks import assert_sparse_after_dense_equals_the_model

FORMS = ("einsum_patchify", "qkv_select", "group_norm_in", "masked_update", "flex", "memo_attribute", "memo_lru",
         "channel_cat", "conv_transpose_out", "fp32_island", "movedim", "unfold_patchify", "tensor_unfold_patchify",
         "pixel_unshuffle_patchify", "fold_out")
COND = 2  # conditioning channels of channel_cat
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())
C, P, D, HEADS = 4, 2, 16, 2


class _Table:
    """A plain (non-Module) helper that fills its table on first call, as RoPE helpers do."""

    def __init__(self):
        self.table = None

    def __call__(self, n: int, device) -> torch.Tensor:
        if self.table is None or self.table.shape[0] != n:
            self.table = torch.sin(torch.arange(n, device=device, dtype=torch.float32)[:, None]
                                   * torch.linspace(0.1, 1.0, D, device=device))
        return self.table


class FormDiT(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.norm_in = nn.GroupNorm(2, C)
        self.embed = nn.Conv2d(C + COND if form == "channel_cat" else C, D, P, stride=P)
        self.unembed = nn.ConvTranspose2d(D, C, P, stride=P)
        self.embed_linear = nn.Linear(C * P * P, D)
        self.time = nn.Sequential(nn.Linear(1, D), nn.SiLU(), nn.Linear(D, D))
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.proj = nn.Linear(D, P * P * C)
        self.positions = _Table()

    @functools.lru_cache(maxsize=8)
    def _lru_table(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.cos(torch.arange(n, device=device, dtype=torch.float32)[:, None]
                         * torch.linspace(0.2, 2.0, D, device=device))

    def patchify(self, latent, cond=None):
        b, c, h, w = latent.shape
        if self.form == "einsum_patchify":
            x = latent.reshape(b, c, h // P, P, w // P, P)
            x = torch.einsum("nchpwq->nhwcpq", x).reshape(b, (h // P) * (w // P), c * P * P)
            return self.embed_linear(x)
        if self.form == "unfold_patchify":  # [b, c * P * P, h/P * w/P]
            return self.embed_linear(F.unfold(latent, P, stride=P).transpose(1, 2))
        if self.form == "tensor_unfold_patchify":  # [b, c, h/P, w/P, P, P]
            x = latent.unfold(2, P, P).unfold(3, P, P).permute(0, 2, 3, 1, 4, 5)
            return self.embed_linear(x.reshape(b, (h // P) * (w // P), c * P * P))
        if self.form == "pixel_unshuffle_patchify":
            return self.embed_linear(F.pixel_unshuffle(latent, P).flatten(2).transpose(1, 2))
        if self.form == "group_norm_in":
            latent = self.norm_in(latent)
        if self.form == "channel_cat":
            latent = torch.cat([latent, cond], dim=1)
        if self.form == "movedim":
            return torch.movedim(self.embed(latent), 1, -1).reshape(b, -1, D)
        return self.embed(latent).flatten(2).transpose(1, 2)

    def attention(self, h):
        b, n, _ = h.shape
        qkv = self.qkv(h).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        if self.form == "qkv_select":
            q, k, v = qkv[0], qkv[1], qkv[2]
        elif self.form == "movedim":  # [b, n, 3, heads, d] -> q, k, v [b, heads, n, d]
            q, k, v = self.qkv(h).reshape(b, n, 3, HEADS, D // HEADS).movedim(2, 0).swapaxes(2, 3).unbind(0)
        else:
            q, k, v = qkv.unbind(0)
        if self.form == "flex":
            from torch.nn.attention.flex_attention import flex_attention
            a = flex_attention(q, k, v)
        elif self.form == "fp32_island":
            with torch.autocast(q.device.type, enabled=False):
                a = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        return self.out(a.transpose(1, 2).reshape(b, n, D))

    def forward(self, hidden_states, timestep, keep=None, cond=None):
        b, c, height, width = hidden_states.shape
        x = self.patchify(hidden_states, cond)
        n = x.shape[1]
        if self.form == "memo_attribute":
            x = x + self.positions(n, x.device)
        elif self.form == "memo_lru":
            x = x + self._lru_table(n, x.device)
        if self.form == "masked_update":
            x = x.clone()
            x[~keep] *= 0.5
        emb = self.time(timestep.reshape(-1, 1) / 1000.0)
        x = x + self.attention(self.norm1(x) + emb[:, None])
        x = x + self.mlp(self.norm2(x))
        if self.form == "conv_transpose_out":
            return self.unembed(x.transpose(1, 2).reshape(b, D, height // P, width // P))
        if self.form == "fold_out":
            return F.fold(self.proj(x).transpose(1, 2), (height, width), P, stride=P)
        x = self.proj(x).reshape(b, height // P, width // P, P, P, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, height, width)


def _inputs(form: str, batch: int = 2, height: int = 8, width: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(batch, C, height, width, generator=g), timestep=torch.full((batch,), 999.0))
    if form == "masked_update":
        kw["keep"] = torch.rand(batch, (height // P) * (width // P), generator=g) > 0.3
    if form == "channel_cat":
        kw["cond"] = torch.randn(batch, COND, height, width, generator=g)
    return kw


def _model(form: str) -> FormDiT:
    torch.manual_seed(0)
    return FormDiT(form).eval()


@pytest.mark.parametrize("form", FORMS)
def test_each_form_is_supported_with_cached_attention(form):
    model = _model(form)
    kw = _inputs(form)
    ras = ras_compile(model, POLICY, backend=None)
    analysis = ras.ras_analysis(**kw)
    assert analysis.num_tokens == 24
    assert analysis.counts["attention_cached_kv"] == 1
    with torch.no_grad():
        want = model(**kw)
    torch.testing.assert_close(ras(**kw), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(form=st.sampled_from(FORMS), seed=st.integers(0, 3), data=st.data())
def test_sparse_step_after_dense_equals_dense_for_any_active_set(form, seed, data):
    model = _model(form)
    kw = _inputs(form, seed=seed)
    ras = ras_compile(model, POLICY, backend=None)
    dense = ras(**kw)
    k = data.draw(st.integers(1, 24), label="k")
    rows = [sorted(data.draw(st.permutations(range(24)), label="perm")[:k]) for _ in range(2)]
    ras.ras_controller.override_next_step("sparse", torch.tensor(rows))
    torch.testing.assert_close(ras(**kw), dense, rtol=1e-5, atol=1e-5)


def test_a_masked_update_becomes_a_where_with_no_data_dependent_shape():
    ras = ras_compile(_model("masked_update"), POLICY, backend=None)
    graph = ras.ras_capture(**_inputs("masked_update")).sparse.graph
    targets = {getattr(n.target, "overloadpacket", None) for n in graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.where in targets
    assert torch.ops.aten.index_put_ not in targets and torch.ops.aten.index_put not in targets
    assert torch.ops.aten.index not in targets


@pytest.mark.parametrize("case", ["view_before", "functional", "other_dtype"])
def test_masked_updates_that_where_would_change_are_left_alone(case):
    """A view taken before the in-place write shares its memory (it must see the update) and values of
    another dtype are cast by index_put but promoted by where: neither is rewritten. The functional
    index_put is, and later readers of x still read x as it was. Either way the graph computes as
    before."""
    from ras_compile.passes.masked_update import rewrite_masked_updates

    class Update(nn.Module):
        def forward(self, x, m, v):
            x = x * 1.0
            if case == "view_before":
                alias = x.view(-1)
                x[m] *= 0.5
                return alias * 2.0
            if case == "functional":
                y = torch.index_put(x, (m,), x[m] * 0.5)
                return x + y
            x[m] = v
            return x

    args = torch.randn(2, 6, 3), torch.rand(2, 6) > 0.5, torch.tensor(2.0, dtype=torch.float64)
    gm = torch.export.export(Update(), args, strict=False).graph_module
    assert rewrite_masked_updates(gm) == (["index_put"] if case == "functional" else [])
    torch.testing.assert_close(gm(*args)[0], Update()(*args))


@pytest.mark.parametrize("token_shape", [(3,), (1, 3)])
def test_a_token_broadcast_over_the_masked_rows_becomes_a_where(token_shape):
    from ras_compile.passes.masked_update import rewrite_masked_updates

    class Fill(nn.Module):
        def forward(self, x, m, token):
            x = x * 1.0
            x[m] = token
            return x

    args = torch.randn(2, 6, 3), torch.rand(2, 6) > 0.5, torch.randn(*token_shape)
    gm = torch.export.export(Fill(), args, strict=False).graph_module
    assert len(rewrite_masked_updates(gm)) == 1
    torch.testing.assert_close(gm(*args)[0], Fill()(*args))


def test_flex_attention_with_a_mask_is_not_taken_for_plain_attention():
    """A real block mask changes what each query sees: the rewrite to SDPA must not apply."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    class Masked(FormDiT):
        def attention(self, h):
            b, n, _ = h.shape
            q, k, v = self.qkv(h).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
            mask = create_block_mask(lambda b_, h_, qi, ki: ki <= qi, None, None, n, n, device="cpu")
            return self.out(flex_attention(q, k, v, block_mask=mask).transpose(1, 2).reshape(b, n, D))

    torch.manual_seed(0)
    ras = ras_compile(Masked("flex").eval(), POLICY, backend=None)
    with pytest.raises(UnsupportedModelError) as info:
        ras(**_inputs("flex"))
    message = str(info.value)
    assert "flex_attention with a block mask or a score function" in message and "attn_mask" in message
    assert "<eval_with_key>" not in message and "test_capture_forms.py:" in message, message


def test_flex_attention_with_block_sparse_tables_is_not_taken_for_plain_attention():
    """A block mask whose mask_mod is the no-op but whose block tables skip blocks (how NABLA-style
    masks arrive) is no full attention on the kernels that read the tables: left alone."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from ras_compile.passes.flex_attention import recognise_flex_attention

    class BlockDiagonal(nn.Module):
        def forward(self, q):
            kv_indices = torch.tensor([[0, 1, 2], [1, 0, 2], [2, 0, 1]], dtype=torch.int32).view(1, 1, 3, 3)
            mask = BlockMask.from_kv_blocks(torch.ones(1, 1, 3, dtype=torch.int32), kv_indices, BLOCK_SIZE=8)
            return flex_attention(q, q, q, block_mask=mask)

    class Full(nn.Module):
        def forward(self, q):
            return flex_attention(q, q, q)

    q = torch.randn(2, 2, 24, 8)
    assert recognise_flex_attention(torch.export.export(BlockDiagonal(), (q,), strict=False).graph_module) == []
    assert len(recognise_flex_attention(torch.export.export(Full(), (q,), strict=False).graph_module)) == 1


def test_a_latent_concatenated_along_a_grid_axis_is_refused_not_taken_for_channels():
    """Rows appended to the latent's height are no channels: the grid is no longer the latent's."""

    class ExtraRows(FormDiT):
        def patchify(self, latent, cond=None):
            return super().patchify(torch.cat([latent, latent[:, :, :2]], dim=2))

        def forward(self, hidden_states, timestep, keep=None, cond=None):
            x = self.patchify(hidden_states)
            x = x + self.attention(self.norm1(x))
            return self.proj(x)

    ras = ras_compile(ExtraRows("qkv_select").eval(), POLICY, backend=None)
    with pytest.raises(UnsupportedModelError, match="no token sequence found"):
        ras(**_inputs("qkv_select"))


def test_a_python_value_that_changes_between_calls_is_named_when_it_forces_a_new_capture():
    class Scaled(FormDiT):
        def forward(self, hidden_states, timestep, keep=None, cond=None, scale: float = 1.0):
            return super().forward(hidden_states, timestep) * scale

    ras = ras_compile(Scaled("qkv_select").eval(), POLICY, backend=None)
    kw = _inputs("qkv_select")
    step = lambda t: dict(kw, timestep=torch.full((2,), t))  # noqa: E731
    ras(**step(999.0), scale=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ras(**dict(step(900.0), hidden_states=torch.randn(2, C, 12, 12)), scale=1.0)  # a new resolution: silent
    with pytest.warns(UserWarning, match=r"argument \['scale'\] changed from 1.0 to 0.5"):
        ras(**step(800.0), scale=0.5)


def test_a_timestep_passed_as_a_python_number_is_warned_at_the_first_capture():
    """A float timestep is a constant of the captured graph: every step would capture again, dense."""

    class FloatTime(FormDiT):
        def forward(self, hidden_states, timestep: float):
            return super().forward(hidden_states, torch.full((hidden_states.shape[0],), timestep))

    ras = ras_compile(FloatTime("qkv_select").eval(), POLICY, backend=None)
    x = _inputs("qkv_select")["hidden_states"]
    with pytest.warns(UserWarning, match=r"the timestep argument 'timestep' is a Python number \(999.0\)"):
        ras(x, 999.0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ras(x, 900.0)  # the next step: a new capture, and the warning is not repeated
    assert not [w for w in seen if "Python number" in str(w.message)]
    timed = ras_compile(FormDiT("qkv_select").eval(), POLICY, backend=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        timed(**_inputs("qkv_select"))  # a tensor timestep: no warning


def test_a_dict_argument_that_gains_entries_is_named_when_it_forces_a_new_capture():
    """A dict argument that gains keys between calls (AnyFlow-FAR's forward adds two to its
    kv_cache_flag when it runs eagerly, so a loop reusing one dict changes it after the first call)."""

    class Flags(FormDiT):
        def forward(self, hidden_states, timestep, keep=None, cond=None, flags=None):
            return super().forward(hidden_states, timestep)

    ras = ras_compile(Flags("qkv_select").eval(), POLICY, backend=None)
    kw = _inputs("qkv_select")
    ras(**kw, flags={"mode": 0})
    with pytest.warns(UserWarning, match=r"the structure of argument 'flags' changed \(now a dict of 2\)"):
        ras(**dict(kw, timestep=torch.full((2,), 900.0)), flags={"mode": 0, "cached_tokens": 4})


@pytest.mark.parametrize("op", ["im2col", "col2im", "pixel_unshuffle", "pixel_shuffle", "unfold", "unfold_last"])
def test_non_overlapping_patch_operators_lower_to_views_with_the_same_values(op):
    from ras_compile.passes.patch_views import lower_patch_views

    fns = {"im2col": lambda x: F.unfold(x, (2, 3), stride=(2, 3)),
           "col2im": lambda x: F.fold(x.reshape(2, 3 * 2 * 3, -1)[:, :, :16], (8, 12), (2, 3), stride=(2, 3)),
           "pixel_unshuffle": lambda x: F.pixel_unshuffle(x, 2),
           "pixel_shuffle": lambda x: F.pixel_shuffle(x.reshape(2, 12, 4, 6), 2),
           "unfold": lambda x: x.unfold(2, 4, 4),
           "unfold_last": lambda x: x.unfold(-1, 3, 3)}

    class One(nn.Module):
        def forward(self, x):
            return fns[op](x) * 1.0

    x = torch.randn(2, 3, 8, 12)
    program = torch.export.export(One(), (x,), strict=False)
    graph_module = program.graph_module
    assert lower_patch_views(graph_module), "nothing was lowered"
    targets = {n.target for n in graph_module.graph.nodes if n.op == "call_function"}
    assert not targets & {torch.ops.aten.im2col.default, torch.ops.aten.col2im.default,
                          torch.ops.aten.pixel_unshuffle.default, torch.ops.aten.pixel_shuffle.default,
                          torch.ops.aten.unfold.default}
    assert torch.equal(graph_module(x)[0], fns[op](x))


@pytest.mark.parametrize("fn", [lambda x: F.unfold(x, 3, stride=2), lambda x: F.unfold(x, 2, stride=2, padding=1),
                                lambda x: x.unfold(2, 3, 2), lambda x: x.unfold(3, 5, 5)],
                         ids=["overlapping", "padded", "overlapping_tensor_unfold", "remainder_dropped"])
def test_overlapping_or_padded_patch_operators_stay(fn):
    from ras_compile.passes.patch_views import lower_patch_views

    class One(nn.Module):
        def forward(self, x):
            return fn(x) * 1.0

    program = torch.export.export(One(), (torch.randn(2, 3, 8, 12),), strict=False)
    assert lower_patch_views(program.graph_module) == []


def test_a_torch_jit_script_submodule_is_captured_and_reads_its_live_weights():
    """A ``torch.jit.script``-ed submodule (a RecursiveScriptModule) is traced through its compiled
    method; its parameters are graph inputs like any other, so an update after capture is seen."""
    model = _model("qkv_select")
    model.mlp = torch.jit.script(model.mlp)
    kw = _inputs("qkv_select")
    ras = ras_compile(model, POLICY, backend=None)
    with torch.no_grad():
        torch.testing.assert_close(ras(**kw), model(**kw), rtol=1e-5, atol=1e-5)
        assert ras.ras_analysis(**kw).counts["attention_cached_kv"] == 1
        model.mlp[0].weight.mul_(1.5)  # after capture
        dense = model(**kw)
        ras.ras_controller.reset()
        torch.testing.assert_close(ras(**kw), dense, rtol=1e-5, atol=1e-5)
        ras.ras_controller.override_next_step("sparse", torch.tensor([[0, 5, 9], [2, 3, 23]]))
        torch.testing.assert_close(ras(**kw), dense, rtol=1e-5, atol=1e-5)
    assert type(torch.jit.RecursiveScriptModule.__call__) is type(nn.Module.__call__)  # restored
    assert "__call__" not in torch.jit.RecursiveScriptModule.__dict__


def test_einsums_that_are_no_permutation_stay():
    class Products(nn.Module):
        def forward(self, a, b):
            return torch.einsum("ij,jk->ik", a, b) + torch.einsum("ii->i", a)[:, None] + torch.einsum("ij->i", a)[:, None]

    gm = torch.export.export(Products(), (torch.randn(3, 3), torch.randn(3, 3)), strict=False).graph_module
    assert lower_einsum_permutes(gm) == []


@pytest.mark.parametrize("equation, rewritten", [
    ("bnhd,bmhd->bhnm", True),   # heads after the tokens: permuted to "bhnd,bhmd->bhnm"
    ("bhnm,bmhd->bnhd", True),   # and its value product, the output permuted back
    ("nhd,mhd->hnm", True),
    ("bhnd,bhmd->bhnm", False),  # already batch-first
    ("bnd,de->bne", False),      # a weight: b and n are no batch axes of both operands
    ("bhnd,bhmd->bhn", False),   # a sum over m as well: no matrix product over batches
])
def test_two_operand_einsums_get_their_batch_axes_first_with_the_same_values(equation, rewritten):
    sizes = {"b": 2, "h": 3, "n": 4, "m": 5, "d": 6, "e": 7}
    ins = equation.split("->")[0].split(",")
    operands = [torch.randn(*(sizes[c] for c in term)) for term in ins]

    class Product(nn.Module):
        def forward(self, a, b):
            return torch.einsum(equation, a, b)

    gm = torch.export.export(Product(), tuple(operands), strict=False).graph_module
    assert bool(lead_einsum_batch_axes(gm)) == rewritten
    torch.testing.assert_close(gm(*operands)[0], torch.einsum(equation, *operands), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["memo_attribute", "memo_lru"])
def test_a_capture_leaves_no_fake_tensor_in_python_memos(form):
    """After compiling, the eager model still runs and equals the compiled one, and a second
    resolution captures again (a fake tensor left in a memo broke both)."""
    model = _model(form)
    ras = ras_compile(model, POLICY, backend=None)
    small, large = _inputs(form), _inputs(form, height=12, width=12, seed=1)
    got_small = ras(**small)
    with torch.no_grad():
        torch.testing.assert_close(model(**small), got_small, rtol=1e-5, atol=1e-5)
    got_large = ras(**large)
    with torch.no_grad():
        torch.testing.assert_close(model(**large), got_large, rtol=1e-5, atol=1e-5)
    from torch._subclasses.fake_tensor import FakeTensor
    assert not isinstance(model.positions.table, FakeTensor)


def test_forget_capture_memos_resets_exactly_what_the_capture_faked():
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = _model("memo_attribute")
    model.positions(4, "cpu")
    real = model.positions.table
    before = snapshot(model)
    with FakeTensorMode():
        model.positions.table = torch.empty(5, D)   # what a traced first call leaves
        model.positions.added = torch.empty(2)      # an attribute the trace created
    model.positions.untouched = torch.ones(1)       # a real tensor set meanwhile stays
    reset = forget_capture_memos(before)
    assert model.positions.table is real and not hasattr(model.positions, "added")
    assert torch.equal(model.positions.untouched, torch.ones(1))
    assert sorted(reset) == ["_Table.added", "_Table.table"]


def test_an_export_refusal_names_the_line_of_the_model_that_read_a_value():
    class Branchy(FormDiT):
        def forward(self, hidden_states, timestep, keep=None):
            if hidden_states.sum() > 0:  # a branch on a tensor value
                hidden_states = hidden_states * 2
            return super().forward(hidden_states, timestep)

    ras = ras_compile(Branchy("qkv_select").eval(), POLICY, backend=None)
    with pytest.raises(UnsupportedModelError) as info:
        ras(**_inputs("qkv_select"))
    message = str(info.value)
    assert "test_capture_forms.py:" in message and "if hidden_states.sum() > 0:" in message, message


def test_an_argument_export_cannot_take_is_refused_by_name():
    class Cache:  # a model's own K/V-cache object (GLM-Image passes one on every call)
        mode = None

    class WithCache(FormDiT):
        def forward(self, hidden_states, timestep, keep=None, cond=None, kv_cache=None):
            return super().forward(hidden_states, timestep)

    ras = ras_compile(WithCache("qkv_select").eval(), POLICY, backend=None)
    with pytest.raises(UnsupportedModelError, match=r"argument \['kv_cache'\] is a Cache object"):
        ras(**_inputs("qkv_select"), kv_cache=Cache())


class _Scale:  # an argument class of the user's, registered as a pytree node
    def __init__(self, value):
        self.value = value


class _KeyedScale(_Scale):
    pass


torch.utils._pytree.register_pytree_node(_Scale, lambda s: ([s.value], None), lambda c, _: _Scale(c[0]))
torch.utils._pytree.register_pytree_node(
    _KeyedScale, lambda s: ([s.value], None), lambda c, _: _KeyedScale(c[0]),
    flatten_with_keys_fn=lambda s: ([(torch.utils._pytree.GetAttrKey("value"), s.value)], None))


class _Scaled(FormDiT):
    def forward(self, hidden_states, timestep, keep=None, scale=None):
        return super().forward(hidden_states, timestep) * scale.value


def test_a_pytree_argument_without_key_paths_is_refused_by_name_and_with_key_paths_runs():
    ras = ras_compile(_Scaled("qkv_select").eval(), POLICY, backend=None)
    with pytest.raises(UnsupportedModelError, match=r"argument \['scale'\] holds a _Scale object.*flatten_with_keys_fn"):
        ras(**_inputs("qkv_select"), scale=_Scale(torch.tensor(2.0)))
    torch.manual_seed(0)
    model = _Scaled("qkv_select").eval()
    ras = ras_compile(model, POLICY, backend=None)
    kw = dict(_inputs("qkv_select"), scale=_KeyedScale(torch.tensor(2.0)))
    assert_sparse_after_dense_equals_the_model(model, ras, kw, torch.tensor([[0, 3, 5], [1, 2, 20]]))


def test_leaves_under_a_node_without_key_paths_are_named_by_their_place():
    call = {"a": [torch.ones(1), _Scale(torch.zeros(1))], "b": 3}
    assert [name for name, _ in named_leaves(call)] == ["['a'][0]", "['a'][1].<_Scale 0>", "['b']"]
    assert [name for name, _ in named_leaves({"a": _KeyedScale(1)})] == ["['a'].value"]


def test_a_timestep_with_a_pinned_entry_counts_steps_by_its_mean():
    """A per-frame timestep whose first entry is a clean frame (0) at every step: steps are told
    apart by the moving entries, not mistaken for repeated calls of one step."""

    class FrameTimesteps(FormDiT):
        def forward(self, hidden_states, timestep, keep=None):
            return super().forward(hidden_states, timestep[:, -1])

    ras = ras_compile(FrameTimesteps("qkv_select").eval(), RASPolicy(sample_ratio=0.5, warmup_steps=2, reset_steps=()),
                      backend=None)
    kw = _inputs("qkv_select")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "called twice in a row" warning fails the test
        for t in (999.0, 800.0, 600.0, 400.0):
            ras(**dict(kw, timestep=torch.tensor([[0.0, t], [0.0, t]])))
    assert [s.mode for s in ras.ras_controller.stats] == ["dense", "dense", "sparse", "sparse"]
    assert [s.timestep for s in ras.ras_controller.stats] == [499.5, 400.0, 300.0, 200.0]
