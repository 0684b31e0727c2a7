"""Token-axis analysis: a pure function from an exported graph to a ``TokenAnalysis``.

It finds where the latent becomes image tokens (the *source*), follows the token
axis through every node, and classifies what the rewrite must do:

* token-wise nodes run unchanged on the active rows (shape arguments rewritten);
* attention whose keys carry image tokens reads stale K/V from a per-layer cache;
* side inputs with a token axis (position tables, RoPE) are gathered where they
  meet the token stream, or where their branch starts (passes/side_sources.py);
* a token axis split into the patch grid is followed as a grid (passes/token_grid.py);
* after a densified operator whose output is the stream, the stream is picked up again
  (passes/stream_reentry.py);
* where the token axis ends (unpatchify) or leaves the graph, the value is
  *densified*: active rows are scattered into a cache of the full value.

Invariants the rewrite relies on (checked here, or refused with the node's name):
every annotated tensor has exactly one token axis whose image rows are the
contiguous range ``[offset, offset + num_tokens)`` (or, read with tubes led by the frames,
``outer`` blocks of them and nothing else: ``TokenLayout.outer``; or consecutive axes that
hold the image tokens only, row-major: ``TokenLayout.grid``); no operator reduces,
sorts or convolves along that axis; the batch axis is known wherever rows move.
"""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from math import prod

import torch
import torch.fx as fx

from ..errors import UnsupportedModelError
from ..source_frames import node_frame
from . import latent_grid as lg

aten = torch.ops.aten


@dataclass(frozen=True)
class TokenLayout:
    """Where image tokens sit in one tensor (dense shapes).

    ``batch_group``: how many consecutive rows of the batch axis belong to one sample.
    It is 1 unless a view folded other axes into the batch axis behind it, as
    ``[B, H, N, d] -> [B * H, N, d]`` does (diffusers' classic attention processor,
    einops' ``(b h) n d``): sample ``b`` then owns rows ``b * H ... b * H + H - 1``.

    ``fold``: 0, or the token axis is folded into the batch axis (Latte's temporal blocks:
    ``[B, N, F, D] -> [B * N, F, D]``, attention over the frames of each token). Axis
    ``token_dim`` then holds the rows ``(sample, token, inner)`` in row-major order,
    ``fold`` inner rows per token, for the whole batch; ``batch_dim`` is None and the
    axis holds image tokens only. ``token_major``: the rows are ``(token, sample, inner)``
    instead (sequence-first code: ``[N, B, D] -> [N * B, D]``).

    ``outer``: 1, or axis ``token_dim`` holds ``outer`` blocks of the image tokens, rows
    ``(o, token)`` in row-major order (``length == outer * N``, image tokens only): the frames
    of a video kept in the sequence while each token is a tube through them (Open-Sora's
    ``[B, F * S, D]``), or any per-sample axis merged in front of the token axis by a view.
    Every block holds the same active tokens.

    ``grid``: (), or the image tokens are split over ``len(grid)`` consecutive axes starting at
    ``token_dim``, of dense sizes ``grid`` (row-major, product ``length``): the token sequence
    unflattened back into its patch grid, ``[B, N, C] -> [B, C, h, w]`` (a convolutional
    feed-forward, HDiT's ``[B, h, w, C]``). The axis holds image tokens only. In the sparse graph
    those axes have sizes ``(k, 1, ...)``, so the rank and every other axis stay as they are
    (passes/token_grid.py).

    ``samples``: None, or the tensor's batch rows are not the latent's samples in order: row ``j`` of
    the batch axis holds latent sample ``samples[j]`` (a per-sample loop's ``x[i:i + 1]``, or ``x[i]``
    whose tensors then have no batch axis and one sample; the batch doubled by ``torch.cat([x, x])``
    for guidance inside the forward; halves split by ``chunk(2)``). Row ``j`` gets the active tokens
    of sample ``samples[j]``; tensors whose samples differ never meet in one operator."""

    token_dim: int
    batch_dim: int | None
    offset: int
    length: int
    batch_group: int = 1
    fold: int = 0
    token_major: bool = False
    outer: int = 1
    grid: tuple[int, ...] = ()
    samples: tuple[int, ...] | None = None

    def shifted(self, token_dim: int | None = None, batch_dim: int | None | str = "same",
                offset: int | None = None, length: int | None = None,
                batch_group: int | None = None) -> "TokenLayout":
        batch_dim = self.batch_dim if batch_dim == "same" else batch_dim
        return TokenLayout(
            self.token_dim if token_dim is None else token_dim,
            batch_dim,
            self.offset if offset is None else offset,
            self.length if length is None else length,
            1 if batch_dim is None else self.batch_group if batch_group is None else batch_group,
            self.fold,
            self.token_major,
            self.outer,
            self.grid,
            self.samples,
        )

    def for_samples(self, samples, batch_size: int, batch_dim: int | None | str = "same") -> "TokenLayout":
        """The same layout with batch rows holding latent samples ``samples`` (None where they are
        the latent's samples in order)."""
        samples = tuple(samples)
        moved = self.shifted(batch_dim=batch_dim)
        return dataclasses.replace(moved, samples=None if samples == tuple(range(batch_size)) else samples)

    def sample_rows(self, batch_size: int) -> tuple[int, ...]:
        """The latent sample of each batch row (``samples``, or every sample in order)."""
        return tuple(range(batch_size)) if self.samples is None else self.samples

    @property
    def axis(self) -> tuple:
        """What two operands must share to carry their tokens on the same axis the same way."""
        return (self.token_dim, self.offset, self.length, self.fold, self.token_major, self.outer, self.grid,
                self.samples)

    @property
    def dims(self) -> tuple[int, ...]:
        """The axes that hold the tokens: ``token_dim``, and the rest of the grid's axes."""
        return tuple(range(self.token_dim, self.token_dim + max(1, len(self.grid))))

    def rows(self, batch_size: int) -> int:
        """Dense size of axis ``token_dim``."""
        return batch_size * self.length * self.fold if self.fold else self.length


@dataclass(frozen=True)
class CacheSite:
    """A full-size tensor kept across steps: attention K/V or a densified activation."""

    name: str
    node: str          # the dense-graph node whose value is cached
    kind: str          # "key", "value" or "activation"
    layout: TokenLayout
    shape: tuple[int, ...]
    dtype: torch.dtype
    reader: str        # the first node that reads it: the dense graph fills the cache just before,
                       # after any in-place update (CogView4 applies RoPE to K in place)


@dataclass(frozen=True)
class SideInput:
    """Operand ``arg_index`` of ``node`` carries a token axis but no active-row selection."""

    node: str
    arg_index: int
    layout: TokenLayout  # aligned to the consuming node's output rank
    rank: int


@dataclass
class TokenAnalysis:
    num_tokens: int
    batch_size: int
    grid: lg.TokenGrid | None          # None: the latent arrives as tokens
    latent_input: str
    source: str
    layouts: dict[str, object] = field(default_factory=dict)  # node -> TokenLayout | list | None
    attention: list[str] = field(default_factory=list)         # SDPA nodes whose K/V are cached
    cross_attention: list[str] = field(default_factory=list)   # SDPA nodes with token queries only
    caches: list[CacheSite] = field(default_factory=list)
    densify_at: dict[str, str] = field(default_factory=dict)   # "consumer:value" -> cache site name
    densify_reasons: dict[str, str] = field(default_factory=dict)  # "consumer:value" -> why
    densify_sources: dict[str, str] = field(default_factory=dict)  # "consumer:value" -> the consumer's model code
    side_inputs: list[SideInput] = field(default_factory=list)
    output_leaf: int | None = None     # which flat output is the latent-shaped prediction
    output_rows: tuple[int, int] | None = None  # token latents: the prediction's image rows in a joint output
    counts: dict[str, int] = field(default_factory=dict)
    fused_projections: list = field(default_factory=list)  # FusedProjection (passes/fuse_projection.py)
    recognised_attention: list = field(default_factory=list)  # RecognisedAttention (passes/attention_pattern.py)
    joined_pieces: list[str] = field(default_factory=list)  # piecewise computations joined (passes/token_chunks.py)
    reordered_rows: list[str] = field(default_factory=list)  # buffers laid out image first (passes/sample_offsets.py)
    token_batched_attention: list[str] = field(default_factory=list)  # SDPA nodes with tokens on a batch axis
    side_sources: list[str] = field(default_factory=list)  # nodes whose outputs are gathered (passes/side_sources.py)
    reading: dict = field(default_factory=dict)  # the _Analyzer settings and latent reading that found this


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _shape(node) -> tuple[int, ...]:
    return tuple(int(s) for s in _val(node).shape)


def _is_tensor(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(_val(node), torch.Tensor)


def _op_name(node: fx.Node) -> str:
    return str(node.target)


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", node.target)


def _arg(node: fx.Node, index: int, name: str, default=None):
    """Argument ``index`` of ``node``, passed positionally or as keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


_VIEWS = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten}
# operators whose output may share storage with their input (an in-place write into it writes the input)
_ALIASING = _VIEWS | {aten.slice, aten.select, aten.narrow, aten.as_strided, aten.permute, aten.transpose, aten.t,
                      aten.expand, aten.unsqueeze, aten.squeeze, aten.diagonal, aten.unfold, aten.split,
                      aten.chunk, aten.unbind, aten.alias, aten.detach, aten.view_as_real, aten.view_as_complex,
                      aten.movedim, aten.swapaxes, aten.split_with_sizes, aten.contiguous, aten.to, aten.type_as}
SAMPLE_OFFSETS_REASON = "ras_sample_offsets"  # gm.meta: why passes/sample_offsets.py left per-sample offsets
_SAME_SHAPE = {aten.to, aten._to_copy, aten.contiguous, aten.dropout, aten.alias, aten.detach, aten.type_as,
               aten.clone, aten.lift_fresh_copy}
_REDUCTIONS = {aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std, aten.prod, aten.logsumexp,
               aten.norm, aten.linalg_vector_norm, aten.var_mean, aten.std_mean}
_SOFTMAX = {aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax}
# normalisations with statistics over the spatial axes (GroupNorm / InstanceNorm / BatchNorm on a
# [B, C, *spatial] map): they mix positions, but in the grid phase (before the token source) every
# value is computed on the full latent, so the spatial atoms pass through unchanged
_GRID_NORMS = {aten.group_norm, aten.instance_norm, aten.batch_norm}
_SKIPPED = {aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size}


def _readers(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that compute something (not the graph's metadata assertions)."""
    return [u for u in node.users if not (u.op == "call_function" and _packet(u) in _SKIPPED)]


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _map_dim_through_view(in_shape, out_shape, dim) -> int | None:
    """Output dim that is exactly input ``dim`` after a row-major view, if any."""
    before = prod(in_shape[:dim])
    running = 1
    for j, size in enumerate(out_shape):
        if running == before and size == in_shape[dim]:
            return j
        running *= size
    return None


def _regroup_batch_through_view(in_shape, out_shape, batch_dim: int, group: int, batch_size: int,
                                token_dim: int) -> tuple[int, int] | None:
    """Where the batch axis goes when a view folds axes into it or splits it (the axis
    keeps samples outermost: sample ``b`` owns ``group`` consecutive rows), as
    ``(out_dim, out_group)``; None if the view mixes samples with the token axis.

    Folding ``[B, H, ...] -> [B * H, ...]`` multiplies the group by ``H``; splitting
    ``[B * H, ...] -> [B, H, ...]`` (or into ``[B * H1, H2, ...]``) divides it."""
    before = prod(in_shape[:batch_dim])
    running = 1
    for j, size in enumerate(out_shape):
        if running == before:
            # fold: input axes batch_dim .. end-1 become output axis j
            merged = in_shape[batch_dim]
            for end in range(batch_dim + 1, len(in_shape)):
                if end == token_dim or merged >= size:
                    break
                merged *= in_shape[end]
                if merged == size:
                    return j, group * (merged // in_shape[batch_dim])
            # fold with the outer factor of the next axis: [.., B, H * d] -> [.., B * H, d] in one view
            # (nn.MultiheadAttention's ``q.view(L, B * heads, head_dim)``)
            nxt = batch_dim + 1
            if size % in_shape[batch_dim] == 0 and nxt < len(in_shape) and nxt != token_dim:
                f = size // in_shape[batch_dim]
                if f > 1 and in_shape[nxt] % f == 0:
                    rest, acc = in_shape[nxt] // f, 1
                    for s in out_shape[j + 1:]:
                        if acc >= rest:
                            break
                        acc *= s
                    if acc == rest:
                        return j, group * f
            # split: input axis batch_dim becomes output axes j, j+1, ... with samples in axis j
            if in_shape[batch_dim] % size == 0 and size % batch_size == 0 and size != in_shape[batch_dim]:
                return j, size // batch_size
            return None
        running *= size
        if running > before:
            return None
    return None


class _NotThisReading(Exception):
    """A relaxed reading that does not apply to this graph (it would repeat another reading)."""


class _Analyzer:
    def __init__(self, gm: fx.GraphModule, latent: fx.Node, tubes: bool = False, lead_tube: bool = False,
                 tube_axes: bool = True, grids: bool = True, side_sources: dict | None = None):
        self.gm = gm
        self.side_sources = side_sources or {}  # node name -> TokenLayout: gathered where computed
        self.grids = grids  # follow token grids (passes/token_grid.py) instead of densifying where one is made
        self.tubes = tubes  # the relaxed reading: grid axes folded into the batch are tubes (latent_grid)
        self.tube_axes = tube_axes  # False (RASPolicy.tubes="never"): the relaxed reading folds token axes only
        self.lead_tube = lead_tube  # and the leading grid axis of a video token sequence is one (latent_grid)
        self.relaxed_used = False  # the relaxed reading found tubes or folded the token axis
        self.latent = latent
        self.grid_values: dict[fx.Node, lg.GridValue] = {}
        self.grid_stops: list[fx.Node] = []  # consumers of the latent's grid that no grid rule follows
        self.batch_regrouped: list[fx.Node] = []  # grid-phase slices / cats along the batch axis
        self.grid_joins: list[fx.Node] = []  # grid-phase cats along a latent axis that holds positions
        self.layout: dict[fx.Node, object] = {}
        shape = _shape(latent)
        self.batch_size = shape[0]
        self.analysis: TokenAnalysis | None = None
        self.counts = {"token_wise": 0, "attention_cached_kv": 0, "cross_attention": 0,
                       "side_inputs_gathered": 0, "densified": 0, "untouched": 0}

    # -- errors -------------------------------------------------------------------------
    def refuse(self, node: fx.Node, reason: str):
        raise UnsupportedModelError(reason, node=node.name, op=_op_name(node), source=node_frame(node))

    # -- entry --------------------------------------------------------------------------
    def run(self, tokens_first: bool) -> TokenAnalysis:
        shape = _shape(self.latent)
        if len(shape) == 3 and tokens_first:
            n = shape[1]
            self.analysis = TokenAnalysis(n, shape[0], None, self.latent.name, self.latent.name)
            self.layout[self.latent] = TokenLayout(1, 0 if shape[0] > 1 else None, 0, n)
        elif len(shape) >= 3:
            self.grid_values[self.latent] = lg.latent_grid(shape)
        else:
            raise UnsupportedModelError(
                f"the latent input '{self.latent.name}' has shape {list(shape)}; expected [B, *channels-and-grid-axes] "
                "or token-shaped [B, N, C]. Pass latent_arg= to ras_compile to name the latent argument")
        pending, visited = [], set()  # side-branch sources (passes/side_sources.py) not laid out yet
        for node in self.gm.graph.nodes:
            if node.op == "call_function":
                self.visit(node)
            elif node.op == "output":
                self.visit_output(node)
            visited.add(node)
            if node.name in self.side_sources and node not in self.layout:
                pending.append(node)
            if self.analysis is not None and pending:
                for source in pending:
                    # dense here, gathered right after (a source fed by another source is token-wise already);
                    # a source computed before the token sequence exists (a timestep input) is laid out once
                    # it does, unless one of its readers was visited before that (it stays dense then)
                    if source not in self.layout and not any(u in visited for u in _readers(source)):
                        self.layout[source] = self.side_sources[source.name]
                        self.analysis.side_sources.append(source.name)
                pending = []
        if self.analysis is None:
            stops = ", ".join(f"'{n.name}' ({_op_name(n)})" for n in self.grid_stops[:3])
            raise UnsupportedModelError(
                f"no token sequence found: the latent '{self.latent.name}' never becomes a sequence of patch "
                "tokens (expected a patch convolution or patch views followed by a flatten)"
                + (f"; the latent's grid was followed up to {stops}, which no grid rule covers" if stops else "")
                + "".join(f"; the latent was concatenated with another tensor along a spatial axis at '{n.name}'"
                          f"{node_frame(n)} (a diptych or extra rows / frames): its patches are then not the "
                          "latent's patch grid" for n in self.grid_joins[:1]))
        a = self.analysis
        a.layouts = {n.name: v for n, v in self.layout.items()}
        a.counts = dict(self.counts)
        if not a.attention and not a.cross_attention:
            where = ""
            if a.densify_reasons:  # the stream ended at a densified value: say where, and why
                site, reason = next(iter(a.densify_reasons.items()))
                consumer, value = site.split(":", 1)
                where = (f": the token stream ends where '{value}' is densified before '{consumer}' ({reason})"
                         f"{a.densify_sources.get(site, '')}, and everything after it runs on the full tensor")
            raise UnsupportedModelError("the token stream reaches no scaled_dot_product_attention node" + where
                                        + "; nothing would be saved by RAS")
        return a

    # -- grid phase ---------------------------------------------------------------------
    def visit_grid(self, node: fx.Node, grid_args: list[fx.Node]) -> None:
        packet = _packet(node)
        src = grid_args[0]
        value = self.grid_values[src]
        out = None
        if not _is_tensor(node):
            return
        out_shape = _shape(node)
        if packet in _VIEWS:
            out = lg.regroup(value, out_shape)
        elif packet in (aten.permute,):
            out = lg.permute(value, [_norm_dim(d, len(out_shape)) for d in node.args[1]])
        elif packet in (aten.transpose, aten.swapaxes, aten.swapdims):
            a, b = (_norm_dim(d, len(out_shape)) for d in node.args[1:3])
            order = list(range(len(out_shape)))
            order[a], order[b] = order[b], order[a]
            out = lg.permute(value, order)
        elif packet in (aten.movedim, aten.moveaxis):
            out = lg.permute(value, _movedim_order(node))
        elif packet in (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution):
            args = list(node.args) + [None] * 7
            stride = args[3] if args[3] is not None else 1
            padding = args[4] if args[4] is not None else 0
            dilation = args[5] if args[5] is not None else 1
            kernel = list(_shape(node.args[1])[2:])
            if isinstance(padding, str):
                padding = [0] if padding == "valid" else [1]
            out = lg.patch_conv(value, out_shape, kernel, list(stride) if isinstance(stride, (list, tuple)) else [stride],
                                list(padding) if isinstance(padding, (list, tuple)) else [padding],
                                list(dilation) if isinstance(dilation, (list, tuple)) else [dilation])
            transposed = packet is aten.convolution and args[6]
            if out is None and not transposed:  # a stem convolution before the patch embedding
                out = lg.same_size_conv(value, _shape(src), out_shape)
            if out is None and not transposed and tuple(_shape(src)[2:]) == tuple(out_shape[2:]):
                self.refuse(node, "a convolution over the latent whose input channels hold positions inside the "
                                  "patches (after a pixel unshuffle or patch views): it mixes neighbouring patches "
                                  "into each position, so the latent cannot be split into tokens")
            if out is None:
                self.refuse(node, "a convolution over the latent that neither cuts patches (kernel == stride, or "
                                  "an overlapping kernel with one output position per stride cell: kernel 3, "
                                  "stride 2, padding 1) nor keeps its size (dilation, or an output size that is not "
                                  "the input's divided by the stride): the latent cannot be split into tokens")
        elif packet in _SAME_SHAPE or packet in _GRID_NORMS or (isinstance(node.target, torch._ops.OpOverload)
                                        and torch.Tag.pointwise in node.target.tags):
            if out_shape == _shape(src):
                out = value
        elif packet in (aten.linear,):
            out = lg.GridValue(value.dims[:-1] + (lg.fresh_atoms(out_shape[-1]),))
        elif packet in (aten.pad, aten.constant_pad_nd) and out_shape == _shape(src):
            out = value  # a pad by nothing (`F.pad(x, (0, (-W) % p, 0, (-H) % p))` on a latent the patch divides)
        elif packet is aten.cat:
            out = self.grid_cat(node, value)
        elif packet is aten.slice:
            out = self.grid_batch_slice(node, value)
        if out is None:  # the latent is used by something else; that value stays dense
            if self.analysis is None:
                self.grid_stops.append(node)
            return
        self.grid_values[node] = out
        found = lg.find_token_dim(out, _shape(self.latent), tubes=self.tubes and self.tube_axes,
                                  lead_tube=self.lead_tube)
        if found is not None and self.analysis is None:
            token_dim, grid = found
            batch = lg.find_batch_dim(out, grid)
            if batch is None and self.batch_size > 1:
                if self.batch_regrouped:
                    names = ", ".join(f"'{n.name}'" for n in self.batch_regrouped[:3])
                    self.refuse(node, f"the token sequence's batch is not the latent's batch of {self.batch_size}: "
                                      f"it was cut or joined along the batch axis before the patch embedding "
                                      f"({names}; a batch doubled or halved inside the forward); RAS keeps one "
                                      "active set per latent sample, so the token rows must be the latent's samples")
                self.refuse(node, "the batch axis of the token sequence could not be identified")
            batch_dim, group = batch if batch is not None else (None, 1)
            self.relaxed_used |= bool(grid.tube_axes)
            self.analysis = TokenAnalysis(grid.num_tokens, self.batch_size, grid, self.latent.name, node.name)
            rows = out_shape[token_dim]  # outer * N: tube rows kept in the sequence (lead_tube)
            if self.lead_tube and rows == grid.num_tokens:
                raise _NotThisReading  # no leading tube axis here: the other relaxed reading covers it
            self.layout[node] = TokenLayout(token_dim, batch_dim, 0, rows, group if batch_dim is not None else 1,
                                            outer=rows // grid.num_tokens)
            del self.grid_values[node]
        elif found is not None and found[1] == self.analysis.grid and not found[1].tube_axes:
            self.second_patchify(node, out, *found)

    def second_patchify(self, node: fx.Node, value: lg.GridValue, token_dim: int, grid: lg.TokenGrid) -> None:
        """Another patch sequence of the latent, cut like the token source (PixNerd's pixel patches
        ``F.unfold(x)`` beside its patch embedding): the same token at the same row, so it is gathered
        where it is made (a side source, passes/side_sources.py) and followed like the tokens."""
        batch = lg.find_batch_dim(value, grid)
        rows = _shape(node)[token_dim]
        if (batch is None and self.batch_size > 1) or rows != grid.num_tokens:
            return  # stays a dense value of the latent's grid
        batch_dim, group = batch if batch is not None else (None, 1)
        self.layout[node] = TokenLayout(token_dim, batch_dim, 0, rows, group if batch_dim is not None else 1)
        self.analysis.side_sources.append(node.name)
        del self.grid_values[node]

    def grid_batch_slice(self, node: fx.Node, value: lg.GridValue) -> lg.GridValue | None:
        """Rows of the batch axis taken before the token source (DiT's ``forward_with_cfg``:
        ``half = x[: len(x) // 2]``, then ``cat([half, half])``). Only the batch dimension
        changes; its rows become *batch slots* (``lg.batch_part_atoms``) until a concatenation
        along it gives back a dimension of the latent's batch size. Everything before the token
        source runs on the full latent, so which sample a slot holds does not matter to the
        rewrite: the token source's row ``i`` is gathered, cached and scattered as sample ``i``."""
        dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(value.dims))
        if not lg.is_batch_dim(value.dims[dim]):
            return None
        size = _shape(node)[dim]
        self.batch_regrouped.append(node)
        return lg.GridValue(value.dims[:dim] + (lg.batch_part_atoms(size, self.batch_size),) + value.dims[dim + 1:])

    def grid_cat(self, node: fx.Node, value: lg.GridValue) -> lg.GridValue | None:
        """The latent concatenated with other tensors (conditioning channels before the patch
        embedding): the other dimensions keep their atoms, the concatenated one becomes an ``x``
        atom. Everything before the token source runs on the full latent, so the other operands
        need no gather. Not followed: a concatenation along the batch axis, or of two latent-derived
        tensors whose other dimensions differ."""
        dim = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), len(value.dims))
        if lg.is_batch_dim(value.dims[dim]):
            # batch slots joined again (cat([half, half])): every operand must be latent-derived with the
            # same atoms elsewhere, so each row of the result is one latent sample's full grid
            rest = lambda v: v.dims[:dim] + v.dims[dim + 1:]  # noqa: E731
            if not all(t in self.grid_values and lg.is_batch_dim(self.grid_values[t].dims[dim])
                       and rest(self.grid_values[t]) == rest(value) for t in node.args[0]):
                return None
            size = _shape(node)[dim]
            self.batch_regrouped.append(node)
            return lg.GridValue(value.dims[:dim] + (lg.batch_part_atoms(size, self.batch_size),) + value.dims[dim + 1:])
        if any(axis == "b" for axis, _, _ in value.dims[dim]):
            return None
        rest = lambda v: v.dims[:dim] + v.dims[dim + 1:]  # noqa: E731
        if any(rest(self.grid_values[t]) != rest(value) for t in node.args[0] if t in self.grid_values):
            return None
        if any(axis.startswith("s") and not _channel_atom(value, axis) for axis, _, _ in value.dims[dim]):
            self.grid_joins.append(node)
        return lg.GridValue(value.dims[:dim] + (lg.concatenated_atoms(_shape(node)[dim]),) + value.dims[dim + 1:])

    # -- token phase --------------------------------------------------------------------
    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        found = []
        for arg in node.args:
            if isinstance(arg, (list, tuple)):
                found.extend(a for a in arg if isinstance(a, fx.Node))
            elif isinstance(arg, fx.Node):
                found.append(arg)
        found.extend(v for v in node.kwargs.values() if isinstance(v, fx.Node))
        return found

    def visit(self, node: fx.Node) -> None:
        inputs = self.tensor_inputs(node)
        if node.target is operator.getitem:
            src = node.args[0]
            if src in self.layout and isinstance(self.layout[src], list):
                item = self.layout[src][node.args[1]]
                if item is not None:
                    self.layout[node] = item
            elif src in self.grid_values:
                return
            return
        annotated = [a for a in inputs if a in self.layout and isinstance(self.layout[a], TokenLayout)]
        _check_densified_write(self, node)
        if not annotated:
            grid_args = [a for a in inputs if a in self.grid_values]
            if grid_args and self.analysis is None:
                self.visit_grid(node, grid_args)
            elif grid_args:  # the latent's grid read on after the token source: a second patchify?
                try:
                    self.visit_grid(node, grid_args)
                except UnsupportedModelError:
                    pass  # not a patch sequence: a dense value of the latent, as before
            self.counts["untouched"] += 1
            return
        packet = _packet(node)
        if packet in _SKIPPED:
            return
        handler = _TOKEN_RULES.get(packet)
        if handler is None and isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags:
            handler = _pointwise
        grid_inputs = [a for a in annotated if self.layout[a].grid]
        if handler is None and not grid_inputs and "flex_attention" in str(node.target):
            self.refuse(node, "flex_attention with a block mask or a score function: only plain flex_attention(q, "
                              "k, v) is read as attention (and becomes SDPA); with a mask_mod / score_mod the pass "
                              "cannot tell which cached keys each active query sees. Write the mask as an SDPA "
                              "attn_mask to run it token-sparse")
        if handler is None and not grid_inputs:
            self.refuse(node, "no token rule for this operator: the pass cannot tell whether it mixes image tokens")
        _check_write_target(self, node, annotated)
        if handler not in _FOLD_RULES and any(self.layout[a].fold for a in annotated):
            self.refuse(node, "this operator meets a tensor whose token axis is folded into the batch axis "
                              "(rows are sample x token); only views, token-wise arithmetic, projections, "
                              "norms and attention over another axis are followed there")
        result = token_grid.visit(self, node, handler, annotated) if grid_inputs else handler(self, node)
        if result is not None:
            self.layout[node] = result
            self.counts["token_wise"] += 1

    def visit_output(self, node: fx.Node) -> None:
        leaves = list(node.args[0]) if isinstance(node.args[0], (list, tuple)) else [node.args[0]]
        for leaf in leaves:
            if isinstance(leaf, fx.Node) and isinstance(self.layout.get(leaf), TokenLayout):
                self.densify(leaf, node, "a graph output carries image tokens")
        a = self.analysis
        if a is None:
            return
        def prediction_like(leaf) -> bool:
            shape = _shape(leaf)
            if a.grid is not None:
                return len(shape) == len(a.grid.latent_shape) and shape[0] == a.batch_size \
                    and all(shape[ax] == a.grid.latent_shape[ax] for ax in a.grid.grid_axes)
            return len(shape) == 3 and shape[0] == a.batch_size and (
                shape[1] == a.num_tokens or _joint_rows(self.layout.get(leaf), a.num_tokens, a.batch_size) is not None)

        nested = node.meta.get("ras_nested_outputs", frozenset())
        candidates = [i for i, leaf in enumerate(leaves) if _is_tensor(leaf) and prediction_like(leaf)]
        a.output_leaf = next((i for i in candidates if i not in nested), None)
        if a.output_leaf is not None and a.grid is None and _shape(leaves[a.output_leaf])[1] != a.num_tokens:
            # a token latent predicted inside the joint sequence (text rows, then the image rows)
            a.output_rows = _joint_rows(self.layout.get(leaves[a.output_leaf]), a.num_tokens, a.batch_size)
        if a.output_leaf is None:
            nested = [i for i in candidates if i in nested]
            other_batch = [_shape(leaf)[0] for leaf in leaves if _is_tensor(leaf) and a.grid is not None
                           and len(_shape(leaf)) == len(a.grid.latent_shape)
                           and all(_shape(leaf)[ax] == a.grid.latent_shape[ax] for ax in a.grid.grid_axes)]
            why = (f": the prediction has the latent's grid but a batch of {other_batch[0]}, not the latent's "
                   f"{a.batch_size} (guidance combined inside the forward); RAS scores each latent sample from "
                   "its own prediction, so return one prediction per latent sample (combine the guided halves "
                   "outside the model)" if other_batch else
                   ": the outputs are lists of per-block features (a ControlNet's residuals), not a prediction; "
                   "compile the transformer they feed instead" if nested else "")
            raise UnsupportedModelError(
                "no output has the latent's layout (the latent's grid axes, any channel count, or [B, N, C] for "
                f"token latents), so the next active tokens cannot be scored from the prediction{why}")

    # -- sites --------------------------------------------------------------------------
    def add_cache(self, node: fx.Node, kind: str, layout: TokenLayout, reader: fx.Node) -> str:
        a = self.analysis
        if layout.fold:
            self.refuse(node, "a value whose token axis is folded into the batch axis would have to be cached "
                              f"(for {reader.name}); only token-wise operators may follow such a fold")
        if layout.batch_dim is None and self.batch_size > 1 and len(layout.samples or ()) != 1:
            self.refuse(node, "the batch axis of this token tensor is merged with another axis; "
                              "rows cannot be cached per sample")
        name = f"ras_cache_{len(a.caches)}_{kind}"
        a.caches.append(CacheSite(name, node.name, kind, layout, _shape(node), _val(node).dtype, reader.name))
        return name

    def densify(self, value: fx.Node, consumer: fx.Node, reason: str) -> None:
        a = self.analysis
        a.densify_reasons[f"{consumer.name}:{value.name}"] = reason
        a.densify_sources[f"{consumer.name}:{value.name}"] = node_frame(consumer)
        existing = [c for c in a.caches if c.node == value.name and c.kind == "activation"]
        name = existing[0].name if existing else self.add_cache(value, "activation", self.layout[value], consumer)
        a.densify_at[f"{consumer.name}:{value.name}"] = name
        self.counts["densified"] += 1

    def side_input(self, node: fx.Node, arg_index: int, layout: TokenLayout, rank: int) -> None:
        self.analysis.side_inputs.append(SideInput(node.name, arg_index, layout, rank))
        self.counts["side_inputs_gathered"] += 1


def _joint_rows(layout, num_tokens: int, batch_size: int) -> tuple[int, int] | None:
    """The rows ``(start, stop)`` of axis 1 that hold the image tokens, in order, when ``layout`` is a
    ``[B, T + N, C]`` joint sequence of the latent's samples (a prediction returned with the text rows,
    as Qwen-Image 2.1 returns it; a batch of one keeps no batch axis in its layouts); None for any
    other layout."""
    batch_ok = isinstance(layout, TokenLayout) and (layout.batch_dim == 0 or (
        batch_size == 1 and layout.batch_dim is None))
    if not batch_ok or layout.token_dim != 1:
        return None
    if (layout.batch_group, layout.fold, layout.outer, layout.grid, layout.samples) != (1, 0, 1, (), None) \
            or layout.token_major or layout.offset + num_tokens > layout.length:
        return None
    return layout.offset, layout.offset + num_tokens


# ---- token rules: each returns the output layout (or a list for multi-output ops) ---------

def _channel_atom(value: lg.GridValue, axis: str) -> bool:
    """Whether latent axis ``axis`` is read as channels so far: it appears in dimension 1 (a
    ``[B, C, *spatial]`` latent's channels) and in no spatial dimension."""
    return (any(atom[0] == axis for atom in value.dims[1])
            and all(atom[0] != axis for dim in value.dims[2:] for atom in dim))


def _check_write_target(an: _Analyzer, node: fx.Node, annotated: list) -> None:
    """An in-place operator that writes image-token values into a tensor holding none (``buf[:, a:b] =
    x`` into a buffer the forward made) is refused: on a sparse step that tensor is gathered, so the
    write would land in the gathered copy while ``buf`` and its other views keep what they held. A
    write into the model's state (a buffer, through any views) is refused too: it outlives the call.
    A destination read by nothing else and no view of another tensor is safe (the write is seen only
    through the operator's output)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.arguments or not node.args:
        return
    alias = schema.arguments[0].alias_info
    dst = node.args[0]
    if alias is None or not alias.is_write or not isinstance(dst, fx.Node) or dst in annotated:
        return
    base = dst
    while base.op == "call_function" and _packet(base) in _ALIASING and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    if base.op == "placeholder":  # a buffer, parameter or input of the model: state seen after the call
        kind = {"BUFFER": "a buffer", "PARAMETER": "a parameter"}.get(base.meta.get("ras_input_kind"), "an input")
        an.refuse(node, f"an in-place write of image-token values into the model's state ('{base.name}', {kind}): "
                        "on a sparse step only the active tokens are computed, so the stored tokens would be "
                        "wrong; keep per-token features out of module state (return them instead)")
    if len(dst.users) == 1 and _packet(dst) not in _ALIASING:
        return
    per_sample, view = False, dst
    while view is not base:
        per_sample |= _packet(view) is aten.select and _norm_dim(view.args[1], len(_shape(view.args[0]))) == 0
        view = view.args[0]
    why = ("; here each sample's tokens are written at their own rows (`buf[i, a_i:b_i] = x[i]` in a per-sample "
           "loop, e.g. after captions of different lengths), which no single row layout of the active tokens "
           "serves: pad the captions to one length, or call the model per sample" if per_sample else "")
    if per_sample and an.gm.meta.get(SAMPLE_OFFSETS_REASON):  # why the rows were not reordered image first
        why += f" (the rows were not reordered image first: {an.gm.meta[SAMPLE_OFFSETS_REASON]})"
    an.refuse(node, "an in-place write of image-token values into a tensor that holds none (`buf[:, a:b] = x` "
                    "into a buffer made in the forward, or into one of its views): write the sequence with "
                    f"torch.cat instead{why}")


def _check_densified_write(an: _Analyzer, node: fx.Node) -> None:
    """An in-place write into a view of a densified value (``out = zeros_like(x); out[:, 1:] = ...``
    where the slice densified ``out``) writes into the full copy the sparse graph scatters for that
    view, while every other reader of ``out`` reads its active rows: the write would be lost. Refused."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.arguments or not node.args or not isinstance(node.args[0], fx.Node):
        return
    alias = schema.arguments[0].alias_info
    if alias is None or not alias.is_write or an.analysis is None:
        return
    view = node.args[0]
    while view.op == "call_function" and view.args and isinstance(view.args[0], fx.Node):
        if f"{view.name}:{view.args[0].name}" in an.analysis.densify_at:
            an.refuse(node, f"an in-place write into a view ('{view.name}') of a token tensor that is densified "
                            f"there ({an.analysis.densify_reasons[f'{view.name}:{view.args[0].name}']}): the other "
                            "readers of that tensor would not see the write; build the value with torch.cat "
                            "instead of writing into slices of it")
        if _packet(view) not in _ALIASING:
            return
        view = view.args[0]


def _layout(an: _Analyzer, node) -> TokenLayout | None:
    v = an.layout.get(node)
    return v if isinstance(v, TokenLayout) else None


def _align(layout: TokenLayout, from_rank: int, to_rank: int) -> TokenLayout:
    shift = to_rank - from_rank
    return layout.shifted(token_dim=layout.token_dim + shift,
                          batch_dim=None if layout.batch_dim is None else layout.batch_dim + shift)


def _pointwise(an: _Analyzer, node: fx.Node):
    out_rank = len(_shape(node))
    result = None
    operands = [(i, a) for i, a in enumerate(node.args) if _is_tensor(a)]
    for _, arg in operands:
        lay = _layout(an, arg)
        if lay is None:
            continue
        aligned = _align(lay, len(_shape(arg)), out_rank)
        if result is None:
            result = aligned
        elif aligned.axis != result.axis:
            an.refuse(node, "operands carry image tokens on different axes or at different offsets")
        elif result.batch_dim is None:
            result = aligned
    for i, arg in operands:
        if _layout(an, arg) is None:
            _side_operand(an, node, i, arg, result, out_rank)
    return result


def _side_operand(an, node, i: int, arg: fx.Node, lay: TokenLayout, rank: int) -> None:
    """Operand ``i`` carries no tokens but broadcasts against a result laid out as ``lay`` (of
    ``rank`` dimensions): a side input to gather where it has the token axis at full size."""
    shape = _shape(arg)
    lead = rank - len(shape)
    if lay.grid:  # each grid axis of the operand is 1 (broadcast) or full; gather_grid_tokens expands it
        sizes = [shape[d - lead] if d >= lead else 1 for d in lay.dims]
        if any(s != 1 for s in sizes):
            an.side_input(node, i, lay, rank)
        return
    pos = lay.token_dim - lead
    if pos >= 0 and shape[pos] != 1:
        if shape[pos] != lay.rows(an.batch_size):
            an.refuse(node, f"operand {i} has size {shape[pos]} on the token axis of length {lay.rows(an.batch_size)}")
        an.side_input(node, i, lay, rank)


def _same_shape(an, node):
    return _layout(an, node.args[0])


def _view(an: _Analyzer, node: fx.Node):
    src = node.args[0]
    lay = _layout(an, src)
    in_shape, out_shape = _shape(src), _shape(node)
    if lay.fold:
        return _unfold_view(an, node, lay, in_shape, out_shape)
    if an.tubes and _map_dim_through_view(in_shape, out_shape, lay.token_dim) is None:
        # the view moves rows between the token axis and its neighbours: read it from the shape with
        # the tube rows and the batch's per-sample rows split out as axes of their own (the same
        # row-major memory, so the same view)
        lay, in_shape = _split_rows(lay, in_shape, an.batch_size)
    token_dim = _map_dim_through_view(in_shape, out_shape, lay.token_dim)
    if token_dim is None and an.tubes:
        folded = (_fold_view(an, lay, in_shape, out_shape, False) or _fold_view(an, lay, in_shape, out_shape, True)
                  or _merge_view(an, lay, in_shape, out_shape))
        if folded is not None:
            return folded
    if token_dim is None:
        grid = token_grid.split_view(an, lay, in_shape, out_shape) if an.grids else None
        if grid is not None:
            return grid
        if lay.offset == 0 and lay.length == an.analysis.num_tokens:
            an.densify(src, node, "the token axis is split back into the latent grid (unpatchify, or a grid operator such as a convolution follows)")
            return None
        an.refuse(node, "a view that splits or merges a joint (text + image) token axis")
    batch_dim, group = None, 1
    if lay.batch_dim is not None:
        batch_dim, group = _map_dim_through_view(in_shape, out_shape, lay.batch_dim), lay.batch_group
        if batch_dim is None and an.batch_size > 1:
            regrouped = _regroup_batch_through_view(in_shape, out_shape, lay.batch_dim, lay.batch_group,
                                                    an.batch_size, lay.token_dim)
            if regrouped is None:
                an.refuse(node, "a view that merges the batch axis with the token axis, or splits it other "
                                "than into samples and a per-sample axis")
            batch_dim, group = regrouped
    return lay.shifted(token_dim=token_dim, batch_dim=batch_dim, batch_group=group)


def _split_rows(lay: TokenLayout, in_shape, batch_size: int) -> tuple[TokenLayout, tuple[int, ...]]:
    """The same tensor read with more axes: a token axis of ``outer`` blocks as ``[outer, N]``
    and a batch axis of ``batch_group`` rows per sample as ``[B, group]``."""
    shape, token_dim, batch_dim = list(in_shape), lay.token_dim, lay.batch_dim
    if lay.outer > 1:
        n = lay.length // lay.outer
        shape[token_dim:token_dim + 1] = [lay.outer, n]
        token_dim += 1
        if batch_dim is not None and batch_dim > lay.token_dim:
            batch_dim += 1
        lay = TokenLayout(token_dim, batch_dim, 0, n, lay.batch_group, samples=lay.samples)
    if batch_dim is not None and lay.batch_group > 1:
        shape[batch_dim:batch_dim + 1] = [batch_size, lay.batch_group]
        token_dim += token_dim > batch_dim
        lay = TokenLayout(token_dim, batch_dim, lay.offset, lay.length, 1, outer=lay.outer, samples=lay.samples)
    return lay, tuple(shape)


def _merge_view(an: _Analyzer, lay: TokenLayout, in_shape, out_shape) -> TokenLayout | None:
    """``[B, F, N, ...] -> [B, F * N, ...]``: per-sample axes in front of the token axis merged into
    it (per-frame rows joined back into one sequence over all frames). The result's rows are
    ``(o, token)``: ``outer`` blocks that each hold every image token (``TokenLayout.outer``), so
    row-wise operators, and attention over the whole sequence with every block's active rows as
    queries, stay exact. None if the view is not that."""
    td, bd = lay.token_dim, lay.batch_dim
    if lay.offset != 0 or lay.length != an.analysis.num_tokens or lay.batch_group != 1 or lay.outer != 1:
        return None
    for first in range(td - 1, -1, -1):
        if bd is not None and first <= bd < td:
            return None  # samples merged into the token axis
        size, before = prod(in_shape[first:td + 1]), prod(in_shape[:first])
        for j, out_size in enumerate(out_shape):
            if prod(out_shape[:j]) == before and out_size == size and size > lay.length:
                batch = None if bd is None else _map_dim_through_view(in_shape, out_shape, bd)
                if bd is not None and batch is None:
                    return None
                an.relaxed_used = True
                return TokenLayout(j, batch, 0, size, 1, outer=size // lay.length, samples=lay.samples)
    return None


def _start_dim(in_shape, out_shape, dim) -> int | None:
    """The output axis whose rows start where input axis ``dim`` starts (row-major), if any."""
    before, running = prod(in_shape[:dim]), 1
    for j, size in enumerate(out_shape):
        if running == before and size > 1:
            return j
        running *= size
    return None


def _fold_view(an: _Analyzer, lay: TokenLayout, in_shape, out_shape, token_major: bool) -> TokenLayout | None:
    """``[B, N, ...] -> [B * N * inner, ...]``: the samples and the image tokens behind them merged
    into one axis (the token axis folded into the batch axis); with ``token_major``
    ``[N, B, ...] -> [N * B * inner, ...]`` (sequence-first code, nn.MultiheadAttention's
    out-projection over ``L * B`` rows). Every row still belongs to one (sample, token); only
    row-wise operators may follow until a view splits it back. None if the view is not that."""
    n, batch = lay.length, an.batch_size
    outer, inner = (lay.token_dim, lay.batch_dim) if token_major else (lay.batch_dim, lay.token_dim)
    if lay.batch_dim is None or lay.batch_group != 1 or inner != outer + 1 \
            or lay.offset != 0 or n != an.analysis.num_tokens or lay.samples is not None:
        return None
    j = _start_dim(in_shape, out_shape, outer)
    if j is None or out_shape[j] % (batch * n):
        return None
    an.relaxed_used = True
    return TokenLayout(j, None, 0, n, 1, out_shape[j] // (batch * n), token_major=token_major)


def _unfold_view(an: _Analyzer, node: fx.Node, lay: TokenLayout, in_shape, out_shape) -> TokenLayout:
    """A view of a folded token axis: it stays folded (other axes merged into or split off its inner
    rows), or splits back into samples and tokens ``[B, N, ...]`` (``[N, B, ...]`` for a token-major fold)."""
    n, batch = lay.length, an.batch_size
    j = _start_dim(in_shape, out_shape, lay.token_dim)
    if j is not None and out_shape[j] % (batch * n) == 0:
        return TokenLayout(j, None, 0, n, 1, out_shape[j] // (batch * n), token_major=lay.token_major)
    first, second = (n, batch) if lay.token_major else (batch, n)
    if j is not None and out_shape[j] == first and j + 1 < len(out_shape) and out_shape[j + 1] == second:
        return TokenLayout(j, j + 1, 0, n) if lay.token_major else TokenLayout(j + 1, j, 0, n)
    an.refuse(node, "a view that splits a token axis folded into the batch axis other than back into "
                    "samples and tokens")


def _permute_like(an, node, order):
    lay = _layout(an, node.args[0])
    return lay.shifted(token_dim=order.index(lay.token_dim),
                       batch_dim=None if lay.batch_dim is None else order.index(lay.batch_dim))


def _permute(an, node):
    rank = len(_shape(node))
    return _permute_like(an, node, [_norm_dim(d, rank) for d in node.args[1]])


def _movedim_order(node) -> list[int]:
    """``movedim(x, source, destination)`` as a permute order: output dim ``i`` is input dim ``order[i]``."""
    rank = len(_shape(node))
    src, dst = node.args[1], node.args[2]
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src, dst = [_norm_dim(d, rank) for d in src], [_norm_dim(d, rank) for d in dst]
    order: list[int | None] = [None] * rank
    for s_, d_ in zip(src, dst):
        order[d_] = s_
    rest = iter(d for d in range(rank) if d not in src)
    return [o if o is not None else next(rest) for o in order]


def _movedim(an, node):
    return _permute_like(an, node, _movedim_order(node))


def _transpose(an, node):
    rank = len(_shape(node))
    if _packet(node) is aten.t:
        a, b = 0, rank - 1
    else:
        a, b = (_norm_dim(d, rank) for d in node.args[1:3])
    order = list(range(rank))
    order[a], order[b] = order[b], order[a]
    return _permute_like(an, node, order)


def _unsqueeze(an, node):
    lay = _layout(an, node.args[0])
    d = _norm_dim(node.args[1], len(_shape(node)))
    bump = lambda x: None if x is None else (x + 1 if x >= d else x)
    return lay.shifted(token_dim=bump(lay.token_dim), batch_dim=bump(lay.batch_dim))


def _squeeze(an, node):
    lay = _layout(an, node.args[0])
    in_shape = _shape(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else [i for i, s in enumerate(in_shape) if s == 1]
    dims = [dims] if isinstance(dims, int) else dims
    removed = {_norm_dim(d, len(in_shape)) for d in dims if in_shape[_norm_dim(d, len(in_shape))] == 1}
    drop = lambda x: None if x is None or x in removed else x - sum(1 for r in removed if r < x)
    return lay.shifted(token_dim=drop(lay.token_dim), batch_dim=drop(lay.batch_dim))


def _expand(an, node):
    src = node.args[0]
    lay = _align(_layout(an, src), len(_shape(src)), len(_shape(node)))
    if lay.batch_dim is not None and _shape(node)[lay.batch_dim] != _shape(src)[lay.batch_dim - len(_shape(node))
                                                                                + len(_shape(src))]:
        rows = _sample_rows(an, node, lay)  # one sample's tokens broadcast over a batch
        return lay.for_samples(rows * _shape(node)[lay.batch_dim], an.batch_size)
    return lay


def _complex_view(an, node):
    """view_as_complex / view_as_real only fold or unfold the trailing (real, imag) axis."""
    lay = _layout(an, node.args[0])
    if lay.token_dim >= min(len(_shape(node)), len(_shape(node.args[0]))) - (_packet(node) is aten.view_as_complex):
        an.refuse(node, "a complex view over the token axis")
    return lay


def _repeat(an, node):
    """Tiling along other axes (grouped-query K/V heads): tiling the token axis would duplicate tokens."""
    src = node.args[0]
    lay = _align(_layout(an, src), len(_shape(src)), len(_shape(node)))
    if _packet(node) is aten.repeat:
        if node.args[1][lay.token_dim] != 1:
            an.refuse(node, "a repeat along the token axis")
        if lay.batch_dim is not None and node.args[1][lay.batch_dim] != 1:  # the batch tiled: x.repeat(2, 1, 1)
            return lay.for_samples(_sample_rows(an, node, lay) * node.args[1][lay.batch_dim], an.batch_size)
    else:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if dim is None or _norm_dim(dim, len(_shape(src))) == lay.token_dim:
            an.refuse(node, "a repeat_interleave along (or flattening) the token axis")
        if lay.batch_dim is not None and _norm_dim(dim, len(_shape(src))) == lay.batch_dim:
            repeats = node.args[1]
            if not isinstance(repeats, int):
                an.refuse(node, "a repeat_interleave of the batch axis by per-sample counts")
            return lay.for_samples(tuple(r for r in _sample_rows(an, node, lay) for _ in range(repeats)),
                                   an.batch_size)
    return lay


def _scan(an, node):
    """``cumsum`` / ``cumprod`` / ``logcumsumexp`` along an axis: token-wise along another axis (the
    channels); along the token axis a running total over tokens (a linear recurrence, Mamba-style),
    which runs on the full input."""
    lay = _layout(an, node.args[0])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if _norm_dim(dim, len(_shape(node.args[0]))) in lay.dims:
        an.densify(node.args[0], node, "a cumulative sum / product over the token axis")
        return None
    return lay


def _roll(an, node):
    """``torch.roll`` of axes other than the token axis is token-wise; rolling the token axis (a token
    shift) or the flattened tensor (``dims=[]``) moves values between tokens: the full input."""
    lay = _layout(an, node.args[0])
    rank = len(_shape(node.args[0]))
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims", [])
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims or any(_norm_dim(d, rank) in lay.dims for d in dims):
        an.densify(node.args[0], node, "a roll along the token axis (or of the flattened tensor)")
        return None
    return lay


def _flip(an, node):
    """``torch.flip`` of other axes is token-wise; flipping the token axis reverses the tokens (a
    bidirectional scan's backward pass): the full input."""
    lay = _layout(an, node.args[0])
    rank = len(_shape(node.args[0]))
    if any(_norm_dim(d, rank) in lay.dims for d in node.args[1]):
        an.densify(node.args[0], node, "a flip of the token axis")
        return None
    return lay


def _argsort(an, node):
    """``argsort`` along another axis is token-wise; along the token axis it ranks tokens: the full input."""
    lay = _layout(an, node.args[0])
    rank = len(_shape(node.args[0]))
    if _norm_dim(_named_arg(node, "dim", -1), rank) in lay.dims:
        an.densify(node.args[0], node, "an argsort over the token axis")
        return None
    return lay


_POOLS = {aten.avg_pool1d: 1, aten.avg_pool2d: 2, aten.avg_pool3d: 3, aten.max_pool1d: 1, aten.max_pool2d: 2,
          aten.max_pool3d: 3, aten.adaptive_avg_pool1d: 1, aten.adaptive_avg_pool2d: 2, aten.adaptive_avg_pool3d: 3,
          aten._adaptive_avg_pool2d: 2, aten._adaptive_avg_pool3d: 3}


def _pool(an, node):
    """A pooling over the trailing (spatial) axes: token-wise when the tokens are on a leading axis (the
    channels of the pool, a 1D pool of each token's features); pooling the token axis mixes tokens."""
    lay = _layout(an, node.args[0])
    rank = len(_shape(node.args[0]))
    if any(d >= rank - _POOLS[_packet(node)] for d in lay.dims):
        an.densify(node.args[0], node, "a pooling over the token axis")
        return None
    return lay


def _expand_as(an, node):
    """``x.expand_as(y)``: ``x``'s layout where ``x`` has tokens (``F.normalize``'s norm), else ``y``'s,
    whose shape (active rows included) the output takes."""
    src, other = node.args[0], node.args[1]
    lay = _layout(an, src)
    if lay is not None:
        return _align(lay, len(_shape(src)), len(_shape(node)))
    return _layout(an, other)


def _einsum(an, node):
    """``einsum(equation, operands)`` read by its index letters: the tokens' letter (the same in every
    operand that carries them) kept in the output is token-wise (a projection ``"bnd,de->bne"``, a
    per-head product over another axis); summed away it mixes the tokens (``"bnd,mn->bmd"``, linear
    attention's ``K^T V``): densified. Attention itself was rewritten as SDPA before the analysis."""
    equation, operands = node.args[0], list(node.args[1])
    if "..." in equation or "->" not in equation:
        an.refuse(node, "an einsum over image tokens with an ellipsis or an implicit output")
    inputs, output = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    letters, laid = set(), []
    for term, operand in zip(terms, operands):
        lay = _layout(an, operand) if isinstance(operand, fx.Node) else None
        if lay is None:
            continue
        if lay.grid or lay.fold or len(term) != len(_shape(operand)):
            an.refuse(node, "an einsum over a token grid or folded token rows")
        letters.add(term[lay.token_dim])
        laid.append((term, operand, lay))
    if len(letters) > 1:
        an.refuse(node, "an einsum between two image-token tensors (two token axes) that is not part of an "
                        "attention the pass recognises; write it with scaled_dot_product_attention")
    letter = letters.pop()
    if letter not in output:
        for _term, operand, _lay in laid:
            an.densify(operand, node, "an einsum that sums over the token axis (it mixes image tokens)")
        return None
    for term, operand in zip(terms, operands):
        if isinstance(operand, fx.Node) and _layout(an, operand) is None and letter in term:
            if _shape(operand)[term.index(letter)] != 1:
                an.refuse(node, "an einsum operand indexed by the tokens' letter that does not descend from the "
                                "latent (per-token weights)")
    term, _operand, lay = laid[0]
    batch = term[lay.batch_dim] if lay.batch_dim is not None else None
    if batch is not None and batch not in output and an.batch_size > 1:
        an.refuse(node, "an einsum that sums over the batch axis mixes samples, whose active tokens differ")
    return lay.shifted(token_dim=output.index(letter),
                       batch_dim=output.index(batch) if batch is not None and batch in output else None)


def _pad(an, node):
    """Padding other axes is token-wise; padding the token axis changes it, so it runs on the full input."""
    lay = _layout(an, node.args[0])
    rank = len(_shape(node.args[0]))
    amounts = list(node.args[1])
    padded = {rank - 1 - i // 2 for i, a in enumerate(amounts) if a != 0}
    if lay.token_dim not in padded:
        return lay
    pair = 2 * (rank - 1 - lay.token_dim)
    before, after = (amounts + [0, 0])[pair:pair + 2]
    constant = _packet(node) is aten.constant_pad_nd or _named_arg(node, "mode", "constant") == "constant"
    tail = lay.length - lay.offset - an.analysis.num_tokens
    if constant and not lay.fold and lay.outer == 1 and -before <= lay.offset and -after <= tail:
        # rows of a constant added (or context rows cropped) before or after the image rows: the
        # same amounts pad the sparse sequence
        return lay.shifted(offset=lay.offset + before, length=lay.length + before + after)
    an.densify(node.args[0], node, "padding along the token axis")
    return None


def _linear(an, node):
    lay = _layout(an, node.args[0])
    if any(_layout(an, a) is not None for a in node.args[1:] if isinstance(a, fx.Node)):
        an.refuse(node, "a weight operand carries image tokens")
    if len(_shape(node.args[0])) - 1 in lay.dims:  # an MLP-Mixer token MLP: on the full input
        an.densify(node.args[0], node, "a projection over the token axis (it mixes image tokens)")
        return None
    if lay.batch_dim == len(_shape(node.args[0])) - 1 and an.batch_size > 1:
        an.refuse(node, "a projection over the batch axis mixes samples, whose active tokens differ")
    return lay


def _matmul(an, node):
    """``a @ b``: token-wise when tokens index rows of ``a``, columns of ``b`` or a batch axis;
    mixing when they are the contracted axis (linear attention's K^T V), which is densified."""
    a, b = node.args[0], node.args[1]
    out_rank = len(_shape(node))
    roles = []
    for operand, contracted, free in ((a, -1, -2), (b, -2, -1)):
        lay = _layout(an, operand)
        if lay is None:
            continue
        rank = len(_shape(operand))
        if rank < 2:
            an.refuse(node, "a vector product with image tokens")
        if lay.token_dim == rank + contracted:
            roles.append(("contracted", operand, lay))
        elif lay.token_dim == rank + free:
            roles.append(("free", operand, lay.shifted(token_dim=out_rank + free,
                                                    batch_dim=_shift_batch(lay, rank, out_rank))))
        else:
            roles.append(("batch", operand, _align(lay, rank, out_rank)))
    kinds = {r[0] for r in roles}
    if kinds == {"contracted"}:
        for _, operand, _ in roles:
            an.densify(operand, node, "a matrix product contracts over the token axis")
        return None
    if "contracted" in kinds or [r[0] for r in roles].count("free") > 1:
        an.refuse(node, "a matrix product between two image-token tensors whose result has two token axes, "
                        "and not part of an attention the pass recognises (softmax over the last axis of q k^T, "
                        "times v, with only scales, masks and casts between: see docs/how-it-works.md); "
                        "write it with scaled_dot_product_attention")
    outs = {r[2].axis for r in roles}
    if len(outs) > 1:
        an.refuse(node, "matrix product operands carry image tokens on different axes")
    return roles[0][2]


def _shift_batch(lay, rank, out_rank):
    return None if lay.batch_dim is None else lay.batch_dim + out_rank - rank


def _layer_norm(an, node):
    lay = _layout(an, node.args[0])
    rank = len(_shape(node.args[0]))
    if lay.dims[-1] >= rank - len(node.args[1]):
        an.refuse(node, "a normalisation over the token axis mixes image tokens")
    return lay


def _rms_norm(an, node):
    return _layer_norm(an, node)


def _batch_norm(an, node):
    """``batch_norm(x, weight, bias, running_mean, running_var, training, ...)`` with running statistics
    in eval mode is a per-channel affine map of axis 1: token-wise unless the tokens are the channels.
    With batch statistics (training mode, or no running statistics) it averages over every other
    axis, the tokens among them: densified."""
    lay = _layout(an, node.args[0])
    fixed = not _arg(node, 5, "training", False) and isinstance(_arg(node, 3, "running_mean"), fx.Node) \
        and isinstance(_arg(node, 4, "running_var"), fx.Node)
    if fixed and 1 not in lay.dims:
        return lay
    an.densify(node.args[0], node, "a batch norm with batch statistics (training mode) or over the token axis")
    return None


def _group_norm(an, node):
    """GroupNorm / InstanceNorm take statistics over the spatial axes (2, ...) and a group's channels:
    token-wise only where the tokens sit on the batch axis (``[B * N, C, F]``); otherwise densified."""
    lay = _layout(an, node.args[0])
    if lay.token_dim == 0 and lay.batch_dim is None:
        return lay
    an.densify(node.args[0], node, "a group / instance norm (statistics over the token axis)")
    return None


def _glu(an, node):
    """``glu(x, dim)``: one half of axis ``dim`` gates the other; token-wise unless ``dim`` holds tokens."""
    lay = _layout(an, node.args[0])
    if _norm_dim(_arg(node, 1, "dim", -1), len(_shape(node.args[0]))) in lay.dims:
        an.densify(node.args[0], node, "a GLU along the token axis")
        return None
    return lay


def _outer(an, node):
    """``torch.outer(a, b)`` is ``a[:, None] * b[None]``: rows follow ``a``, columns ``b`` (Wan's
    sinusoidal embedding of a flattened per-token timestep)."""
    la, lb = _layout(an, node.args[0]), _layout(an, node.args[1])
    if la is not None and lb is not None:
        an.refuse(node, "an outer product of two token vectors (a table over pairs of tokens)")
    return la if la is not None else lb.shifted(token_dim=1)


def _fresh(an, node):
    """``x.new_zeros(size)`` and kin read only ``x``'s dtype and device: a constant of a static size
    (Wan's ``u.new_zeros(1, seq_len - n, dim)`` padding), a side input where it meets the stream."""
    return None


def reduced_dims(node: fx.Node) -> set[int]:
    """The axes a reduction node reduces, read by the name ``dim`` in its schema: where it sits moves
    between overloads (``sum(x, dim)``, ``linalg_vector_norm(x, ord, dim)``, ``norm(x, p, dim)``); an
    overload without one, ``dim=None`` or ``dim=[]`` reduces every axis."""
    rank = len(_shape(node.args[0]))
    schema = getattr(node.target, "_schema", None)
    if schema is None or "dim" not in [a.name for a in schema.arguments]:
        return set(range(rank))
    dims = _named_arg(node, "dim", None)
    if dims is None or dims == []:
        return set(range(rank))
    return {_norm_dim(d, rank) for d in ([dims] if isinstance(dims, int) else dims)}


def _named_arg(node: fx.Node, name: str, default):
    """Argument ``name`` of ``node``, positional or keyword, found by its place in the op's schema."""
    names = [a.name for a in node.target._schema.arguments]
    if name in names and names.index(name) < len(node.args):
        return node.args[names.index(name)]
    return node.kwargs.get(name, default)


def _reduction(an, node):
    lay = _layout(an, node.args[0])
    rank = len(_shape(node.args[0]))
    dims = reduced_dims(node)
    if lay.token_dim in dims:
        an.densify(node.args[0], node, "a reduction (mean/sum/norm/...) over the token axis")
        return None
    keep = len(_shape(node)) == rank
    if keep:
        return lay
    drop = lambda x: None if x is None or x in dims else x - sum(1 for r in dims if r < x)
    return lay.shifted(token_dim=drop(lay.token_dim), batch_dim=drop(lay.batch_dim))


def _softmax(an, node):
    lay = _layout(an, node.args[0])
    if _norm_dim(node.args[1], len(_shape(node))) == lay.token_dim:
        an.densify(node.args[0], node, "a softmax over the token axis")
        return None
    return lay


def _pointwise_convolution(node: fx.Node) -> bool:
    """A convolution with a 1x1 kernel, stride 1 and no padding (not transposed): a projection of
    each position's channels, whatever the groups."""
    weight = node.args[1]
    if not all(s == 1 for s in _shape(weight)[2:]):
        return False
    if _packet(node) is aten.convolution:
        args = list(node.args) + [None] * 9
        stride, padding, transposed = args[3], args[4], args[6]
        if transposed:
            return False
    elif _packet(node) in (aten.conv1d, aten.conv2d, aten.conv3d):
        stride, padding = _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0)
    else:
        return False
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else [v]  # noqa: E731
    if isinstance(padding, str):
        padding = [0] if padding in ("valid", "same") else [1]
    return all(s == 1 for s in as_list(stride)) and all(p == 0 for p in as_list(padding))


def _convolution(an, node):
    """A convolution whose input carries tokens mixes neighbouring tokens, and a transposed one is an
    unpatchify (ACE-Step's ConvTranspose1d): either way, run it on the full input. Tokens on the
    convolution's batch axis (a temporal convolution over the frames of each token, ``[B * N, C, F]``)
    are token-wise, and so is a 1x1 convolution with tokens on its spatial axes (a projection of each
    position's channels: Sana's inverted-bottleneck feed-forward on the token grid, a Conv1d(C, C, 1))."""
    lay = _layout(an, node.args[0])
    if any(_layout(an, a) is not None for a in node.args[1:] if isinstance(a, fx.Node)):
        an.refuse(node, "a convolution whose weight carries image tokens")
    if lay.token_dim == 0 and lay.batch_dim is None:
        return lay
    if lay.batch_dim in (0, None) and lay.batch_group == 1 and lay.token_dim >= 2 and _pointwise_convolution(node):
        return lay
    an.densify(node.args[0], node, "a convolution over the token axis")
    return None


def _slice_bounds(length, start, end):
    start = 0 if start is None else (start + length if start < 0 else start)
    end = length if end is None else (end + length if end < 0 else end)
    return max(0, min(start, length)), max(0, min(end, length))


def _piece_layout(an, node, lay: TokenLayout, start: int, end: int) -> TokenLayout | None:
    """Layout of rows [start, end) of the token axis (None: no image rows in it)."""
    if lay.fold:
        an.refuse(node, "a slice of a token axis folded into the batch axis")
    if lay.outer > 1:
        n = lay.length // lay.outer
        if start % n or end % n or end <= start:
            an.refuse(node, "a slice of a token axis that holds the image tokens of several frames (tube rows) "
                            "other than whole blocks of them")
        blocks = (end - start) // n  # whole blocks: each holds the same active rows
        return dataclasses.replace(lay, length=end - start, outer=blocks)
    lo, hi = lay.offset, lay.offset + an.analysis.num_tokens
    if end <= lo or start >= hi:
        return None
    if start <= lo and end >= hi:
        return lay.shifted(offset=lo - start, length=end - start)
    an.refuse(node, "a slice that cuts through the image tokens of the token axis")


def _slice(an, node):
    lay = _layout(an, node.args[0])
    rank = len(_shape(node.args[0]))
    args = list(node.args) + [None] * 4
    dim = _norm_dim(args[1] if args[1] is not None else 0, rank)
    if dim == lay.batch_dim and tuple(_shape(node)) != tuple(_shape(node.args[0])):
        rows = _sample_rows(an, node, lay)  # x[i:i + 1] of a per-sample loop, x[:B] of a doubled batch
        start, end = _slice_bounds(len(rows), args[2], args[3])
        return lay.for_samples(rows[start:end:args[4] or 1], an.batch_size)
    if dim != lay.token_dim:
        return lay
    if args[4] not in (None, 1):
        an.refuse(node, "a strided slice along the token axis")
    start, end = _slice_bounds(lay.length, args[2], args[3])
    return _piece_layout(an, node, lay, start, end)


def _split(an, node):
    lay = _layout(an, node.args[0])
    rank = len(_shape(node.args[0]))
    dim_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = _norm_dim(dim_arg, rank)
    outs = node.meta["val"]
    if dim == lay.batch_dim and len(outs) > 1:  # the halves of a doubled batch, chunk(2)
        rows, start, pieces = _sample_rows(an, node, lay), 0, []
        for out in outs:
            size = int(out.shape[dim])
            pieces.append(lay.for_samples(rows[start:start + size], an.batch_size))
            start += size
        return pieces
    if dim != lay.token_dim:
        return [lay for _ in outs]
    sizes = [int(v.shape[dim]) for v in outs]
    pieces, start = [], 0
    for size in sizes:
        pieces.append(_piece_layout(an, node, lay, start, start + size))
        start += size
    return pieces


def _unbind(an, node):
    lay = _layout(an, node.args[0])
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(_shape(node.args[0])))
    if dim == lay.token_dim:
        an.refuse(node, "unbind along the token axis")
    drop = lambda x: None if x is None else (x - 1 if x > dim else x)
    if dim == lay.batch_dim:  # `for u in x`: each piece is one sample's, with no batch axis
        rows = _sample_rows(an, node, lay)
        return [lay.shifted(token_dim=drop(lay.token_dim)).for_samples((r,), an.batch_size, batch_dim=None)
                for r in rows]
    return [lay.shifted(token_dim=drop(lay.token_dim), batch_dim=drop(lay.batch_dim)) for _ in node.meta["val"]]


def _select(an, node):
    """``x[:, i]`` on an axis other than the token and batch axes (``qkv[0]`` of a packed projection)."""
    lay = _layout(an, node.args[0])
    dim = _norm_dim(node.args[1], len(_shape(node.args[0])))
    if dim == lay.token_dim:
        if lay.fold or lay.outer > 1 or lay.grid:
            an.refuse(node, "select of one row of the token axis")
        index = node.args[2] % lay.length
        if lay.offset <= index < lay.offset + an.analysis.num_tokens:  # one image token's row: the full input
            an.densify(node.args[0], node, "a select of one image token's row")
        return None  # a context row (a class or label token): always computed, a value without tokens
    drop = lambda x: None if x is None else (x - 1 if x > dim else x)
    if dim == lay.batch_dim:  # x[i] of a per-sample loop: one sample's tokens, no batch axis
        rows = _sample_rows(an, node, lay)
        return lay.shifted(token_dim=drop(lay.token_dim)).for_samples((rows[node.args[2]],), an.batch_size,
                                                                       batch_dim=None)
    return lay.shifted(token_dim=drop(lay.token_dim), batch_dim=drop(lay.batch_dim))


def _sample_rows(an, node, lay: TokenLayout) -> tuple[int, ...]:
    """The latent sample of each batch row of a token tensor that an operator is about to take apart
    or put together along its batch axis (refused where the axis is not one row per sample)."""
    if lay.fold or lay.batch_group != 1:
        an.refuse(node, "rows of a batch axis that also holds another axis (attention heads folded into the "
                        "batch, or the token axis) taken apart or put together")
    return lay.sample_rows(an.batch_size)


def _joined_samples(an, node, pieces: list, tensors: list) -> tuple[int, ...]:
    """The samples of the batch rows of ``cat`` / ``stack`` of token tensors along the batch axis: the
    pieces' samples in order. Every operand must carry the image tokens the same way."""
    if len(pieces) != len(tensors):
        an.refuse(node, "a concatenation along the batch axis of image tokens with a tensor that holds none "
                        "(those rows would have no active tokens)")
    plain = [dataclasses.replace(p, samples=None) for p in pieces]
    if any(p.axis != plain[0].axis or p.batch_dim != plain[0].batch_dim for p in plain):
        an.refuse(node, "samples joined along the batch axis carry their image tokens at other rows (e.g. "
                        "captions of different lengths before the image in a per-sample loop): pad them to one "
                        "length, or call the model per sample")
    return tuple(r for p in pieces for r in _sample_rows(an, node, p))


def _cat(an, node):
    tensors = node.args[0]
    rank = len(_shape(node))
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), rank)
    annotated = [(i, t) for i, t in enumerate(tensors) if _layout(an, t) is not None]
    first = _layout(an, annotated[0][1])
    if dim == first.token_dim:
        if first.fold:
            an.refuse(node, "a concatenation along a token axis folded into the batch axis")
        if first.outer > 1:
            an.refuse(node, "a concatenation along a token axis that holds the image tokens of several frames "
                            "(tube rows)")
        if len(annotated) > 1:
            if len(annotated) == len(tensors) and all(_layout(an, t) == first for _, t in annotated) \
                    and first.offset == 0 and first.length == an.analysis.num_tokens and not first.grid:
                # image tokens only, twice or more (a decoder attending to [its tokens, the encoder's]):
                # blocks of the same tokens, each holding the same active rows
                return dataclasses.replace(first, length=first.length * len(tensors), outer=len(tensors))
            an.refuse(node, "two image-token sequences concatenated on the token axis")
        index = annotated[0][0]
        before = sum(_shape(t)[dim] for t in tensors[:index])
        return first.shifted(offset=first.offset + before, length=_shape(node)[dim])
    if first.batch_dim is not None and dim == first.batch_dim:  # guidance halves or per-sample pieces joined
        samples = _joined_samples(an, node, [_layout(an, t) for _, t in annotated], tensors)
        return first.for_samples(samples, an.batch_size)
    for i, t in enumerate(tensors):
        lay = _layout(an, t)
        if lay is None:
            if _shape(t)[first.token_dim] != 1:
                an.side_input(node, i, first, rank)
        elif lay.axis != first.axis:
            an.refuse(node, "concatenated tensors carry image tokens on different axes")
    return first


def _stack(an, node):
    tensors = node.args[0]
    rank = len(_shape(node))
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), rank)
    first = _layout(an, next(t for t in tensors if _layout(an, t) is not None))
    bump = lambda x: None if x is None else (x + 1 if x >= dim else x)
    if first.batch_dim is None and len(first.samples or ()) == 1:  # one sample's pieces of a per-sample loop
        samples = _joined_samples(an, node, [_layout(an, t) for t in tensors if _layout(an, t) is not None],
                                  tensors)
        return first.shifted(token_dim=bump(first.token_dim)).for_samples(samples, an.batch_size, batch_dim=dim)
    for i, t in enumerate(tensors):
        lay = _layout(an, t)
        if lay is None:
            if _shape(t)[first.token_dim] != 1:
                an.side_input(node, i, first, rank - 1)
        elif lay.axis != first.axis:
            an.refuse(node, "stacked tensors carry image tokens on different axes")
    return first.shifted(token_dim=bump(first.token_dim), batch_dim=bump(first.batch_dim))


def _sdpa(an: _Analyzer, node: fx.Node):
    q, k, v = node.args[:3]
    lq, lk, lv = _layout(an, q), _layout(an, k), _layout(an, v)
    if lq is not None and lq.token_dim < len(_shape(q)) - 2:
        return _token_batched_sdpa(an, node, lq)
    if (lk is None) != (lv is None):
        an.refuse(node, "keys and values disagree on carrying image tokens")
    is_causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    if is_causal and lk is not None:
        an.refuse(node, "causal attention over image tokens")
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node) and _layout(an, mask) is not None:
        an.refuse(node, "an attention mask computed from image tokens")
    if isinstance(mask, fx.Node) and (lq is not None or lk is not None):
        ms = _shape(mask)
        rank = len(_shape(q))
        qd = rank - 2 - (rank - len(ms))
        if lq is not None and qd >= 0 and ms[qd] != 1:
            an.side_input(node, 3, lq, rank)  # gather the mask's query rows
        if lk is not None and not an.policy_kv_cache and ms[-1] != 1:
            an.refuse(node, "a key mask with the K/V cache switched off")
    if lk is not None:
        if lq is not None and lq.token_dim != len(_shape(q)) - 2:
            an.refuse(node, "queries whose token axis is not the sequence axis")
        if lk.token_dim != len(_shape(k)) - 2:
            an.refuse(node, "keys whose token axis is not their sequence axis, with queries that carry no tokens")
        an.analysis.attention.append(node.name)
        an.counts["attention_cached_kv"] += 1
        if an.policy_kv_cache:
            an.add_cache(k, "key", lk, node)
            an.add_cache(v, "value", lv, node)
    else:
        an.analysis.cross_attention.append(node.name)
        an.counts["cross_attention"] += 1
    if lq is None:
        return None
    return lq


def _token_batched_sdpa(an: _Analyzer, node: fx.Node, lq: TokenLayout):
    """Attention whose token axis is one of its batch axes (Latte's temporal attention over the
    frames of each token, ``[B * N, heads, F, d]``): every token attends within its own row, so it
    is token-wise. K, V and a mask with that axis are gathered like any operand of a token-wise node."""
    rank = len(_shape(node.args[0]))
    want = lq.axis
    operands = [(1, node.args[1]), (2, node.args[2])]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):
        if _layout(an, mask) is not None:
            an.refuse(node, "an attention mask computed from image tokens")
        operands.append((3, mask))
    for i, operand in operands:
        lay = _layout(an, operand)
        op_rank = len(_shape(operand))
        if lay is not None:
            aligned = _align(lay, op_rank, rank)
            if aligned.axis != want:
                an.refuse(node, "queries carry image tokens on a batch axis, but keys or values carry them elsewhere")
            continue
        _side_operand(an, node, i, operand, lq, rank)
    an.analysis.token_batched_attention.append(node.name)
    return lq


def _dim_arg(node, index, default):
    if len(node.args) > index:
        return node.args[index]
    name = node.target._schema.arguments[index].name if isinstance(node.target, torch._ops.OpOverload) else "dim"
    return node.kwargs.get(name, default)


def _index_reduction(an, node):
    """argmax / argmin over an axis other than the token axis (a router's expert choice): token-wise.
    Over the token axis, or over the flattened tensor (dim=None), it mixes tokens: densified."""
    lay = _layout(an, node.args[0])
    rank = len(_shape(node.args[0]))
    dim = _dim_arg(node, 1, None)
    if dim is None or _norm_dim(dim, rank) == lay.token_dim:
        an.densify(node.args[0], node, "an argmax / argmin over the token axis")
        return None
    dim = _norm_dim(dim, rank)
    if len(_shape(node)) == rank:  # keepdim
        return lay
    drop = lambda x: None if x is None else (x - 1 if x > dim else x)
    return lay.shifted(token_dim=drop(lay.token_dim), batch_dim=drop(lay.batch_dim))


def _sort_like(an, node):
    """topk / sort (values, indices) along an axis other than the token axis (top-k routing over
    experts): token-wise, both outputs keep the input's layout. Along the token axis: densified."""
    lay = _layout(an, node.args[0])
    rank = len(_shape(node.args[0]))
    dim = _dim_arg(node, 2 if _packet(node) is aten.topk else 1, -1)
    if _norm_dim(dim, rank) == lay.token_dim:
        an.densify(node.args[0], node, "a topk / sort along the token axis")
        return [None for _ in node.meta["val"]]
    return [lay for _ in node.meta["val"]]


def _gather_scatter(an, node):
    """gather / scatter / scatter_add along an axis other than the token axis (picking or placing
    experts per token): token-wise when every tensor operand that carries tokens carries them on the
    same axis; an operand without tokens but with a token-sized axis there is a side input. Along the
    token axis it moves values between tokens: refused."""
    out_rank = len(_shape(node))
    dim = _norm_dim(node.args[1], out_rank)
    result = None
    for i, arg in enumerate(node.args):
        lay = _layout(an, arg)
        if lay is None:
            continue
        if len(_shape(arg)) != out_rank:
            an.refuse(node, "a gather / scatter operand of another rank carries image tokens")
        if result is None:
            result = lay
        elif lay.axis != result.axis:
            an.refuse(node, "gather / scatter operands carry image tokens on different axes")
        elif result.batch_dim is None:
            result = lay
    if dim == result.token_dim:
        an.refuse(node, "a gather / scatter along the token axis moves values between image tokens")
    rows = result.rows(an.batch_size)
    if _shape(node)[result.token_dim] != rows:
        an.refuse(node, "a gather whose index covers part of the token axis")
    for i, arg in enumerate(node.args):
        if _is_tensor(arg) and _layout(an, arg) is None and len(_shape(arg)) == out_rank:
            _side_operand(an, node, i, arg, result, out_rank)
    return result


def _one_hot(an, node):
    """one_hot appends the class axis: the token axis stays where it was."""
    return _layout(an, node.args[0])


_FFT_ONE = {aten.fft_fft, aten.fft_ifft, aten.fft_rfft, aten.fft_irfft, aten.fft_hfft, aten.fft_ihfft}
_FFT_TWO = {aten.fft_fft2, aten.fft_ifft2, aten.fft_rfft2, aten.fft_irfft2}
_FFT_N = {aten.fft_fftn, aten.fft_ifftn, aten.fft_rfftn, aten.fft_irfftn}


def _fft(an, node):
    """A discrete Fourier transform mixes every position of the axes it transforms: over the token
    axis (FNet, a GFNet/AFNO filter on [B, N, C]) it runs on the full input (densified); over other
    axes only it is token-wise (the token axis keeps its place and size)."""
    lay = _layout(an, node.args[0])
    rank = len(_shape(node.args[0]))
    packet = _packet(node)
    if packet in _FFT_ONE:
        dims = [_dim_arg(node, 2, -1)]
    elif packet in _FFT_TWO:
        dims = list(_dim_arg(node, 2, (-2, -1)))
    else:
        dims = _dim_arg(node, 2, None)
        s = _dim_arg(node, 1, None)
        dims = list(dims) if dims is not None else (list(range(rank - len(s), rank)) if s is not None
                                                    else list(range(rank)))
    if lay.token_dim in {_norm_dim(d, rank) for d in dims}:
        an.densify(node.args[0], node, "a Fourier transform over the token axis")
        return None
    return lay


_TOKEN_RULES = {
    aten.view: _view, aten.reshape: _view, aten._unsafe_view: _view, aten.flatten: _view, aten.unflatten: _view,
    aten.permute: _permute, aten.transpose: _transpose, aten.t: _transpose,
    aten.swapaxes: _transpose, aten.swapdims: _transpose, aten.movedim: _movedim, aten.moveaxis: _movedim,
    aten.unsqueeze: _unsqueeze, aten.squeeze: _squeeze, aten.expand: _expand,
    aten.linear: _linear, aten.matmul: _matmul, aten.mm: _matmul, aten.bmm: _matmul,
    aten.layer_norm: _layer_norm, aten.rms_norm: _rms_norm,
    aten.batch_norm: _batch_norm, aten.group_norm: _group_norm, aten.instance_norm: _group_norm, aten.glu: _glu,
    aten.outer: _outer, aten.ger: _outer,
    aten.new_zeros: _fresh, aten.new_ones: _fresh, aten.new_empty: _fresh, aten.new_full: _fresh,
    aten.slice: _slice, aten.split: _split, aten.split_with_sizes: _split, aten.chunk: _split,
    aten.unbind: _unbind, aten.select: _select, aten.cat: _cat, aten.stack: _stack,
    aten.conv1d: _convolution, aten.conv2d: _convolution, aten.conv3d: _convolution,
    aten.convolution: _convolution, aten.conv_transpose1d: _convolution, aten.conv_transpose2d: _convolution,
    aten.conv_transpose3d: _convolution,
    aten.einsum: _einsum, aten.flip: _flip, aten.argsort: _argsort, aten.expand_as: _expand_as, **{p: _pool for p in _POOLS},
    aten.cumsum: _scan, aten.cumprod: _scan, aten.logcumsumexp: _scan, aten.roll: _roll,
    aten.pad: _pad, aten.constant_pad_nd: _pad, aten.copy_: _pointwise, aten.copy: _pointwise,
    aten.empty_like: _same_shape, aten.zeros_like: _same_shape, aten.ones_like: _same_shape,
    aten.full_like: _same_shape,
    aten.repeat: _repeat, aten.repeat_interleave: _repeat,
    aten.view_as_complex: _complex_view, aten.view_as_real: _complex_view,
    aten.scaled_dot_product_attention: _sdpa,
    aten.argmax: _index_reduction, aten.argmin: _index_reduction,
    aten.topk: _sort_like, aten.sort: _sort_like,
    aten.gather: _gather_scatter, aten.scatter: _gather_scatter, aten.scatter_add: _gather_scatter,
    aten.one_hot: _one_hot, aten.real: _same_shape, aten.imag: _same_shape,
    **{p: _fft for p in _FFT_ONE | _FFT_TWO | _FFT_N},
    **{p: _reduction for p in _REDUCTIONS},
    **{p: _softmax for p in _SOFTMAX},
    **{p: _same_shape for p in _SAME_SHAPE},
}


# the rules that know a token axis folded into the batch axis (TokenLayout.fold); any other
# operator meeting one is refused
_FOLD_RULES = {_pointwise, _same_shape, _view, _permute, _movedim, _transpose, _unsqueeze, _squeeze, _expand,
               _linear, _matmul, _layer_norm, _rms_norm, _reduction, _softmax, _split, _slice, _unbind, _select, _cat,
               _stack, _sdpa, _repeat, _complex_view, _convolution, _pad,
               _index_reduction, _sort_like, _gather_scatter, _one_hot, _fft, _batch_norm, _group_norm, _glu, _outer,
               _fresh, _scan, _roll, _flip, _argsort, _pool, _expand_as}


from . import side_sources, stream_reentry, token_grid  # noqa: E402  (they use this module's rules; imported once those exist)

_HOST_READS = {aten._local_scalar_dense.default, aten.item.default}


def _size_symbols(values) -> set:
    """The symbols of the symbolic sizes among ``values`` (sizes, SymInts, tensors' shapes)."""
    found = set()
    for v in values:
        dims = list(v.shape) if isinstance(v, torch.Tensor) else [v]
        found |= {s for d in dims if isinstance(d, torch.SymInt) for s in d.node.expr.free_symbols}
    return found


def _symbol_origins(gm: fx.GraphModule, refused: fx.Node, shape) -> str:
    """Where the data-dependent sizes in ``shape`` come from: ``; u0, u1 are read from a tensor as a
    Python number (`.item()`, `.tolist()`, `int(t)`): nodes 'item', 'item_1'`` (and the model line
    where it is not the refused node's). A symbol's origin is the first node whose value is it or
    has it as a size (``nonzero``'s output); a size the refused node introduces itself from symbolic
    arguments (a slice to a tensor-valued end) is traced to those arguments."""
    sources: dict = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        dims = [val] if isinstance(val, torch.SymInt) else list(val.shape) if isinstance(val, torch.Tensor) else []
        for d in dims:
            if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol:
                sources.setdefault(d.node.expr, node)
    pending, seen, origins = _size_symbols(shape), set(), {}
    while pending:
        symbol = pending.pop()
        if symbol in seen or symbol not in sources:
            continue
        seen.add(symbol)
        inner = _size_symbols(a.meta.get("val") for a in refused.all_input_nodes) if sources[symbol] is refused else ()
        if inner:
            pending |= inner
        else:
            origins[symbol] = sources[symbol]
    groups: dict = {}
    named = node_frame(refused)
    for symbol in sorted(origins, key=str):
        node = origins[symbol]
        how = ("read from a tensor as a Python number (`.item()`, `.tolist()`, `int(t)`)" if node.target in _HOST_READS
               else f"the output size of {_op_name(node)}, which depends on its input's values")
        frame = node_frame(node)
        groups.setdefault((how, "" if frame == named else frame), []).append((str(symbol), node.name))
    parts = []
    for (how, frame), members in groups.items():
        symbols = ", ".join(sym for sym, _ in members)
        nodes = ", ".join(f"'{name}'" for _, name in members)
        verb, noun = ("are", "nodes") if len(members) > 1 else ("is", "node")
        parts.append(f"{symbols} {verb} {how}: {noun} {nodes}{frame}")
    return "".join(f"; {part}" for part in parts)


def _require_static_shapes(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        vals = val if isinstance(val, (list, tuple)) else [val]
        for v in vals:
            if isinstance(v, torch.Tensor) and not all(isinstance(d, int) for d in v.shape):
                raise UnsupportedModelError(
                    f"the shape {list(v.shape)} depends on tensor values (data-dependent shapes, e.g. tokens "
                    f"selected by a mask in a Python loop){_symbol_origins(gm, node, v.shape)}; a graph "
                    "with static shapes is required", node=node.name, op=str(node.target), source=node_frame(node))


def _stopped_at(e: UnsupportedModelError, named: UnsupportedModelError) -> str:
    """Where one reading of a combined refusal stopped: its node, and its model code unless the
    combined error names that node already."""
    if e.node is None:
        return ""
    return f" (node '{e.node}', {e.op}{'' if named.node == e.node else e.source})"


def analyze_tokens(gm: fx.GraphModule, latent: fx.Node, *, kv_cache: bool = True, tubes: bool = True) -> TokenAnalysis:
    """Analyse ``gm`` (an exported graph with shapes in ``node.meta['val']``).

    Token grids (passes/token_grid.py) are followed where a view unflattens the token sequence
    into one. Following them reaches code that was densified before (past a grid, a model may
    merge the grid back into a sequence and go on with an operator no rule covers); where that
    reading is refused, the model is read again without grids, and refused only if that reading
    is too, with its reason. The readings of one attempt are described in ``_analyze``.
    """
    try:
        found = _analyze(gm, latent, kv_cache=kv_cache, tubes=tubes, grids=True)
    except UnsupportedModelError:
        found = _analyze(gm, latent, kv_cache=kv_cache, tubes=tubes, grids=False)

    def rerun(sources: dict) -> TokenAnalysis:
        settings = dict(found.reading)
        tokens_first = settings.pop("tokens_first")
        if not settings.get("tubes"):  # a branch may fold its tokens into the batch (timestep.flatten())
            settings.update(tubes=True, tube_axes=False)
        analyzer = _Analyzer(gm, latent, side_sources=sources, **settings)
        analyzer.policy_kv_cache = kv_cache
        again = analyzer.run(tokens_first)
        again.reading = found.reading
        return again

    return stream_reentry.pick_up_stream(gm, side_sources.gather_at_sources(gm, found, rerun), rerun)


def _analyze(gm: fx.GraphModule, latent: fx.Node, *, kv_cache: bool, tubes: bool, grids: bool) -> TokenAnalysis:
    """One analysis of ``gm``, following token grids or not (``grids``).

    A 3-D latent is either a token sequence ``[B, N, C]`` (Flux's packed latents) or a
    1-D signal ``[B, C, L]``; shapes alone cannot tell, so the token reading is tried
    first and the signal reading if the graph refutes it. Two relaxed readings follow,
    where tokens are tubes through the frames: frames folded into the batch axis (Latte's
    factorised blocks; the token axis may then be folded into the batch axis too, as in
    attention over the frames of each token or sequence-first ``[N * B, D]`` rows), and
    frames leading the token sequence (Open-Sora's ``[B, F * S, D]``). A relaxed reading
    replaces an accepted one only where it runs more nodes on the active rows from the
    later of their token sources on (a view the plain reading had to densify at), so a
    model the plain reading serves as well keeps its finer tokens. ``tubes=False``
    (``RASPolicy(tubes="never")``) makes no grid axis a tube: the relaxed reading then
    only folds token axes into the batch axis.
    """
    _require_static_shapes(gm)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    readings = [True, False] if latent.meta["val"].dim() == 3 else [False]
    errors, plain, plain_progress = [], None, -1
    for tokens_first in readings:
        analyzer = _Analyzer(gm, latent, grids=grids)
        analyzer.policy_kv_cache = kv_cache
        try:
            plain = analyzer.run(tokens_first)
            plain.reading = dict(tokens_first=tokens_first, grids=grids)
            readings = [tokens_first]  # the relaxed readings keep the plain one's reading of the latent
            break
        except UnsupportedModelError as exc:
            errors.append(exc)
            plain_progress = max(plain_progress, _progress(analyzer, exc, order))
    relaxed, best = [], plain
    for tokens_first in readings:
        for lead_tube in ((False, True) if tubes else (False,)):
            analyzer = _Analyzer(gm, latent, tubes=True, lead_tube=lead_tube, tube_axes=tubes, grids=grids)
            analyzer.policy_kv_cache = kv_cache
            try:
                found = analyzer.run(tokens_first)
                found.reading = dict(tokens_first=tokens_first, tubes=True, lead_tube=lead_tube, tube_axes=tubes,
                                     grids=grids)
            except _NotThisReading:
                continue
            except UnsupportedModelError as exc:
                # reported only where it got further through the graph than the plain reading
                if analyzer.relaxed_used and _progress(analyzer, exc, order) > plain_progress:
                    relaxed.append(exc)
                continue
            except Exception:  # noqa: BLE001 - a failure of a relaxed reading never costs the plain one
                continue        # (or its precise refusal) the model it reads
            if best is None or (analyzer.relaxed_used and _better(found, best, order)):
                best = found
    if best is not None:
        return best
    if len(errors) == 1:
        error = errors[0]
    else:
        first, second = errors
        named = first if first.node is not None else second
        error = UnsupportedModelError(
            f"read as tokens [B, N, C]: {first.reason}{_stopped_at(first, named)}; read as a signal "
            f"[B, C, L]: {second.reason}{_stopped_at(second, named)}", node=named.node, op=named.op, source=named.source)
    if relaxed:  # a relaxed reading got further: its reason comes first
        further = relaxed[0]
        error = UnsupportedModelError(
            "read with tubes (one token = one patch position in every frame, the frames folded into the batch "
            f"axis or leading the token sequence): {further.reason}; read without tubes: {error.reason}"
            f"{_stopped_at(error, further)}",
            node=further.node, op=further.op, source=further.source)
    if not tubes and latent.meta["val"].dim() >= 5:  # a video latent: the tube readings may have served it
        error = UnsupportedModelError(
            f"{error.reason} (RASPolicy(tubes='never') tried no reading where a token spans the frames; "
            "tubes='auto' does)", node=error.node, op=error.op, source=error.source)
    raise error


def _progress(analyzer: _Analyzer, error: UnsupportedModelError, order: dict) -> int:
    """How far a failed reading got: the last node it laid tokens out on, or the node it refused."""
    reached = [order[n.name] for n, v in analyzer.layout.items() if isinstance(v, TokenLayout)]
    if error.node in order:
        reached.append(order[error.node])
    return max(reached, default=-1)


def _better(found: TokenAnalysis, best: TokenAnalysis, order: dict) -> bool:
    """A relaxed reading ``found`` replaces the accepted ``best`` where it runs more of the graph on
    the active rows; where its tokens are coarser (tubes: several frame patches per token), only if
    that moves self-attention over image tokens onto the active rows. Coarser tokens make the active
    set less adaptive, which running a small per-frame side branch (Wan-Animate's face adapter)
    on the active rows does not pay for; running the blocks' own attention there (STDiT) does."""
    if not _runs_more(found, best, order):
        return False
    if found.num_tokens < best.num_tokens:
        attended = lambda a: len(a.attention) + len(a.token_batched_attention)  # noqa: E731
        return attended(found) > attended(best)
    return True


def _runs_more(found: TokenAnalysis, best: TokenAnalysis, order: dict) -> bool:
    """``found`` lays more nodes out on the active rows than ``best``, counted from the later of the
    two token sources on (a reading whose tokens start earlier, before per-frame rows are joined into
    one sequence, does not win by the views in between)."""
    start = max(order[found.source], order[best.source])
    rows = lambda a: sum(1 for name, v in a.layouts.items()  # noqa: E731
                         if isinstance(v, TokenLayout) and order.get(name, -1) >= start)
    return rows(found) > rows(best)
