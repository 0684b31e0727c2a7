"""Recognise hand-written attention in a captured graph and rewrite it as one SDPA node.

The token analysis (passes/token_axis.py) knows attention as
``aten.scaled_dot_product_attention``: queries keep the token axis, keys and values are
read whole from the K/V cache. Many DiTs compute attention by hand instead (the DiT and
PixArt reference code, timm's non-fused path, diffusers' classic ``AttnProcessor``),
which torch.export captures as::

    s = matmul(q, transpose(k, -2, -1))          # or bmm, baddbmm(_, q, kT, beta=0, alpha=a),
                                                 # or einsum("...id,...jd->...ij", q, k), q / k
                                                 # possibly channel-first ("...di,...dj->...ij")
    s = s * c | s / c | s + mask | masked_fill(s, m, -inf) | to(s, dtype)   # any of, in any order
    s = view(s, [B, H, L, S]) | view(s, [B * H, L, S])   # regrouping the leading axes only
    p = softmax(s, -1)                           # or _softmax; optionally with a dtype
    p = dropout(p, _, False) | to(p, dtype) | clone(p)                     # inference no-ops
    o = matmul(p, v)                             # or bmm, einsum("...ij,...jd->...id", p, v), in either
                                                 # order, v / the output possibly channel-first

Read as tokens, ``s`` has two token axes (queries and keys), which the analysis cannot
follow. ``recognise_attention`` replaces each such chain by
``scaled_dot_product_attention(q, k, v, attn_mask=M, scale=c)``, the same function: the
scale is the product of every constant factor (``alpha``, ``* c``, ``/ c``), an additive
mask is passed as is, ``masked_fill(s, m, v)`` with ``v = -inf`` (or a finite ``v <=
-1e4``) becomes the boolean mask ``~m``, and adding a constant to every score is dropped
(softmax ignores it); a mask applied in a view of the scores' leading axes is expanded over
them and regrouped as the product's. The match is strict: every intermediate value must be read only
inside the chain (a model that returns its attention maps is left alone and refused as
before), the softmax is over the last axis, q, k and v have rank >= 3 and one dtype, and
the output has that dtype. K's and V's batch axes equal the queries' or broadcast to them
through size-1 axes (multi-query attention: one K/V head for every query head, which
``matmul`` broadcasts); such K / V are expanded to the queries' batch axes before the SDPA,
so their cache holds every head. Anything else is left as it was.

What differs from the hand-written form: the float rounding of the fused kernel, and a
query row whose keys are *all* masked by a finite fill (the hand-written softmax spreads
it uniformly; SDPA's boolean mask does not). Neither changes a model whose masks leave
some key visible to every query, which is what padding masks do.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode

from .token_axis import _SKIPPED, _arg, _packet, _readers, _val

aten = torch.ops.aten

__all__ = ["RecognisedAttention", "recognise_attention"]

_SOFTMAX = {aten.softmax, aten._softmax}
_PRODUCT = {aten.matmul, aten.bmm}
_CASTS = {aten.to, aten._to_copy, aten.type_as}
_IDENTITY_AFTER = {aten.clone, aten.contiguous, aten.alias, aten.detach}
_VIEWS = {aten.view, aten._unsafe_view, aten.reshape}
_FILL_LIMIT = -1e4  # a masked_fill value at or below this removes the key from the softmax


@dataclasses.dataclass(frozen=True)
class RecognisedAttention:
    """One hand-written attention replaced by ``sdpa`` (node names in the captured graph)."""

    sdpa: str
    scores: str       # the q-k product node
    softmax: str
    output: str       # the p-v product node it replaced
    scale: float
    mask: str | None  # "additive" or "boolean" or None

    def __str__(self) -> str:
        mask = f", {self.mask} mask" if self.mask else ""
        return f"{self.scores} -> {self.softmax} -> {self.output} as {self.sdpa} (scale {self.scale:.6g}{mask})"


@dataclasses.dataclass
class _Chain:
    q: fx.Node
    k: fx.Node               # [..., S, E]; or, when k_is_transposed, the [..., E, S] product operand
    k_is_transposed: bool    # True: ``k`` above is the [..., E, S] operand and needs a transpose
    q_is_transposed: bool = False    # True: ``q`` is [..., E, L] (channel-first attention); likewise
    v_is_transposed: bool = False    # ``v`` [..., E, S]
    out_is_transposed: bool = False  # and the output [..., E, L]
    v: fx.Node | None = None
    expand_k: tuple | None = None  # ``expand`` sizes taking K / V to the queries' batch axes (size-1
    expand_v: tuple | None = None  # head axis: multi-query attention); () when they already match
    scale: float = 1.0
    q_factors: list = dataclasses.field(default_factory=list)  # (tensor, "mul" | "div") constant over the keys
    mask: fx.Node | None = None
    mask_kind: str | None = None  # "additive" or "fill"
    mask_space: tuple | None = None  # the scores' batch sizes where the mask is applied, when a view of
                                     # the leading axes lies between it and the product; None: the product's
    scores: fx.Node | None = None
    nodes: list = dataclasses.field(default_factory=list)  # every node the SDPA replaces


def _only_reader(node: fx.Node) -> fx.Node | None:
    readers = _readers(node)
    return readers[0] if len(readers) == 1 else None


def _functional_packet(node: fx.Node):
    """``node``'s op packet, an in-place one (``attn += bias`` -> ``add_``, ``attn.masked_fill_``,
    ``attn.mul_``) read as its out-of-place packet when the tensor it updates is read by nothing
    else (the update is then invisible outside the chain: the same function); None for an in-place
    op whose updated tensor has other readers."""
    packet = _packet(node)
    name = getattr(packet, "__name__", "")
    if not isinstance(node.target, torch._ops.OpOverload) or not name.endswith("_") or name.startswith("_"):
        return packet
    functional = getattr(aten, name[:-1], None)
    if functional is None or not isinstance(node.args[0], fx.Node) or _only_reader(node.args[0]) is not node:
        return None
    return functional


def _batch_of(node: fx.Node) -> tuple:
    """The sizes of the scores' leading (batch) axes at ``node``."""
    return tuple(_val(node).shape[:-2])


def _leading_view(node: fx.Node) -> bool:
    """Whether view ``node`` regroups only its input's leading axes (``[B*H, L, S] -> [B, H, L, S]``),
    keeping the last two (queries and keys)."""
    a, b = _val(node.args[0]), _val(node)
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 3 and b.dim() >= 3 \
        and tuple(a.shape[-2:]) == tuple(b.shape[-2:]) and all(isinstance(d, int) for d in (*a.shape, *b.shape))


def _mask_sizes(chain: "_Chain") -> tuple:
    """The mask's sizes as SDPA reads it: its own, or, when it was applied in a view of the scores'
    leading axes, those axes expanded and regrouped as the product's (its last two kept)."""
    m = tuple(_val(chain.mask).shape)
    if chain.mask_space is None:
        return m
    tail = ((1, 1) + m)[-2:]
    return (*_batch_of(chain.scores), *tail)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def _is_last_dim(dim, rank: int) -> bool:
    return isinstance(dim, int) and dim % rank == rank - 1


def _is_last_two_transpose(node: fx.Node) -> bool:
    if _packet(node) is not aten.transpose:
        return False
    rank = _val(node).dim()
    return {node.args[1] % rank, node.args[2] % rank} == {rank - 2, rank - 1}


def _einsum_terms(equation: str):
    """``(a, b, out)`` of a two-operand einsum whose three terms share their leading axes (letters used
    once) and have two trailing letters each; None otherwise."""
    eq = equation.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        return None
    ins, out = eq.split("->")
    a, b = ins.split(",")
    if any(len(t) < 3 for t in (a, b, out)) or len({a[:-2], b[:-2], out[:-2]}) != 1:
        return None
    letters = [c for c in a[:-2] if c != "."]
    if len(set(letters)) != len(letters) or any(c in letters for c in a[-2:] + b[-2:] + out[-2:]):
        return None
    return a[-2:], b[-2:], out[-2:]


def _einsum_scores(equation: str) -> tuple[bool, bool] | None:
    """``equation`` as a score product ``q k^T`` over the same leading axes: ``(q_transposed,
    k_transposed)``, each operand either ``[.., L, E]`` or, transposed, ``[.., E, L]`` (guided-diffusion's
    ``"bct,bcs->bts"``); None if it is not one."""
    terms = _einsum_terms(equation)
    if terms is None:
        return None
    a, b, (i, j) = terms
    if i == j or set(a) - {i} != set(b) - {j} or len(set(a) - {i}) != 1 or i not in a or j not in b:
        return None
    d = (set(a) - {i}).pop()
    if d in (i, j):
        return None
    return a == d + i, b == d + j


def _einsum_values(equation: str, p_operand: int) -> tuple[bool, bool] | None:
    """``equation`` as a value product ``p v`` with ``p`` ``[.., L, S]`` its operand ``p_operand`` (0 or 1):
    ``(v_transposed, out_transposed)``, ``v`` being ``[.., S, E]`` or ``[.., E, S]`` and the output
    ``[.., L, E]`` or ``[.., E, L]`` (guided-diffusion's ``"bts,bcs->bct"``); None if it is not one."""
    terms = _einsum_terms(equation)
    if terms is None:
        return None
    p, v = (terms[0], terms[1]) if p_operand == 0 else (terms[1], terms[0])
    (i, j), out = p, terms[2]
    if i == j or j not in v or i in v or len(set(v)) != 2 or set(out) != {i} | (set(v) - {j}):
        return None
    d = (set(v) - {j}).pop()
    return v == d + j, out == d + i


def _value_product(user: fx.Node, p: fx.Node) -> tuple[bool, bool] | None:
    """``user`` as an einsum value product reading the probabilities ``p``: its layout, or None."""
    if _packet(user) is not aten.einsum or len(user.args[1]) != 2 or list(user.args[1]).count(p) != 1:
        return None
    return _einsum_values(user.args[0], list(user.args[1]).index(p))


def _score_product(node: fx.Node) -> _Chain | None:
    """``node`` as the q-k product, or None."""
    packet = _packet(node)
    if packet in _PRODUCT:
        return _score_product_from(node.args[0], node.args[1])
    if packet is aten.baddbmm:
        beta, alpha = _arg(node, 3, "beta", 1), _arg(node, 4, "alpha", 1)
        if not (_is_number(beta) and _is_number(alpha)) or beta not in (0, 1):
            return None
        chain = _score_product_from(node.args[1], node.args[2])
        if chain is None:
            return None
        chain.scale *= float(alpha)
        if beta == 1:
            chain.mask, chain.mask_kind = node.args[0], "additive"
        return chain
    layout = _einsum_scores(node.args[0]) if packet is aten.einsum and len(node.args[1]) == 2 else None
    if layout is not None:
        q, k = node.args[1]
        return _Chain(q=q, k=k, k_is_transposed=layout[1], q_is_transposed=layout[0])
    return None


def _score_product_from(q, kt) -> _Chain | None:
    if not (isinstance(q, fx.Node) and isinstance(kt, fx.Node)):
        return None
    if _is_last_two_transpose(kt):
        return _Chain(q=q, k=kt.args[0], k_is_transposed=False)
    return _Chain(q=q, k=kt, k_is_transposed=True)


def _key_constant(scores: fx.Node, factor) -> bool:
    """Whether tensor ``factor`` scales the scores ``scores`` by the same value for every key (its last
    axis has size 1: a learned per-head logit scale ``[H, 1, 1]``), so that it can scale the queries."""
    f, sv = _val(factor), _val(scores)
    return (isinstance(f, torch.Tensor) and isinstance(sv, torch.Tensor) and f.dim() <= sv.dim()
            and (f.dim() == 0 or f.shape[-1] == 1) and not f.is_complex())


def _walk_scores(node: fx.Node, chain_nodes: list, scale: float, mask, factors: tuple = ()) -> _Chain | None:
    """Walk from a softmax input back to the q-k product through scale / mask / cast nodes."""
    if _only_reader(node) is None:
        return None  # the scores are read elsewhere too: not a pure attention
    packet = _functional_packet(node)
    if packet is None:
        return None
    here = [*chain_nodes, node]
    if packet in (*_PRODUCT, aten.baddbmm, aten.einsum):
        chain = _score_product(node)
        if chain is None or (chain.mask is not None and mask is not None):
            return None
        chain.scale *= scale
        chain.q_factors.extend(factors)
        if mask is not None:
            chain.mask, chain.mask_kind, space = mask
            if space != tuple(_val(node).shape[:-2]):
                chain.mask_space = space
        chain.scores, chain.nodes = node, here
        return chain
    if packet in _CASTS:
        return _walk_scores(node.args[0], here, scale, mask, factors)
    if packet in _VIEWS:
        if factors or not _leading_view(node):
            return None  # a per-head scale would need the view too
        return _walk_scores(node.args[0], here, scale, mask, factors)
    if packet is aten.mul:
        a, b = node.args[0], node.args[1]
        tensor, c = (a, b) if _is_number(b) else (b, a) if _is_number(a) else (None, None)
        if tensor is None:  # a tensor scale constant over the keys moves to the queries
            for scores, factor in ((a, b), (b, a)):
                if isinstance(factor, fx.Node) and _key_constant(node, factor):
                    chain = _walk_scores(scores, here, scale, mask, (*factors, (factor, "mul")))
                    if chain is not None:
                        return chain
            return None
        return _walk_scores(tensor, here, scale * float(c), mask, factors)
    if packet is aten.div:
        if node.kwargs.get("rounding_mode"):
            return None
        if isinstance(node.args[1], fx.Node) and _key_constant(node, node.args[1]):
            return _walk_scores(node.args[0], here, scale, mask, (*factors, (node.args[1], "div")))
        if not _is_number(node.args[1]) or node.args[1] == 0:
            return None
        return _walk_scores(node.args[0], here, scale / float(node.args[1]), mask, factors)
    if packet is aten.add:
        a, b = node.args[0], node.args[1]
        if node.kwargs.get("alpha", 1) != 1 or (len(node.args) > 2 and node.args[2] != 1):
            return None
        if _is_number(b) or _is_number(a):  # a constant shift of every score: softmax ignores it
            return _walk_scores(a if _is_number(b) else b, here, scale, mask, factors)
        if mask is not None or scale != 1.0 or factors:
            return None  # ``(q k^T + bias) * c`` scales the bias too, which SDPA's mask is not
        for scores, extra in ((a, b), (b, a)):
            chain = _walk_scores(scores, here, scale, (extra, "additive", _batch_of(node)), factors)
            if chain is not None:
                return chain
        return None
    if packet is aten.masked_fill:
        value = node.args[2]
        if mask is not None or not _is_number(value) or not (value == -math.inf or value <= _FILL_LIMIT):
            return None
        if _val(node.args[1]) is None or _val(node.args[1]).dtype != torch.bool:
            return None
        return _walk_scores(node.args[0], here, scale, (node.args[1], "fill", _batch_of(node)), factors)
    return None


def _walk_probabilities(softmax: fx.Node) -> tuple[fx.Node, list] | None:
    """From the softmax forward through inference no-ops to the p-v product."""
    node, passed = softmax, []
    while True:
        user = _only_reader(node)
        if user is None:
            return None
        packet = _packet(user)
        if packet in _CASTS or packet in _IDENTITY_AFTER or (packet in _VIEWS and _leading_view(user)):
            node = user
        elif packet is aten.dropout:
            if _arg(user, 2, "train", True) and _arg(user, 1, "p", 0) != 0:
                return None
            node = user
        elif packet in _PRODUCT and user.args[0] is node:
            return user, passed
        elif _value_product(user, node) is not None:
            return user, passed
        else:
            return None
        passed.append(node)


def _shapes_fit(chain: _Chain, output: fx.Node) -> bool:
    q, k, v = _val(chain.q), _val(chain.k), _val(chain.v)
    out = _val(output)
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v, out)) or q.dim() < 3:
        return False
    if not (q.dim() == k.dim() == v.dim() == out.dim()):
        return False
    q, v, out = (t.transpose(-2, -1) if flag else t for t, flag in
                 ((q, chain.q_is_transposed), (v, chain.v_is_transposed), (out, chain.out_is_transposed)))
    k_shape = tuple(k.shape[:-2]) + ((k.shape[-1], k.shape[-2]) if chain.k_is_transposed else tuple(k.shape[-2:]))
    batch = tuple(q.shape[:-2])
    if k_shape[-1] != q.shape[-1] or v.shape[-2] != k_shape[-2] or tuple(out.shape[:-2]) != batch:
        return False
    chain.expand_k = _broadcast_to(tuple(k_shape[:-2]), batch)
    chain.expand_v = _broadcast_to(tuple(v.shape[:-2]), batch)
    if chain.expand_k is None or chain.expand_v is None:
        return False
    if not (q.dtype == k.dtype == v.dtype == out.dtype) or not q.is_floating_point():
        return False
    if chain.mask is not None:
        m = _val(chain.mask)
        if not isinstance(m, torch.Tensor):
            return False
        if chain.mask_space is not None:
            if m.dim() > len(chain.mask_space) + 2:
                return False
            try:
                torch.broadcast_shapes(tuple(m.shape), (*chain.mask_space, q.shape[-2], k_shape[-2]))
            except RuntimeError:
                return False
        try:
            torch.broadcast_shapes(_mask_sizes(chain), (*batch, q.shape[-2], k_shape[-2]))
        except RuntimeError:
            return False
        if len(_mask_sizes(chain)) > q.dim():
            return False
        if chain.mask_kind == "additive" and not m.is_floating_point():
            return False  # SDPA would read a boolean as a keep-mask, not as +0 / +1
    return True


def _broadcast_to(axes: tuple, batch: tuple) -> tuple | None:
    """The sizes for ``expand`` that take K's or V's batch ``axes`` to the queries' ``batch``
    (-1 keeps an axis; ``()`` if they already equal it), or None if they do not broadcast to
    exactly ``batch`` or a broadcast axis has a symbolic size."""
    if axes == batch:
        return ()
    if len(axes) != len(batch):
        return None
    sizes = []
    for have, want in zip(axes, batch):
        if have == want:
            sizes.append(-1)
        elif have == 1 and isinstance(want, int):
            sizes.append(want)
        else:
            return None
    return (*sizes, -1, -1)


def _match(softmax: fx.Node) -> tuple[_Chain, fx.Node] | None:
    scores = softmax.args[0]
    if not isinstance(scores, fx.Node) or not isinstance(_val(scores), torch.Tensor):
        return None
    if not _is_last_dim(softmax.args[1], _val(scores).dim()):
        return None
    chain = _walk_scores(scores, [], 1.0, None)
    if chain is None:
        return None
    forward = _walk_probabilities(softmax)
    if forward is None:
        return None
    output, passed = forward
    if _packet(output) in _PRODUCT:
        chain.v = output.args[1]
    else:
        p = passed[-1] if passed else softmax
        chain.v_is_transposed, chain.out_is_transposed = _value_product(output, p)
        chain.v = next(a for a in output.args[1] if a is not p)
    if not isinstance(chain.v, fx.Node) or not _shapes_fit(chain, output):
        return None
    chain.nodes += [softmax, *passed, output]
    return chain, output


def _fake(node: fx.Node, fn, *args, like: fx.Node | None = None, **kwargs) -> None:
    """Compute ``node.meta['val']`` by running ``fn`` on the inputs' fake values (operands may be lists
    of nodes, ``cat``'s); a factory with no tensor operand (``ones``, ``full``) runs in the fake mode of
    ``like``'s value."""
    fake = lambda a: a.meta["val"] if isinstance(a, fx.Node) else a  # noqa: E731
    vals, kw = fx.node.map_aggregate(args, fake), fx.node.map_aggregate(kwargs, fake)
    tensors = [v for v in pytree.tree_leaves((vals, kw)) if isinstance(v, torch.Tensor)]
    with detect_fake_mode(tensors or [like.meta["val"]]):
        node.meta["val"] = fn(*vals, **kw)


def _expanded(graph: fx.Graph, node: fx.Node, sizes: tuple) -> fx.Node:
    """``aten.expand(node, sizes)`` with its fake value (inserted at the graph's insert point)."""
    expand = graph.call_function(aten.expand.default, (node, list(sizes)))
    _fake(expand, aten.expand.default, node, list(sizes))
    return expand


def _replace(graph: fx.Graph, chain: _Chain, output: fx.Node) -> fx.Node:
    with graph.inserting_before(output):
        k = chain.k
        if chain.k_is_transposed:
            k = _transposed(graph, chain.k)
        v = _transposed(graph, chain.v) if chain.v_is_transposed else chain.v
        if chain.expand_k:  # multi-query: one K/V head read by every query head, made explicit
            k = _expanded(graph, k, chain.expand_k)
        if chain.expand_v:
            v = _expanded(graph, v, chain.expand_v)
        mask = chain.mask
        if mask is not None and chain.mask_space is not None:  # applied in a view of the leading axes
            tail = list(((1, 1) + tuple(_val(mask).shape))[-2:])
            full = graph.call_function(aten.expand.default, (mask, [*chain.mask_space, *tail]))
            _fake(full, aten.expand.default, mask, [*chain.mask_space, *tail])
            sizes = list(_mask_sizes(chain))
            mask = graph.call_function(aten.reshape.default, (full, sizes))
            _fake(mask, aten.reshape.default, full, sizes)
        if mask is not None and chain.mask_kind == "fill":
            inverted = graph.call_function(aten.logical_not.default, (mask,))
            _fake(inverted, aten.logical_not.default, mask)
            mask = inverted
        elif mask is not None and _val(mask).dtype != _val(chain.q).dtype:
            dtype = _val(chain.q).dtype
            cast = graph.call_function(aten.to.dtype, (mask, dtype))
            _fake(cast, aten.to.dtype, mask, dtype)
            mask = cast
        q = _transposed(graph, chain.q) if chain.q_is_transposed else chain.q
        for factor, how in chain.q_factors:  # a per-head (per-query) score scale, applied to the queries
            op = aten.mul.Tensor if how == "mul" else aten.div.Tensor
            scaled = graph.call_function(op, (q, factor))
            _fake(scaled, op, q, factor)
            if _val(scaled).dtype != _val(chain.q).dtype:
                dtype = _val(chain.q).dtype
                scaled_cast = graph.call_function(aten.to.dtype, (scaled, dtype))
                _fake(scaled_cast, aten.to.dtype, scaled, dtype)
                scaled = scaled_cast
            q = scaled
        kwargs = {"attn_mask": mask, "scale": chain.scale}
        sdpa = graph.call_function(aten.scaled_dot_product_attention.default, (q, k, v), kwargs)
        _fake(sdpa, aten.scaled_dot_product_attention.default, q, k, v, **kwargs)
        result = _transposed(graph, sdpa) if chain.out_is_transposed else sdpa
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in output.meta:
            sdpa.meta[key] = output.meta[key]
    output.replace_all_uses_with(result)
    return sdpa


def _transposed(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """``aten.transpose(node, -2, -1)`` with its fake value (inserted at the graph's insert point)."""
    t = graph.call_function(aten.transpose.int, (node, -2, -1))
    _fake(t, aten.transpose.int, node, -2, -1)
    return t


def _erase_dead(graph: fx.Graph, nodes: list) -> set[fx.Node]:
    """Erase the replaced ``nodes`` (with the metadata asserts on them), last first, then
    their operands that nothing reads any more (a transpose of K, baddbmm's empty input).
    Returns the erased nodes."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    erased = set()
    operands = []
    for node in sorted(nodes, key=order.__getitem__, reverse=True):
        for user in list(node.users):
            if _packet(user) in _SKIPPED and not user.users:
                graph.erase_node(user)
        if not node.users:
            operands += [a for a in node.all_input_nodes if a not in nodes]
            graph.erase_node(node)
            erased.add(node)
    for node in operands:
        if node.op == "call_function" and node not in erased and not _readers(node) and not node.is_impure():
            for user in list(node.users):
                graph.erase_node(user)
            graph.erase_node(node)
            erased.add(node)
    return erased


_MASK_KINDS = {"additive": "additive", "fill": "boolean"}  # how a chain's mask reaches SDPA


def recognise_attention(gm: fx.GraphModule) -> list[RecognisedAttention]:
    """Rewrite every hand-written attention chain of ``gm`` as one SDPA node, in place.

    Returns what was replaced, in graph order (an empty list leaves ``gm`` untouched)."""
    found, erased = [], set()
    for node in list(gm.graph.nodes):
        if node in erased or node.op != "call_function" or _packet(node) not in _SOFTMAX:
            continue
        matched = _match(node)
        if matched is None:
            continue
        chain, output = matched
        sdpa = _replace(gm.graph, chain, output)
        found.append(RecognisedAttention(sdpa=sdpa.name, scores=chain.scores.name, softmax=node.name,
                                         output=output.name, scale=chain.scale,
                                         mask=_MASK_KINDS.get(chain.mask_kind)))
        erased |= _erase_dead(gm.graph, chain.nodes)
    if found:
        gm.graph.lint()
        gm.recompile()
    return found
