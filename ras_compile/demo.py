"""``python -m ras_compile.demo``: RAS on a small random-weight SD3 transformer, on CPU.

Runs the same flow-matching Euler sampling loop (``FlowMatchEulerDiscreteScheduler``)
from the same noise three ways:

1. dense, the plain model (eager): the reference latents;
2. dense, ``torch.compile(model, backend=...)``: the fair speed baseline for RAS;
3. ``ras_compile(model, RASPolicy(sample_ratio=...))`` with the same backend;

then once more with ``sample_ratio=1.0``, where RAS must reproduce the dense result.
Each compiled mode runs one untimed generation first (it compiles); the timings are the
best of ``--repeats`` generations.
The weights are random, so the numbers say how RAS behaves, not how images look.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from ras_compile import RASPolicy, ras_compile
from ras_compile.tiny_models import example_inputs, tiny_sd3_transformer


@dataclass(frozen=True)
class Size:
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    latent: int  # latent height = width, in pixels
    text_tokens: int


FULL = Size(num_layers=4, num_attention_heads=4, attention_head_dim=32, latent=64, text_tokens=77)
QUICK = Size(num_layers=2, num_attention_heads=2, attention_head_dim=16, latent=16, text_tokens=8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ras_compile.demo",
        description="Region-Adaptive Sampling on a small random-weight SD3 transformer (CPU).",
    )
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per generation (default 10)")
    parser.add_argument(
        "--ratio",
        type=float,
        default=0.5,
        help="RAS sample ratio: fraction of image tokens computed in a sparse step (default 0.5)",
    )
    parser.add_argument(
        "--backend",
        default="inductor",
        help="torch.compile backend for the compiled modes: inductor (default), aot_eager or eager",
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=2, help="dense steps at the start of a generation (default 2)"
    )
    parser.add_argument(
        "--reset-steps",
        type=int,
        nargs="*",
        default=[5],
        help="dense error-reset steps, 0-based (default: 5)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed generations per mode; the best is reported (default 3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the noise (default 0)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes (2 layers, 64 image tokens); compiling still takes most of the time"
    )
    return parser.parse_args(argv)


def sample(model, inputs: dict, steps: int) -> torch.Tensor:
    """A plain flow-matching Euler loop, as a diffusers pipeline runs it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(steps)
    latents = inputs["hidden_states"]
    batch = latents.shape[0]
    for t in scheduler.timesteps:
        call = dict(inputs, hidden_states=latents, timestep=t.expand(batch))
        velocity = model(**call)[0]
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents


def timed(model, inputs: dict, steps: int, repeats: int, *, warm: bool):
    """(final latents, best seconds of ``repeats`` generations, seconds of the warm-up one or None).

    The best of a few runs, because a shared CPU makes single timings noisy.
    """
    first = None
    with torch.no_grad():
        if warm:
            start = time.perf_counter()
            sample(model, inputs, steps)
            first = time.perf_counter() - start
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            latents = sample(model, inputs, steps)
            best = min(best, time.perf_counter() - start)
    return latents, best, first


def report(name: str, seconds: float, steps: int, first: float | None) -> None:
    extra = f"   (first generation, compiling: {first:.1f} s)" if first is not None else ""
    print(f"{name:<26} {seconds:7.3f} s {seconds / steps * 1e3:8.1f} ms/step{extra}", flush=True)


def mode_summary(stats) -> str:
    letters = "".join({"dense": "D", "sparse": "S", "predicted": "P", "fallback": "F"}.get(s.mode, "?")
                      for s in stats)
    sparse = [s for s in stats if s.mode == "sparse"]
    counts = {m: sum(s.mode == m for s in stats) for m in ("dense", "sparse", "predicted")}
    text = f"{letters}  (dense {counts['dense']}, sparse {counts['sparse']}"
    if counts["predicted"]:
        text += f", predicted by the step cache {counts['predicted']}"
    if sparse:
        active = sorted({s.active_tokens for s in sparse})
        total = getattr(sparse[0], "num_tokens", None)
        of = f" of {total}" if total else ""
        text += f"; active tokens per sparse step: {', '.join(map(str, active))}{of}"
    others = len(stats) - sum(counts.values())
    if others:
        text += f"; other {others}"
    return text + ")"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    demo_start = time.perf_counter()
    size = QUICK if args.quick else FULL
    torch.manual_seed(args.seed)

    model = tiny_sd3_transformer(
        num_layers=size.num_layers,
        num_attention_heads=size.num_attention_heads,
        attention_head_dim=size.attention_head_dim,
        sample_size=size.latent,
        seed=args.seed,
    )
    inputs = example_inputs(
        model, batch=2, height=size.latent, width=size.latent, seed=args.seed, text_len=size.text_tokens
    )
    patch = model.config.patch_size
    image_tokens = (size.latent // patch) ** 2
    params = sum(p.numel() for p in model.parameters())
    print(
        f"SD3 transformer, random weights: {size.num_layers} layers, "
        f"{size.num_attention_heads} heads x {size.attention_head_dim}, {params / 1e6:.2f} M parameters"
    )
    print(
        f"latent {size.latent}x{size.latent}, patch {patch}: {image_tokens} image tokens "
        f"+ {size.text_tokens} text tokens, batch 2, {args.steps} steps, {torch.get_num_threads()} CPU threads"
    )
    print(f"backend: {args.backend}\n")

    policy = RASPolicy(
        sample_ratio=args.ratio, warmup_steps=args.warmup_steps, reset_steps=tuple(args.reset_steps)
    )

    print(f"best of {args.repeats} generations each:", flush=True)
    dense, t_dense, _ = timed(model, inputs, args.steps, args.repeats, warm=True)
    report("dense, eager", t_dense, args.steps, None)

    compiled = torch.compile(model, backend=args.backend)
    dense_c, t_dense_c, first = timed(compiled, inputs, args.steps, args.repeats, warm=True)
    report("dense, torch.compile", t_dense_c, args.steps, first)

    ras = ras_compile(model, policy, backend=args.backend)
    sparse, t_ras, first = timed(ras, inputs, args.steps, args.repeats, warm=True)
    report(f"RAS, sample_ratio={args.ratio}", t_ras, args.steps, first)

    print()
    print(f"time ratio RAS / dense torch.compile: {t_ras / t_dense_c:.3f}")
    print(f"time ratio RAS / dense eager:         {t_ras / t_dense:.3f}")
    print(f"steps: {mode_summary(ras.ras_controller.stats)}")
    print(f"max |RAS - dense| of final latents:             {(sparse - dense).abs().max().item():.3e}")
    print(f"max |dense torch.compile - dense| (for scale):   {(dense_c - dense).abs().max().item():.3e}")
    print(f"[{time.perf_counter() - demo_start:.0f} s] checking sample_ratio=1.0 ...", flush=True)

    exact = RASPolicy(sample_ratio=1.0, warmup_steps=args.warmup_steps, reset_steps=tuple(args.reset_steps))
    ras_full = ras_compile(model, exact, backend=args.backend)
    with torch.no_grad():
        full = sample(ras_full, inputs, args.steps)
    print(f"max |RAS(sample_ratio=1.0) - dense| (should be ~0): {(full - dense).abs().max().item():.3e}")
    print(f"   steps: {mode_summary(ras_full.ras_controller.stats)}")
    print(f"\ndemo wall time: {time.perf_counter() - demo_start:.0f} s, compiles included")


if __name__ == "__main__":
    main()
