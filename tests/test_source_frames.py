"""Refusals and densified values name the model's own code (ras_compile/source_frames.py):
the submodule a node was traced in and the line of the model that made it, not only an
FX node name such as ``gather_3``."""
from __future__ import annotations

import inspect
import os

import pytest
import torch
from torch import nn

from ras_compile import RASPolicy, UnsupportedModelError, explain, ras_compile
from ras_compile.source_frames import module_of, node_frame

HERE = os.path.basename(__file__)


def _line_of(fn, marker: str) -> int:
    """The line number of the line of ``fn`` that contains ``marker``."""
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if marker in line)


class TokenShuffle(nn.Module):
    """Moves values between tokens: the pass must refuse it."""

    def forward(self, x):
        order = torch.argsort(x[..., 0], dim=1)  # ranks tokens
        return torch.gather(x, 1, order[..., None].expand_as(x))  # moves values between tokens


class Block(nn.Module):
    def __init__(self, dim: int, shuffle: bool):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mix = TokenShuffle() if shuffle else nn.Identity()

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.mix(x + self.proj(a))


class TinyDiT(nn.Module):
    def __init__(self, shuffle_in: int | None = None, dim: int = 16, patch: int = 2, channels: int = 4):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.embed = nn.Conv2d(channels, dim, patch, patch)
        self.t = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(Block(dim, i == shuffle_in) for i in range(2))
        self.out = nn.Linear(dim, patch * patch * channels)

    def forward(self, latent, timestep):
        b, _, h, w = latent.shape
        x = self.embed(latent).flatten(2).transpose(1, 2) + self.t(timestep[:, None])[:, None]
        for block in self.blocks:
            x = block(x)
        p = self.patch
        x = self.out(x).view(b, h // p, w // p, p, p, self.channels)  # the token grid
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, self.channels, h, w)  # unpatchify


def _inputs():
    g = torch.Generator().manual_seed(0)
    return {"latent": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([0.5, 0.25])}


def test_a_refusal_names_the_submodule_and_the_model_line():
    model = TinyDiT(shuffle_in=1)
    ras = ras_compile(model, RASPolicy(), backend=None)
    with pytest.raises(UnsupportedModelError) as info:
        ras(**_inputs())
    error = info.value
    line = _line_of(TokenShuffle.forward, "# moves values")
    assert error.op == "aten.gather.default"
    assert error.source == (f" in blocks.1.mix (TokenShuffle) at {HERE}:{line} "
                            "`return torch.gather(x, 1, order[..., None].expand_as(x))  # moves values between tokens`")
    assert f"node '{error.node}' (aten.gather.default) in blocks.1.mix (TokenShuffle) at {HERE}:{line}" in str(error)


def test_explain_says_where_each_densified_value_is_read():
    model = TinyDiT()
    result = explain(model, _inputs(), verbose=False)
    line = _line_of(TinyDiT.forward, "# unpatchify")  # the grid's axes are interleaved with the patch axes
    assert len(result.densified) == len(result.densified_sources) == 1
    assert result.densified_sources[0] == (f" at {HERE}:{line} "
                                           "`return x.permute(0, 5, 1, 3, 2, 4).reshape(b, self.channels, h, w)  "
                                           "# unpatchify`")
    assert f"{HERE}:{line}" in str(result).splitlines()[2]


class IndexPlacer(nn.Module):
    """Token latents [B, N, C] placed into a longer sequence at scattered positions given as an input: no
    rule can tell which tokens the rows are, in either reading of a 3-D latent (one contiguous run of
    positions would be a slice: tests/test_index_inputs.py)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.inp = nn.Linear(dim, dim)

    def forward(self, latent, slots):
        base = torch.zeros(latent.shape[0], 2 * latent.shape[1], latent.shape[2])
        x = base.index_copy(1, slots, self.inp(latent))  # placed rows
        return nn.functional.scaled_dot_product_attention(x, x, x)[:, : latent.shape[1]]


def test_a_combined_refusal_names_the_model_line_once():
    model = IndexPlacer()
    ras = ras_compile(model, RASPolicy(), backend=None)
    with pytest.raises(UnsupportedModelError) as info:
        ras(latent=torch.randn(2, 6, 8), slots=torch.arange(0, 12, 2))
    message = str(info.value)
    line = _line_of(IndexPlacer.forward, "# placed rows")
    assert "read as tokens [B, N, C]" in message and "read as a signal [B, C, L]" in message
    assert message.count(f"{HERE}:{line}") == 1
    assert info.value.source.endswith(f"{HERE}:{line} `x = base.index_copy(1, slots, self.inp(latent))  # placed rows`")


def test_a_node_without_export_metadata_has_no_frame():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(torch.ops.aten.relu.default, (x,))
    assert node_frame(node) == "" and module_of(node) == ""


def test_torch_frames_are_skipped_for_the_innermost_model_frame():
    """A linear's trace ends in torch's own ``F.linear`` call: the frame shown is the model's call of it."""
    model = TinyDiT()
    program = torch.export.export(model, (), _inputs(), strict=False)
    linear = next(n for n in program.graph.nodes if n.op == "call_function" and "linear" in str(n.target)
                  and "blocks.0.qkv" in module_of(n))
    line = _line_of(Block.forward, "self.qkv(x)")
    assert "torch" + os.sep + "nn" in linear.meta["stack_trace"]  # torch's frame is recorded ...
    assert node_frame(linear).startswith(f" in blocks.0.qkv (Linear) at {HERE}:{line} `q, k, v = self.qkv(x)")  # not shown


class LengthFromMask(TinyDiT):
    """Allocates as many rows as the latent has positive values, read on the host: a data-dependent
    shape (a count of an integer input would be captured for its value, test_host_reads.py)."""

    def forward(self, latent, timestep):
        n = (latent > 0).sum().item()  # a host read
        rows = latent.new_zeros(latent.shape[0], n, 4)
        return super().forward(latent, timestep) + rows.sum()


def test_a_data_dependent_shape_names_the_host_read_it_comes_from():
    ras = ras_compile(LengthFromMask(), RASPolicy(), backend=None)
    with pytest.raises(UnsupportedModelError) as info:
        ras(**_inputs())
    reason = info.value.reason
    line = _line_of(LengthFromMask.forward, "# a host read")
    assert "depends on tensor values" in reason
    assert "u0 is read from a tensor as a Python number (`.item()`, `.tolist()`, `int(t)`): node '" in reason
    assert f"{HERE}:{line} `n = (latent > 0).sum().item()  # a host read`" in reason



def test_a_size_from_nonzero_names_the_operator():
    class Nonzero(TinyDiT):
        def forward(self, latent, timestep):
            rows = torch.nonzero(latent[:, 0].flatten(1) > 0)
            return super().forward(latent, timestep) + rows.shape[0] * 0

    ras = ras_compile(Nonzero(), RASPolicy(), backend=None)
    with pytest.raises(UnsupportedModelError) as info:
        ras(**_inputs())
    assert "is the output size of aten.nonzero.default, which depends on its input's values: node 'nonzero'" \
        in info.value.reason
