"""The module ``ras_compile`` returns: the model's signature, RAS inside.

Per input signature (shapes, dtypes, non-tensor arguments) it captures the graph,
analyses it, builds the dense and sparse variants and compiles both. Per call it
asks the controller for the step's mode, runs the matching graph (or, on a step a
step cache predicts, runs nothing and extrapolates the last computed outputs) and
hands the merged prediction back to the controller, which picks the next active set.
"""
from __future__ import annotations

import inspect
import warnings
from math import prod

import torch

from .capture import (Captured, call_arguments, export_model, latent_placeholder, mark_input_kinds,
                      mark_nested_outputs, signature_change, signature_key, training_mode_ops)
from .controller import RASController
from .errors import RASCallError, UnsupportedModelError
from .host_reads import ValueMemo, value_key
from .kernels.linear_scatter import triton_available
from . import model_objects
from .passes.attention_pattern import recognise_attention
from .passes.causal_mask import lower_causal_attention
from .passes.dead_values import drop_dead_values
from .passes.einsum_permute import lead_einsum_batch_axes, lower_einsum_permutes
from .passes.flex_attention import recognise_flex_attention
from .passes.fuse_projection import fuse_kv_projections
from .passes.patch_views import lower_patch_views
from .passes.flat_rows import unflatten_projected_rows
from .passes.shape_forms import lower_shape_forms
from .passes.token_chunks import join_token_chunks
from .passes.constant_masks import drop_constant_wheres
from .passes.padded_rows import split_joined_pieces, split_padded_wheres
from .passes.sample_offsets import reorder_sample_offsets
from .passes.sample_loops import rebatch_sample_stacks
from .passes.buffer_writes import concatenate_buffer_writes
from .passes.split_projection import split_packed_projections
from .passes.masked_update import rewrite_masked_updates
from .passes.rewrite import dense_graph, sparse_graph
from .passes.token_axis import TokenAnalysis, analyze_tokens
from .policy import RASPolicy
from .sample_lists import PerSampleLatent, SampleList, batch_sample_list, mixed_samples
from .stale_tokens import element_tokens

BACKENDS_WITHOUT_DYNAMO = (None, "none")
TIMESTEP_NAMES = ("timestep", "timesteps", "t")  # tried in this order when timestep_arg is not given
MAX_CAPTURES = 8  # input signatures kept (graphs and caches); older ones are captured again when they return


COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the Inductor modes that replay CUDA graphs


def compile_graph(gm: torch.fx.GraphModule, backend, mode: str | None = None):
    if backend in BACKENDS_WITHOUT_DYNAMO:
        return gm
    return torch.compile(gm, backend=backend, fullgraph=True, mode=mode)


def check_compile_mode(mode, backend) -> None:
    """``ValueError`` unless ``mode`` is an Inductor mode and the backend is Inductor."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={mode!r} is not allowed: use one of {COMPILE_MODES} "
                         "(torch.compile's modes for Inductor)")
    if mode is not None and backend != "inductor":
        raise ValueError(f"compile_mode={mode!r} needs backend='inductor' (the modes are Inductor's), "
                         f"got backend={backend!r}")


# operators whose refusal may be an index input placing or taking rows (tried again specialised on it)
INPUT_INDEXED = ("aten.index_copy.default", "aten.index_select.default", "aten.index.Tensor",
                 "aten.index_put_.default", "aten.index_put.default", "aten.gather.default")


def _analyze(program, gm, latent_node, reading: dict) -> TokenAnalysis:
    """``analyze_tokens``; a refusal of a data-dependent shape also says why the host read it comes
    from could not be specialised (``host_reads``)."""
    try:
        return analyze_tokens(gm, latent_node, **reading)
    except UnsupportedModelError as exc:
        why = getattr(program, "ras_host_read_refused", None)
        if why is None or "depends on tensor values" not in exc.reason:
            raise
        raise UnsupportedModelError(f"{exc.reason}; it was not captured for the values read: {why}",
                                    node=exc.node, op=exc.op, source=exc.source) from exc


def image_rows(prediction: torch.Tensor, analysis: TokenAnalysis) -> torch.Tensor:
    """The prediction's image tokens: all of it, or its image rows where a token latent is predicted
    inside the joint text + image sequence (``analysis.output_rows``)."""
    if analysis.output_rows is None:
        return prediction
    start, stop = analysis.output_rows
    return prediction[:, start:stop]


def prediction_patches(prediction: torch.Tensor, analysis: TokenAnalysis) -> torch.Tensor:
    """The merged prediction as ``[B, N, S, C]``: token, position inside its patch, channel.

    The prediction has the latent's layout (its channel dimensions may be wider, e.g.
    a learned variance), so the grid axes found by the analysis say how to cut it.
    """
    return _patches(image_rows(prediction, analysis), analysis)


def _patches(prediction: torch.Tensor, analysis: TokenAnalysis) -> torch.Tensor:
    if analysis.grid is None:
        return prediction.unsqueeze(2)
    grid = analysis.grid
    batch = prediction.shape[0]
    channel_axes = grid.channel_axes
    channels = prod(prediction.shape[a] for a in channel_axes)
    x = prediction.permute(0, *grid.grid_axes, *channel_axes)
    split = [batch]
    for cells, patch in zip(grid.grid_shape, grid.patch_size):
        split += [cells, patch]
    x = x.reshape(*split, channels)
    n = len(grid.grid_axes)
    order = [0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)] + [1 + 2 * n]
    return x.permute(order).reshape(batch, grid.num_tokens, prod(grid.patch_size), channels)


def _detach_from_caches(flat, caches) -> list:
    """Outputs that are views of a cache (an unpatchify made only of views) are copied:
    the next step writes into the cache and must not change what was returned."""
    cache_storages = {c.untyped_storage().data_ptr() for c in caches}
    return [o.clone() if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in cache_storages else o
            for o in flat]


def row_major(index: torch.Tensor) -> torch.Tensor:
    """The ``[B, k]`` ``index`` with strides ``(k, 1)`` (copied only when it has others).

    The compiled graphs guard on their inputs' strides, and an index can be contiguous
    with other strides: with batch 1 the selection's ``[1, k]`` slice of the ``[1, N]``
    ranking keeps the row stride ``N`` (a size-1 dim's stride does not count for
    ``is_contiguous``, so ``.contiguous()`` keeps it), which recompiled the sparse graph
    on the first sparse step."""
    if index.stride() == (index.shape[1], 1):
        return index
    return index.clone(memory_format=torch.contiguous_format)


def all_tokens(batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """The active set of a dense step run through the sparse graph: every token, ``[B, N]`` int64."""
    return torch.arange(num_tokens, device=device).expand(batch, num_tokens).contiguous()


class RASModule(torch.nn.Module):
    """``model`` with Region-Adaptive Sampling; attributes not defined here are the model's."""

    def __init__(self, model: torch.nn.Module, policy: RASPolicy, *, backend="inductor",
                 latent_arg: str | None = None, timestep_arg: str | None = None, fuse_kv_projection="auto",
                 dense_graph: bool = False, compile_mode: str | None = None):
        super().__init__()
        if fuse_kv_projection not in ("auto", True, False):
            raise ValueError(f"fuse_kv_projection={fuse_kv_projection!r} is not allowed: use 'auto' (fused on CUDA), "
                             "True (always; elsewhere the op runs its ATen reference) or False")
        if not isinstance(dense_graph, bool):
            raise ValueError(f"dense_graph={dense_graph!r} is not allowed: use False (dense steps run the sparse "
                             "graph with every token active: one compile) or True (compile a separate dense graph)")
        check_compile_mode(compile_mode, backend)
        if fuse_kv_projection is not False:
            from .kernels.linear_scatter_tma import variant

            variant()  # a bad $RAS_COMPILE_KV_KERNEL fails here, not inside the first compile
        self.ras_fuse_kv_projection = fuse_kv_projection
        self.ras_dense_graph = dense_graph
        self.ras_compile_mode = compile_mode
        self.model = model
        self.ras_policy = policy
        self.ras_backend = backend
        self.ras_controllers = [RASController(policy) for _ in range(policy.calls_per_step)]
        self._slot = 0                        # the call slot of the last call (see RASPolicy.calls_per_step)
        self._last_timestep: float | None = None
        self._warned_repeat = False
        self._signature = inspect.signature(model.forward)
        params = list(self._signature.parameters)
        # a forward(*args, **kwargs) takes any keyword: names are looked up in each call instead
        open_keywords = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in self._signature.parameters.values())
        self._latent_arg = latent_arg or ("hidden_states" if "hidden_states" in params or open_keywords
                                          else params[0])
        found = next((n for n in TIMESTEP_NAMES if n in params), None)
        # the names the timestep may have in a call, first match wins
        self._timestep_names = ((timestep_arg,) if timestep_arg else (found,) if found
                                else TIMESTEP_NAMES if open_keywords else ())
        for name, role in ((self._latent_arg, "latent_arg"), (timestep_arg, "timestep_arg")):
            if name is not None and name not in params and not open_keywords:
                raise ValueError(f"{role}={name!r} is not an argument of {type(model).__name__}.forward "
                                 f"(its arguments: {', '.join(params)})")
        self._captures: dict = {}
        self._registrations = -1  # model_objects.version() when the captures' parameters were last looked at
        self._value_inputs: list[str] = []  # inputs whose values a capture read on the host (host_reads)
        self._value_memo = ValueMemo()  # their host copies, by tensor: one copy per tensor object, not per call
        self._last_key: tuple | None = None  # the last call's signature key, to explain a recapture
        self._warned_recapture = False
        self._warned_timestep = False
        self._warned_training = False

    @property
    def ras_controller(self) -> RASController:
        """The controller of the first call of every step (the only one unless ``calls_per_step > 1``)."""
        return self.ras_controllers[0]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    # -- capture ---------------------------------------------------------------------------
    def _key(self, call: dict) -> tuple:
        """The signature key of ``call``, with the values of the inputs a capture read on the host."""
        values = value_key(call, self._value_inputs, self._value_memo)
        return signature_key(call) + ((values,) if values else ())

    def ras_captured(self, call: dict) -> Captured:
        """The capture for ``call`` (the forward's arguments, a per-sample latent list among them)."""
        return self._captured(call, *batch_sample_list(call, self._latent_arg))

    def _captured(self, call: dict, batched: dict, samples: SampleList | None) -> Captured:
        """The capture for ``call``, keyed by ``call`` (a latent list by its samples' shapes) and made of
        ``batched`` (``call`` with such a list stacked: ``sample_lists``)."""
        self._check_weights()
        key = self._key(call)
        captured = self._captures.pop(key, None)
        if captured is None:
            self._warn_number_timestep(call)
            self._warn_recapture(key, call)
            captured = self._capture(key, batched, samples)
            learned = [] if captured.program is None else captured.program.ras_value_inputs
            if any(name not in self._value_inputs for name in learned):
                self._value_inputs += [name for name in learned if name not in self._value_inputs]
                key = captured.key = self._key(call)
            while len(self._captures) >= MAX_CAPTURES:  # forget the least recently used signature
                self._captures.pop(next(iter(self._captures)))
        self._captures[key] = captured
        self._last_key = key
        return captured

    def _check_weights(self) -> None:
        """Drop every capture when a parameter or buffer its graph reads was replaced since it was captured
        (model_objects.py: looked at only after a registration somewhere in the process)."""
        if model_objects.version() == self._registrations:
            return
        self._registrations = model_objects.version()
        name = None
        for captured in self._captures.values():
            found = None if captured.program is None else model_objects.replaced(captured.root, captured.program)
            if found is not None:  # named in the model (a per-sample-list wrapper holds it as 'model')
                name = found if captured.root is self.model else found.removeprefix("model.")
                break
        if name is None:
            return
        self.ras_reset_captures()
        warnings.warn(
            f"the model's '{name}' (and maybe more) was replaced since its graphs were captured (LoRA adapters "
            "loaded, a module swapped, a parameter assigned): ras_compile captures it again, and the first step "
            "on the new graphs runs dense. Changes in place (load_state_dict, fusing LoRA into the weights, .to()) "
            "need no new capture.", stacklevel=4)

    def ras_reset_captures(self) -> None:
        """Forget every captured graph: the next call captures the model again (its first step dense).
        Call it after changing what the forward does without replacing a parameter or buffer its graphs
        read (an attention processor set, a config flag, a module without parameters swapped), which the
        module cannot see."""
        self._captures.clear()
        self._last_key = None

    def _warn_recapture(self, key: tuple, call: dict) -> None:
        """Once per module: a new capture because a non-tensor argument changed between calls."""
        change = None if self._last_key is None else signature_change(self._last_key, key, call)
        if change is None or self._warned_recapture:
            return
        self._warned_recapture = True
        warnings.warn(
            f"ras_compile captures the model again: {change} between calls. Every new value is a new "
            "capture and compile, and the first step on it runs dense with empty caches. Keep non-tensor "
            "arguments fixed over a generation (pass a fresh copy of a dict the forward mutates), or pass "
            "a value that changes every step as a tensor. A pipeline that alternates two kinds of call in one "
            "step on purpose (skip-layer guidance's extra call, separate conditional and unconditional passes) "
            "should pass RASPolicy(calls_per_step=2): each call slot then keeps its own caches.", stacklevel=4)

    def _warn_training_mode(self, program) -> None:
        """Once per module: the captured graph runs dropout or batch norm as in training."""
        found = training_mode_ops(program.graph_module)
        if not found or self._warned_training:
            return
        self._warned_training = True
        warnings.warn(
            f"the model runs {len(found)} dropout / batch-norm node(s) in training mode ({', '.join(found[:3])}): "
            "it is in train() mode, so every call is random (or uses the batch's statistics), and the dense and "
            "sparse steps cannot match. Call model.eval() before sampling.", stacklevel=4)

    def _warn_number_timestep(self, call: dict) -> None:
        """Once per module, at the first capture: a timestep passed as a Python number is a constant of
        the captured graph, so every step would capture again and run dense."""
        name, t = self._timestep_of(call)
        if self._warned_timestep or isinstance(t, bool) or not isinstance(t, (int, float)):
            return
        self._warned_timestep = True
        warnings.warn(
            f"the timestep argument '{name}' is a Python number ({t!r}): a captured graph holds it "
            "as a constant, so every new value is a new capture and compile whose first step runs dense, and "
            f"RAS never runs a sparse step. Pass it as a tensor (e.g. torch.full((batch,), {t!r})).", stacklevel=4)

    def _capture(self, key, call: dict, samples: SampleList | None = None) -> Captured:
        latent = call.get(self._latent_arg)
        stacked = []  # the output paths of per-sample lists, as the last traced call returned them
        target = self.model if samples is None else \
            PerSampleLatent(self.model, self._latent_arg, samples, report=lambda paths: stacked.append(paths))
        try:
            mixed = mixed_samples(call, self._latent_arg)
            if mixed is not None:
                raise UnsupportedModelError(mixed)
            if self._latent_arg not in call:
                raise RASCallError(f"the call has no argument '{self._latent_arg}', the latent argument (it has "
                                   f"{', '.join(call)}); pass latent_arg= to ras_compile to name the argument that "
                                   "holds the noisy latent")
            if not isinstance(latent, torch.Tensor):
                raise RASCallError(f"the latent argument '{self._latent_arg}' must be a tensor, got "
                                   f"{type(latent).__name__}; pass latent_arg= to ras_compile to name another argument")
            try:
                program, name, gm, analysis = self._prepare(target, call, latent)
            except UnsupportedModelError as exc:
                if exc.op not in INPUT_INDEXED:
                    raise
                try:  # rows placed or taken by index inputs: captured for their values, as slices
                    program, name, gm, analysis = self._prepare(target, call, latent, index_inputs=True)
                except UnsupportedModelError:
                    raise exc from exc.__cause__
        except UnsupportedModelError as exc:
            if self.ras_policy.on_unsupported != "fallback":
                raise
            # the error's advice (pass on_unsupported='fallback') is what the caller already did
            message = str(exc).replace(" Pass RASPolicy(on_unsupported='fallback') to run it dense instead.", "")
            warnings.warn(f"{message} Running the dense compiled model instead (on_unsupported='fallback').",
                          stacklevel=3)
            dense = self.model if self.ras_backend in BACKENDS_WITHOUT_DYNAMO \
                else compile_graph(self.model, self.ras_backend, self.ras_compile_mode)
            return Captured(key, None, self._latent_arg, fallback=dense)
        captured = Captured(key, program, name, analysis=analysis, root=target)
        if samples is not None:  # the caller gets the per-sample lists back
            captured.sample_lists = stacked[-1]
        mode = self.ras_compile_mode
        captured.dense = compile_graph(dense_graph(gm, analysis), self.ras_backend, mode)  # compiled on first call
        captured.sparse = compile_graph(sparse_graph(gm, analysis), self.ras_backend, mode)
        return captured

    def _prepare(self, model: torch.nn.Module, call: dict, latent: torch.Tensor, index_inputs: bool = False):
        """Capture ``call``, canonicalise the graph and analyse it: ``(program, latent name, graph,
        analysis)``. ``index_inputs``: the capture is specialised on integer index inputs that place or
        take rows (``index_copy`` / ``index_select`` by a contiguous run become slices; host_reads)."""
        program = export_model(model, call, changing=(self._latent_arg, self._timestep_of(call)[0]),
                               index_inputs=index_inputs)
        mark_input_kinds(program)
        mark_nested_outputs(program)
        self._warn_training_mode(program)
        name = latent_placeholder(program, self._latent_arg)
        gm = program.graph_module
        latent_node = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == name)
        drop_dead_values(gm)  # values nothing reads (nn.MultiheadAttention's unused averaged weights)
        lower_einsum_permutes(gm)  # einops-style patchify einsums -> permute
        lead_einsum_batch_axes(gm)  # einsum("bnhd,bmhd->bhnm") -> einsum("bhnd,bhmd->bhnm") over permuted operands
        lower_patch_views(gm)  # non-overlapping im2col / col2im / pixel_(un)shuffle / unfold -> views
        lower_shape_forms(gm)  # x.view_as(y) / x.reshape_as(y) -> view / reshape to y's sizes
        unflatten_projected_rows(gm)  # linear(x.reshape(L * B, E)).view(L, B, F) -> linear(x)
        drop_constant_wheres(gm)  # where(an all-false mask built from numbers, pad, x) -> x
        split_joined_pieces(gm)  # cat(split(x)) -> x; split(cat(parts)) at part boundaries -> the parts
        if split_padded_wheres(gm):  # where(rows padded by cat, pad token, x) -> cat of x's rows and the pad token
            split_joined_pieces(gm)
        reordered = reorder_sample_offsets(gm)  # captions of different lengths before the image: each sample's rows image first
        rebatch_sample_stacks(gm)  # stack([f(x[i]) for i in range(B)]) -> f over x
        concatenate_buffer_writes(gm)  # buf = zeros(...); buf[:, :T] = a; buf[:, T:] = b -> cat([a, b], 1)
        rewrite_masked_updates(gm)  # x[mask] *= c -> where(mask, x * c, x)
        recognise_flex_attention(gm)  # plain flex_attention (identity score_mod, full mask) -> SDPA
        recognised = recognise_attention(gm)  # hand-written softmax(q k^T) v -> one SDPA node
        joined = join_token_chunks(gm)  # cat([ff(p) for p in x.chunk(n, 1)], 1) -> ff(x); attention slices
        lower_causal_attention(gm, latent_node)  # is_causal over image tokens -> an explicit tril mask
        reading = {"kv_cache": self.ras_policy.kv_cache, "tubes": self.ras_policy.tubes != "never"}
        analysis = _analyze(program, gm, latent_node, reading)
        if self._fuses(latent.device):
            if split_packed_projections(gm, analysis):  # one linear per part of a packed q/k/v
                analysis = analyze_tokens(gm, latent_node, **reading)
            analysis = fuse_kv_projections(gm, analysis)
        analysis.recognised_attention = recognised
        analysis.joined_pieces = joined
        analysis.reordered_rows = reordered
        return program, name, gm, analysis

    def _fuses(self, device: torch.device) -> bool:
        if self.ras_fuse_kv_projection == "auto":
            return device.type == "cuda" and triton_available()
        return self.ras_fuse_kv_projection

    # -- call ------------------------------------------------------------------------------
    def _timestep_of(self, call: dict) -> tuple[str | None, object]:
        """The timestep argument's name and value in ``call`` (``(None, None)`` where it has none)."""
        name = next((n for n in self._timestep_names if n in call), None)
        return name, call.get(name) if name is not None else None

    def _timestep_value(self, call: dict) -> float | None:
        _, t = self._timestep_of(call)
        if isinstance(t, torch.Tensor):
            # the mean, not the first element: a per-token or per-frame timestep may pin some entries
            # (a clean conditioning frame at 0) while the others move with the schedule
            return float(t.detach().double().mean()) if t.numel() else None
        return None if t is None else float(t)

    def forward(self, *args, **kwargs):
        call = call_arguments(self._signature, args, kwargs)
        with torch.no_grad():
            batched, samples = batch_sample_list(call, self._latent_arg)
            captured = self._captured(call, batched, samples)
            if captured.fallback is not None:
                return self._run_fallback(captured, call)
            return self._run(captured, batched)

    def _next_slot(self, timestep: float | None) -> int:
        """Which call of the current step this is: a call at the same timestep as the one
        before it is the next call of that step (up to ``calls_per_step``), any other starts a step."""
        repeat = timestep is not None and timestep == self._last_timestep
        self._last_timestep = timestep
        slots = len(self.ras_controllers)
        self._slot = self._slot + 1 if repeat and self._slot + 1 < slots else 0
        if repeat and slots == 1 and not self._warned_repeat and not self.ras_controller.has_override:
            self._warned_repeat = True
            warnings.warn(
                f"the model was called twice in a row at timestep {timestep:g}. If the pipeline runs the conditional "
                "and unconditional passes as separate calls, pass RASPolicy(calls_per_step=2) so they do not share "
                "RAS caches; if it repeats timesteps on purpose (e.g. a Heun sampler), ignore this warning.",
                stacklevel=4)
        return self._slot

    def _run_fallback(self, captured: Captured, call: dict):
        timestep = self._timestep_value(call)
        self.ras_controllers[self._next_slot(timestep)].fallback_step(timestep)
        return captured.fallback(**call)

    def _run(self, captured: Captured, call: dict):
        analysis: TokenAnalysis = captured.analysis
        latent = call[self._latent_arg]
        timestep = self._timestep_value(call)
        slot = self._next_slot(timestep)
        controller = self.ras_controllers[slot]
        mode, index = controller.begin_step(timestep, captured, analysis.num_tokens, analysis.batch_size,
                                            latent.device)
        if mode == "predicted":  # the step cache: the model does not run
            flat = controller.predicted_outputs()
            controller.end_step(mode, prediction_patches(flat[analysis.output_leaf], analysis))
            return captured.outputs(flat)
        cuda_graphs = self.ras_compile_mode in CUDA_GRAPH_MODES and latent.device.type == "cuda"
        caches = captured.caches.get(slot)
        if caches is None:
            caches = captured.caches[slot] = [torch.empty(c.shape, dtype=c.dtype, device=latent.device)
                                              for c in analysis.caches]
            if cuda_graphs:  # the graphs write the caches in place: CUDA graphs must keep their addresses
                for cache in caches:
                    torch._dynamo.mark_static_address(cache)
        if cuda_graphs:  # each call is a new step: earlier replays' outputs were consumed by the caller
            torch.compiler.cudagraph_mark_step_begin()
        inputs = captured.graph_inputs(call)
        if mode == "dense" and self.ras_dense_graph:
            flat = captured.dense(*inputs, *caches)
        else:
            if mode == "dense":  # every token active: the sparse graph computes the dense step and fills the caches
                index = all_tokens(analysis.batch_size, analysis.num_tokens, latent.device)
            index = row_major(index)
            if index.shape[1] >= 2 and self.ras_backend not in BACKENDS_WITHOUT_DYNAMO:
                torch._dynamo.mark_dynamic(index, 1, min=2, max=analysis.num_tokens)
            flat = captured.sparse(*inputs, index, *caches)
        flat = _detach_from_caches(flat, caches)
        leaf = analysis.output_leaf
        if self.ras_policy.stale_token_order:  # inactive tokens continued from their last two computed values
            image = image_rows(flat[leaf], analysis)
            merged = controller.merge_stale(image, None if mode == "dense" else index,
                                            self._element_tokens(captured, image))
            flat[leaf] = merged if analysis.output_rows is None else torch.cat(
                [flat[leaf][:, :analysis.output_rows[0]], merged, flat[leaf][:, analysis.output_rows[1]:]], 1)
        controller.record_outputs(flat)
        controller.end_step(mode, prediction_patches(flat[leaf], analysis))
        return captured.outputs(flat)

    @staticmethod
    def _element_tokens(captured: Captured, prediction: torch.Tensor) -> torch.Tensor:
        if captured.element_tokens is None:
            captured.element_tokens = element_tokens(
                prediction.shape[1:], lambda x: _patches(x, captured.analysis)).to(prediction.device)
        return captured.element_tokens

    def ras_capture(self, *args, **kwargs) -> Captured:
        """The capture for this call signature: its analysis and its dense and sparse graphs
        (``.dense`` / ``.sparse``; GraphModules with ``backend=None``). Captures if needed; runs nothing."""
        return self.ras_captured(call_arguments(self._signature, args, kwargs))

    def ras_analysis(self, *args, **kwargs) -> TokenAnalysis:
        """The token-axis analysis for this call signature (captures if needed; runs nothing)."""
        return self.ras_captured(call_arguments(self._signature, args, kwargs)).analysis
