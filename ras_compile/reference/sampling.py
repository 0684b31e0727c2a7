"""Rectified-flow Euler sampling of the reference DiT with ``FlowMatchEulerDiscreteScheduler``.

The convention is diffusers' flow matching: ``x_sigma = (1 - sigma) x0 + sigma noise``,
the model predicts the velocity ``v = noise - x0`` at ``timestep = 1000 * sigma``, and the
scheduler's Euler step is ``x <- x + (sigma_next - sigma) v`` going from sigma = 1 (pure
noise) down to 0. :mod:`ras_compile.reference.train` trains with the same convention.

Classifier-free guidance batches the conditional and the unconditional (null class)
halves in one model call: ``v = v_null + g (v_cond - v_null)``. The model may be a plain
``DiTTransformer2DModel`` or one returned by ``ras_compile`` (same call signature).
"""
from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

__all__ = ["make_scheduler", "initial_noise", "velocity", "guided_velocity", "sample"]


def make_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """The reference scheduler: rectified flow, 1000 training timesteps, no dynamic shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def initial_noise(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Standard normal noise ``[n, channels, size, size]`` from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn((n, channels, size, size), generator=gen)


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of ``model``'s first floating-point parameter (CPU float32 if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def velocity(model: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor
             ) -> torch.Tensor:
    """The model's velocity prediction for ``x`` at ``timestep`` (a scalar or ``[n]``), in float32
    on ``x``'s device."""
    device, dtype = _model_device_dtype(model)
    t = torch.as_tensor(timestep, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(x.shape[0])
    out = model(hidden_states=x.to(device, dtype), timestep=t, class_labels=labels.to(device),
                return_dict=False)[0]
    return out.to(x.device, torch.float32)


def guided_velocity(model: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor,
                    guidance_scale: float, null_class: int) -> torch.Tensor:
    """Classifier-free guided velocity, with cond and uncond in one batched call.

    ``guidance_scale == 1`` is the plain conditional velocity (one call of batch ``n``)."""
    if guidance_scale == 1.0:
        return velocity(model, x, timestep, labels)
    null = torch.full_like(labels, null_class)
    both = velocity(model, torch.cat([x, x]), timestep, torch.cat([labels, null]))
    cond, uncond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def sample(model: torch.nn.Module, labels: torch.Tensor, steps: int, seed: int, guidance_scale: float = 1.0,
           *, shift: float = 1.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Generate one image per label with ``steps`` Euler steps; returns float32 ``[n, C, H, W]``.

    The starting noise comes from ``seed`` (or is ``noise``, if given); the model's config
    gives the channel count, the image size and the null class (``num_embeds_ada_norm``).
    The output is not clamped: images are in about ``[-1, 1]``.
    """
    config = model.config
    labels = torch.as_tensor(labels, dtype=torch.long)
    if noise is None:
        noise = initial_noise(labels.shape[0], config.in_channels, config.sample_size, seed)
    scheduler = make_scheduler(shift)
    scheduler.set_timesteps(steps)
    x = noise.to(_model_device_dtype(model)[0], torch.float32)
    for t in scheduler.timesteps:
        v = guided_velocity(model, x, t, labels, guidance_scale, null_class=config.num_embeds_ada_norm)
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x
