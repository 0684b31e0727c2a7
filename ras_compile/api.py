"""``ras_compile(model, policy)``: the one public entry point."""
from __future__ import annotations

import torch

from .policy import RASPolicy
from .runtime import RASModule

SUPPORTED_BACKENDS = ("inductor", "aot_eager", "eager", None)


def ras_compile(model: torch.nn.Module, policy: RASPolicy | None = None, *, backend: str | None = "inductor",
                latent_arg: str | None = None, timestep_arg: str | None = None,
                fuse_kv_projection: bool | str = "auto", dense_graph: bool = False,
                compile_mode: str | None = None) -> RASModule:
    """Return ``model`` with Region-Adaptive Sampling, compiled.

    The result has the model's call signature and outputs. Graphs are captured on
    the first call for every input signature (shapes, dtypes, non-tensor
    arguments) and compiled with ``backend`` (``"inductor"``; ``"aot_eager"`` or
    ``"eager"`` to debug the rewrite through Dynamo; ``None`` runs the rewritten
    graphs directly, without Dynamo).

    ``latent_arg`` names the forward argument holding the noisy latent (default:
    ``hidden_states`` if the forward has it, else its first argument; a tensor, or a list of one
    tensor per sample, all of one shape, which runs as their stack);
    ``timestep_arg`` the one holding the timestep (default: the first of
    ``timestep``, ``timesteps``, ``t`` the forward has), from which steps and new
    generations are told apart; without one, every call is a new step.

    ``fuse_kv_projection``: where a K or V projection reaches attention through
    layout changes only, project the active rows straight into the cache with
    ``ras_compile.kernels.linear_scatter_`` (a Triton GeMM with a scatter epilogue).
    ``"auto"`` fuses on CUDA when Triton is installed; ``True`` always (off CUDA the op
    runs its ATen reference, which gives the same values); ``False`` never.

    ``dense_graph``: ``False`` (default) runs the dense steps (warm-up, resets, after
    the end step) through the sparse graph with every token active, so each input
    signature compiles one graph; ``True`` compiles a separate dense graph for them
    (two compiles; dense steps skip the gathers and scatters of the sparse graph).
    Both give the dense model's values; ``docs/benchmarks.md`` has the measured trade.

    ``compile_mode``: ``torch.compile``'s ``mode`` for the Inductor graphs (``None``:
    torch's default). ``"reduce-overhead"`` replays CUDA graphs on CUDA: the K/V and
    output caches are marked as static addresses (the graphs write them in place) and
    every call starts a new CUDA-graph step, so a returned tensor is valid until the
    next call (pipelines consume it before then). One CUDA graph is recorded per
    active-token count (two with a static ratio: ``k`` and ``N``). Not yet measured on a
    GPU: see docs/benchmarks.md.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"ras_compile expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, RASModule):
        raise ValueError("this model is already RAS-compiled; pass the original model (module.model)")
    if policy is None:
        policy = RASPolicy()
    if not isinstance(policy, RASPolicy):
        raise TypeError(f"policy must be a RASPolicy, got {type(policy).__name__}")
    if backend not in SUPPORTED_BACKENDS and not callable(backend):
        raise ValueError(f"backend={backend!r} is not supported: use one of {SUPPORTED_BACKENDS} or a callable "
                         "torch.compile backend")
    return RASModule(model, policy, backend=backend, latent_arg=latent_arg, timestep_arg=timestep_arg,
                     fuse_kv_projection=fuse_kv_projection, dense_graph=dense_graph,
                     compile_mode=compile_mode)
