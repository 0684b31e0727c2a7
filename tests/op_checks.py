"""Checks that a custom op lives inside `torch.compile` graphs, shared by the kernel test files.

Each takes a function that calls the op between other ops (so the op sits inside a
graph) and a dict of its inputs (tensors or None); the op writes one of them, `cache`,
in place.
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


def clone_inputs(inputs: dict) -> dict:
    """A copy of ``inputs`` whose tensors are fresh clones (None stays None)."""
    return {n: None if t is None else t.clone() for n, t in inputs.items()}


def assert_compiled_matches_eager(fn: Callable, inputs: dict, backend: str, **tolerance) -> None:
    """``torch.compile(fn, fullgraph=True)`` returns what eager ``fn`` returns, and its in-place
    write of ``cache`` reaches the caller's tensor."""
    torch._dynamo.reset()
    eager_in, comp_in = clone_inputs(inputs), clone_inputs(inputs)
    want = fn(**eager_in)
    got = torch.compile(fn, backend=backend, fullgraph=True)(**comp_in)
    torch.testing.assert_close(got, want, **tolerance)
    torch.testing.assert_close(comp_in["cache"], eager_in["cache"], **tolerance)


def assert_one_graph_without_breaks(fn: Callable, inputs: dict) -> None:
    """Dynamo captures ``fn`` as one graph with no graph break."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(**inputs)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def assert_dynamic_k_compiles_once(fn: Callable, make_inputs: Callable[..., dict], ks=(3, 5, 8), max_k: int = 12
                                   ) -> None:
    """With ``x`` and ``index`` marked dynamic along dim 1 (the active-token count k), the
    compiled ``fn`` matches eager at every k in ``ks`` and compiles once.
    ``make_inputs(seed=..., k=...)`` builds the inputs."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for k in ks:
        inputs = make_inputs(seed=k, k=k)
        # (a max is needed: with min alone torch 2.13 fails in value-range setup)
        torch._dynamo.mark_dynamic(inputs["x"], 1, min=2, max=max_k)
        torch._dynamo.mark_dynamic(inputs["index"], 1, min=2, max=max_k)
        eager_in = clone_inputs(inputs)
        torch.testing.assert_close(compiled(**inputs), fn(**eager_in))
        torch.testing.assert_close(inputs["cache"], eager_in["cache"])
    assert counter.frame_count == 1


class _GraphSeen(Exception):
    pass


def traced_targets(fn: Callable, *args) -> list[str]:
    """The call targets of the forward graph AOTAutograd's functionalization makes of
    ``fn(*args)``: what Inductor would compile. Works on fake tensors (e.g. fake CUDA
    tensors without a GPU), since the graph is captured and never run."""
    from functorch.compile import aot_function

    graphs = []

    def compiler(gm, _inputs):
        graphs.append(gm)
        raise _GraphSeen  # fake tensors cannot run the graph; the graph is all we want

    with pytest.raises(_GraphSeen):
        aot_function(fn, fw_compiler=compiler)(*args)
    return [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]


class _FakeSm90Driver:
    """What torch's user-kernel tracing asks of Triton's driver: an sm90 CUDA target."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cuda")


def recorded_kernel_calls(fn: Callable, monkeypatch, *args) -> list[dict]:
    """The kwargs of every Triton kernel call in the graph AOTAutograd records for
    ``fn(*args)`` (fake CUDA tensors), as compiled for an sm90 GPU that is not there: a
    fake driver lets torch lower the kernel to Triton IR on this machine, so its analysis
    of which tensors the kernel writes (``tensors_to_clone``) runs as it would on a GPU."""
    import triton
    from functorch.compile import aot_function

    monkeypatch.setattr(triton.runtime.driver, "_active", _FakeSm90Driver())
    graphs = []

    def compiler(gm, _inputs):
        graphs.append(gm)
        raise _GraphSeen

    with pytest.raises(_GraphSeen):
        aot_function(fn, fw_compiler=compiler)(*args)
    return [dict(n.kwargs) for n in graphs[0].graph.nodes
            if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target)]
