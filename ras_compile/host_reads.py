"""Host reads of integer, boolean and conditioning inputs, specialised at capture.

Some forwards read tensor values on the host: Lumina-Image-2.0 lays out its joint
sequence with ``attention_mask.sum(dim=1).tolist()`` and loops over the lengths in
Python. ``torch.export`` traces with fake tensors, whose values are unknown, so such a
forward has no single graph. When the values come only from integer or boolean inputs
(masks, ids, lengths), the graph is the same for every call with the same values of
those inputs: it can be captured for those values and reused while they stay the same.

``specialising_host_reads(call)`` is the context for that capture. Inside it export
propagates real values beside the fake ones (``fake_tensor_propagate_real_tensors``)
and ``Tensor.tolist`` / ``item`` / ``numpy`` / ``bool`` / ``int`` / ``float`` /
``index`` answer from the real value, and ``nonzero`` / ``argwhere`` (whose output size
is a count of true values) and ``x[mask]`` with a boolean mask (only where the plain export
failed: a traced masked update becomes a ``where`` instead) return that call's result as a
constant, but only for a tensor whose value is computed from integer or boolean inputs of the
call, floating-point inputs other than the latent and the timestep (conditioning, the same over a
loop: HunyuanVideo-1.5's ``if torch.all(image_embeds == 0):``) and constants: its ancestors in
the graph being traced are checked at every read. A read of anything else (the latent, the
timestep, a weight: values that change every step) is answered as export answers it,
so the capture fails as before, and the refusal names the read. ``HostReads.inputs``
lists the inputs the graph was specialised on: the caller adds their values to the
capture's signature (a host read of them on every call, as the model makes itself).

Propagating real values runs the forward once more on real tensors, with a real copy of
every weight: only a capture that failed on a data-dependent value is tried this way.
"""
from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental import proxy_tensor
from torch.utils._python_dispatch import _disable_current_modes

from .leaf_names import named_leaves
from .source_frames import is_model_file

READS = ("tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__")
# operators whose output size is read from their input's values: answered with a constant
SIZED_BY_VALUES = ("nonzero", "argwhere")


@dataclass
class HostReads:
    inputs: list[str] = field(default_factory=list)   # pytree key strings of the specialised inputs
    refused: str | None = None                        # the first read that could not be specialised, and why


def value_inputs(call: dict, changing: tuple = ()) -> list[tuple[str, torch.Tensor]]:
    """The call's tensors a capture may be specialised on, by pytree key string: its integer and boolean
    tensors, and its floating-point ones but those under the arguments ``changing`` (the latent and the
    timestep, whose values change every step): conditioning such as image embeddings stays the same
    over a sampling loop."""
    skip = tuple(f"[{name!r}]" for name in changing)
    return [(name, leaf) for name, leaf in named_leaves(call)
            if isinstance(leaf, torch.Tensor) and not leaf.is_complex()
            and (not leaf.is_floating_point() or not name.startswith(skip))]


def value_key(call: dict, names: list[str]) -> tuple:
    """The values of the inputs ``names`` of ``call``, hashable (a device-to-host copy of each)."""
    if not names:
        return ()
    leaves = dict(named_leaves(call))
    key = []
    for name in names:
        leaf = leaves.get(name)
        key.append((name, tuple(leaf.shape), str(leaf.dtype), leaf.detach().cpu().numpy().tobytes())
                   if isinstance(leaf, torch.Tensor) else (name, None))
    return tuple(key)


def _model_line() -> str:
    """`` at file.py:line `code` `` of the innermost model frame of the current stack."""
    for frame in reversed(traceback.extract_stack()):
        if is_model_file(frame.filename):
            code = (frame.line or "").strip()
            name = frame.filename.rsplit("/", 1)[-1]
            return f" at {name}:{frame.lineno}" + (f" `{code}`" if code else "")
    return ""


def _sources(tensor: FakeTensor, candidates: list[tuple[str, torch.Tensor]]) -> tuple[list[str], str | None]:
    """The candidate inputs ``tensor``'s value is computed from, or why it is not computed only from them."""
    mode = proxy_tensor.get_proxy_mode()
    if mode is None:
        return [], "no graph is being traced"
    slot = proxy_tensor.get_proxy_slot(tensor, mode.tracer, None)
    if slot is None:
        return [], None  # not traced: made from Python values alone
    seen, todo, names = set(), [slot.proxy.node], []
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo.extend(node.all_input_nodes)
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        real = getattr(val, "real_tensor", None)
        if not isinstance(val, torch.Tensor) or val.is_complex() or real is None:
            return [], "it is computed from an input (values that change)"
        with _disable_current_modes():
            match = [name for name, leaf in candidates
                     if leaf.shape == real.shape and leaf.dtype == real.dtype and torch.equal(leaf.cpu(), real.cpu())]
        if not match and val.is_floating_point():
            return [], ("it is computed from a floating-point tensor that changes between steps (the latent, the "
                        "timestep, an embedding of them, or a weight)")
        if not match:
            return [], "it is computed from an integer buffer or parameter of the model, not from an input"
        names.extend(m for m in match if m not in names)
    return names, None


def _specialisable(fake, name: str, what: str, candidates, record: HostReads):
    """The real tensor behind ``fake`` when its value may be specialised on (it is computed from the
    candidate inputs ``candidates``, whose names are recorded); None otherwise, the first such read
    recorded as the refusal (``name`` ``what``: "`item` reads a tensor value on the host")."""
    real = getattr(fake, "real_tensor", None)
    names, why = _sources(fake, candidates)
    if real is None or why is not None:
        if record.refused is None:
            record.refused = f"`{name}` {what}{_model_line()}, and {why or 'its value is unknown'}"
        return None
    record.inputs.extend(n for n in names if n not in record.inputs)
    return real


def _patched(name: str, original, candidates, record: HostReads):
    def read(self, *args, **kwargs):
        if not isinstance(self, FakeTensor):
            return original(self, *args, **kwargs)
        real = _specialisable(self, name, "reads a tensor value on the host", candidates, record)
        if real is None:
            return original(self, *args, **kwargs)
        with _disable_current_modes():
            return original(real, *args, **kwargs)
    return read


def _constant(real):
    """``real`` (a tensor, or a tuple of them) made again under the active tracing modes: a constant
    of the graph being traced."""
    if isinstance(real, tuple):
        return tuple(_constant(r) for r in real)
    return torch.tensor(real.tolist(), dtype=real.dtype, device=real.device).reshape(real.shape)


def _patched_sized(name: str, original, candidates, record: HostReads):
    """``torch.nonzero(mask)`` and its kin: the output's size is the count of the input's true values,
    unknown to export; for a mask computed from integer / boolean inputs the result is that call's
    constant (Mochi's attention loop takes each sample's valid caption rows with ``nonzero``)."""
    def sized(self, *args, **kwargs):
        if not isinstance(self, FakeTensor):
            return original(self, *args, **kwargs)
        real = _specialisable(self, name, "sizes its output by tensor values", candidates, record)
        if real is None:
            return original(self, *args, **kwargs)
        with _disable_current_modes():
            value = original(real, *args, **kwargs)
        return _constant(value)
    return sized


def _patched_getitem(original, candidates, record: HostReads):
    """``x[mask]`` with a boolean mask: its size is the mask's count of true values, read inside the
    indexing operator where no read can be answered; for a mask computed from the candidate inputs (or
    constants) the index is that call's ``nonzero`` of the mask, a constant (HunyuanVideo-1.5
    reorders each sample's valid caption rows with ``text[text_mask]``)."""
    def getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        masks = [p for p in parts if isinstance(p, FakeTensor) and p.dtype == torch.bool]
        if not masks:
            return original(self, index)
        new = []
        for part in parts:
            if any(part is m for m in masks):
                real = _specialisable(part, "a boolean-mask index", "sizes its output by tensor values",
                                      candidates, record)
                if real is None:
                    return original(self, index)
                with _disable_current_modes():
                    rows = real.nonzero(as_tuple=True)
                new.extend(_constant(tuple(rows)))
            else:
                new.append(part)
        return original(self, tuple(new))
    return getitem


@contextlib.contextmanager
def specialising_host_reads(call: dict, changing: tuple = (), mask_indexing: bool = True):
    """While a capture runs: host reads of values computed from the call's integer and boolean inputs,
    and its floating-point ones but the arguments ``changing``, return those values (see the module
    docstring); with ``mask_indexing``, so do boolean-mask indexes ``x[mask]``. Yields the ``HostReads``
    record."""
    import torch._functorch.config as functorch_config

    record = HostReads()
    candidates = value_inputs(call, changing)
    patched = READS + SIZED_BY_VALUES + (("__getitem__",) if mask_indexing else ())
    originals = {name: torch.Tensor.__dict__.get(name) for name in patched}
    functions = {name: getattr(torch, name) for name in SIZED_BY_VALUES}
    for name in READS:
        setattr(torch.Tensor, name, _patched(name, getattr(torch.Tensor, name), candidates, record))
    for name in SIZED_BY_VALUES:
        setattr(torch.Tensor, name, _patched_sized(name, getattr(torch.Tensor, name), candidates, record))
        setattr(torch, name, _patched_sized(name, functions[name], candidates, record))
    if mask_indexing:
        torch.Tensor.__getitem__ = _patched_getitem(torch.Tensor.__getitem__, candidates, record)
    try:
        with functorch_config.patch(fake_tensor_propagate_real_tensors=True):
            yield record
    finally:
        for name, original in originals.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
        for name, function in functions.items():
            setattr(torch, name, function)
