"""A check shared by the test files of the analysis: one sparse step, right after a dense step on
the same inputs, returns the model's own output for any active set."""
from __future__ import annotations

import warnings

import torch


def assert_sparse_after_dense_equals_the_model(model, ras, kw: dict, index: torch.Tensor) -> None:
    """``ras`` (``ras_compile(model, ...)``) runs a dense step on ``kw``, then a sparse step with the
    active tokens ``index`` ([B, k]) on the same inputs; it must return what ``model`` returns. The
    dense step is forced, so one compiled ``ras`` serves many examples."""
    ras.ras_controller.override_next_step("dense")
    ras(**kw)
    ras.ras_controller.override_next_step("sparse", index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same timestep twice in a row, on purpose
        got = ras(**kw)
    with torch.no_grad():
        torch.testing.assert_close(got, model(**kw), rtol=1e-5, atol=1e-5)


def random_active_sets(data, num_tokens: int, batch: int = 2) -> torch.Tensor:
    """``[batch, k]`` sorted active tokens drawn with hypothesis (``data``: ``st.data()``), one set per sample."""
    from hypothesis import strategies as st

    k = data.draw(st.integers(1, num_tokens))
    return torch.stack([torch.tensor(sorted(data.draw(st.permutations(range(num_tokens)))[:k]))
                        for _ in range(batch)])


def assert_ratio_one_loop_equals_the_model(model, inputs, steps: int = 3, backend: str = "aot_eager") -> None:
    """A compiled loop at sample ratio 1 returns the model's output at every step; ``inputs(step)``
    gives the step's keyword arguments, with a ``timestep`` that the loop scales down."""
    from ras_compile import RASPolicy, ras_compile

    ras = ras_compile(model, RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=()), backend=backend)
    for step in range(steps):
        kw = inputs(step)
        kw["timestep"] = kw["timestep"] * (1 - step / (steps + 1))
        with torch.no_grad():
            torch.testing.assert_close(ras(**kw), model(**kw), rtol=1e-5, atol=1e-5)


_COMPILED: dict = {}


def assert_drawn_sparse_step_equals_the_model(data, key, make_model, policy, inputs, num_tokens: int) -> None:
    """``assert_sparse_after_dense_equals_the_model`` on one ``ras_compile`` per ``key`` (``compiled_once``),
    for inputs ``inputs(seed)`` and an active set both drawn with hypothesis (``data``: ``st.data()``)."""
    from hypothesis import strategies as st

    model, ras = compiled_once(key, make_model, policy)
    assert_sparse_after_dense_equals_the_model(model, ras, inputs(data.draw(st.integers(0, 3))),
                                               random_active_sets(data, num_tokens))


def compiled_once(key, make_model, policy):
    """``(model, ras_compile(model, policy, backend=None))``, made once per ``key`` (the test module and
    its parameter), so that the examples hypothesis draws share one capture."""
    from ras_compile import ras_compile

    if key not in _COMPILED:
        model = make_model()
        _COMPILED[key] = (model, ras_compile(model, policy, backend=None))
    return _COMPILED[key]
