"""``RASPolicy.stale_token_order=1``: inactive tokens continued from their last two computed values,
checked piece by piece and over whole loops against the eager RAS reference plus an independent,
pixel-level extrapolation."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from families import Case, cases, euler_loop, prediction_of
from reference import EagerRASReference, _token_mask
from ras_compile import RASPolicy, ras_compile
from ras_compile.controller import RASController
from ras_compile.stale_tokens import element_tokens, estimate, merge, start

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _dit_patches(channels: int, height: int, width: int, patch: int):
    """[1, C, H, W] -> [1, N, p*p, C], row-major tokens (what the pass's grid analysis gives a DiT)."""
    def cut(x):
        x = x.reshape(1, channels, height // patch, patch, width // patch, patch)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(1, (height // patch) * (width // patch), patch * patch, channels)
    return cut


@pytest.mark.parametrize("channels, height, width, patch", [(4, 8, 8, 2), (3, 4, 6, 1), (8, 6, 4, 2)])
def test_element_tokens_names_the_patch_of_every_element(channels, height, width, patch):
    tokens = element_tokens(torch.Size([channels, height, width]), _dit_patches(channels, height, width, patch))
    h = torch.arange(height).view(1, height, 1) // patch
    w = torch.arange(width).view(1, 1, width) // patch
    expected = (h * (width // patch) + w).expand(channels, height, width)
    assert torch.equal(tokens, expected)


def test_element_tokens_refuses_a_cut_that_leaves_elements_out():
    with pytest.raises(ValueError, match="belong to no token"):
        element_tokens(torch.Size([2, 4]), lambda x: x[:, :1].reshape(1, 1, 1, 4))


def test_a_token_on_a_line_stays_on_it_and_a_token_computed_once_stands_still():
    tokens = torch.tensor([0, 0, 1, 1, 2])  # 3 tokens, 5 elements
    line = lambda s: torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]]) * (1 + 0.5 * s)  # noqa: E731
    history = start(line(0), 0, 3)
    everything = torch.ones(1, 3, dtype=torch.bool)
    merged, history = merge(line(1), everything, history, tokens, 1)  # a dense step: all computed
    assert torch.equal(merged, line(1))
    only_token_1 = torch.tensor([[False, True, False]])
    merged, history = merge(line(2), only_token_1, history, tokens, 2)
    torch.testing.assert_close(merged, line(2))  # 0 and 2 continued exactly along the line
    merged, history = merge(line(3) * 0, only_token_1, history, tokens, 3)  # token 1 computed (0 here)
    torch.testing.assert_close(merged[0, [0, 1, 4]], line(3)[0, [0, 1, 4]])  # 3 steps since 0 and 2 were computed
    assert merged[0, 2:4].abs().max() == 0
    assert history.last_step.tolist() == [[1.0, 3.0, 1.0]] and history.previous_step.tolist() == [[0.0, 2.0, 0.0]]
    once = start(line(0), 4, 3)  # computed once: nothing to continue from
    torch.testing.assert_close(estimate(once, tokens, 6), line(0))


def test_bad_stale_token_order_says_what_is_allowed():
    for bad in (2, -1, 1.0, True):
        with pytest.raises(ValueError, match="RASPolicy.stale_token_order=.*must be 0 .*or 1"):
            RASPolicy(stale_token_order=bad)


def test_merging_stale_tokens_never_reads_a_tensor_on_the_host():
    controller = RASController(RASPolicy(warmup_steps=1, reset_steps=(), stale_token_order=1))
    meta = torch.device("meta")
    tokens = torch.arange(64).repeat_interleave(4).view(4, 64).to(meta)  # 4 channels per token, on the device
    for step in range(4):
        mode, index = controller.begin_step(1.0 - step / 4, "capture", 64, 2, meta)
        merged = controller.merge_stale(torch.empty(2, 4, 64, device=meta), index, tokens)
        assert merged.device == meta and merged.shape == (2, 4, 64)
        controller.end_step(mode, torch.empty(2, 64, 1, 4, device=meta))


# -- whole loops ------------------------------------------------------------------------------------
class PixelContinuation:
    """The test's own stale-token rule, per pixel: last / previous computed value and their steps."""

    def __init__(self):
        self.state = None

    def __call__(self, computed: torch.Tensor, fresh: torch.Tensor, step: int) -> torch.Tensor:
        """``computed``: the reference's order-0 prediction; ``fresh``: bool, broadcastable, the pixels
        this step computed."""
        fresh = fresh.expand_as(computed)
        if self.state is None:
            self.state = [computed.clone(), computed.clone(), torch.full_like(computed, step),
                          torch.full_like(computed, -1.0)]
            return computed
        last, previous, last_step, previous_step = self.state
        out = computed.clone()
        for i in (~fresh).nonzero().tolist():
            i = tuple(i)
            if previous_step[i] >= 0:
                rate = (last[i] - previous[i]) / (last_step[i] - previous_step[i])
                out[i] = last[i] + rate * (step - last_step[i])
        self.state = [torch.where(fresh, computed, last), torch.where(fresh, last, previous),
                      torch.where(fresh, torch.full_like(last_step, step), last_step),
                      torch.where(fresh, last_step, previous_step)]
        return out


@settings(max_examples=6, **SETTINGS)
@given(case=cases(), ratio=st.sampled_from([0.25, 0.5, 0.75]), interval=st.sampled_from([1, 2]))
def test_loop_equals_the_eager_reference_with_stale_tokens_continued(case, ratio, interval):
    policy = RASPolicy(sample_ratio=ratio, warmup_steps=2, reset_steps=(6,), stale_token_order=1,
                       step_cache_interval=interval)
    model = case.build()
    ras = ras_compile(model, policy, backend=None)
    reference = EagerRASReference(model, case.num_tokens, case.patch, case.image_rows)
    continuation = PixelContinuation()
    computed = []
    for step, kwargs, got in euler_loop(ras, case, steps=9):
        stats = ras.ras_controller.stats[-1]
        if stats.mode == "predicted":  # the step cache on top: the line through the last two returned outputs
            (s0, a), (s1, b) = computed[-2:]
            expected = b + (b - a) * (step - s1) / (s1 - s0)
        else:
            active = ras.ras_controller.last_index if stats.mode == "sparse" else None
            plain = reference.step(kwargs, active)
            if active is None:
                fresh = torch.ones(1, 1, 1, 1, dtype=torch.bool)
            else:
                grid = _token_mask(active, case.num_tokens).reshape(case.batch, 1, case.height // case.patch,
                                                                      case.width // case.patch)
                fresh = grid.repeat_interleave(case.patch, 2).repeat_interleave(case.patch, 3)
            expected = continuation(plain, fresh, step)
            computed.append((step, expected))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    modes = [s.mode for s in ras.ras_controller.stats]
    assert modes.count("sparse") >= 3 and ("predicted" in modes) == (interval == 2)


def test_ratio_one_with_stale_tokens_continued_equals_the_dense_model():
    case = Case("sd3", layers=1, heads=2, head_dim=8, patch=2, height=8, width=12, batch=2)
    model = case.build()
    ras = ras_compile(model, RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=(), stale_token_order=1),
                      backend=None)
    for _, kwargs, got in euler_loop(ras, case, steps=5):
        torch.testing.assert_close(got, prediction_of(model(**kwargs)), rtol=1e-5, atol=1e-5)


def test_continuing_stale_tokens_changes_a_sparse_step_and_the_default_does_not():
    """Right after two dense steps, the inactive tokens move on from the second one by its change
    from the first; with the default they return the second one's values."""
    case = Case("pixart", layers=1, heads=2, head_dim=8, patch=2, height=8, width=8, batch=1)
    model = case.build()
    outs = {}
    for order in (0, 1):
        ras = ras_compile(model, RASPolicy(sample_ratio=0.25, warmup_steps=2, reset_steps=(),
                                           stale_token_order=order), backend=None)
        outs[order] = [got for _, _, got in euler_loop(ras, case, steps=3)]
        index = ras.ras_controller.last_index
    d0, d1, _ = outs[0]
    inactive = ~_token_mask(index, case.num_tokens).reshape(1, 1, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)
    inactive = inactive.expand_as(d1)
    torch.testing.assert_close(outs[0][2][inactive], d1[inactive])
    torch.testing.assert_close(outs[1][2][inactive], (2 * d1 - d0)[inactive])
