"""Host reads of integer / boolean inputs, specialised at capture (ras_compile/host_reads.py).

``CaptionDiT`` reads its caption mask on the host, as Lumina-Image-2.0 does: the caption lengths
(``mask.sum(1).tolist()``) decide how many caption tokens join the image tokens, and a Python
branch on ``mask.all()``. torch.export cannot trace that with fake values; captured for the
mask's values, the graph holds for every call with the same mask, and a new mask is a new
capture. A read of anything else (a value computed from the latent or a weight) is refused,
naming the read.
"""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ras_compile import RASPolicy, UnsupportedModelError, ras_compile
from ras_compile.capture import export_model
from sparse_checks import assert_sparse_after_dense_equals_the_model, compiled_once, random_active_sets

C, D, HEADS, H, W, P, T = 4, 16, 2, 8, 12, 2, 6
N = (H // P) * (W // P)
POLICY = RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=())
HERE = __file__.rsplit("/", 1)[-1]


class CaptionDiT(nn.Module):
    def __init__(self, read: str = "mask"):
        super().__init__()
        self.read = read
        self.embed, self.text = nn.Conv2d(C, D, P, stride=P), nn.Linear(8, D)
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(2))
        self.out = nn.Linear(D, P * P * C)
        self.register_buffer("ids", torch.arange(T))

    def forward(self, latent, timestep, caption, mask):
        x = self.embed(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
        if self.read == "latent" and (latent.abs().amax() > 100).item():  # reads the latent: refused
            x = x * 2
        if self.read == "buffer":
            x = x[:, : self.ids.max().item() + N - T + 1]  # reads a buffer of the model: refused
        lengths = mask.sum(1).tolist()  # the caption lengths, on the host
        text = self.text(caption[:, : max(lengths)])
        if not mask.all():  # a branch on the mask
            text = text * mask[:, : max(lengths), None]
        return self.attend_and_unpatchify(text, x)

    def attend_and_unpatchify(self, text, x):
        """The joint attention blocks over ``[text, x]``, then the image tokens back to the latent."""
        n_text, b = text.shape[1], x.shape[0]
        for qkv in self.qkv:
            seq = torch.cat([text, x], 1)
            q, k, v = (t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2) for t in qkv(seq).chunk(3, -1))
            seq = seq + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            text, x = seq[:, :n_text], seq[:, n_text:]
        x = self.out(x).view(b, H // P, W // P, P, P, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, C, H, W)


def _model(read: str = "mask") -> CaptionDiT:
    torch.manual_seed(0)
    return CaptionDiT(read).eval()


def _inputs(seed: int = 0, length: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[:, :length] = True
    return dict(latent=torch.randn(2, C, H, W, generator=g), timestep=torch.tensor([500.0, 300.0]),
                caption=torch.randn(2, T, 8, generator=g), mask=mask)


def test_the_capture_is_specialised_on_the_mask_it_read():
    program = export_model(_model(), _inputs())
    assert program.ras_value_inputs == ["['mask']"]
    reads = [n for n in program.graph.nodes if n.target in (torch.ops.aten._local_scalar_dense.default,
                                                            torch.ops.aten.item.default)]
    assert reads == []  # the lengths are constants of the graph
    plain = export_model(_model(), {**_inputs(), "mask": torch.ones(2, T, dtype=torch.bool)})
    assert plain.ras_value_inputs == ["['mask']"]  # the all-ones mask is read too (the branch)


class ShapeReadDiT(CaptionDiT):
    """Wan's official code: the grid sizes as a tensor made from the shape, read back on the host."""

    def forward(self, latent, timestep, caption, mask):
        grid = torch.tensor(latent.shape[2:]) // P
        h, w = grid.tolist()  # a value made from Python numbers alone: the same on every call of this shape
        x = self.embed(latent).flatten(2).transpose(1, 2)[:, : h * w] * (1 + timestep[:, None, None] / 1000)
        q, k, v = (t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2) for t in self.qkv[0](x).chunk(3, -1))
        x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.out(x).view(-1, h, w, P, P, C).permute(0, 5, 1, 3, 2, 4).reshape(latent.shape)


def test_a_read_of_a_value_made_from_shapes_is_answered_without_value_inputs():
    model = ShapeReadDiT().eval()
    kw = {k: v for k, v in _inputs().items()}
    kw["mask"] = torch.ones(2, T)  # a float mask: no integer or boolean input to specialise on
    program = export_model(model, kw)
    assert program.ras_value_inputs == []
    ras = ras_compile(model, RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=()), backend=None)
    with torch.no_grad():
        torch.testing.assert_close(ras(**kw), model(**kw), rtol=1e-5, atol=1e-5)




class SizedUnpatchifyDiT(CaptionDiT):
    """HiDream's unpatchify: the patch counts kept in a tensor, each sample's rows cut and reshaped by
    them (``x[i, : h * w].reshape(1, h, w, -1)``, sizes read inside the operators)."""

    def forward(self, latent, timestep, caption, mask):
        b = latent.shape[0]
        sizes = torch.tensor([H // P, W // P]).unsqueeze(0).repeat(b, 1)
        x = self.embed(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
        q, k, v = (t.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2) for t in self.qkv[0](x).chunk(3, -1))
        x = self.out(x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        out = []
        for i, (h, w) in enumerate(sizes):
            t = x[i, : h * w].reshape(1, h, w, -1).reshape(1, h, w, P, P, C)
            out.append(t.permute(0, 5, 1, 3, 2, 4).reshape(1, C, h * P, w * P))
        return torch.cat(out)


def test_sizes_held_in_a_tensor_and_read_by_operators_are_numbers():
    torch.manual_seed(0)
    model = SizedUnpatchifyDiT().eval()
    program = export_model(model, _inputs(), changing=("latent", "timestep"))
    assert not any(n.target in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)
                   for n in program.graph.nodes)  # no size is read at run time
    ras = ras_compile(model, POLICY, backend=None)
    assert_sparse_after_dense_equals_the_model(model, ras, _inputs(), torch.tensor([[0, 4, 7], [1, 2, 23]]))


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_sparse_step_after_dense_step_equals_the_model(data):
    model, ras = compiled_once(__name__, _model, POLICY)
    length = data.draw(st.sampled_from([2, 4, T]))
    assert_sparse_after_dense_equals_the_model(model, ras, _inputs(data.draw(st.integers(0, 3)), length),
                                               random_active_sets(data, N))


def test_each_mask_is_captured_once_and_kept():
    model = _model()
    ras = ras_compile(model, RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=()), backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, length in enumerate([4, 4, 2, 4, 2]):
            kw = _inputs(step, length)
            with torch.no_grad():
                torch.testing.assert_close(ras(**kw), model(**kw), rtol=1e-5, atol=1e-5)
    assert len(ras._captures) == 2  # one graph per mask, reused when the mask comes back
    messages = [str(w.message) for w in caught if "captures the model again" in str(w.message)]
    assert len(messages) == 1 and "the values of ['mask'] changed" in messages[0]


def _line(marker: str) -> int:
    lines, start = inspect.getsourcelines(CaptionDiT.forward)
    return start + next(i for i, line in enumerate(lines) if marker in line)


@pytest.mark.parametrize("read,what,marker", [("latent", "floating-point tensor", "# reads the latent"),
                                              ("buffer", "integer buffer", "# reads a buffer")])
def test_a_read_of_anything_else_is_refused_naming_it(read, what, marker):
    ras = ras_compile(_model(read), POLICY, backend=None)
    with pytest.raises(UnsupportedModelError) as info:
        ras(**_inputs())
    message = str(info.value)
    assert "reads a tensor value on the host" in message and what in message
    assert f"{HERE}:{_line(marker)}" in message


def test_explain_says_which_inputs_the_capture_holds():
    from ras_compile import explain

    ex = explain(_model(), _inputs(), POLICY, verbose=False)
    assert ex.value_inputs == ["['mask']"]
    assert "captured for the values of ['mask'] (the forward reads them on the host)" in str(ex)


# --------------------------------------------------------------------------- conditioning read on the host


class ConditionedDiT(CaptionDiT):
    """HunyuanVideo-1.5's forms: a branch on a floating-point conditioning input (``if
    torch.all(image_embeds == 0):``, text-to-video when no image is given), and each sample's valid
    caption rows taken by a boolean mask index (``caption[i][mask[i]]``), the rest padded after them."""

    def forward(self, latent, timestep, caption, mask, image_embeds):
        x = self.embed(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
        text = self.text(caption)
        if torch.all(image_embeds == 0):
            text = text * 0.5
        text = torch.stack([torch.cat([t[m], torch.zeros_like(t[~m])]) for t, m in zip(text, mask)])
        return self.attend_and_unpatchify(text, x)


def _conditioned_inputs(seed: int = 0, image: bool = False) -> dict:
    kw = _inputs(seed)
    kw["mask"] = torch.tensor([[True, False, True, True, False, True], [False, True, True, False, False, False]])
    kw["image_embeds"] = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(7)) if image \
        else torch.zeros(2, 3, 8)  # the same conditioning at every step of a loop
    return kw


@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_a_branch_on_a_conditioning_input_and_mask_indexing_run_sparse(data):
    torch.manual_seed(0)
    model, ras = compiled_once((__name__, "conditioned"), lambda: ConditionedDiT().eval(), POLICY)
    assert_sparse_after_dense_equals_the_model(model, ras, _conditioned_inputs(data.draw(st.integers(0, 3))),
                                               random_active_sets(data, N))


def test_the_conditioning_value_is_part_of_the_capture_and_the_latent_is_not():
    torch.manual_seed(0)
    model = ConditionedDiT().eval()
    ras = ras_compile(model, RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=()), backend=None)
    with torch.no_grad():
        for image in (False, True, False):  # text-to-video, then image-to-video: each its own capture
            for step in range(2):
                kw = _conditioned_inputs(step, image=image)
                kw["timestep"] = kw["timestep"] * (1 - step / 3)
                torch.testing.assert_close(ras(**kw), model(**kw), rtol=1e-5, atol=1e-5)
    assert len(ras._captures) == 2  # the latent and the timestep changed every call without a new capture
    names = {n for c in ras._captures.values() for n in c.program.ras_value_inputs}
    assert "['image_embeds']" in names and not any(n.startswith(("['latent']", "['timestep']")) for n in names)


def test_the_same_conditioning_tensor_is_copied_to_the_host_once_and_a_write_to_it_is_seen(monkeypatch):
    """A pipeline passes the same embeddings object at every step: its value is read for the signature
    once, not per call (on a GPU, one synchronisation per call); written in place, it is read again and
    captured for its new value."""
    torch.manual_seed(0)
    model = ConditionedDiT().eval()
    ras = ras_compile(model, RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=()), backend=None)
    kw = _conditioned_inputs(0, image=True)
    embeds = kw["image_embeds"]
    copies = []
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: (copies.append(t is embeds), cpu(t, *a, **k))[1])
    with torch.no_grad():
        for step in range(3):
            kw["timestep"] = torch.tensor([500.0, 300.0]) * (1 - step / 4)
            torch.testing.assert_close(ras(**kw), model(**kw), rtol=1e-5, atol=1e-5)
            if step == 0:
                copies.clear()  # the capture itself reads it, and the key after it
        assert sum(copies) == 0 and len(ras._captures) == 1
        embeds.zero_()  # the same object, now text-to-video: the model takes its other branch
        torch.testing.assert_close(ras(**kw), model(**kw), rtol=1e-5, atol=1e-5)
    assert sum(copies) >= 1 and len(ras._captures) == 2


def test_a_slice_bound_held_in_a_tensor_is_its_value():
    """``caption[:, : mask.sum(1).max()]``: the bound is a 0-d tensor that Python's slice protocol reads
    with ``__index__``; read from the mask's values it is a number of this capture."""
    class Bounded(CaptionDiT):
        def forward(self, latent, timestep, caption, mask):
            x = self.embed(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
            text = self.text(caption[:, : mask.sum(1).max()])
            return self.attend_and_unpatchify(text, x)

    torch.manual_seed(0)
    model = Bounded().eval()
    program = export_model(model, _inputs(length=3))
    assert program.ras_value_inputs == ["['mask']"]
    ras = ras_compile(model, POLICY, backend=None)
    assert_sparse_after_dense_equals_the_model(model, ras, _inputs(length=3), torch.tensor([[0, 4, 7], [1, 2, 23]]))


# --------------------------------------------------------------------------- sizes and writes by mask values


class _Widened(nn.Module):
    """Qwen-Image 2.1's forms on their own: rows widened by tensor repeats read from a mask, the
    one-argument ``repeat_interleave`` (segment ids), and writes by a boolean mask, one contiguous
    run (a slice) or scattered (constant positions)."""

    def forward(self, x, mask):
        repeats = torch.where(mask, 3, 1)
        wide = x.repeat_interleave(repeats, dim=1)           # [B, sum(repeats), C], x any traced value
        ids = torch.repeat_interleave(repeats)               # the row each widened row came from
        flat = x[:, :1].repeat_interleave(repeats[1:3])      # dim None: over the flattened tensor
        run = torch.repeat_interleave(mask, repeats)         # True on one contiguous run
        wide[:, run] = x[:, 1:3].repeat_interleave(3, dim=1) * 2  # rows of a known count: export must
        spread = wide.new_zeros(wide.shape[1], dtype=torch.bool)    # know the mask's count to trace it
        spread[::2] = True                                  # true on every other row: positions, not a slice
        wide[:, spread] = -wide[:, ::2]
        return wide + ids, flat


def test_sizes_read_from_a_mask_are_that_calls_constants():
    x = torch.randn(2, 5)
    mask = torch.tensor([False, True, True, False, False])
    program = export_model(_Widened(), dict(x=x, mask=mask), changing=("x",))  # x: values that change
    assert program.ras_value_inputs == ["['mask']"]
    for got, want in zip(program.module()(x=x * 3, mask=mask), _Widened()(x * 3, mask)):
        torch.testing.assert_close(got, want)
    targets = {n.target for n in program.graph_module.graph.nodes}
    assert torch.ops.aten.repeat_interleave.Tensor not in targets  # no size left to read at run time
    assert not any("nonzero" in str(t) for t in targets)


class MaskTokenDiT(CaptionDiT):
    """A read on the host (the caption lengths) beside a broadcast write by an input mask (MDT's mask
    token where ``keep`` is False): the write stays a masked update, a ``where`` for every mask,
    and the capture is not specialised on ``keep``."""

    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.randn(D))

    def forward(self, latent, timestep, caption, mask, keep):
        x = self.embed(latent).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None] / 1000)
        x = x.clone()
        x[~keep] = self.token
        text = self.text(caption[:, : max(mask.sum(1).tolist())])
        return self.attend_and_unpatchify(text, x)


def test_a_broadcast_write_by_an_input_mask_stays_a_where_for_every_mask():
    torch.manual_seed(0)
    model = MaskTokenDiT().eval()
    kw = dict(_inputs(), keep=torch.rand(2, N, generator=torch.Generator().manual_seed(3)) > 0.3)
    program = export_model(model, kw, changing=("latent", "timestep"))
    assert program.ras_value_inputs == ["['mask']"]
    ras = ras_compile(model, POLICY, backend=None)
    targets = {getattr(n.target, "overloadpacket", None) for n in ras.ras_capture(**kw).sparse.graph.nodes}
    assert torch.ops.aten.where in targets and torch.ops.aten.index_put_ not in targets
    assert_sparse_after_dense_equals_the_model(model, ras, kw, torch.tensor([[0, 4, 7], [1, 2, 23]]))


def test_captures_in_two_threads_are_each_specialised_on_their_own_call_and_leave_torch_as_it_was():
    """The answers are installed on torch.Tensor for a capture's duration: concurrent captures take turns,
    another thread's tensors see the originals, and every original is back afterwards."""
    import threading

    names = ("__getitem__", "__setitem__", "tolist", "item", "nonzero", "repeat_interleave")
    before = {name: torch.Tensor.__dict__.get(name) for name in names}
    functions = {name: getattr(torch, name) for name in ("nonzero", "repeat_interleave")}
    programs, errors = {}, []
    models = {length: _model() for length in (2, 5)}  # built here: seeding the global RNG in two threads races

    def capture(length):
        try:
            programs[length] = export_model(models[length], _inputs(length=length))
        except Exception as exc:  # reported below: an assertion in a thread would be lost
            errors.append(exc)

    threads = [threading.Thread(target=capture, args=(length,)) for length in (2, 5)]
    for thread in threads:
        thread.start()
    reads = [torch.arange(6)[torch.arange(6) > 2].tolist() for _ in range(200)]  # meanwhile, here: plain eager
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert reads[-1] == [3, 4, 5]
    for length, program in programs.items():
        assert program.ras_value_inputs == ["['mask']"]
        kw = _inputs(length=length)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(**kw), models[length](**kw))
    assert {name: torch.Tensor.__dict__.get(name) for name in names} == before
    assert {name: getattr(torch, name) for name in functions} == functions
