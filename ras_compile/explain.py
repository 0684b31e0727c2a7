"""``explain``: what the pass would do to a model, without running it.

It captures and analyses the model on example inputs, then reports the token source
and where the token axis ends, how many nodes fall in each class, which attention
nodes read cached K/V, which side inputs are gathered (and which side branches are
gathered where they start), what is densified and why,
and the FLOPs of a sparse step at a given ratio as a fraction of a dense step
(counted by ``torch.utils.flop_counter`` on fake tensors: nothing is computed).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils.flop_counter import FlopCounterMode

from .passes.fuse_projection import fuse_kv_projections
from .passes.split_projection import split_packed_projections
from .passes.token_axis import TokenAnalysis, analyze_tokens
from .policy import RASPolicy


@dataclass
class Explanation:
    model: str
    num_tokens: int
    batch_size: int
    patch_size: tuple[int, ...] | None
    grid_shape: tuple[int, ...] | None
    source: str
    densified: list[tuple[str, str, str]]   # (value, consumer, reason)
    attention_cached_kv: list[str]
    cross_attention: list[str]
    side_inputs: list[str]
    counts: dict[str, int]
    ratio: float
    active_tokens: int
    dense_flops: int
    sparse_flops: int
    caches: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)
    fusible_projections: list[str] = field(default_factory=list)  # K/V linears fused with the cache write on CUDA
    fused_norms: list[str] = field(default_factory=list)  # those K linears whose per-head q/k-norm is fused too
    recognised_attention: list[str] = field(default_factory=list)  # hand-written attention rewritten as SDPA
    joined_pieces: list[str] = field(default_factory=list)  # chunked / sliced computations made whole
    reordered_rows: list[str] = field(default_factory=list)  # buffers whose rows were laid out image first
    token_batched_attention: list[str] = field(default_factory=list)  # attention within each token's own row
    tube_axes: tuple[int, ...] = ()  # latent axes a token spans whole (in the batch axis, or leading the sequence)
    tube_rows: int = 1  # > 1: the token sequence holds that many rows per token (frames kept in the sequence)
    densified_sources: list[str] = field(default_factory=list)  # per densified value: its consumer in the model code
    side_sources: list[str] = field(default_factory=list)  # gathered where computed (side_sources, stream_reentry)
    value_inputs: list[str] = field(default_factory=list)  # inputs whose values the forward reads on the host
    output_rows: tuple[int, int] | None = None  # the prediction's image rows in a joint-sequence output

    @property
    def flop_fraction(self) -> float:
        """FLOPs of one sparse step at ``ratio`` over those of a dense step."""
        return self.sparse_flops / self.dense_flops if self.dense_flops else float("nan")

    def __str__(self) -> str:
        latent = (f"grid {'x'.join(map(str, self.grid_shape))} of patches {'x'.join(map(str, self.patch_size))}"
                  if self.grid_shape else "already a token sequence")
        lines = [
            f"{self.model}: {self.num_tokens} image tokens ({latent}), batch {self.batch_size}",
            f"  token source: {self.source}",
        ]
        if self.value_inputs:
            lines.append(f"  captured for the values of {', '.join(self.value_inputs)} (the forward reads them on "
                         "the host): other values are another capture")
        if self.output_rows:
            lines.append(f"  prediction: rows {self.output_rows[0]}:{self.output_rows[1]} of the joint sequence the "
                         "model returns (the image tokens; scored, and continued when stale_token_order=1)")
        if self.tube_axes:
            where = (f"kept in the token sequence ({self.tube_rows} rows per token)" if self.tube_rows > 1
                     else "folded into the batch axis")
            lines.append(f"  tubes: latent axis {', '.join(map(str, self.tube_axes))} is part of every token, {where}; "
                         "a token is one patch position along all of it, selected and computed as a whole")
        sources = self.densified_sources or [""] * len(self.densified)
        for (value, consumer, reason), source in zip(self.densified, sources):
            lines.append(f"  densified: {value} before {consumer} ({reason}){source}")
        lines.append("  nodes: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.counts.items()))
        if self.recognised_attention:
            lines.append(f"  hand-written attention recognised ({len(self.recognised_attention)}): "
                         + "; ".join(self.recognised_attention))
        if self.joined_pieces:
            lines.append(f"  piecewise computations joined ({len(self.joined_pieces)}): " + "; ".join(self.joined_pieces))
        if self.reordered_rows:
            lines.append(f"  rows reordered image first in each sample ({len(self.reordered_rows)} buffers): "
                         + "; ".join(self.reordered_rows))
        lines.append(f"  attention over cached K/V ({len(self.attention_cached_kv)}): "
                     + (", ".join(self.attention_cached_kv) or "none"))
        if self.cross_attention:
            lines.append(f"  cross-attention, token-wise ({len(self.cross_attention)}): " + ", ".join(self.cross_attention))
        if self.token_batched_attention:
            lines.append(f"  attention within each token (the token axis is a batch axis of it), token-wise "
                         f"({len(self.token_batched_attention)}): " + ", ".join(self.token_batched_attention))
        if self.side_inputs:
            lines.append(f"  side inputs gathered ({len(self.side_inputs)}): " + ", ".join(self.side_inputs))
        if self.side_sources:
            lines.append(f"  side branches gathered where they start, and densified operators after which the "
                         f"stream is picked up ({len(self.side_sources)}): " + ", ".join(self.side_sources))
        kv = sum(1 for name, _, _ in self.caches if name.endswith(("_key", "_value")))
        lines.append(f"  K/V projections fused with the cache write on CUDA: {len(self.fusible_projections)} of {kv}"
                     + (f" ({', '.join(self.fusible_projections)})" if self.fusible_projections else ""))
        if self.fused_norms:
            lines.append(f"    with the K's per-head norm in the epilogue: {len(self.fused_norms)} "
                         f"({', '.join(self.fused_norms)})")
        cache_bytes = sum(_numel(s) * torch.empty((), dtype=getattr(torch, d)).element_size() for _, s, d in self.caches)
        lines.append(f"  caches: {len(self.caches)} tensors, {cache_bytes / 2**20:.2f} MiB")
        lines.append(f"  sparse step at ratio {self.ratio:g} ({self.active_tokens} active tokens): "
                     f"{self.flop_fraction:.3f} of a dense step's FLOPs")
        return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _graph_device(graph: torch.fx.GraphModule) -> torch.device:
    """Where the graph's tensors live: its first parameter or buffer, else its first
    tensor placeholder, else the CPU. Fake inputs must sit there too: a CUDA model's
    weights and CPU fake inputs cannot meet in one op."""
    for t in (*graph.parameters(), *graph.buffers()):
        return t.device
    for node in graph.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            return val.device
    return torch.device("cpu")


def _fake_inputs(graph: torch.fx.GraphModule, analysis: TokenAnalysis, k: int | None, mode: FakeTensorMode):
    caches = {c.name: c for c in analysis.caches}
    device = _graph_device(graph)
    values = []
    with mode:
        for node in graph.graph.nodes:
            if node.op != "placeholder":
                continue
            val = node.meta.get("val")
            if node.name in caches:
                site = caches[node.name]
                values.append(torch.empty(site.shape, dtype=site.dtype, device=device))
            elif node.name == "ras_index":
                values.append(torch.arange(k, device=device).expand(analysis.batch_size, k).contiguous())
            elif isinstance(val, torch.Tensor):
                values.append(torch.empty(val.shape, dtype=val.dtype, device=val.device))
            else:
                values.append(val)
    return values


def _count_flops(graph: torch.fx.GraphModule, inputs, mode: FakeTensorMode) -> int:
    counter = FlopCounterMode(display=False)
    with mode, counter:
        graph(*inputs)
    return counter.get_total_flops()


def explanation_of(model_name: str, analysis: TokenAnalysis, dense, sparse, policy: RASPolicy,
                   ratio: float) -> Explanation:
    k = max(1, min(analysis.num_tokens, round(ratio * analysis.num_tokens)))
    # a shape environment lets a host read in the graph (``.item()`` of a conditioning tensor, as Open-Sora's
    # STDiT3 reads ``height[0].item()``) run on fake tensors as an unbacked symbol instead of raising
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    dense_flops = _count_flops(dense, _fake_inputs(dense, analysis, None, mode), mode)
    sparse_flops = _count_flops(sparse, _fake_inputs(sparse, analysis, k, mode), mode)
    grid = analysis.grid
    densified, sources = [], []
    for key in analysis.densify_at:
        consumer, value = key.split(":")
        densified.append((value, consumer, analysis.densify_reasons.get(key, "")))
        sources.append(analysis.densify_sources.get(key, ""))
    return Explanation(
        model=model_name, num_tokens=analysis.num_tokens, batch_size=analysis.batch_size,
        patch_size=grid.patch_size if grid else None, grid_shape=grid.grid_shape if grid else None,
        source=analysis.source, densified=densified,
        attention_cached_kv=list(analysis.attention), cross_attention=list(analysis.cross_attention),
        side_inputs=[f"{s.node}[{s.arg_index}]" for s in analysis.side_inputs],
        counts=dict(analysis.counts), ratio=ratio, active_tokens=k,
        dense_flops=dense_flops, sparse_flops=sparse_flops,
        caches=[(c.name, c.shape, str(c.dtype).replace("torch.", "")) for c in analysis.caches],
        recognised_attention=[str(r) for r in analysis.recognised_attention],
        joined_pieces=list(analysis.joined_pieces),
        reordered_rows=list(analysis.reordered_rows),
        token_batched_attention=list(analysis.token_batched_attention),
        tube_axes=grid.tube_axes if grid else (),
        tube_rows=analysis.layouts[analysis.source].outer, densified_sources=sources,
        output_rows=analysis.output_rows,
        side_sources=list(analysis.side_sources),
    )


def _fusible_on_cuda(captured, policy: RASPolicy) -> list:
    """The K/V projections a CUDA capture fuses with their cache write: on a copy of the graph, packed
    q/k/v projections split into one per part, then the fusion pass (runtime.RASModule._capture)."""
    gm = captured.program.graph_module
    if captured.analysis.fused_projections:  # the capture fused already (a CUDA model)
        return list(captured.analysis.fused_projections)
    graph = torch.fx.Graph()
    nodes = {}
    graph.output(graph.graph_copy(gm.graph, nodes))
    copy = torch.fx.GraphModule(gm, graph)
    analysis = captured.analysis
    if split_packed_projections(copy, analysis):
        latent = next(n for n in copy.graph.nodes if n.op == "placeholder" and n.name == captured.latent_node)
        analysis = analyze_tokens(copy, latent, kv_cache=policy.kv_cache, tubes=policy.tubes != "never")
    return fuse_kv_projections(copy, analysis).fused_projections


def explain(model: torch.nn.Module, example_inputs: dict, policy: RASPolicy | None = None, *,
            ratio: float | None = None, latent_arg: str | None = None, timestep_arg: str | None = None,
            verbose: bool = True) -> Explanation:
    """Analyse ``model`` on ``example_inputs`` (its forward's keyword arguments) and report.

    ``ratio`` defaults to the policy's ``sample_ratio``. Raises
    ``UnsupportedModelError`` (naming the node, the operator and why) for a model the
    pass refuses, whatever ``policy.on_unsupported`` says.
    """
    from .capture import call_arguments
    from .runtime import RASModule  # the module owns capture and rewriting

    policy = policy or RASPolicy()
    strict = RASPolicy(**{**policy.__dict__, "on_unsupported": "raise"})
    module = RASModule(model, strict, backend=None, latent_arg=latent_arg, timestep_arg=timestep_arg)
    captured = module.ras_captured(call_arguments(module._signature, (), dict(example_inputs)))
    result = explanation_of(type(model).__name__, captured.analysis, captured.dense, captured.sparse, policy,
                            policy.sample_ratio if ratio is None else ratio)
    result.value_inputs = list(getattr(captured.program, "ras_value_inputs", []))
    fused = _fusible_on_cuda(captured, policy)
    result.fusible_projections = [f.linear for f in fused]
    result.fused_norms = [f.linear for f in fused if f.norm is not None]
    if verbose:
        print(result)
    return result
