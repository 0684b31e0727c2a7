"""RAS inside an unchanged diffusers Z-Image pipeline, on CPU.

The pipeline hands its transformer a list of per-sample latents and a list of per-prompt
caption features at each prompt's own length, runs guidance as one batch of ``[prompt rows,
negative prompt rows]`` and reads a list back. Caption features are passed in
(``prompt_embeds``: no text encoder can be downloaded here), a prompt of 7 tokens and a
negative prompt of 40, so the two samples' sequences differ in length after their image tokens.
"""
from __future__ import annotations

import pytest
import torch

from pipeline_parts import tiny_vae
from ras_compile import RASPolicy, ras_compile

STEPS = 4


def _pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from conformance_models import _z_image_build

    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=None,
                          tokenizer=None, transformer=_z_image_build(0, frame_positions=128))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, seed=0, width=32, guidance=4.0):
    g = torch.Generator().manual_seed(11)
    prompt, negative = [torch.randn(7, 32, generator=g)], [torch.randn(40, 32, generator=g)]
    return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, guidance_scale=guidance, height=32, width=width,
                num_inference_steps=STEPS, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.slow
def test_ras_at_full_ratio_reproduces_the_dense_pipeline():
    pipe = _pipeline()
    dense = _generate(pipe)
    pipe.transformer = ras_compile(pipe.transformer, RASPolicy(sample_ratio=1.0, warmup_steps=1, reset_steps=()),
                                   backend="aot_eager")
    got = _generate(pipe)
    assert got.shape == dense.shape == (1, 4, 16, 16)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    assert [s.mode for s in pipe.transformer.ras_controller.stats] == ["dense"] + ["sparse"] * (STEPS - 1)


# 80 tokens: padded to 96 by the model; guidance 0 (Z-Image-Turbo): a batch of one
@pytest.mark.parametrize("width,tokens,guidance", [(32, 64, 4.0), (40, 80, 4.0), (32, 64, 0.0)])
def test_sparse_steps_run_inside_the_pipeline_on_half_the_tokens(width, tokens, guidance):
    pipe = _pipeline()
    dense = _generate(pipe, width=width, guidance=guidance)
    pipe.transformer = ras_compile(pipe.transformer, RASPolicy(sample_ratio=0.5, warmup_steps=1, reset_steps=()),
                                   backend=None)
    got = _generate(pipe, width=width, guidance=guidance)
    stats = pipe.transformer.ras_controller.stats
    assert [s.mode for s in stats] == ["dense"] + ["sparse"] * (STEPS - 1)
    assert [s.active_tokens for s in stats][1:] == [tokens // 2] * (STEPS - 1)  # half the tokens, each step
    assert got.shape == dense.shape and torch.isfinite(got).all() and not torch.equal(got, dense)
