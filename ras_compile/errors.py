"""The package's exceptions: each one says what failed and what to change."""
from __future__ import annotations


class RASError(Exception):
    """Base class of every error ras_compile raises on purpose."""


class UnsupportedModelError(RASError):
    """The pass cannot rewrite this model's graph.

    ``node`` and ``op`` name the FX node and operator where the analysis stopped;
    ``source`` where that node comes from in the model's code (its submodule and line,
    `` in blocks.3.attn (Attention) at attention.py:120 `code` ``, or ``""``);
    ``reason`` says why. ``RASPolicy(on_unsupported="fallback")`` runs the dense
    compiled model instead, with a warning.
    """

    def __init__(self, reason: str, node: str | None = None, op: str | None = None, source: str = ""):
        self.node, self.op, self.reason, self.source = node, op, reason, source
        where = f"node '{node}' ({op}){source}: " if node is not None else ""
        super().__init__(
            f"ras_compile cannot handle this model: {where}{reason}. "
            "Pass RASPolicy(on_unsupported='fallback') to run it dense instead."
        )


class RASCallError(RASError, ValueError):
    """The compiled module was called in a way it cannot serve (bad arguments)."""
