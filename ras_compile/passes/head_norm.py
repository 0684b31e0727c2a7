"""Recognise a per-head norm (RMSNorm / LayerNorm over the last dim) in a captured graph.

The fused K projection (passes/fuse_projection.py) can carry a q/k-norm in its
epilogue. What such a norm looks like in the graph torch.export captures (torch 2.13,
diffusers 0.42):

* ``aten.rms_norm(h, [d], weight, eps)``: ``torch.nn.RMSNorm`` / ``F.rms_norm``
  (Flux, Wan, ...).
* ``aten.layer_norm(h, [d], weight, bias, eps, cudnn)``: ``nn.LayerNorm``
  (CogVideoX, HunyuanDiT, ...).
* either op on ``to(h, float32)`` and cast back with ``to(., dtype)``: diffusers'
  ``FP32LayerNorm`` (AuraFlow).
* diffusers' own ``RMSNorm``, decomposed (SD3.5, ...)::

      t = to(h, float32)                  # absent when h is already fp32 and not cast
      r = rsqrt(add(mean(pow(t, 2), [-1], keepdim=True), eps))
      y = mul(t or h, r)
      [y = to(y, dtype)]  [y = mul(y, weight)]  [y = to(y, dtype)]

``match_head_norm(node)`` answers "is ``node`` the output of one of these, and what
does it read?". The decomposed match is strict: every intermediate node must be read
only inside the pattern, the mean is over the last dim with keepdim, the power is 2, a
16-bit input must be cast to fp32 before the statistics (so that the fused epilogue's
fp32 arithmetic is what the model computes, up to rounding). Anything else is not a
match, and the caller leaves the path unfused.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .token_axis import _SKIPPED, _arg, _packet, _val

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class HeadNormMatch:
    """A norm over the last dim of ``input`` (size ``head_dim``) whose value is ``output``."""

    kind: str                 # "rms" or "layer"
    input: str                # the node normalised
    output: str               # the node holding the normalised (and affine) value
    nodes: tuple[str, ...]    # every node of the pattern, output included
    weight: str | None        # [head_dim] affine weight node
    bias: str | None          # [head_dim] affine bias node (layer norm)
    eps: float
    head_dim: int


def _is(node, packet) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and _packet(node) is packet


def _last_dim_only(node: fx.Node, normalized_shape) -> int | None:
    """``head_dim`` when ``normalized_shape`` is the input's last dim alone, else None."""
    val = _val(node.args[0])
    if val is None or val.dim() == 0 or not isinstance(normalized_shape, (list, tuple)):
        return None
    if len(normalized_shape) != 1 or int(normalized_shape[0]) != int(val.shape[-1]):
        return None
    return int(val.shape[-1])


def _affine_ok(param, head_dim: int) -> bool:
    v = _val(param)
    return param is None or (v is not None and tuple(v.shape) == (head_dim,))


def _match_rms_op(node: fx.Node) -> HeadNormMatch | None:
    head_dim = _last_dim_only(node, _arg(node, 1, "normalized_shape"))
    weight, eps = _arg(node, 2, "weight"), _arg(node, 3, "eps")
    if head_dim is None or not _affine_ok(weight, head_dim) or not isinstance(node.args[0], fx.Node):
        return None
    if eps is None:  # F.rms_norm's default: the input dtype's machine epsilon
        eps = torch.finfo(_val(node.args[0]).dtype).eps
    return HeadNormMatch("rms", node.args[0].name, node.name, (node.name,), getattr(weight, "name", None), None,
                         float(eps), head_dim)


def _match_layer_op(node: fx.Node) -> HeadNormMatch | None:
    head_dim = _last_dim_only(node, _arg(node, 1, "normalized_shape"))
    weight, bias, eps = _arg(node, 2, "weight"), _arg(node, 3, "bias"), _arg(node, 4, "eps", 1e-5)
    if head_dim is None or not (_affine_ok(weight, head_dim) and _affine_ok(bias, head_dim)):
        return None
    if not isinstance(node.args[0], fx.Node):
        return None
    return HeadNormMatch("layer", node.args[0].name, node.name, (node.name,), getattr(weight, "name", None),
                         getattr(bias, "name", None), float(eps), head_dim)


def _to_dtype(node) -> torch.dtype | None:
    """The target dtype of a plain ``aten.to.dtype`` cast, else None."""
    if not _is(node, aten.to) or node.target is not aten.to.dtype:
        return None
    if set(node.kwargs) - {"non_blocking", "copy"} or node.kwargs.get("copy"):
        return None
    return node.args[1] if len(node.args) > 1 else None


def _rsqrt_stats(r) -> tuple[fx.Node, float, list] | None:
    """``rsqrt(add(mean(pow(t, 2), [-1], keepdim=True), eps))`` -> (t, eps, nodes)."""
    if not _is(r, aten.rsqrt):
        return None
    add = r.args[0]
    if not _is(add, aten.add) or add.target is not aten.add.Tensor or add.kwargs or len(add.args) != 2:
        return None
    mean, eps = add.args
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        return None
    if not _is(mean, aten.mean) or mean.target is not aten.mean.dim or mean.kwargs.get("dtype") is not None:
        return None
    pw = mean.args[0]
    rank = _val(pw).dim() if _val(pw) is not None else -1
    dims = mean.args[1] if len(mean.args) > 1 else None
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if not (isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] % rank == rank - 1 and keepdim):
        return None
    if not _is(pw, aten.pow) or pw.target is not aten.pow.Tensor_Scalar or pw.args[1] != 2:
        return None
    return pw.args[0], float(eps), [r, add, mean, pw]


def _match_decomposed_rms(node: fx.Node) -> HeadNormMatch | None:
    nodes: list[fx.Node] = [node]
    cur = node
    if _to_dtype(cur) is not None:  # the final cast back to the model dtype
        cur = cur.args[0]
        nodes.append(cur)
    weight = None
    if _rsqrt_in(cur) is None and _is(cur, aten.mul) and cur.target is aten.mul.Tensor and len(cur.args) == 2:
        y, w = cur.args  # y * weight, the order diffusers writes it
        if isinstance(w, fx.Node) and _val(w) is not None and _val(w).dim() == 1:
            weight, cur = w, y
            nodes.append(cur)
            if _to_dtype(cur) is not None:  # diffusers rounds to a 16-bit weight's dtype first
                cur = cur.args[0]
                nodes.append(cur)
    core = _rsqrt_in(cur)
    if core is None:
        return None
    t, eps, stats = core
    src = t
    if _to_dtype(t) is not None:
        if _to_dtype(t) is not torch.float32:
            return None
        src = t.args[0]
        stats.append(t)
    a = cur.args[0] if cur.args[1] is stats[0] else cur.args[1]
    if a is not t and a is not src:
        return None
    if not isinstance(src, fx.Node) or _val(src) is None or _val(src).dim() == 0:
        return None
    if _val(src).dtype is not torch.float32 and t is src:
        return None  # statistics in 16 bits: not what the fp32 epilogue computes
    head_dim = int(_val(src).shape[-1])
    if weight is not None and tuple(_val(weight).shape) != (head_dim,):
        return None
    if not _inside_only(nodes + stats):  # intermediates are read inside the pattern only
        return None
    return HeadNormMatch("rms", src.name, node.name, tuple(n.name for n in nodes + stats),
                         getattr(weight, "name", None), None, eps, head_dim)


def _rsqrt_in(node) -> tuple[fx.Node, float, list] | None:
    """For ``mul(y, rsqrt(stats(t)))`` (either order): (t, eps, [rsqrt, add, mean, pow, ...]); the
    rsqrt is the list's first entry."""
    if not (_is(node, aten.mul) and node.target is aten.mul.Tensor and len(node.args) == 2 and not node.kwargs):
        return None
    for r in (node.args[1], node.args[0]):
        found = _rsqrt_stats(r)
        if found is not None:
            return found
    return None


def _inside_only(pattern: list[fx.Node]) -> bool:
    """Every node of ``pattern`` but the first (the output) is read inside it only."""
    names = {n.name for n in pattern}
    return all(u.name in names or (u.op == "call_function" and _packet(u) in _SKIPPED)
               for n in pattern[1:] for u in n.users)


def _match_norm_op(node: fx.Node) -> HeadNormMatch | None:
    """``[to(]rms_norm|layer_norm([to(]h[, float32)], ...)[, dtype)]``: the op, optionally
    computed on an fp32 copy and cast back (diffusers' FP32LayerNorm)."""
    pattern = [node]
    op = node
    if _to_dtype(op) is not None:
        op = op.args[0]
        pattern.append(op)
    if not isinstance(op, fx.Node) or op.op != "call_function":
        return None
    if op.target is aten.rms_norm.default:
        found = _match_rms_op(op)
    elif op.target is aten.layer_norm.default:
        found = _match_layer_op(op)
    else:
        return None
    if found is None:
        return None
    src = op.args[0]
    if _to_dtype(src) is not None:
        if _to_dtype(src) is not torch.float32:
            return None
        pattern.append(src)
        src = src.args[0]
    if pattern[1:] and not _inside_only(pattern):
        return None
    if not isinstance(src, fx.Node) or _val(src) is None:
        return None
    return dataclasses.replace(found, input=src.name, output=node.name, nodes=tuple(n.name for n in pattern))


def match_head_norm(node: fx.Node) -> HeadNormMatch | None:
    """The per-head norm whose output is ``node``, or None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    return _match_norm_op(node) or _match_decomposed_rms(node)
