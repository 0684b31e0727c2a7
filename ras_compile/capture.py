"""Capture: the model's forward as an exported FX graph, once per input signature.

``torch.export`` (non-strict) gives an ATen graph with shapes in ``node.meta``,
parameters lifted to inputs (read from the live module at every call, so later
weight updates are seen) and the output's pytree structure, so the compiled
module returns exactly what the model returns.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import re
import sys
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree

from .errors import RASCallError, UnsupportedModelError
from .fake_leaks import forget_capture_memos, snapshot
from .host_reads import CAPTURE_LOCK, specialising_host_reads
from .hooks import check_capturable_hooks
from .leaf_names import keyless_argument, named_leaves
from .sample_lists import unstack_outputs
from .source_frames import model_frame


def call_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """The call as keyword arguments in signature order (what export and the cache key see)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise RASCallError(f"the compiled model was called with arguments its forward does not accept: {exc}") from None
    call: dict = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise RASCallError(f"extra positional arguments (*{name}) are not supported; pass them by keyword")
        else:
            call[name] = value
    return call


def _leaf_key(leaf):
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device.type, leaf.device.index)
    try:
        hash(leaf)
        return ("value", type(leaf), leaf)
    except TypeError:
        return ("repr", type(leaf), repr(leaf))


def signature_key(call: dict):
    """What a captured graph is specialised on: structure, tensor shapes/dtypes/devices, other values."""
    leaves, _spec = pytree.tree_flatten(call)
    structure = tuple((name, str(pytree.tree_structure(value))) for name, value in call.items())
    return (structure, tuple(_leaf_key(leaf) for leaf in leaves))


def signature_change(before: tuple, after: tuple, call: dict) -> str | None:
    """What made signature key ``after`` (of ``call``) out of the last one, ``before``, when it is not a
    tensor's shape, dtype or device (a new resolution is expected to capture again; a changing Python
    value or structure is not): ``None`` when only tensors changed. Runs only when a capture is made."""
    if before[0] != after[0]:
        old, new = dict(before[0]), dict(after[0])
        changed = [name for name in new if old.get(name) != new[name]] + [name for name in old if name not in new]
        value = call.get(changed[0]) if changed else None
        what = ("None" if value is None else f"a {type(value).__name__}"
                + (f" of {len(value)}" if isinstance(value, (list, tuple, dict)) else ""))
        return (f"the structure of argument '{changed[0]}' changed (now {what})" if changed else
                "the structure of the arguments changed (a list or dict argument gained or lost entries)")
    for (name, _leaf), old, new in zip(named_leaves(call), before[1], after[1]):
        if old != new and new[0] != "tensor":
            return f"argument {name} changed from {old[2]!r} to {new[2]!r}"
    if before[1] == after[1] and before[2:] != after[2:]:  # the values a capture read on the host (host_reads)
        old_values = {v[0]: v for v in (before[2] if len(before) > 2 else ())}
        changed = [v[0] for v in (after[2] if len(after) > 2 else ()) if old_values.get(v[0]) != v]
        return (f"the values of {', '.join(changed)} changed (the forward reads them on the host, so a "
                "captured graph holds them; each set of values is captured once and kept)")
    return None


@dataclass
class Captured:
    key: tuple
    program: torch.export.ExportedProgram
    latent_node: str
    dense: object = None
    sparse: object = None
    analysis: object = None
    fallback: object = None
    caches: dict = field(default_factory=dict)  # call slot -> the cache tensors of that slot
    element_tokens: object = None  # the token of each prediction element (stale_token_order 1; made on first use)
    sample_lists: tuple = ()  # ((output path, list or tuple), ...): per-sample output lists, stacked in the graph
    root: object = None  # the module captured (the model, or its per-sample-list wrapper): names are of its tensors

    def graph_inputs(self, call: dict) -> list:
        """Parameters, buffers, constants and user inputs, in the graph's placeholder order."""
        return self.program._graph_module_flat_inputs((), call)

    def outputs(self, flat_outputs) -> object:
        out = pytree.tree_unflatten(list(flat_outputs), self.program.call_spec.out_spec)
        return unstack_outputs(out, self.sample_lists) if self.sample_lists else out


_PLAIN_LEAVES = (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format,
                 torch.layout)


_UNKNOWN_OUTPUT = re.compile(r"Found <class '([\w.<>]+)'> in output, which is not a known type")


def opaque_output(exc: BaseException) -> str | None:
    """Why export refused the forward's return value: an object of a class pytree does not know (a
    dataclass of the model's own), with how to register it; None for any other failure."""
    found = _UNKNOWN_OUTPUT.search(str(exc))
    if found is None:
        return None
    name = found.group(1).rsplit(".", 1)[-1]
    return (f"the forward returns a {name} object, which torch.export cannot return (only tensors, numbers, "
            f"and lists, tuples, dicts, diffusers outputs or registered classes of them): register the class "
            f"before ras_compile, torch.utils._pytree.register_dataclass({name}) for a dataclass or "
            f"torch.utils._pytree.register_pytree_node for another class, or return a tuple or dict")


def opaque_argument(call: dict) -> str | None:
    """Why export may have refused the call: an argument that is no tensor, number or string in
    lists, tuples and dicts (a model's own K/V-cache object, say), by name; None if there is none."""
    for name, leaf in named_leaves(call):
        if not isinstance(leaf, _PLAIN_LEAVES):
            return (f"argument {name} is a {type(leaf).__name__} object, which torch.export cannot "
                    "take as an input (only tensors, numbers, strings and lists, tuples or dicts of them); pass "
                    "None if the model allows it, or register the class with "
                    "torch.utils._pytree.register_pytree_node")
    return None


@contextlib.contextmanager
def _script_modules_called_directly(model: torch.nn.Module):
    """While ``model`` is exported, call its ``torch.jit.script``-ed submodules through their compiled
    method. Non-strict export records module calls by patching ``nn.Module.__call__``, which for a
    ``RecursiveScriptModule`` ends in the eager class's unbound ``forward`` ("forward() takes 2
    positional arguments but 3 were given"). ``module._c.forward`` runs the same ATen ops through
    the dispatcher, where export records them, on the module's own parameters, which export lifts
    as usual. Models without a script module are untouched."""
    script = torch.jit.RecursiveScriptModule
    if not any(isinstance(m, script) for m in model.modules()):
        yield
        return
    had = "__call__" in script.__dict__
    old = script.__dict__.get("__call__")
    script.__call__ = lambda self, *args, **kwargs: self._c.forward(*args, **kwargs)
    try:
        yield
    finally:
        if had:
            script.__call__ = old
        else:
            del script.__call__


def export_model(model: torch.nn.Module, call: dict, changing: tuple = (),
                 index_inputs: bool = False) -> torch.export.ExportedProgram:
    """The forward as an exported program. A forward that reads integer or boolean inputs on the
    host (a mask's lengths, ``.tolist()``) is captured for the values of this call
    (``host_reads``): ``program.ras_value_inputs`` names the inputs the graph is specialised on
    (empty for every other model, and for one whose reads are of values made from Python numbers
    alone: Wan's official ``torch.tensor(u.shape[2:])`` grid sizes read back with ``.tolist()``).
    Floating-point inputs may be specialised on too, but not the arguments named in ``changing`` (the
    latent and the timestep): HunyuanVideo-1.5's ``if torch.all(image_embeds == 0):``. With
    ``index_inputs`` the capture is specialised from the start, and rows placed or taken by integer
    index inputs in one contiguous run are slices (MiniMax-H3's packed sequence). Captures from several
    threads take turns (``host_reads.CAPTURE_LOCK``)."""
    with CAPTURE_LOCK:
        return _export_model(model, call, changing, index_inputs)


def _export_model(model: torch.nn.Module, call: dict, changing: tuple, index_inputs: bool):
    check_capturable_hooks(model)  # stateful hooks would be frozen at capture time
    if index_inputs:
        program = _export_specialised(model, call, None, changing, index_inputs=True)
        _check_outputs(program)
        return program
    try:
        program = _export(model, call, specialise=False)
    except UnsupportedModelError as error:
        if not _data_dependent(error.__cause__):
            own = _eager_failure(model, call)
            if own is not None:
                raise own from error.__cause__
            raise
        program = _export_specialised(model, call, error, changing)
    else:
        if _has_symbolic(program, sizes_only=True):
            try:  # the traced host reads would leave shapes the analysis refuses: specialise them if they allow
                program = _export_specialised(model, call, None, changing)
            except UnsupportedModelError as refused:  # kept as traced: the analysis names the data-dependent
                program.ras_host_read_refused = refused.reason  # shape, and says why it was not specialised
    if not hasattr(program, "ras_value_inputs"):
        program.ras_value_inputs = []
    _check_outputs(program)
    return program


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _eager_failure(model: torch.nn.Module, call: dict) -> RASCallError | None:
    """When export failed on something other than a value read: the error of the model's own forward on
    this call, if it fails without ras_compile too (an input of the wrong dtype, device or shape); then
    the call is to fix, not the model's capture. None when the forward runs."""
    try:
        with torch.no_grad():
            model(**call)
    except Exception as exc:  # the model's own error, whatever it is
        return RASCallError(f"the model's own forward fails on this call, without ras_compile too "
                            f"({type(exc).__name__}: {_first_line(exc)}){model_frame(exc)}: fix the call (the inputs' "
                            "dtypes, devices and shapes) or the model; this is not a limit of ras_compile")
    return None


def _check_outputs(program: torch.export.ExportedProgram) -> None:
    bad = [s for s in program.graph_signature.output_specs if s.kind.name != "USER_OUTPUT"]
    if bad:
        raise UnsupportedModelError(f"the forward mutates its own state ({bad[0].kind.name} of {bad[0].target}); "
                                    "a stateless forward is required")


_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "DataDependentOutputException", "UserError")


def _data_dependent(exc: BaseException | None) -> bool:
    """Whether export failed on a value it could not know (a host read, its hash or its branch)."""
    text = f"{type(exc).__name__}: {exc}"
    return exc is not None and (any(name in text for name in _DATA_DEPENDENT) or "SymInt" in text
                                or "data-dependent" in text or "tensor subclasses" in text)


def _has_symbolic(program: torch.export.ExportedProgram, sizes_only: bool = False) -> bool:
    """Whether a tensor size of the graph (or, unless ``sizes_only``, any value) is symbolic: read from
    data at trace time."""
    for node in program.graph_module.graph.nodes:
        val = node.meta.get("val")
        for v in val if isinstance(val, (list, tuple)) else [val]:
            if not sizes_only and isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                return True
            if isinstance(v, torch.Tensor) and not all(isinstance(d, int) for d in v.shape):
                return True
    return False


def _short_of_memory(model: torch.nn.Module) -> str | None:
    """Why the specialised export cannot run here: propagating real values allocates a real copy of every
    weight, which must fit in the free memory of the weights' CUDA device (None: it fits, or the weights
    are not on CUDA)."""
    devices = {p.device for p in model.parameters() if p.device.type == "cuda"}
    if not devices:
        return None
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    free = min(torch.cuda.mem_get_info(d)[0] for d in devices)
    if need < 0.9 * free:
        return None
    return (f"reading the values the forward reads on the host needs a second copy of the weights "
            f"({need / 2**30:.1f} GiB) while capturing, more than the {free / 2**30:.1f} GiB free on the device")


def _export_specialised(model: torch.nn.Module, call: dict, error: UnsupportedModelError | None,
                        changing: tuple = (), index_inputs: bool = False):
    """Export again with host reads of integer / boolean inputs answered from their values; when a read
    cannot be specialised, the first failure (``error``) stands, naming that read."""
    short = _short_of_memory(model)
    if short:
        raise UnsupportedModelError(f"{error.reason if error else 'the forward reads tensor values on the host'}; "
                                    f"{short}") from (error.__cause__ if error else None)
    # boolean-mask indexes are answered only where the plain export failed: a graph it traced with a mask
    # index (x[~keep] *= 0.5) becomes a where (passes/masked_update.py), one graph for every mask
    with specialising_host_reads(call, changing, mask_indexing=error is not None,
                                 index_inputs=index_inputs) as reads, _quiet_shape_logs():
        try:
            program = _export(model, call, specialise=True)
        except UnsupportedModelError as again:
            first = error or again
            if not reads.refused:
                raise first from first.__cause__
            named = UnsupportedModelError(first.reason.replace(
                "; data-dependent control flow", f"; {reads.refused}; data-dependent control flow"))
            named.partial_graph = getattr(first, "partial_graph", "")
            raise named from first.__cause__
    if reads.refused:
        raise UnsupportedModelError(reads.refused)
    if _has_symbolic(program):
        # a value read where no patched method sees it (inside an operator): export decided its guards
        # from real values the specialisation does not cover, so the graph is not kept
        raise error or UnsupportedModelError(
            "torch.export traced a value read from a tensor inside an operator (an unbacked size); "
            "data-dependent control flow or shapes are not supported")
    program.ras_value_inputs = list(reads.inputs)
    return program


@contextlib.contextmanager
def _quiet_shape_logs():
    """Real-value propagation logs every guard it decides (``propagate_real_tensors evaluate_expr``)."""
    import logging

    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _export(model: torch.nn.Module, call: dict, specialise: bool) -> torch.export.ExportedProgram:
    printed = io.StringIO()  # torch.export prints the partial graph of a failed capture to stderr
    memos = snapshot(model)
    try:
        with torch.no_grad(), contextlib.redirect_stderr(printed), _script_modules_called_directly(model):
            program = torch.export.export(model, (), call, strict=False)
    except Exception as exc:  # export failures are many and deep; report them as one clear refusal
        opaque = keyless_argument(call) or opaque_argument(call) or opaque_output(exc)
        if opaque is not None:
            raise UnsupportedModelError(opaque) from exc
        error = UnsupportedModelError(
            f"torch.export could not capture the forward as one graph ({type(exc).__name__}: {_first_line(exc)})"
            f"{model_frame(exc)}; data-dependent control flow or shapes are not supported")
        error.partial_graph = printed.getvalue()  # what export had traced before it failed, for debugging
        raise error from exc
    finally:
        forget_capture_memos(memos)  # tables the forward memoised while tracing hold fake tensors
    if not specialise:
        sys.stderr.write(printed.getvalue())
    return _inline_autocast(program)


def _inline_autocast(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """A forward that runs part of itself under ``torch.autocast`` is exported with that region as one
    ``wrap_with_autocast`` higher-order op around a submodule: the analysis would see one opaque node
    where the region meets the tokens.

    * A region that switches autocast off (``enabled=False``: fp32 islands for RoPE or norms, with no
      autocast around the capture) changes nothing: its body is inlined as it is.
    * A region that switches it on: lowering to the inference IR with no decompositions inlines it,
      the casts autocast makes becoming explicit ``_to_copy`` nodes (values unchanged). That lowering
      also functionalises in-place updates (into ``slice_scatter`` and the like), so it is kept to
      the graphs that need it.
    """
    gm = program.graph_module
    while True:
        off = [n for n in gm.graph.nodes if _autocast_region(n) and not n.args[2]]
        if not off:
            break
        for node in off:
            _inline_region(gm, node)
    gm.recompile()
    if any(_autocast_region(n) for n in gm.graph.nodes):
        with torch.no_grad():
            return program.run_decompositions({})
    return program


def _autocast_region(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.higher_order.wrap_with_autocast


def _inline_region(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """Replace ``wrap_with_autocast(device, dtype, enabled, cache, body, *operands)`` by the nodes of
    ``body``; its ``getitem`` readers read the body's outputs."""
    body_attr = node.args[4]
    body = getattr(gm, body_attr.target)
    env: dict = {}
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    for placeholder, operand in zip(placeholders, node.args[5:]):
        env[placeholder] = operand
    outputs = ()
    with gm.graph.inserting_before(node):
        for inner in body.graph.nodes:
            if inner.op == "placeholder":
                continue
            if inner.op == "output":
                outputs = inner.args[0]
                break
            if inner.op == "get_attr":  # a nested region's body (or a constant) moves to the outer module
                name = f"{body_attr.target}_{inner.target}"
                setattr(gm, name, getattr(body, inner.target))
                env[inner] = gm.graph.get_attr(name)
                env[inner].meta = dict(inner.meta)
                continue
            env[inner] = gm.graph.node_copy(inner, lambda n: env[n])
    for user in list(node.users):
        user.replace_all_uses_with(env[outputs[user.args[1]]])
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    if not body_attr.users:
        gm.graph.erase_node(body_attr)


def training_mode_ops(gm: torch.fx.GraphModule) -> list[str]:
    """The nodes that run as in training (dropout with ``train=True`` and ``p > 0``, batch norm with
    ``training=True``): a model left in ``train()`` mode, whose outputs are then random or batch-dependent."""
    aten = torch.ops.aten
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        args = list(node.args)
        if node.target in (aten.dropout.default, aten.native_dropout.default) and len(args) > 2 \
                and args[2] and args[1]:
            found.append(node.name)
        elif node.target is aten.batch_norm.default and len(args) > 5 and args[5]:
            found.append(node.name)
    return found


def mark_input_kinds(program: torch.export.ExportedProgram) -> None:
    """Record on every placeholder what it holds (``meta["ras_input_kind"]``: ``USER_INPUT``,
    ``PARAMETER``, ``BUFFER``, ...), for passes that must tell a model input from a weight."""
    kinds = {getattr(s.arg, "name", None): s.kind.name for s in program.graph_signature.input_specs}
    for node in program.graph_module.graph.nodes:
        if node.op == "placeholder" and node.name in kinds:
            node.meta["ras_input_kind"] = kinds[node.name]


def mark_nested_outputs(program: torch.export.ExportedProgram) -> None:
    """Record on the output node which flat outputs sit inside a nested list or tuple of the returned
    structure (``meta["ras_nested_outputs"]``): per-block features such as a ControlNet's residuals,
    ``(tuple_of_block_samples, tuple_of_single_block_samples)``, never the prediction, which is the
    returned tensor or an entry of the returned tuple / dict / output object."""
    spec = program.call_spec.out_spec
    if spec is None:
        return
    nested = frozenset(i for i, depth in enumerate(_leaf_depths(spec)) if depth > 1)
    for node in program.graph_module.graph.nodes:
        if node.op == "output":
            node.meta["ras_nested_outputs"] = nested


def _leaf_depths(spec: pytree.TreeSpec, depth: int = 0) -> list[int]:
    """How many containers hold each leaf of ``spec``, in flat order; read from the spec itself, so
    output types registered without key paths (diffusers' output classes) work too."""
    if spec.is_leaf():
        return [depth]
    children = spec.children() if hasattr(spec, "children") else spec.children_specs
    return [d for child in children for d in _leaf_depths(child, depth + 1)]


def latent_placeholder(program: torch.export.ExportedProgram, latent_name: str) -> str:
    """The graph input holding the latent argument (a plain tensor keyword argument)."""
    specs = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    for spec in specs:
        if getattr(spec.arg, "name", None) == latent_name:
            return spec.arg.name
    raise UnsupportedModelError(f"the latent argument '{latent_name}' is not a tensor input of the exported graph; "
                                "pass latent_arg= naming the tensor argument that holds the noisy latent")
