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

The answers are installed on ``torch.Tensor`` and ``torch`` for the capture's duration, so they
are seen process-wide: in any thread but the capturing one the installed functions are the
originals (another thread's own ``torch.compile`` or export is not specialised on this call's
inputs), and captures take turns (``CAPTURE_LOCK``, held by ``capture.export_model`` for every
capture: torch.export's dispatch-mode slots are process-wide too, so two exports at once fail
inside torch with "ProxyTorchDispatchMode slot already occupied").
"""
from __future__ import annotations

import contextlib
import functools
import threading
import traceback
import weakref
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental import proxy_tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes

from .leaf_names import named_leaves
from .source_frames import is_model_file

READS = ("tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__")
# operators that read only their input's shape, dtype and device, never its values
_SHAPE_ONLY = {getattr(torch.ops.aten, name) for name in (
    "new_zeros", "new_ones", "new_empty", "new_full", "zeros_like", "ones_like", "empty_like", "full_like",
    "sym_size")}
# operators whose output size is read from their input's values: answered with a constant
SIZED_BY_VALUES = ("nonzero", "argwhere")


CAPTURE_LOCK = threading.RLock()  # one capture at a time: export and these answers act process-wide


def _owned(patch, original, owner: int):
    """``patch`` in the thread ``owner``, ``original`` in every other thread."""
    @functools.wraps(original)
    def call(*args, **kwargs):
        return (patch if threading.get_ident() == owner else original)(*args, **kwargs)
    return call


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


def value_key(call: dict, names: list[str], memo: "ValueMemo | None" = None) -> tuple:
    """The values of the inputs ``names`` of ``call``, hashable (a device-to-host copy of each, unless
    ``memo`` holds the value of that very tensor)."""
    if not names:
        return ()
    leaves = dict(named_leaves(call))
    key = []
    for name in names:
        leaf = leaves.get(name)
        if not isinstance(leaf, torch.Tensor):
            key.append((name, None))
            continue
        value = memo.get(leaf) if memo is not None else None
        if value is None:
            value = leaf.detach().cpu().numpy().tobytes()
            if memo is not None:
                memo.put(leaf, value)
        key.append((name, tuple(leaf.shape), str(leaf.dtype), value))
    return tuple(key)


class ValueMemo:
    """The host copies of the tensors a signature key read, by tensor: a pipeline passes the same
    prompt embeddings or mask object at every step, and a tensor passed again unchanged (the same
    object, still alive, its version counter unchanged: no in-place write since, through any view)
    needs no device-to-host copy (on a GPU, a synchronisation per call). The memo holds weak
    references only, so a freed tensor's id cannot be mistaken for a new one's. A write through
    ``tensor.data``, which bypasses the version counter, is not seen: pass a new tensor instead."""

    def __init__(self, size: int = 16):
        self.size = size
        self._entries: dict[int, tuple] = {}  # id -> (weakref, version, bytes)

    def get(self, tensor: torch.Tensor) -> bytes | None:
        entry = self._entries.get(id(tensor))
        if entry is None or entry[0]() is not tensor or entry[1] != _version(tensor):
            return None
        return entry[2]

    def put(self, tensor: torch.Tensor, value: bytes) -> None:
        version = _version(tensor)
        if version is None:
            return
        self._entries = {k: e for k, e in self._entries.items() if e[0]() is not None}
        while len(self._entries) >= self.size:
            self._entries.pop(next(iter(self._entries)))
        self._entries[id(tensor)] = (weakref.ref(tensor), version, value)


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter (None for an inference tensor, which keeps none: never memoised)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


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
        if getattr(node.target, "overloadpacket", None) not in _SHAPE_ONLY:
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


def _specialisable(fake, name: str, what: str, candidates, record: HostReads, optional: bool = False):
    """The real tensor behind ``fake`` when its value may be specialised on (it is computed from the
    candidate inputs ``candidates``, whose names are recorded); None otherwise, the first such read
    recorded as the refusal (``name`` ``what``: "`item` reads a tensor value on the host") unless the
    rewrite is ``optional`` (the operator traces as it is)."""
    real = getattr(fake, "real_tensor", None)
    names, why = _sources(fake, candidates)
    if real is None or why is not None:
        if record.refused is None and not optional:
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


def _run(rows: torch.Tensor) -> slice | None:
    """``rows`` (ascending positions) as the slice they fill, when they are one contiguous run."""
    if rows.numel() == 0:
        return slice(0, 0)
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    return slice(lo, hi) if hi - lo == rows.numel() else None


def _patched_getitem(original, candidates, record: HostReads):
    """``x[mask]`` with a boolean mask: its size is the mask's count of true values, read inside the
    indexing operator where no read can be answered; for a mask computed from the candidate inputs (or
    constants) the index is that call's ``nonzero`` of the mask, a constant (HunyuanVideo-1.5
    reorders each sample's valid caption rows with ``text[text_mask]``), or the slice of its one
    contiguous run where a one-axis mask has one (``out[:, image_mask]``: the image rows of a joint
    sequence, a slice the analysis follows), copied as the mask index copies."""
    def getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        masks = [p for p in parts if isinstance(p, FakeTensor) and p.dtype == torch.bool]
        if not masks:
            return original(self, index)
        tensors = sum(isinstance(p, torch.Tensor) for p in parts)
        new, sliced = [], False
        for part in parts:
            if any(part is m for m in masks):
                real = _specialisable(part, "a boolean-mask index", "sizes its output by tensor values",
                                      candidates, record)
                if real is None:
                    return original(self, index)
                with _disable_current_modes():
                    rows = real.nonzero(as_tuple=True)
                    run = _run(rows[0]) if real.dim() == 1 and tensors == 1 else None
                if run is not None:
                    new.append(run)
                    sliced = True
                else:
                    new.extend(_constant(tuple(rows)))
            else:
                new.append(part)
        out = original(self, tuple(new))
        return out.clone() if sliced else out  # a mask index makes a copy, a slice a view
    return getitem


def _patched_repeat_interleave(original, candidates, record: HostReads):
    """``x.repeat_interleave(repeats, dim)`` with tensor ``repeats``: the output's size is the sum of
    ``repeats``, unknown to export; for ``repeats`` computed from the candidate inputs the result is
    ``x.index_select(dim, index)`` with that call's index as a constant, so ``x`` itself may be any
    traced value (Qwen-Image 2.1 widens each image slot of its joint sequence to four rows with
    ``torch.where(img_mask, 4, 1)``). The one-argument form ``torch.repeat_interleave(repeats)`` is
    that index."""
    def repeat_interleave(self, repeats=None, dim=None, *, output_size=None):
        if repeats is None:   # torch.repeat_interleave(repeats)
            real = None if not isinstance(self, FakeTensor) else _specialisable(
                self, "repeat_interleave", "sizes its output by tensor values", candidates, record)
            if real is None:
                return original(self, output_size=output_size)
            with _disable_current_modes():
                value = original(real)
            return _constant(value)
        if not isinstance(repeats, FakeTensor):
            return original(self, repeats, dim, output_size=output_size)
        real = _specialisable(repeats, "repeat_interleave", "sizes its output by tensor values", candidates, record)
        if real is None:
            return original(self, repeats, dim, output_size=output_size)
        source = self.flatten() if dim is None else self
        axis = 0 if dim is None else dim
        with _disable_current_modes():
            index = original(torch.arange(source.shape[axis], device=real.device), real)
        return source.index_select(axis, _constant(index))
    return repeat_interleave


def _patched_setitem(original, candidates, record: HostReads):
    """``x[:, mask] = rows`` with a boolean mask and ``rows`` packed (one row per true value, not a
    value broadcast over them): the write's positions are the mask's true values, read inside the
    indexing operator; for a mask computed from the candidate inputs (or constants) the write is made
    at that call's positions: a slice where a one-axis mask is true on one contiguous run (a joint
    sequence's image rows, ``joint[:, image_mask] = image`` in Qwen-Image 2.1: a slice write the
    buffer-write pass reads as a concatenation), else that call's ``nonzero`` of the mask, a constant.
    A fill or a broadcast value (``x[~keep] = mask_token``) is traced as it is: a masked update the
    analysis rewrites to a ``where``, one graph for every mask."""
    def setitem(self, index, value):
        parts = index if isinstance(index, tuple) else (index,)
        at = [i for i, p in enumerate(parts) if isinstance(p, FakeTensor) and p.dtype == torch.bool]
        if len(at) != 1 or not isinstance(value, torch.Tensor) or any(
                not (isinstance(p, slice) and p == slice(None)) for i, p in enumerate(parts) if i != at[0]):
            return original(self, index, value)
        mask, p = parts[at[0]], at[0]
        real = getattr(mask, "real_tensor", None)
        if real is None:
            return original(self, index, value)
        with _disable_current_modes():
            rows = real.nonzero(as_tuple=True)
            run = _run(rows[0]) if real.dim() == 1 else None
        packed = (*self.shape[:p], rows[0].numel(), *self.shape[p + real.dim():])
        if tuple(value.shape) != tuple(packed) or _specialisable(
                mask, "a boolean-mask index", "sizes its write by tensor values", candidates, record,
                optional=True) is None:
            return original(self, index, value)
        new = (*parts[:p], *((run,) if run is not None else _constant(tuple(rows))), *parts[p + 1:])
        return original(self, new, value)
    return setitem


# functions and methods whose integer arguments are sizes, read in C++ (``x.reshape(1, h, w, -1)`` with
# ``h`` a 0-d tensor is an ``item`` inside the operator, where no patched read answers it)
SIZE_TAKERS = frozenset((
    "reshape", "view", "expand", "repeat", "tile", "unflatten", "narrow", "split", "new_zeros", "new_ones",
    "new_empty", "new_full"))
FACTORIES = frozenset(("zeros", "ones", "empty", "full", "arange", "randn", "rand"))  # no tensor operand


class _SizeArguments(TorchFunctionMode):
    """0-d integer tensors passed as sizes to ``SIZE_TAKERS`` and ``FACTORIES`` become the Python numbers
    they hold, where their value may be specialised on (HiDream's ``x[i, : h * w].reshape(1, h, w, -1)``
    with ``h, w`` rows of a tensor of patch counts)."""

    def __init__(self, candidates, record: HostReads):
        super().__init__()
        self.candidates, self.record = candidates, record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if name in SIZE_TAKERS or name in FACTORIES:
            first = 0 if name in FACTORIES else 1  # the tensor operand stays a tensor
            args = tuple(a if i < first else self._number(a) for i, a in enumerate(args))
            kwargs = {k: self._number(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def _number(self, value):
        if isinstance(value, (list, tuple)):
            return type(value)(self._number(v) for v in value)
        if not (isinstance(value, FakeTensor) and value.dim() == 0 and not value.is_floating_point()
                and not value.is_complex() and value.dtype != torch.bool):
            return value
        real = _specialisable(value, "a size argument", "reads a tensor value on the host", self.candidates,
                              self.record)
        if real is None:
            return value
        with _disable_current_modes():
            return int(real)


def _patched_index(name: str, original, candidates, record: HostReads):
    """``x.index_select(dim, index)`` / ``x.index_copy(dim, index, rows)`` by an integer index input:
    where the index is one ascending contiguous run, the slice it takes (copied, as the index copies)
    or the concatenation it writes (MiniMax-H3 packs its text, audio and video rows into one sequence
    with ``index_copy`` by position inputs, and takes the video rows back with ``index_select``)."""
    def indexed(self, dim, index, *rest, **kwargs):
        if not isinstance(index, FakeTensor) or index.dim() != 1 or index.is_floating_point():
            return original(self, dim, index, *rest, **kwargs)
        real = _specialisable(index, name, "places rows by tensor values", candidates, record, optional=True)
        if real is None:
            return original(self, dim, index, *rest, **kwargs)
        with _disable_current_modes():
            run = _run(real)
            ascending = bool((real[1:] > real[:-1]).all()) if real.numel() > 1 else True
        if run is None or not ascending or kwargs:
            return original(self, dim, index, *rest, **kwargs)
        if name == "index_select":
            return self.narrow(dim, run.start, run.stop - run.start).clone()
        (rows,) = rest
        size = self.shape[dim]
        return torch.cat([self.narrow(dim, 0, run.start), rows.to(self.dtype),
                          self.narrow(dim, run.stop, size - run.stop)], dim)
    return indexed


INDEXERS = ("index_select", "index_copy", "gather")


def _patched_gather(original, candidates, record: HostReads):
    """``x.gather(dim, index)`` by an index input that takes, in every row, the same contiguous run of
    positions along ``dim`` in order: that slice of ``x`` (copied). MDT's unshuffle by ``ids_restore``
    is the identity at inference (``arange``), and then nothing moves between tokens."""
    def gather(self, dim, index, *rest, **kwargs):
        if rest or kwargs or not isinstance(index, FakeTensor) or index.dim() != self.dim():
            return original(self, dim, index, *rest, **kwargs)
        d = dim % self.dim()
        if any(index.shape[a] != self.shape[a] for a in range(self.dim()) if a != d):
            return original(self, dim, index)
        real = _specialisable(index, "gather", "moves rows by tensor values", candidates, record, optional=True)
        if real is None:
            return original(self, dim, index)
        with _disable_current_modes():
            n = real.shape[d]
            start = int(real.flatten()[0]) if real.numel() else 0
            shape = [1] * real.dim()
            shape[d] = n
            run = torch.arange(start, start + n, device=real.device).view(shape).expand(real.shape)
            same = bool(torch.equal(real, run))
        if not same:
            return original(self, dim, index)
        return self.narrow(d, start, n).clone()
    return gather


def _integer_run(index, candidates, record: HostReads) -> slice | None:
    """The slice an index ``x[:, idx]`` stands for: ``idx`` a 1-D integer tensor computed from the
    candidate inputs whose values are one ascending contiguous run (None otherwise)."""
    parts = index if isinstance(index, tuple) else (index,)
    tensors = [p for p in parts if isinstance(p, torch.Tensor)]
    if len(tensors) != 1 or not isinstance(tensors[0], FakeTensor) or tensors[0].dim() != 1 \
            or tensors[0].is_floating_point() or tensors[0].dtype == torch.bool:
        return None
    real = _specialisable(tensors[0], "an index", "places rows by tensor values", candidates, record,
                          optional=True)
    if real is None:
        return None
    with _disable_current_modes():
        return _run(real) if real.numel() < 2 or bool((real[1:] > real[:-1]).all()) else None


def _patched_integer_index(original, candidates, record: HostReads, write: bool):
    """``x[:, idx]`` / ``x[:, idx] = rows`` by an integer index input that is one ascending contiguous
    run: the slice (copied, as the index copies) or a write into it."""
    def indexed(self, index, *value):
        run = _integer_run(index, candidates, record)
        if run is None:
            return original(self, index, *value)
        parts = index if isinstance(index, tuple) else (index,)
        new = tuple(run if isinstance(p, torch.Tensor) else p for p in parts)
        return original(self, new, *value) if write else original(self, new).clone()
    return indexed


@contextlib.contextmanager
def specialising_host_reads(call: dict, changing: tuple = (), mask_indexing: bool = True,
                            index_inputs: bool = False):
    """While a capture runs: host reads of values computed from the call's integer and boolean inputs,
    and its floating-point ones but the arguments ``changing``, return those values (see the module
    docstring); with ``mask_indexing``, so do boolean-mask indexes ``x[mask]``. Yields the ``HostReads``
    record."""
    import torch._functorch.config as functorch_config

    with CAPTURE_LOCK:
        record = HostReads()
        candidates = value_inputs(call, changing)
        indexers = INDEXERS if index_inputs else ()
        patched = READS + SIZED_BY_VALUES + ("repeat_interleave", "__setitem__") + (
            ("__getitem__",) if mask_indexing or index_inputs else ()) + indexers
        originals = {name: torch.Tensor.__dict__.get(name) for name in patched}
        functions = {name: getattr(torch, name) for name in SIZED_BY_VALUES + ("repeat_interleave",) + indexers}
        owner = threading.get_ident()

        def install(where, name, make):
            original = getattr(where, name)
            setattr(where, name, _owned(make(original), original, owner))

        for name in READS:
            install(torch.Tensor, name, lambda o, name=name: _patched(name, o, candidates, record))
        for name in SIZED_BY_VALUES:
            install(torch.Tensor, name, lambda o, name=name: _patched_sized(name, o, candidates, record))
            install(torch, name, lambda o, name=name: _patched_sized(name, o, candidates, record))
        for name in indexers:
            patch = _patched_gather if name == "gather" else lambda o, c, r, name=name: _patched_index(name, o, c, r)
            install(torch.Tensor, name, lambda o, patch=patch: patch(o, candidates, record))
            install(torch, name, lambda o, patch=patch: patch(o, candidates, record))
        install(torch.Tensor, "repeat_interleave", lambda o: _patched_repeat_interleave(o, candidates, record))
        install(torch, "repeat_interleave", lambda o: _patched_repeat_interleave(o, candidates, record))
        if mask_indexing:
            install(torch.Tensor, "__getitem__", lambda o: _patched_getitem(o, candidates, record))
        install(torch.Tensor, "__setitem__", lambda o: _patched_setitem(o, candidates, record))
        if index_inputs:
            install(torch.Tensor, "__getitem__", lambda o: _patched_integer_index(o, candidates, record, False))
            install(torch.Tensor, "__setitem__", lambda o: _patched_integer_index(o, candidates, record, True))
        try:
            with functorch_config.patch(fake_tensor_propagate_real_tensors=True), _SizeArguments(candidates, record):
                yield record
        finally:
            for name, original in originals.items():
                if original is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, original)
            for name, function in functions.items():
                setattr(torch, name, function)
