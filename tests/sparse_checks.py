"""A check shared by the test files of the analysis: one sparse step, right after a dense step on
the same inputs, returns the model's own output for any active set."""
from __future__ import annotations

import warnings

import torch


def assert_sparse_after_dense_equals_the_model(model, ras, kw: dict, index: torch.Tensor) -> None:
    """``ras`` (``ras_compile(model, ...)``) runs a dense step on ``kw``, then a sparse step with the
    active tokens ``index`` ([B, k]) on the same inputs; it must return what ``model`` returns."""
    ras(**kw)
    ras.ras_controller.override_next_step("sparse", index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same timestep twice in a row, on purpose
        got = ras(**kw)
    with torch.no_grad():
        torch.testing.assert_close(got, model(**kw), rtol=1e-5, atol=1e-5)
