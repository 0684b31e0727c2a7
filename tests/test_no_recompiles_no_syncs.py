"""Over a whole loop the graphs compile once; the controller never reads the device."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from families import Case, flow_sigmas, prediction_of, timestep_for
from ras_compile import RASPolicy, ras_compile
from ras_compile.controller import RASController


@pytest.mark.parametrize("batch, share", [(2, "per_sample"), (1, "per_sample"), (2, "batch")])
@pytest.mark.parametrize("dense_graph", [False, True])
def test_a_28_step_dynamic_schedule_compiles_each_graph_once(dense_graph, batch, share):
    """One graph by default (dense steps run the sparse graph with every token active), two
    with ``dense_graph=True``; either way nothing compiles again over a whole loop, for
    per-sample and batch-shared active sets. With batch 1 the active index is a ``[1, k]``
    slice of the ranking that keeps the row stride N, which recompiled the sparse graph
    until the runtime made it row-major (``runtime.row_major``)."""
    case = Case("sd3", layers=1, heads=2, head_dim=8, patch=2, height=16, width=16, batch=batch)
    model = case.build()
    policy = RASPolicy(sample_ratio=0.5, warmup_steps=4, reset_steps=(12, 20), schedule="dynamic", num_steps=28,
                       skip_num_step=8, skip_num_step_length=4, dynamic_drop_multiple=4, share_active_set=share)
    ras = ras_compile(model, policy, backend="aot_eager", dense_graph=dense_graph)
    kwargs = case.inputs(model)
    latent, sigmas = kwargs["hidden_states"], flow_sigmas(28)
    first_sparse = 4  # the warm-up steps are 0-3
    torch._dynamo.reset()
    counters.clear()
    try:
        for i in range(28):
            # the first call compiles (and, with a dense graph, the first sparse one); nothing after that
            torch._dynamo.config.error_on_recompile = i > (first_sparse if dense_graph else 0)
            pred = prediction_of(ras(**dict(kwargs, hidden_states=latent, timestep=timestep_for(sigmas[i], batch))))
            latent = latent + (sigmas[i + 1] - sigmas[i]) * pred
    finally:
        torch._dynamo.config.error_on_recompile = False
    counts = [s.active_tokens for s in ras.ras_controller.stats if s.mode == "sparse"]
    assert len(set(counts)) >= 4  # the active count really changes
    assert counters["stats"]["unique_graphs"] == (2 if dense_graph else 1)
    assert not counters["graph_break"]


@pytest.mark.parametrize("metric", ["std", "l2norm", lambda p: p.float().abs().mean(dim=(2, 3))])
@pytest.mark.parametrize("rule", ["paper", "official"])
@pytest.mark.parametrize("share", ["per_sample", "cfg", "batch"])
def test_choosing_the_next_active_set_never_reads_a_tensor_on_the_host(metric, rule, share):
    """On the meta device any host read (item, bool, nonzero, tolist) raises."""
    controller = RASController(RASPolicy(metric=metric, starvation_rule=rule, share_active_set=share,
                                         high_ratio=0.7, warmup_steps=1, reset_steps=()))
    meta = torch.device("meta")
    for step in range(4):
        mode, index = controller.begin_step(1.0 - step / 4, "capture", 64, 4, meta)
        assert mode == ("dense" if step == 0 else "sparse")
        if index is not None:
            assert index.device == meta and index.shape == (4, 32)
        controller.end_step(mode, torch.empty(4, 64, 4, 16, device=meta))


@pytest.mark.parametrize("order", [0, 1, 2])
def test_a_step_cache_never_reads_a_tensor_on_the_host(order):
    """Keeping computed outputs, extrapolating a predicted step and choosing the set after it, on meta."""
    controller = RASController(RASPolicy(warmup_steps=1, reset_steps=(), step_cache_interval=2,
                                         step_cache_order=order))
    meta = torch.device("meta")
    modes = []
    for step in range(6):
        mode, _ = controller.begin_step(1.0 - step / 6, "capture", 64, 2, meta)
        modes.append(mode)
        if mode == "predicted":
            outputs = controller.predicted_outputs()
            assert outputs[0].device == meta and outputs[0].shape == (2, 64, 16)
        else:
            outputs = [torch.empty(2, 64, 16, device=meta)]
            controller.record_outputs(outputs)
        controller.end_step(mode, outputs[0].view(2, 64, 1, 16))
    assert modes == ["dense", "sparse", "predicted", "sparse", "predicted", "sparse"]
