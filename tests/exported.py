"""A plain function exported as a graph, for the test files that check one rewrite on its own."""
from __future__ import annotations

import torch
from torch import nn


class Exported:
    """``fn`` exported on ``args``: ``gm`` its graph (a rewrite changes it in place), called through
    the program; ``targets()`` the operators it calls."""

    def __init__(self, fn, *args):
        class Wrap(nn.Module):
            def forward(self, *a):
                return fn(*a)
        self.program = torch.export.export(Wrap(), args, strict=False)
        self.gm = self.program.graph_module

    def __call__(self, *args):
        return self.program.module()(*args)

    def targets(self) -> set:
        return {n.target for n in self.gm.graph.nodes if n.op == "call_function"}
