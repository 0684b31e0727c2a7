"""The token stream picked up again after an operator that had to run on the full value.

A densified operator (a ``torch.roll`` of the token grid, a depthwise convolution applied to
the residual stream itself) runs on the full value, active rows scattered into its cache.
If its output is the stream from then on (nothing sparse reads it), everything after it used
to run on every token: the next block's attention, its projections, its feed-forward. Here
the output of such an operator, when it still carries the image tokens (one axis of ``N``,
or the token grid's axes), becomes a token source of its own: it is gathered where it is
computed and the analysis runs again, so what follows runs on the active rows, reads stale
K/V from caches and is densified where it ends, exactly as the first stream is. A sparse
step right after a dense step on the same inputs still returns the dense output.

A pick-up is kept only if the new analysis runs more projections, convolutions, matrix
products or attention nodes on the active rows than before (so an output that only reaches
the unpatchify is not gathered for nothing), and everything that ran on the active rows
still does.
"""
from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx

from . import side_sources as ss
from . import token_axis as ta

MAX_ANALYSES = 8


def _sparse_work(analysis: ta.TokenAnalysis, nodes: dict[str, fx.Node]) -> int:
    """How many heavy nodes (projections, convolutions, matrix products, attention) run on the active rows."""
    heavy = ss._HEAVY | {ta.aten.scaled_dot_product_attention}
    return sum(1 for name, lay in analysis.layouts.items()
               if isinstance(lay, ta.TokenLayout) and name in nodes and nodes[name].op == "call_function"
               and ta._packet(nodes[name]) in heavy)


def _sparse(analysis: ta.TokenAnalysis) -> set[str]:
    return {name for name, lay in analysis.layouts.items() if isinstance(lay, ta.TokenLayout)}


def pick_up_stream(gm: fx.GraphModule, analysis: ta.TokenAnalysis,
                   rerun: Callable[[dict], ta.TokenAnalysis]) -> ta.TokenAnalysis:
    """``analysis`` with the outputs of densified operators gathered where the stream would end
    there; ``rerun(sources)`` analyses the graph again with ``sources`` laid out as given."""
    nodes = {n.name: n for n in gm.graph.nodes}
    best, tried, tries = analysis, set(), 0
    accepted = {name: best.layouts[name] for name in best.side_sources}
    while tries < MAX_ANALYSES:
        candidates = []
        for key in best.densify_at:
            consumer = nodes.get(key.split(":")[0])
            if consumer is None or consumer.op != "call_function" or consumer.name in tried:
                continue
            if isinstance(best.layouts.get(consumer.name), ta.TokenLayout):
                continue
            if any(isinstance(best.layouts.get(u.name), ta.TokenLayout) for u in ta._readers(consumer)):
                continue  # read by the stream: a side input (side_sources moves those)
            lay = ss.guess_layout(consumer, best)
            if lay is not None:
                candidates.append((consumer.name, lay))
        if not candidates:
            break
        improved = False
        for name, lay in candidates:
            if tries >= MAX_ANALYSES:
                break
            tried.add(name)
            tries += 1
            try:
                found = rerun({**accepted, name: lay})
            except Exception:  # noqa: BLE001 - a pick-up that does not analyse never costs the analysis
                continue
            if name in found.side_sources and _sparse_work(found, nodes) > _sparse_work(best, nodes) \
                    and _sparse(best) <= _sparse(found):
                best, accepted, improved = found, {**accepted, name: lay}, True
        if not improved:
            break
    return best
