"""The per-head norm matcher (passes/head_norm.py) and the head-alignment check of the
fused K projection (passes/fuse_projection.py) on small exported graphs.

A match must mean "this computes a per-head RMSNorm / LayerNorm of that node"; any
variation that changes the values (another exponent, another reduction dim, statistics
in 16 bits, an intermediate read elsewhere) is no match, so the path stays unfused.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ras_compile.passes.fuse_projection import _aligned_heads
from ras_compile.passes.head_norm import match_head_norm

H, D = 2, 8  # heads, head dim


class Heads(nn.Module):
    """linear -> [B, L, H, D] -> transpose -> ``norm`` -> output."""

    def __init__(self, norm, dtype=torch.float32):
        super().__init__()
        self.proj = nn.Linear(H * D, H * D).to(dtype)
        self.weight = nn.Parameter(torch.randn(D, dtype=dtype))
        self.norm = norm

    def forward(self, x):
        h = self.proj(x).view(x.shape[0], x.shape[1], H, D).transpose(1, 2)
        return self.norm(self, h)


def diffusers_rms(m, h, eps=1e-6, power=2, dim=-1, upcast=True):
    t = h.to(torch.float32) if upcast else h
    var = t.pow(power).mean(dim, keepdim=True)
    return (h * torch.rsqrt(var + eps)).to(h.dtype) * m.weight


def _out_node(module, dtype=torch.float32):
    x = torch.randn(2, 5, H * D, dtype=dtype)
    gm = torch.export.export(module, (x,)).graph_module
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    return gm, out


CASES = {
    "F.rms_norm": (lambda m, h: F.rms_norm(h, (D,), m.weight, 1e-6), "rms", True),
    "F.rms_norm, no weight": (lambda m, h: F.rms_norm(h, (D,), None, 1e-5), "rms", False),
    "F.layer_norm": (lambda m, h: F.layer_norm(h, (D,), m.weight, None, 1e-6), "layer", True),
    "fp32 layer norm, cast back": (lambda m, h: F.layer_norm(h.float(), (D,), None, None, 1e-5).to(h.dtype),
                                   "layer", False),
    "diffusers RMSNorm": (diffusers_rms, "rms", True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_norm_forms_match(name):
    norm, kind, affine = CASES[name]
    gm, out = _out_node(Heads(norm))
    found = match_head_norm(out)
    assert found is not None and found.kind == kind and found.head_dim == D
    assert (found.weight is not None) == affine
    assert found.input.startswith("transpose")


NOT_NORMS = {
    "cube instead of square": lambda m, h: diffusers_rms(m, h, power=3),
    "mean over heads": lambda m, h: diffusers_rms(m, h, dim=-2),
    "16-bit statistics": lambda m, h: diffusers_rms(m, h, upcast=False),
    "norm over two dims": lambda m, h: F.layer_norm(h, (5, D)),  # tokens and head dim
    "rsqrt read twice": lambda m, h: (lambda r: h * r + r)(torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)),
    "plus a constant": lambda m, h: F.rms_norm(h, (D,), m.weight, 1e-6) + 1,
}


@pytest.mark.parametrize("name", list(NOT_NORMS))
def test_other_computations_do_not_match(name):
    dtype = torch.bfloat16 if name == "16-bit statistics" else torch.float32
    gm, out = _out_node(Heads(NOT_NORMS[name], dtype), dtype)
    assert match_head_norm(out) is None


def _layout_nodes(view_shape, *, transpose=None, permute=None):
    class M(nn.Module):
        def forward(self, y):
            h = y.view(*view_shape)
            if transpose:
                h = h.transpose(*transpose)
            if permute:
                h = h.permute(*permute)
            return h + 0

    gm = torch.export.export(M(), (torch.randn(2, 5, H * D),)).graph_module
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and "view" in str(n.target)
             or "transpose" in str(n.target) or "permute" in str(n.target)]
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    return placeholder, nodes


@pytest.mark.parametrize("view_shape,kw,aligned", [
    ((2, 5, H, D), dict(transpose=(1, 2)), True),     # [B, H, L, D]: heads of the projection
    ((2, 5, H, D), {}, True),
    ((2, 5, D, H), {}, False),                        # the last dim strides across heads
    ((2, 5, H, D), dict(transpose=(2, 3)), False),    # last dim = heads
    ((2, 5, H * D), {}, False),                       # the whole row is not one head of D
])
def test_only_whole_aligned_heads_are_fused(view_shape, kw, aligned):
    linear, nodes = _layout_nodes(view_shape, **kw)
    assert _aligned_heads(linear, nodes, D) is aligned
