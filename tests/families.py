"""Random small configurations of the architectures the core slice covers, for hypothesis."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from ras_compile.tiny_models import (example_inputs, tiny_dit_transformer, tiny_pixart_transformer,
                                     tiny_sd3_transformer)

TEXT_LEN = 7  # prime: never equal to an image token count of a grid at least 2 x 2


@dataclass(frozen=True)
class Case:
    family: str
    layers: int
    heads: int
    head_dim: int
    patch: int
    height: int   # latent pixels
    width: int
    batch: int
    seed: int = 0

    @property
    def num_tokens(self) -> int:
        return (self.height // self.patch) * (self.width // self.patch)

    def build(self) -> torch.nn.Module:
        common = dict(num_layers=self.layers, num_attention_heads=self.heads, attention_head_dim=self.head_dim,
                      patch_size=self.patch, sample_size=max(self.height, self.width), seed=self.seed)
        return BUILDERS[self.family](**common)

    def inputs(self, model, seed: int = 0) -> dict:
        return example_inputs(model, batch=self.batch, height=self.height, width=self.width, seed=seed,
                              text_len=TEXT_LEN)

    def image_rows(self, seq_len: int):
        """Where a self-attention sequence holds image tokens (SD3: image first, then text)."""
        n = self.num_tokens
        if seq_len == n or (self.family == "sd3" and seq_len == n + TEXT_LEN):
            return slice(0, n)
        return None


BUILDERS = {
    "dit": tiny_dit_transformer,
    "pixart": tiny_pixart_transformer,
    "sd3": lambda **kw: tiny_sd3_transformer(**kw),
}


@st.composite
def cases(draw, families=("dit", "pixart", "sd3"), max_batch: int = 3):
    family = draw(st.sampled_from(families))
    patch = draw(st.sampled_from([1, 2]))
    cells_h = draw(st.integers(2, 5))
    # diffusers' DiT unpatchifies as if the latent were square
    cells_w = cells_h if family == "dit" else draw(st.integers(2, 5))
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([4, 8]))
    if family == "pixart" and (heads * head_dim) % 2:
        heads += 1
    return Case(family, draw(st.integers(1, 2)), heads, head_dim, patch, cells_h * patch, cells_w * patch,
                draw(st.integers(1, max_batch)), draw(st.integers(0, 3)))


def flow_sigmas(steps: int) -> list[float]:
    """A rectified-flow schedule from pure noise (1.0) to data (0.0)."""
    return [1.0 - i / steps for i in range(steps + 1)]


def timestep_for(sigma: float, batch: int) -> torch.Tensor:
    return torch.full((batch,), sigma * 1000.0)


def prediction_of(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def euler_loop(model, case: Case, steps: int, seed: int = 0):
    """A flow-matching Euler loop of ``steps`` steps from ``case``'s inputs, the latent following what
    ``model`` (a plain model or a RAS module) returns; yields ``(step, inputs, prediction)``."""
    kwargs = case.inputs(model.model if hasattr(model, "ras_controller") else model, seed=seed)
    latent, sigmas = kwargs["hidden_states"], flow_sigmas(steps)
    for i in range(steps):
        kwargs = dict(kwargs, hidden_states=latent, timestep=timestep_for(sigmas[i], case.batch))
        pred = prediction_of(model(**kwargs))
        yield i, kwargs, pred
        latent = latent + (sigmas[i + 1] - sigmas[i]) * pred[:, : latent.shape[1]]
