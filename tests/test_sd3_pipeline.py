"""RAS inside an unchanged diffusers pipeline: a whole tiny SD3 pipeline on CPU.

The pipeline batches classifier-free guidance ([uncond, cond]) and makes two images per
prompt, so the transformer sees a batch of 4 with 256 image tokens (32x32 latent, patch
2) and 333 text tokens (77 CLIP + 256 T5).
"""

from __future__ import annotations

import pytest
import torch

from ras_compile import RASPolicy, ras_compile
from ras_compile.tiny_models import tiny_sd3_pipeline

PROMPT = "A painting of a squirrel eating a burger"


def generate(pipe, *, steps: int = 4, seed: int = 0, output_type: str = "pt"):
    return pipe(
        PROMPT,
        num_inference_steps=steps,
        height=32,
        width=32,
        guidance_scale=5.0,
        num_images_per_prompt=2,
        output_type=output_type,
        generator=torch.Generator(device="cpu").manual_seed(seed),
    ).images


def make_pipeline():
    pipe = tiny_sd3_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dense_pipeline_runs_with_guidance_and_two_images():
    pipe = make_pipeline()
    images = generate(pipe)
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all()
    assert not torch.allclose(images[0], images[1])  # two images, two noises
    again = generate(pipe)
    assert torch.equal(images, again)
    arrays = generate(pipe, output_type="np")
    assert arrays.shape == (2, 32, 32, 3)


@pytest.mark.slow
def test_ras_at_full_ratio_reproduces_the_dense_pipeline():
    pipe = make_pipeline()
    dense = generate(pipe)
    pipe.transformer = ras_compile(pipe.transformer, RASPolicy(sample_ratio=1.0), backend="aot_eager")
    ras = generate(pipe)
    assert ras.shape == dense.shape
    torch.testing.assert_close(ras, dense, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_ras_at_half_ratio_runs_sparse_steps():
    pipe = make_pipeline()
    dense = generate(pipe, steps=6)
    policy = RASPolicy(sample_ratio=0.5, warmup_steps=2, reset_steps=())
    pipe.transformer = ras_compile(pipe.transformer, policy, backend="aot_eager")
    ras = generate(pipe, steps=6)
    assert ras.shape == dense.shape == (2, 3, 32, 32)
    assert torch.isfinite(ras).all()

    stats = pipe.transformer.ras_controller.stats
    assert [s.step for s in stats] == list(range(6))
    assert [s.mode for s in stats[:2]] == ["dense", "dense"]
    sparse = [s for s in stats if s.mode == "sparse"]
    assert sparse, [s.mode for s in stats]
    assert all(0 < s.active_tokens < 256 for s in sparse)  # about half of the 256 image tokens
    # the skipped tokens reuse old predictions: close to dense, not equal
    assert not torch.equal(ras, dense)

    again = generate(pipe, steps=6)  # a second generation starts over from warm-up
    torch.testing.assert_close(again, ras, atol=1e-5, rtol=0)
    assert [s.mode for s in pipe.transformer.ras_controller.stats] == [s.mode for s in stats]
