"""Lower non-overlapping patch extraction / placement operators to ``view`` + ``permute``.

Ported ViT code patchifies with ``F.unfold(x, p, stride=p)`` (``aten.im2col``), ``x.unfold(2, p, p)``
(``aten.unfold``: a strided view) or ``nn.PixelUnshuffle(p)`` (``aten.pixel_unshuffle``), and places
patches back with ``F.fold(x, (H, W), p, stride=p)`` (``aten.col2im``). When the kernel equals the
stride, there is no padding, a dilation of 1 and the grid divides by the kernel, each of them is
exactly a reshape -> permute -> reshape of its input: the patch views the latent-grid analysis already
follows. Anything else (overlapping windows, padding) is left alone and refused as before.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .node_shapes import static_shape

aten = torch.ops.aten


def _pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def _lowering(node: fx.Node):
    """The (view / permute) steps equal to ``node``, or None."""
    target = node.target
    x = node.args[0]
    shape = static_shape(x)
    if shape is None:
        return None
    if target is aten.im2col.default and len(shape) == 4 and len(node.args) >= 5:
        _, kernel, dilation, padding, stride = node.args[:5]
        kernel, dilation, padding, stride = map(_pair, (kernel, dilation, padding, stride))
        b, c, hh, ww = shape
        p1, p2 = kernel
        if stride != kernel or dilation != (1, 1) or padding != (0, 0) or hh % p1 or ww % p2:
            return None
        h, w = hh // p1, ww // p2
        return [(aten.reshape.default, (b, c, h, p1, w, p2)), (aten.permute.default, (0, 1, 3, 5, 2, 4)),
                (aten.reshape.default, (b, c * p1 * p2, h * w))]
    if target is aten.col2im.default and len(shape) == 3 and len(node.args) >= 6:
        _, output_size, kernel, dilation, padding, stride = node.args[:6]
        output_size, kernel, dilation, padding, stride = map(_pair, (output_size, kernel, dilation, padding, stride))
        b, ckk, length = shape
        p1, p2 = kernel
        hh, ww = output_size
        if stride != kernel or dilation != (1, 1) or padding != (0, 0) or hh % p1 or ww % p2 or ckk % (p1 * p2):
            return None
        h, w, c = hh // p1, ww // p2, ckk // (p1 * p2)
        if h * w != length:
            return None
        return [(aten.reshape.default, (b, c, p1, p2, h, w)), (aten.permute.default, (0, 1, 4, 2, 5, 3)),
                (aten.reshape.default, (b, c, hh, ww))]
    if target is aten.pixel_unshuffle.default and len(shape) >= 3 and len(node.args) >= 2:
        r = node.args[1]
        *lead, c, hh, ww = shape
        if hh % r or ww % r:
            return None
        n = len(lead)
        perm = list(range(n)) + [n + i for i in (0, 2, 4, 1, 3)]
        return [(aten.reshape.default, (*lead, c, hh // r, r, ww // r, r)), (aten.permute.default, perm),
                (aten.reshape.default, (*lead, c * r * r, hh // r, ww // r))]
    if target is aten.pixel_shuffle.default and len(shape) >= 3 and len(node.args) >= 2:
        r = node.args[1]
        *lead, crr, h, w = shape
        if crr % (r * r):
            return None
        n = len(lead)
        perm = list(range(n)) + [n + i for i in (0, 3, 1, 4, 2)]
        return [(aten.reshape.default, (*lead, crr // (r * r), r, r, h, w)), (aten.permute.default, perm),
                (aten.reshape.default, (*lead, crr // (r * r), h * r, w * r))]
    if target is aten.unfold.default and len(node.args) >= 4:
        _, dim, size, step = node.args[:4]
        dim = dim % len(shape)
        if size != step or shape[dim] % size:
            return None
        split = shape[:dim] + (shape[dim] // size, size) + shape[dim + 1:]
        perm = [i for i in range(len(split)) if i != dim + 1] + [dim + 1]  # the window axis goes last
        return [(aten.reshape.default, split), (aten.permute.default, perm)]
    return None


def lower_patch_views(gm: fx.GraphModule) -> list[str]:
    """Replace each non-overlapping im2col / col2im / pixel_(un)shuffle / unfold of ``gm`` by views and a
    permute, in place. Returns the names of the replaced nodes."""
    replaced = []
    targets = {aten.im2col.default, aten.col2im.default, aten.pixel_unshuffle.default, aten.pixel_shuffle.default,
               aten.unfold.default}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        steps = _lowering(node)
        if steps is None:
            continue
        x = node.args[0]
        with gm.graph.inserting_before(node):
            out = x
            val = x.meta["val"]
            for op, arg in steps:
                nxt = gm.graph.call_function(op, (out, list(arg)))
                # the meta the analysis reads: a fake value of the right shape, the source location
                val = op(val, list(arg))
                nxt.meta = dict(node.meta)
                nxt.meta["val"] = val
                out = nxt
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        replaced.append(node.name)
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return replaced
