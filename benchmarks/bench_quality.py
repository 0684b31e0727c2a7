"""Benchmark: what Region-Adaptive Sampling costs in image quality, on the reference DiT.

    python benchmarks/bench_quality.py                       # shipped weights, 256 samples a configuration
    python benchmarks/bench_quality.py --device cuda --batch-size 256
    python benchmarks/bench_quality.py --quick --model DIR --classifier FILE --backend eager   # smoke run

The model is the reference class-conditional DiT of :mod:`ras_compile.reference` (32x32 RGB
pixels, patch 2: 256 image tokens), sampled with the reference flow-matching Euler loop
(:func:`ras_compile.reference.sampling.sample`) from fixed noise (one seed for the whole
set, so a sample does not depend on the batch size) with balanced class labels. Two tables,
shaped like the paper's:

* **Table 2** (quality vs throughput): RAS at each ``--ratios`` and ``--ras-steps`` against
  dense sampling at ``--dense-steps`` (fewer steps), ordered by measured throughput, with
  the Pareto front of throughput vs Frechet distance and of throughput vs class accuracy
  marked. Dense sampling also runs at every step count RAS uses (the PSNR / SSIM
  reference); those runs are real dense configurations and take part in the front.
* **Table 6** (ablations) at ``--ablation-ratio`` / ``--ablation-steps``, each one
  ``RASPolicy`` field changed from the baseline: ``metric`` (``std`` / ``l2norm`` /
  ``random``), ``kv_cache`` (attention recovery off), ``reset_steps=()`` (no error reset),
  ``starvation_rule="official"`` and ``starvation_scale=0`` (no starvation prevention),
  ``schedule="dynamic"`` (the official linear schedule around the same mean ratio).

With ``--step-cache-intervals N ...`` Table 2 also gets RAS with its step cache stacked on it
(``RASPolicy(step_cache_interval=N)``: whole steps predicted by extrapolating the last two computed
outputs) at every ratio and RAS step count, and the step cache alone (ratio 1.0), so the fronts
show whether stacking buys a better trade than RAS alone or fewer dense steps. With
``--stale-linear`` it also gets RAS with its inactive tokens continued from their last two
computed outputs (``RASPolicy(stale_token_order=1)``) at every ratio and RAS step count, alone
and with each step-cache interval.

Plus one check: RAS at ratio 1.0, whose output must match dense (PSNR very high); and one reference
outside the tables: dense sampling at ``--converged-steps`` (100; more than any other step count),
the limit the Euler sampler approaches. Every configuration's PSNR against it (*PSNR vs converged*)
is the sampling error that fewer steps and stale tokens add; it is Table 2's third front, because on
a small rectified-flow model class accuracy and the Frechet distance saturate after a few steps.

Baseline RAS policy at ``S`` steps: the paper's dense steps (warm-up 4, resets at 12 and 20
of 28) scaled to ``S`` by :func:`ras_compile.schedule.scaled_plan` (warm-up
``max(1, round(4 S / 28))``, resets ``round(12 S / 28)``, ``round(20 S / 28)`` kept if after the
warm-up), so the dense steps cover the same part of every loop; ``num_steps=S``, paper starvation
rule with scale 0.1, static ratio, ``share_active_set="cfg"`` when guidance batches
``[cond; uncond]`` (the official code shares the set), else ``"per_sample"``. Configurations with equal policies (e.g. Table 6's
``std`` baseline and Table 2's RAS at the same ratio and steps) are run once.

Metrics per configuration (images clamped to [-1, 1]): class accuracy (the evaluator
classifier's prediction vs the conditioning class), Frechet distance of the classifier's
features to as many real images (:func:`ras_compile.reference.data.make_batch`, fixed
seed; its bootstrap standard deviation tells the noise of a difference), PSNR and SSIM
against dense sampling at the **same** seeds and number of steps, PSNR against the converged
reference. Table 6's claims are judged on the Frechet distance (paired bootstrap) and on PSNR
against dense (paired per-sample differences). Throughput: samples/s
of the timed sampling loops (every model call and scheduler step, on CUDA synchronised
per batch), after an untimed warm-up that compiles every graph; all in one process on
one device. Every configuration gets its own ``ras_compile`` module (the policy is fixed
when the module is built; ``kv_cache`` even changes the captured graphs).

Writes ``<out>/<name>.json``, ``<out>/<name>.md`` and, when matplotlib is installed,
``<out>/<name>.png`` (the two Pareto plots).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
if str(REPO) not in sys.path:  # run as a script from anywhere: import the checkout's ras_compile
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ras_compile.machine import cores_available, cpu_model, cpu_seconds, other_cpu_cores  # noqa: E402
from ras_compile.reference import DEFAULT_GUIDANCE_SCALE  # noqa: E402
from ras_compile.schedule import flop_bound_speedup, scaled_plan  # noqa: E402

NOISE_SEED = 60_2026          # starting noise of every configuration's samples
REAL_SEED_OFFSET = 6_000      # real images: make_batch(EVAL_SEED_BASE + offset): held out from training
BOOTSTRAP = 50                # resamples for the Frechet distance's standard deviation

DEFAULTS = dict(ratios=(0.75, 0.5, 0.25, 0.125), ras_steps=(6, 8, 10, 14, 20, 28, 40),
                dense_steps=(4, 5, 6, 8, 10, 14, 20, 28),
                converged_steps=100, ablation_ratio=0.5, ablation_steps=28, samples=256, batch_size=64)
QUICK = dict(ratios=(0.5, 0.25), ras_steps=(8,), dense_steps=(4,), converged_steps=16, ablation_ratio=0.5,
             ablation_steps=8, samples=16, batch_size=16, ablations=("metric_random", "kv_cache_off"))

# Table 6: name -> (what it ablates, RASPolicy fields changed from the baseline). "dynamic" is filled
# in by ablation_overrides (its parameters depend on the token count and the loop length).
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "metric_std": ("score metric: std (baseline)", {}),
    "metric_l2norm": ("score metric: l2norm", {"metric": "l2norm"}),
    "metric_random": ("score metric: random", {"metric": "random"}),
    "kv_cache_off": ("K/V caching off (attention over active tokens only)", {"kv_cache": False}),
    "reset_off": ("error-reset steps off", {"reset_steps": ()}),
    "starvation_official": ("starvation prevention: official rule exp(+sD)", {"starvation_rule": "official"}),
    "starvation_none": ("starvation prevention: none (starvation_scale=0)", {"starvation_scale": 0.0}),
    "schedule_dynamic": ("ratio schedule: dynamic (official linear)", {"schedule": "dynamic"}),
    # the fields the paper does not ablate, so that every RASPolicy knob has a measured effect
    "warmup_2": ("warm-up: 2 dense steps", {"warmup_steps": 2}),
    "warmup_8": ("warm-up: 8 dense steps", {"warmup_steps": 8}),
    "end_step": ("dense tail: the last 4 steps dense (end_step)", {}),
    "high_ratio_half": ("dropped tokens: half from each end of the ranking (high_ratio=0.5)", {"high_ratio": 0.5}),
    "share_per_sample": ("active set per sample, not shared by a guidance pair (share_active_set)",
                         {"share_active_set": "per_sample"}),
    # RAS's step cache stacked on the baseline (whole steps predicted, not run)
    "step_cache_2": ("step cache stacked: every other sparse step predicted, linear extrapolation",
                     {"step_cache_interval": 2}),
    "step_cache_2_reuse": ("step cache stacked: every other sparse step reuses the last prediction",
                           {"step_cache_interval": 2, "step_cache_order": 0}),
    "step_cache_3": ("step cache stacked: two of every three sparse steps predicted, linear extrapolation",
                     {"step_cache_interval": 3}),
    "stale_linear": ("inactive tokens continued linearly from their last two computed outputs",
                     {"stale_token_order": 1}),
}

# (ablation, baseline, what the paper says, True when the paper says the baseline is better)
ABLATION_CLAIMS = (
    ("metric_random", "metric_std", "std selection beats random selection (paper Table 6)", True),
    ("metric_l2norm", "metric_std", "std vs l2norm (the paper's default is std)", None),
    ("kv_cache_off", "metric_std", "K/V caching (attention recovery) beats no K/V caching (paper Table 6)", True),
    ("reset_off", "metric_std", "error-reset steps beat none (paper Table 6)", True),
    ("starvation_none", "metric_std", "starvation prevention beats none (paper Table 6)", True),
    ("starvation_official", "metric_std", "paper rule exp(-sD) vs official rule exp(+sD) (no paper claim)", None),
    ("schedule_dynamic", "metric_std", "static vs dynamic ratio schedule (no paper claim)", None),
    ("warmup_2", "metric_std", "the baseline warm-up vs 2 warm-up steps (no paper claim)", None),
    ("warmup_8", "metric_std", "the baseline warm-up vs 8 warm-up steps (no paper claim)", None),
    ("end_step", "metric_std", "no dense tail vs the last 4 steps dense (no paper claim)", None),
    ("high_ratio_half", "metric_std", "dropping the lowest-scored tokens vs half from each end (no paper claim)", None),
    ("share_per_sample", "metric_std", "one active set per guidance pair vs one per sample (no paper claim)", None),
    ("step_cache_2", "metric_std", "RAS alone vs a step cache of interval 2 stacked on it (no paper claim)", None),
    ("step_cache_2_reuse", "metric_std", "RAS alone vs a reusing step cache of interval 2 (no paper claim)", None),
    ("step_cache_3", "metric_std", "RAS alone vs a step cache of interval 3 stacked on it (no paper claim)", None),
    ("stale_linear", "metric_std", "inactive tokens returning their last output vs continued linearly "
                                   "(no paper claim)", None),
)


# -- configurations ---------------------------------------------------------------------------------
@dataclass
class Config:
    """One row of a table: how to sample and what came out."""

    name: str
    table: str                     # "converged", "table2", "table6" or "check"
    kind: str                      # "dense" or "ras"
    steps: int
    label: str
    ratio: float | None = None
    policy: Any = None             # RASPolicy for kind "ras"
    ablation: str | None = None
    reference_only: bool = False   # dense run added only as the PSNR / SSIM reference of RAS steps
    same_run_as: str | None = None  # a configuration with an equal policy whose samples are reused
    result: dict = field(default_factory=dict)


def dense_plan(steps: int, warmup_steps: int | None = None) -> tuple[int, tuple[int, ...]]:
    """``(warm-up, resets)`` of the baseline at ``steps``: :func:`scaled_plan`, or with ``warmup_steps``
    that many warm-up steps and the scaled resets that fall after them."""
    warmup, resets = scaled_plan(steps)
    if warmup_steps is None:
        return warmup, resets
    return warmup_steps, tuple(r for r in resets if r > warmup_steps)


def base_policy(ratio: float, steps: int, guided: bool, warmup: int | None = None, **overrides: Any):
    """The baseline RAS policy at ``ratio`` and ``steps`` (see the module docstring; ``warmup`` replaces
    the scaled warm-up), with ``overrides`` (RASPolicy fields; a ``warmup_steps`` among them wins)."""
    from ras_compile import RASPolicy

    warmup, resets = dense_plan(steps, warmup)
    fields = dict(sample_ratio=ratio, warmup_steps=warmup, reset_steps=resets,
                  num_steps=steps, share_active_set="cfg" if guided else "per_sample")
    fields.update(overrides)
    return RASPolicy(**fields)


def ablation_overrides(name: str, ratio: float, steps: int, num_tokens: int,
                       warmup_steps: int | None = None) -> dict[str, Any]:
    """The RASPolicy fields ablation ``name`` changes. ``end_step`` makes the last 4 steps dense. The dynamic
    schedule is :func:`ras_compile.schedule.spread_dynamic_schedule`: it drops ``(1 - ratio) N`` tokens on
    average, growing linearly over the steps after the warm-up (at ratio 0.5 from about 0.75x to 1.25x of
    that), in multiples of N / 64 (the official code's 64 of 4096 tokens, scaled)."""
    overrides = dict(ABLATIONS[name][1])
    if name == "end_step":
        overrides["end_step"] = steps - 4
    if overrides.get("schedule") == "dynamic":
        from ras_compile.schedule import spread_dynamic_schedule

        overrides.update(spread_dynamic_schedule(ratio, num_tokens, steps - dense_plan(steps, warmup_steps)[0]))
    return overrides


def plan_configs(ratios: Sequence[float], ras_steps: Sequence[int], dense_steps: Sequence[int],
                 ablation_ratio: float, ablation_steps: int, ablations: Sequence[str], guided: bool,
                 num_tokens: int, converged_steps: int | None = None,
                 warmup_steps: int | None = None, step_cache_intervals: Sequence[int] = (),
                 stale_linear: bool = False) -> list[Config]:
    """Every configuration of the run, in run order (the references first: the converged sampler, then dense).

    ``converged_steps`` (None or 0: none) adds dense sampling at that many steps, outside the tables: the
    reference of ``psnr_converged_db``, how close each configuration comes to the sampler's limit. It must
    exceed every other step count (:func:`parse_args` checks). ``warmup_steps`` (None: scaled to each loop)
    fixes the baseline's warm-up. ``step_cache_intervals`` adds Table 2 rows with RAS's step cache stacked
    (``sc<n>``): the step cache alone (ratio 1) and on RAS at every ratio, at every RAS step count.
    ``stale_linear`` adds RAS with ``stale_token_order=1`` (``_st1``) at every ratio and RAS step count,
    alone and with each step-cache interval."""
    configs: list[Config] = []
    if converged_steps:
        configs.append(Config(f"converged_s{converged_steps}", "converged", "dense", converged_steps,
                              f"dense {converged_steps} steps (converged reference)"))
    needed = sorted(set(dense_steps) | set(ras_steps) | {ablation_steps})
    for s in needed:
        configs.append(Config(f"dense_s{s}", "table2", "dense", s, f"dense {s} steps",
                              reference_only=s not in dense_steps))
    for s in ras_steps:
        for r in ratios:
            configs.append(Config(f"ras_r{r:g}_s{s}", "table2", "ras", s, f"RAS {r:g} @ {s} steps", ratio=r,
                                  policy=base_policy(r, s, guided, warmup_steps)))
    for n in step_cache_intervals:
        for s in ras_steps:
            configs.append(Config(f"sc{n}_s{s}", "table2", "ras", s, f"step cache {n} @ {s} steps", ratio=1.0,
                                  policy=base_policy(1.0, s, guided, warmup_steps, step_cache_interval=n)))
            for r in ratios:
                configs.append(Config(f"ras_r{r:g}_sc{n}_s{s}", "table2", "ras", s,
                                      f"RAS {r:g} + step cache {n} @ {s} steps", ratio=r,
                                      policy=base_policy(r, s, guided, warmup_steps, step_cache_interval=n)))
    for s in ras_steps if stale_linear else ():
        for r in ratios:
            configs.append(Config(f"ras_r{r:g}_st1_s{s}", "table2", "ras", s,
                                  f"RAS {r:g}, stale tokens continued @ {s} steps", ratio=r,
                                  policy=base_policy(r, s, guided, warmup_steps, stale_token_order=1)))
            for n in step_cache_intervals:
                configs.append(Config(f"ras_r{r:g}_st1_sc{n}_s{s}", "table2", "ras", s,
                                      f"RAS {r:g}, stale tokens continued + step cache {n} @ {s} steps", ratio=r,
                                      policy=base_policy(r, s, guided, warmup_steps, stale_token_order=1,
                                                         step_cache_interval=n)))
    for name in ("metric_std", *[a for a in ablations if a != "metric_std"]):
        policy = base_policy(ablation_ratio, ablation_steps, guided, warmup_steps,
                             **ablation_overrides(name, ablation_ratio, ablation_steps, num_tokens, warmup_steps))
        configs.append(Config(f"abl_{name}", "table6", "ras", ablation_steps, ABLATIONS[name][0],
                              ratio=ablation_ratio, policy=policy, ablation=name))
    configs.append(Config(f"check_ras_r1_s{ablation_steps}", "check", "ras", ablation_steps,
                          f"RAS 1.0 @ {ablation_steps} steps (must equal dense)", ratio=1.0,
                          policy=base_policy(1.0, ablation_steps, guided, warmup_steps)))
    seen: dict[tuple, str] = {}
    for c in configs:
        key = (c.kind, c.steps, c.policy)
        if key in seen:
            c.same_run_as = seen[key]
        else:
            seen[key] = c.name
    return configs


# -- Pareto front -----------------------------------------------------------------------------------
def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[bool]:
    """For each point, whether no other point dominates it.

    ``maximize[i]`` says whether coordinate ``i`` is better high (else low). A point dominates
    another if it is at least as good in every coordinate and better in one. A point with a
    NaN coordinate is never on the front and dominates nothing; equal points are both on it."""
    signs = [1.0 if m else -1.0 for m in maximize]
    scored = [None if any(math.isnan(float(v)) for v in p) else [s * float(v) for s, v in zip(signs, p)]
              for p in points]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [p is not None and not any(q is not None and dominates(q, p) for q in scored) for p in scored]


# -- sampling ---------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_sparse_step(policy, steps: int) -> int | None:
    """The first step a policy runs sparse in a ``steps``-step loop (step 0 is always dense)."""
    return next((s for s in range(1, steps) if not policy.is_dense_step(s)), None)


def make_sampler(model: torch.nn.Module, config: Config, backend: str | None, dense_cache: dict):
    """The module that samples ``config``: ``ras_compile(model, policy)``, or for dense the model
    compiled with the same backend (one shared module)."""
    if config.kind == "ras":
        from ras_compile import ras_compile

        return ras_compile(model, config.policy, backend=backend)
    if "dense" not in dense_cache:
        dense_cache["dense"] = model if backend is None else torch.compile(model, backend=backend)
    return dense_cache["dense"]


def _reset(sampler) -> None:
    for controller in getattr(sampler, "ras_controllers", ()):
        controller.reset()


def run_config(sampler, config: Config, noise: torch.Tensor, labels: torch.Tensor, batch_size: int,
               guidance_scale: float, device: torch.device) -> tuple[torch.Tensor, dict]:
    """Warm up (untimed), then sample every batch timed; returns CPU images and timings / RAS stats."""
    from ras_compile.reference.sampling import sample

    noise_batches, label_batches = noise.split(batch_size), labels.split(batch_size)
    warm_steps = config.steps
    if config.kind == "ras":
        first = first_sparse_step(config.policy, config.steps)
        warm_steps = config.steps if first is None else first + 1
    else:
        warm_steps = min(config.steps, 2)
    t0 = time.perf_counter()
    for i in sorted({0, len(noise_batches) - 1}):  # every batch shape the timed loop will see
        _reset(sampler)
        sample(sampler, label_batches[i], warm_steps, NOISE_SEED, guidance_scale, noise=noise_batches[i])
    _sync(device)
    warmup_s = time.perf_counter() - t0

    images, seconds, modes, active = [], 0.0, {"dense": 0, "sparse": 0, "predicted": 0, "fallback": 0}, []
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    for x, y in zip(noise_batches, label_batches):
        _reset(sampler)
        _sync(device)
        t0 = time.perf_counter()
        out = sample(sampler, y, config.steps, NOISE_SEED, guidance_scale, noise=x)
        _sync(device)
        seconds += time.perf_counter() - t0
        images.append(out.cpu())
        for controller in getattr(sampler, "ras_controllers", ()):
            for st in controller.stats:
                modes[st.mode] += 1
                if st.mode == "sparse":
                    active.append(st.active_tokens / st.num_tokens)
    other = other_cpu_cores(cpu0, cpu_seconds(), time.perf_counter() - wall0)
    n = len(noise)
    timing = {"seconds": seconds, "samples_per_s": n / seconds if seconds > 0 else float("nan"),
              "ms_per_sample_step": 1000 * seconds / (n * config.steps), "warmup_compile_s": warmup_s,
              "other_process_cores": other}
    stats = None
    if config.kind == "ras":
        batches = len(noise_batches)
        stats = {"dense_steps_per_loop": modes["dense"] / batches, "sparse_steps_per_loop": modes["sparse"] / batches,
                 "predicted_steps_per_loop": modes["predicted"] / batches,
                 "fallback_steps_per_loop": modes["fallback"] / batches,
                 "mean_sparse_active_fraction": sum(active) / len(active) if active else None}
    return torch.cat(images), {"timing": timing, "ras_stats": stats}


# -- metrics ----------------------------------------------------------------------------------------
def frechet_with_spread(feats: torch.Tensor, real_feats: torch.Tensor, resamples: int = BOOTSTRAP,
                        seed: int = 0) -> tuple[float, float]:
    """The Frechet distance of ``feats`` to ``real_feats`` and its bootstrap standard deviation
    (``feats`` resampled with replacement; a fixed seed)."""
    from ras_compile.reference.metrics import frechet_distance

    value = frechet_distance(feats, real_feats)
    gen = torch.Generator().manual_seed(seed)
    n = feats.shape[0]
    boots = [frechet_distance(feats[torch.randint(n, (n,), generator=gen)], real_feats) for _ in range(resamples)]
    boots = [b for b in boots if math.isfinite(b)]
    spread = float(torch.tensor(boots, dtype=torch.float64).std()) if len(boots) > 1 else float("nan")
    return value, spread


def paired_fd_difference_sd(feats_a: torch.Tensor, feats_b: torch.Tensor, real_feats: torch.Tensor,
                            resamples: int = BOOTSTRAP, seed: int = 1) -> float:
    """Bootstrap standard deviation of ``FD(a) - FD(b)`` when sample ``i`` of ``a`` and of ``b`` come from the
    same noise and class (resampling the same indices for both): the noise of a paired difference, far
    smaller than that of either distance alone because most of it is shared."""
    from ras_compile.reference.metrics import frechet_distance

    gen = torch.Generator().manual_seed(seed)
    n = feats_a.shape[0]
    diffs = []
    for _ in range(resamples):
        idx = torch.randint(n, (n,), generator=gen)
        d = frechet_distance(feats_a[idx], real_feats) - frechet_distance(feats_b[idx], real_feats)
        if math.isfinite(d):
            diffs.append(d)
    return float(torch.tensor(diffs, dtype=torch.float64).std()) if len(diffs) > 1 else float("nan")


def paired_mean_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, int]:
    """``mean(a - b)`` over the samples where both are finite, its standard error (sample ``i`` of both
    starts from the same noise and class, so the difference is taken per sample), and how many samples
    were dropped as non-finite (a PSNR of ``inf``: bit-identical images)."""
    a, b = a.double(), b.double()
    keep = torch.isfinite(a) & torch.isfinite(b)
    d = (a - b)[keep]
    n = int(d.numel())
    if n == 0:
        return float("nan"), float("nan"), int(a.numel())
    se = float(d.std() / math.sqrt(n)) if n > 1 else float("nan")
    return float(d.mean()), se, int(a.numel()) - n


def image_metrics(images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None, classifier,
                  real_feats: torch.Tensor, converged: torch.Tensor | None = None
                  ) -> tuple[dict, torch.Tensor, dict[str, torch.Tensor | None]]:
    """Accuracy, Frechet distance (and its spread), PSNR and SSIM against ``reference`` (dense, same steps),
    PSNR against ``converged`` (dense at many steps); the samples' classifier features; and the per-sample
    values (``accuracy``: 1 where classified right; ``psnr_db``, ``psnr_converged_db``: None without their
    reference) for paired comparisons."""
    from ras_compile.reference.evaluator import classify, features
    from ras_compile.reference.metrics import psnr, ssim

    images = images.float().clamp(-1, 1)
    feats = features(classifier, images)
    fd, fd_std = frechet_with_spread(feats, real_feats)
    correct = (classify(classifier, images) == labels).float()
    out = {"accuracy": float(correct.mean()), "fd": fd, "fd_std": fd_std,
           "psnr_db": None, "ssim": None, "psnr_converged_db": None}
    per_sample: dict[str, torch.Tensor | None] = {"accuracy": correct, "psnr_db": None, "psnr_converged_db": None}
    if reference is not None:
        per_sample["psnr_db"] = psnr(images, reference)
        out["psnr_db"] = float(per_sample["psnr_db"].double().mean())
        out["ssim"] = float(ssim(images, reference).double().mean())
    if converged is not None:
        per_sample["psnr_converged_db"] = psnr(images, converged)
        out["psnr_converged_db"] = float(per_sample["psnr_converged_db"].double().mean())
    return out, feats, per_sample


# -- claims -----------------------------------------------------------------------------------------
def _by_name(configs: list[Config]) -> dict[str, Config]:
    return {c.name: c for c in configs}


# Table 2's fronts: (key in result["pareto"], metric, better high, what it measures)
FRONTS = (("fd", "fd", False, "Frechet distance"), ("accuracy", "accuracy", True, "accuracy"),
          ("psnr_converged", "psnr_converged_db", True, "PSNR against the converged sampler"))


def _metric(c: Config, metric: str) -> float:
    v = c.result["metrics"].get(metric)
    return float("nan") if v is None else float(v)


def compute_pareto(configs: list[Config]) -> None:
    """Mark Table 2's configurations on each front of ``FRONTS`` (throughput up; FD down, accuracy up, PSNR
    against the converged sampler up). Without a converged reference that front is all ``None``."""
    rows = [c for c in configs if c.table == "table2"]
    thr = [c.result["timing"]["samples_per_s"] for c in rows]
    for key, metric, better_high, _ in FRONTS:
        values = [_metric(c, metric) for c in rows]
        flags = pareto_front(list(zip(thr, values)), (True, better_high))
        for c, f, v in zip(rows, flags, values):
            c.result.setdefault("pareto", {})[key] = None if math.isnan(v) else f
    # Table 6 rows on Table 2's plane: which dense rows (fewer steps) each one beats on the converged front
    dense = [c for c in rows if c.kind == "dense"]
    for c in configs:
        if c.table == "table6" and not math.isnan(_metric(c, "psnr_converged_db")):
            c.result["beats_dense_converged"] = [d for _, d in ras_dominates_dense([c], dense, "psnr_converged_db",
                                                                                  True)]


def ras_dominates_dense(ras: list[Config], dense: list[Config], key: str, better_high: bool) -> list[tuple[str, str]]:
    """(RAS name, dense name) pairs where the RAS configuration takes more steps than the dense one, is at
    least as fast and at least as good in metric ``key``, and strictly better in one of the two (the paper's
    Table 2 comparison: RAS with more steps against dense with fewer)."""
    pairs = []
    for r in ras:
        for d in dense:
            if r.steps <= d.steps:
                continue
            front = pareto_front([(r.result["timing"]["samples_per_s"], _metric(r, key)),
                                  (d.result["timing"]["samples_per_s"], _metric(d, key))], (True, better_high))
            if front == [True, False]:
                pairs.append((r.name, d.name))
    return pairs


def paired_noise(metric: str, a: str, b: str, feats: dict[str, torch.Tensor] | None, real_feats: torch.Tensor | None,
                 per_sample: dict[str, dict[str, torch.Tensor | None]] | None) -> float:
    """Twice the standard deviation of ``metric(a) - metric(b)`` for configurations whose sample ``i`` starts
    from the same noise and class: the paired bootstrap for the Frechet distance, the standard error of the
    per-sample differences for accuracy and PSNR; NaN when this run lacks what it needs."""
    if metric == "fd":
        if feats is None or real_feats is None:
            return float("nan")
        return 2 * paired_fd_difference_sd(feats[a], feats[b], real_feats)
    va, vb = ((per_sample or {}).get(n, {}).get(metric) for n in (a, b))
    if va is None or vb is None:
        return float("nan")
    return 2 * paired_mean_difference(va, vb)[1]


def _noise_of_difference(a: dict, b: dict) -> float:
    return 2 * math.sqrt((a.get("fd_std") or 0.0) ** 2 + (b.get("fd_std") or 0.0) ** 2)


def compute_claims(configs: list[Config], ablation_ratio: float, ablation_steps: int,
                   feats: dict[str, torch.Tensor] | None = None, real_feats: torch.Tensor | None = None,
                   per_sample: dict[str, dict[str, torch.Tensor | None]] | None = None) -> list[dict]:
    """The paper's claims, checked against this run's numbers (``holds``: True / False / None if not
    measurable here; ``measure``: the metric it was judged on).

    Table 2's claims are judged on each front of ``FRONTS`` that this run measured. Each Table 6 claim is
    judged twice: on the Frechet distance (with every configuration's features, ``feats``, a difference is
    "beyond noise" when it exceeds twice its paired bootstrap standard deviation; without, twice the unpaired
    one) and, with the per-sample PSNRs (``per_sample``), on PSNR against dense at the same steps (beyond
    noise: more than twice the standard error of the paired per-sample difference)."""
    claims: list[dict] = []
    by = _by_name(configs)
    t2 = [c for c in configs if c.table == "table2"]
    # the paper's claims are judged on RAS as the paper has it; the variants get claims of their own
    ras = [c for c in t2 if c.kind == "ras" and c.policy.step_cache_interval == 1 and c.policy.stale_token_order == 0]
    stacked = [c for c in t2 if c.kind == "ras" and c.policy.step_cache_interval > 1]
    continued = [c for c in t2 if c.kind == "ras" and c.policy.stale_token_order == 1]
    dense = [c for c in t2 if c.kind == "dense"]
    fronts = [f for f in FRONTS if any(c.result["pareto"].get(f[0]) is not None for c in t2)]
    # Table 2: the headline point (the ablation ratio / steps, 0.5 at 28 by default)
    focus = f"ras_r{ablation_ratio:g}_s{ablation_steps}"
    focus = focus if focus in by else (ras[len(ras) // 2].name if ras else None)
    if focus:
        c = by[focus]
        for key, metric, _, what in fronts:
            on = c.result["pareto"][key]
            claims.append({"claim": f"{c.label} is on the Pareto front (throughput vs {what})", "paper": True,
                           "holds": on, "measure": metric,
                           "measured": f"{c.label}: {c.result['timing']['samples_per_s']:.3g} samples/s, "
                                       f"{metric} {_metric(c, metric):.4g}; {'on' if on else 'not on'} the front"})
    for key, metric, better_high, what in fronts:
        wins = []
        for r, d in ras_dominates_dense(ras, dense, metric, better_high):
            margin = abs(_metric(by[r], metric) - _metric(by[d], metric))
            noise = paired_noise(metric, r, d, feats, real_feats, per_sample)
            wins.append({"ras": r, "dense": d, "margin": margin, "noise_2sd": noise,
                         "beyond_noise": None if math.isnan(noise) else margin > noise})
        resolved = [w for w in wins if w["beyond_noise"]]
        shown = (resolved or wins)[:4]
        n_ras = sum(bool(c.result["pareto"][key]) for c in ras)
        n_dense = sum(bool(c.result["pareto"][key]) for c in dense)
        measured = (f"{len(wins)} pairs ({len(resolved)} beyond the paired noise), e.g. "
                    + "; ".join(f"{by[w['ras']].label} over {by[w['dense']].label} (by {w['margin']:.3g}, 2 sd "
                                f"{_fmt(w['noise_2sd'], '.2g')})" for w in shown)
                    if wins else "no RAS configuration dominates a dense one with fewer steps")
        claims.append({"claim": f"RAS with more steps beats dense with fewer steps at equal throughput ({what}): "
                                "some RAS configuration is at least as fast as a dense one with fewer steps and "
                                "better (paper Table 2)",
                       "paper": True, "holds": bool(wins), "measure": metric, "pairs": wins,
                       "beyond_noise": bool(resolved) if wins else None,
                       "measured": measured + f"; on the front: {n_ras} of {len(ras)} RAS, {n_dense} of "
                                              f"{len(dense)} dense"})
    for c in (c for c in t2 if c.kind == "ras"):  # RAS and its variants: faster than dense at the same steps?
        d = by.get(f"dense_s{c.steps}")
        if d is not None:
            c.result["speedup_vs_dense_same_steps"] = c.result["timing"]["samples_per_s"] / \
                d.result["timing"]["samples_per_s"]
    speedups = [c.result["speedup_vs_dense_same_steps"] for c in ras if "speedup_vs_dense_same_steps" in c.result]
    if speedups:
        claims.append({"claim": "RAS is faster than dense at the same number of steps (paper Table 3: 1.62x at 0.5, "
                                "2.44x at 0.125 on SD3, A100)", "paper": True, "measure": "samples_per_s",
                       "holds": all(s > 1 for s in speedups),
                       "measured": "speed-ups " + ", ".join(f"{c.label}: {c.result['speedup_vs_dense_same_steps']:.2f}x"
                                                            for c in ras if "speedup_vs_dense_same_steps" in c.result)})
    for rows, what_rows in ((stacked, "a step cache stacked on RAS (or alone)"),
                            (continued, "RAS with its stale tokens continued")):
        for key, metric, _, what in fronts if rows else ():
            on = [c for c in rows if c.result["pareto"][key]]
            claims.append({"claim": f"{what_rows} reaches the Pareto front of throughput vs {what} (no paper claim)",
                           "paper": None, "holds": bool(on), "measure": metric,
                           "measured": (f"{len(on)} of {len(rows)} on the front: "
                                        + ", ".join(f"{c.label} ({c.result['timing']['samples_per_s']:.3g} "
                                                    f"samples/s, {metric} {_metric(c, metric):.4g})" for c in on))
                           if on else f"none of {len(rows)} is on the front"})
    # Table 6
    where = f" at ratio {ablation_ratio:g}, {ablation_steps} steps"
    for ablation, baseline, text, paper in ABLATION_CLAIMS:
        a, b = by.get(f"abl_{ablation}"), by.get(f"abl_{baseline}")
        if a is None or b is None:
            continue
        ma, mb = a.result["metrics"], b.result["metrics"]
        better = mb["fd"] < ma["fd"]
        margin = abs(mb["fd"] - ma["fd"])
        if feats is not None and real_feats is not None:
            noise, kind = 2 * paired_fd_difference_sd(feats[a.name], feats[b.name], real_feats), "paired bootstrap"
        else:
            noise, kind = _noise_of_difference(ma, mb), "bootstrap"
        psnr_better = None if ma["psnr_db"] is None or mb["psnr_db"] is None else mb["psnr_db"] > ma["psnr_db"]
        measured = (f"FD {mb['fd']:.4g} (baseline) vs {ma['fd']:.4g} ({ablation}); difference "
                    f"{'beyond' if margin > noise else 'within'} the {kind} noise (2 sd = {noise:.3g}); "
                    f"accuracy {mb['accuracy']:.3f} vs {ma['accuracy']:.3f}")
        claims.append({"claim": text + where + ": baseline has the lower FD", "paper": paper, "holds": better,
                       "measure": "fd", "ablation": ablation, "beyond_noise": margin > noise,
                       "fd_difference_2sd": noise, "baseline_higher_psnr": psnr_better, "measured": measured})
        pa = (per_sample or {}).get(a.name, {}).get("psnr_db")
        pb = (per_sample or {}).get(b.name, {}).get("psnr_db")
        if pa is None or pb is None:
            continue
        diff, se, dropped = paired_mean_difference(pb, pa)
        resolved = math.isfinite(diff) and math.isfinite(se) and abs(diff) > 2 * se
        claims.append({"claim": text + where + ": baseline has the higher PSNR against dense at the same steps",
                       "paper": paper, "holds": bool(diff > 0) if math.isfinite(diff) else None, "measure": "psnr_db",
                       "ablation": ablation, "beyond_noise": resolved, "psnr_difference_db": diff,
                       "psnr_difference_2se": 2 * se,
                       "measured": f"PSNR vs dense {_fmt(mb['psnr_db'], '.2f')} (baseline) vs "
                                   f"{_fmt(ma['psnr_db'], '.2f')} dB ({ablation}); paired per-sample difference "
                                   f"{diff:+.2f} dB, {'beyond' if resolved else 'within'} its noise (2 se = "
                                   f"{2 * se:.2g} dB)" + (f"; {dropped} bit-identical samples left out" if dropped
                                                          else "")})
    check = next((c for c in configs if c.table == "check"), None)
    if check is not None:
        p = check.result["metrics"]["psnr_db"]
        claims.append({"claim": "RAS at ratio 1.0 reproduces dense sampling (PSNR >= 40 dB)", "paper": None,
                       "measure": "psnr_db", "holds": p is not None and p >= 40,
                       "measured": f"PSNR {_fmt(p, '.1f')} dB"})
    return claims


# -- report -----------------------------------------------------------------------------------------
def _fmt(v, spec: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


def _json_safe(obj):
    """Non-finite floats as the strings "inf" / "-inf" / "nan" (strict JSON has no such numbers;
    ``float(value)`` reads them back)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def policy_dict(policy) -> dict | None:
    if policy is None:
        return None
    d = dataclasses.asdict(policy)
    d["metric"] = d["metric"] if isinstance(d["metric"], str) else getattr(d["metric"], "__name__", "callable")
    return d


def machine_info(device: torch.device) -> dict:
    import diffusers

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_model": cpu_model(), "logical_cores": os.cpu_count(),
            "cores_available": cores_available(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    try:
        import matplotlib
        info["matplotlib"] = matplotlib.__version__
    except ImportError:
        info["matplotlib"] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                            check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        info["git_dirty"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"], info["git_dirty"] = None, None
    return info


def config_row(c: Config) -> dict:
    return {"name": c.name, "table": c.table, "kind": c.kind, "steps": c.steps, "ratio": c.ratio, "label": c.label,
            "ablation": c.ablation, "reference_only": c.reference_only, "same_run_as": c.same_run_as,
            "policy": policy_dict(c.policy), **c.result}


def _mark(flag: bool | None) -> str:
    return "yes" if flag else ("no" if flag is not None else "-")


def _holds(flag: bool | None) -> str:
    return {True: "**yes**", False: "**no**", None: "n/a"}[flag]


def render_markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    rows = {r["name"]: r for r in report["configs"]}
    device = f"GPU {m['gpu']}" if m.get("gpu") else f"CPU {m['cpu_model']}"
    lines = [f"# RAS quality benchmark: {report['name']}", ""]
    if report["model"]["stand_in"]:
        lines += [f"> **Stand-in model** ({report['model']['path']}), not the shipped reference weights: these "
                  "numbers test the benchmark, they say nothing about RAS's quality.", ""]
    if report["classifier"]["stand_in"]:
        lines += [f"> **Stand-in classifier** ({report['classifier']['path']}): accuracy and Frechet distance "
                  "are not meaningful.", ""]
    lines += [f"- machine: {device}; {m['cores_available']} cores available, {m['torch_threads']} torch threads; "
              f"{m['platform']}",
              f"- software: Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}, "
              f"matplotlib {m['matplotlib'] or 'not installed'}",
              f"- date {m['date']}; commit {(m.get('git_commit') or '?')[:10]}"
              f"{' (with uncommitted changes)' if m.get('git_dirty') else ''}",
              f"- command: `{report['command']}`",
              f"- model: {report['model']['path']} ({report['model']['tokens']} image tokens, "
              f"{report['model']['parameters']:,} parameters), dtype {s['dtype']}, backend {s['backend']}, "
              f"{s['samples']} samples per configuration in batches of {s['batch_size']}, guidance scale "
              f"{s['guidance_scale']:g}, noise seed {NOISE_SEED}",
              f"- real images: {s['samples']} from `make_batch(EVAL_SEED_BASE + {REAL_SEED_OFFSET})`; classifier "
              f"accuracy on them {report['real']['accuracy']:.3f}; Frechet distance between two real sets of this "
              f"size (the floor) {report['real']['fd_real_vs_real']:.4g}",
              f"- total wall time {report['wall_s'] / 60:.1f} min", ""]
    contended = [r["label"] for r in report["configs"]
                 if (r["timing"]["other_process_cores"] or 0) > 0.25 and r["same_run_as"] is None]
    if contended:
        lines += [f"> Other processes used more than 0.25 cores during the timed loops of: {', '.join(contended)}. "
                  "Their throughput is understated; rerun on a quiet machine.", ""]

    converged = [r for r in report["configs"] if r["table"] == "converged"]
    if converged:
        r = converged[0]
        lines += ["## The converged reference", "",
                  f"{r['label']}: {_fmt(r['timing']['samples_per_s'], '.3g')} samples/s, FD "
                  f"{_fmt(r['metrics']['fd'])} ± {_fmt(r['metrics']['fd_std'], '.2g')}, accuracy "
                  f"{_fmt(r['metrics']['accuracy'], '.3f')}. *PSNR conv* below is each configuration's PSNR against "
                  "it (same noise and class): how far a configuration's samples are from the Euler sampler's "
                  "limit, the error that fewer steps and stale tokens add.", ""]
    lines += ["## Table 2: quality vs throughput", "",
              "Ordered by measured throughput (samples/s, this run, this device). *front FD* / *front acc* / "
              "*front conv*: on the Pareto front of throughput vs Frechet distance (lower is better) / vs class "
              "accuracy / vs PSNR against the converged reference. PSNR and SSIM are against dense sampling at the "
              "same seeds and the same number of steps (dense rows: themselves). Dense rows marked *(ref)* were "
              "added only because RAS uses that step count.", "",
              "| configuration | steps | samples/s | speed-up vs dense, same steps | FD | acc | PSNR dB | SSIM "
              "| PSNR conv dB | front FD | front acc | front conv |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|:-:|"]
    for name in report["table2_order"]:
        r = rows[name]
        mt = r["metrics"]
        label = r["label"] + (" *(ref)*" if r["reference_only"] else "")
        lines.append(f"| {label} | {r['steps']} | {_fmt(r['timing']['samples_per_s'], '.3g')} | "
                     f"{_fmt(r.get('speedup_vs_dense_same_steps'), '.2f')} | "
                     f"{_fmt(mt['fd'])} ± {_fmt(mt['fd_std'], '.2g')} | "
                     f"{_fmt(mt['accuracy'], '.3f')} | {_fmt(mt['psnr_db'], '.2f')} | {_fmt(mt['ssim'], '.4f')} | "
                     f"{_fmt(mt.get('psnr_converged_db'), '.2f')} | {_mark(r['pareto']['fd'])} | "
                     f"{_mark(r['pareto']['accuracy'])} | {_mark(r['pareto'].get('psnr_converged'))} |")
    lines += ["", "FD ± is the bootstrap standard deviation of the generated set's Frechet distance "
                  f"({BOOTSTRAP} resamples).", ""]

    t6 = [r for r in report["configs"] if r["table"] == "table6"]
    if t6:
        lines += [f"## Table 6: ablations at ratio {s['ablation_ratio']:g}, {s['ablation_steps']} steps", "",
                  "Each row changes the named RASPolicy fields of the baseline (first row).", "",
                  "*beats dense (conv)*: the Table 2 dense rows with fewer steps that this row is at least as fast "
                  "as and closer to the converged reference than (none: it is dominated there, or slower).", "",
                  "| ablation | RASPolicy change | samples/s | FD | acc | PSNR dB | SSIM | PSNR conv dB "
                  "| beats dense (conv) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in t6:
            change = ", ".join(f"{k}={v!r}" for k, v in ablation_change(r).items()) or "(baseline)"
            mt = r["metrics"]
            same = f" (= {rows[r['same_run_as']]['label']})" if r["same_run_as"] else ""
            lines.append(f"| {r['label']}{same} | `{change}` | {_fmt(r['timing']['samples_per_s'], '.3g')} | "
                         f"{_fmt(mt['fd'])} ± {_fmt(mt['fd_std'], '.2g')} | {_fmt(mt['accuracy'], '.3f')} | "
                         f"{_fmt(mt['psnr_db'], '.2f')} | {_fmt(mt['ssim'], '.4f')} | "
                         f"{_fmt(mt.get('psnr_converged_db'), '.2f')} | "
                         f"{', '.join(rows[d]['label'] for d in r.get('beats_dense_converged', [])) or '-'} |")
        lines.append("")
    checks = [r for r in report["configs"] if r["table"] == "check"]
    if checks:
        lines += ["## Check", ""]
        for r in checks:
            lines.append(f"- {r['label']}: PSNR {_fmt(r['metrics']['psnr_db'], '.2f')} dB, SSIM "
                         f"{_fmt(r['metrics']['ssim'], '.5f')} against dense.")
        lines.append("")
    lines += ["## Paper claims against this run", "",
              "*holds* is computed from the numbers above. Each Table 6 claim is judged twice: on the Frechet "
              "distance, where *beyond noise* says whether the difference exceeds twice its paired bootstrap "
              "standard deviation (samples of both configurations start from the same noise, so they are "
              "resampled together), and on PSNR against dense at the same steps, where it says whether the mean "
              "per-sample difference exceeds twice its standard error. A difference within the noise is not "
              "evidence either way.", "",
              "| claim | judged on | paper | holds here | beyond noise | measured |", "|---|---|:-:|:-:|:-:|---|"]
    for c in report["claims"]:
        paper = {True: "yes", False: "no", None: "-"}[c["paper"]]
        lines.append(f"| {c['claim']} | {c.get('measure', '-')} | {paper} | {_holds(c['holds'])} | "
                     f"{_mark(c.get('beyond_noise'))} | {c['measured']} |")
    contradicted = [c["claim"] for c in report["claims"] if c["paper"] and c["holds"] is False
                    and c.get("beyond_noise", True)]
    unresolved = [c["claim"] for c in report["claims"] if c["paper"] and c.get("beyond_noise") is False]
    lines += ["", "**Does not reproduce here:** " + ("; ".join(contradicted) if contradicted else
                                                     "none of the paper's claims checked above") + ".", ""]
    if unresolved:
        lines += ["**Not resolved at this sample count** (difference within the noise): " + "; ".join(unresolved)
                  + ".", ""]
    lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    lines += [f"Plot: `{report['name']}.png`" if report["plot"] else f"No plot: {report['plot_note']}", ""]
    return "\n".join(lines)


def ablation_change(row: dict) -> dict:
    """The RASPolicy fields of an ablation row that differ from its Table 6 baseline (from the JSON row)."""
    if row.get("ablation") in (None, "metric_std"):
        return {}
    extra = {"schedule_dynamic": ("skip_num_step", "skip_num_step_length", "dynamic_drop_multiple"),
             "end_step": ("end_step",)}.get(row["ablation"], ())
    return {k: v for k, v in ABLATIONS[row["ablation"]][1].items()} | {k: row["policy"][k] for k in extra}


def save_plot(report: dict, path: Path) -> tuple[bool, str | None]:
    """The Pareto plots (one per front this run measured); (written, why not)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False, "matplotlib is not installed (pip install matplotlib)"
    rows = [r for r in report["configs"] if r["table"] == "table2"]
    panels = [("fd", "fd", "Frechet distance (lower is better)"),
              ("accuracy", "accuracy", "class accuracy (higher is better)")]
    if any(r["pareto"].get("psnr_converged") is not None for r in rows):
        panels.append(("psnr_converged", "psnr_converged_db", "PSNR vs converged reference, dB (higher is better)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    for ax, (front_key, key, ylabel) in zip(axes, panels):
        dense = sorted((r for r in rows if r["kind"] == "dense"), key=lambda r: r["steps"])
        ax.plot([r["timing"]["samples_per_s"] for r in dense], [r["metrics"][key] for r in dense], "o-", color="k",
                label="dense")
        for r in dense:
            ax.annotate(str(r["steps"]), (r["timing"]["samples_per_s"], r["metrics"][key]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ratios = sorted({r["ratio"] for r in rows if r["kind"] == "ras"}, reverse=True)
        for i, ratio in enumerate(ratios):
            pts = sorted((r for r in rows if r["ratio"] == ratio), key=lambda r: r["steps"])
            ax.plot([r["timing"]["samples_per_s"] for r in pts], [r["metrics"][key] for r in pts], "s--",
                    color=f"C{i}", label=f"RAS {ratio:g}")
            for r in pts:
                ax.annotate(str(r["steps"]), (r["timing"]["samples_per_s"], r["metrics"][key]), fontsize=7,
                            xytext=(3, -9), textcoords="offset points", color=f"C{i}")
        front = sorted((r for r in rows if r["pareto"][front_key]), key=lambda r: r["timing"]["samples_per_s"])
        ax.plot([r["timing"]["samples_per_s"] for r in front], [r["metrics"][key] for r in front], "o", ms=12,
                mfc="none", mec="red", label="Pareto front")
        ax.set_xlabel("throughput (samples/s, this run)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"{report['name']}: {m.get('gpu') or m['cpu_model']}, {report['settings']['samples']} samples "
                 f"per point{' (stand-in model)' if report['model']['stand_in'] else ''}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True, None


# -- main -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--samples", type=int, default=None, help=f"samples per configuration (default "
                   f"{DEFAULTS['samples']}, --quick {QUICK['samples']})")
    p.add_argument("--batch-size", type=int, default=None, help=f"samples per sampling loop (default "
                   f"{DEFAULTS['batch_size']}; the guidance batch is twice this)")
    p.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE,
                   help="classifier-free guidance (1: none; default: the reference DiT's DEFAULT_GUIDANCE_SCALE)")
    p.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager", "eager", "none"),
                   help="torch.compile backend for ras_compile and for the dense baseline ('none': the rewritten "
                        "graphs and the dense model run without Dynamo)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (16 samples, 2 configurations a table, "
                                                        "8 steps)")
    p.add_argument("--model", default=None, help="folder of a DiTTransformer2DModel (from_pretrained layout); "
                                                 "default: the shipped reference weights")
    p.add_argument("--classifier", default=None, help="evaluator classifier .safetensors (default: the shipped one)")
    p.add_argument("--ratios", type=float, nargs="+", default=None)
    p.add_argument("--ras-steps", type=int, nargs="+", default=None)
    p.add_argument("--dense-steps", type=int, nargs="+", default=None)
    p.add_argument("--converged-steps", type=int, default=None,
                   help=f"dense steps of the converged reference (PSNR vs converged; default "
                        f"{DEFAULTS['converged_steps']}, --quick {QUICK['converged_steps']}; 0: none); more than "
                        "every other step count")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="warm-up steps of every RAS configuration (default: RASPolicy's 4 of 28 scaled to each "
                        "loop, ras_compile.schedule.scaled_plan); the warm-up ablations still set their own")
    p.add_argument("--step-cache-intervals", type=int, nargs="*", default=(),
                   help="Table 2 rows with RAS's step cache stacked (RASPolicy.step_cache_interval), each >= 2: "
                        "the step cache alone and on RAS at every --ratios, at every --ras-steps (default: none)")
    p.add_argument("--stale-linear", action="store_true",
                   help="Table 2 rows with RAS's inactive tokens continued linearly (RASPolicy.stale_token_order=1) "
                        "at every --ratios and --ras-steps, alone and with each --step-cache-intervals")
    p.add_argument("--ablation-ratio", type=float, default=None)
    p.add_argument("--ablation-steps", type=int, default=None)
    p.add_argument("--ablations", nargs="*", default=None, choices=list(ABLATIONS),
                   help="Table 6 rows besides the baseline (default: all; --quick: 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=str(RESULTS), help="output folder (default benchmarks/results)")
    p.add_argument("--name", default=None, help="output file stem (default <device>_reference_quality[_quick])")
    a = p.parse_args(argv)
    preset = QUICK if a.quick else DEFAULTS
    for key in ("ratios", "ras_steps", "dense_steps", "converged_steps", "ablation_ratio", "ablation_steps",
                "samples", "batch_size"):
        if getattr(a, key) is None:
            setattr(a, key, preset[key])
    if a.ablations is None:
        a.ablations = list(QUICK["ablations"]) if a.quick else [k for k in ABLATIONS if k != "metric_std"]
    a.backend = None if a.backend == "none" else a.backend
    if a.samples < 2 or a.batch_size < 1:
        p.error("--samples must be >= 2 and --batch-size >= 1")
    if any(not 0 < r <= 1 for r in [*a.ratios, a.ablation_ratio]):
        p.error("ratios must lie in (0, 1]")
    if any(n < 2 for n in a.step_cache_intervals):
        p.error("--step-cache-intervals must be >= 2 (1 is RAS without a step cache, already in Table 2)")
    if min([*a.ras_steps, *a.dense_steps, a.ablation_steps]) < 1:
        p.error("step counts must be >= 1")
    if a.warmup_steps is not None and a.warmup_steps < 1:
        p.error(f"--warmup-steps {a.warmup_steps} must be >= 1 (step 0 is always dense)")
    longest = max([*a.ras_steps, *a.dense_steps, a.ablation_steps])
    if a.converged_steps < 0 or 0 < a.converged_steps <= longest:
        p.error(f"--converged-steps {a.converged_steps} must exceed every other step count ({longest}), or be 0 "
                "for no converged reference")
    if a.name is None:
        a.name = f"{torch.device(a.device).type}_reference_quality{'_quick' if a.quick else ''}"
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    from ras_compile.reference.data import EVAL_SEED_BASE, NUM_CLASSES, make_batch
    from ras_compile.reference.evaluator import accuracy, features, load_classifier
    from ras_compile.reference.metrics import frechet_distance
    from ras_compile.reference.model import WEIGHTS_DIR, load_reference_model, parameter_count
    from ras_compile.reference.sampling import initial_noise

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    started = time.perf_counter()
    model = load_reference_model(a.model, dtype=dtype).to(device)
    classifier = load_classifier(a.classifier)
    cfg = model.config
    tokens = (cfg.sample_size // cfg.patch_size) ** 2
    guided = a.guidance_scale != 1.0
    configs = plan_configs(a.ratios, a.ras_steps, a.dense_steps, a.ablation_ratio, a.ablation_steps, a.ablations,
                           guided, tokens, a.converged_steps, a.warmup_steps, a.step_cache_intervals,
                           a.stale_linear)

    n = a.samples
    labels = torch.arange(n) % NUM_CLASSES
    noise = initial_noise(n, cfg.in_channels, cfg.sample_size, NOISE_SEED)
    real, _ = make_batch(EVAL_SEED_BASE + REAL_SEED_OFFSET, n, cfg.sample_size)
    real2, real2_labels = make_batch(EVAL_SEED_BASE + REAL_SEED_OFFSET + 1, n, cfg.sample_size)
    real_feats = features(classifier, real)
    real_info = {"seed": EVAL_SEED_BASE + REAL_SEED_OFFSET, "accuracy": accuracy(classifier, real2, real2_labels),
                 "fd_real_vs_real": frechet_distance(features(classifier, real2), real_feats)}

    images: dict[str, torch.Tensor] = {}
    feats: dict[str, torch.Tensor] = {}
    per_sample: dict[str, dict[str, torch.Tensor | None]] = {}
    dense_cache: dict = {}
    converged_name = f"converged_s{a.converged_steps}" if a.converged_steps else None
    for i, c in enumerate(configs):
        if c.same_run_as is not None:
            src = _by_name(configs)[c.same_run_as]
            c.result = {k: v for k, v in src.result.items() if k != "pareto"}
            images[c.name], feats[c.name] = images[src.name], feats[src.name]
            per_sample[c.name] = per_sample[src.name]
            print(f"[{i + 1}/{len(configs)}] {c.label}: same policy as {src.label}, reused", flush=True)
            continue
        sampler = make_sampler(model, c, a.backend, dense_cache)
        imgs, run = run_config(sampler, c, noise, labels, a.batch_size, a.guidance_scale, device)
        images[c.name] = imgs.float().clamp(-1, 1)
        reference = images.get(f"dense_s{c.steps}")
        converged = images.get(converged_name) if converged_name and c.name != converged_name else None
        metrics, feats[c.name], per_sample[c.name] = image_metrics(images[c.name], labels, reference, classifier,
                                                                   real_feats, converged)
        c.result = {**run, "metrics": metrics}
        if c.kind == "ras":
            c.result["flop_bound_speedup"] = flop_bound_speedup(c.policy, c.steps, tokens)
            del sampler  # free its caches and compiled graphs
        mt, tm = c.result["metrics"], c.result["timing"]
        print(f"[{i + 1}/{len(configs)}] {c.label}: {tm['samples_per_s']:.3g} samples/s "
              f"(warm-up {tm['warmup_compile_s']:.1f} s), FD {mt['fd']:.4g}, acc {mt['accuracy']:.3f}, "
              f"PSNR {_fmt(mt['psnr_db'], '.2f')}, PSNR vs converged {_fmt(mt['psnr_converged_db'], '.2f')}",
              flush=True)

    compute_pareto(configs)
    claims = compute_claims(configs, a.ablation_ratio, a.ablation_steps, feats, real_feats, per_sample)
    t2 = [c for c in configs if c.table == "table2"]
    table2_order = [c.name for c in sorted(t2, key=lambda c: -c.result["timing"]["samples_per_s"])]

    model_path = Path(a.model).resolve() if a.model else WEIGHTS_DIR
    classifier_path = Path(a.classifier).resolve() if a.classifier else WEIGHTS_DIR / "classifier.safetensors"
    ras_step_counts = sorted({c.steps for c in configs if c.kind == "ras"})
    notes = [
        "Dense sampling runs at every step count RAS uses, as the PSNR / SSIM reference "
        f"(steps {sorted({c.steps for c in t2 if c.reference_only}) or 'none'} beyond --dense-steps).",
        (f"PSNR vs converged: against dense sampling at {a.converged_steps} steps from the same noise and class, "
         "the limit the Euler sampler approaches as steps grow; it measures the sampling error (fewer steps, "
         "stale tokens) that class accuracy and the Frechet distance cannot see once the samples are recognisable."
         if a.converged_steps else "No converged reference (--converged-steps 0)."),
        "RAS baseline: the paper's dense steps (warm-up 4, resets at 12 and 20 of 28) scaled to the loop "
        f"(ras_compile.schedule.scaled_plan{'' if a.warmup_steps is None else f', warm-up fixed at {a.warmup_steps}'};"
        f" steps: (warm-up, resets) {', '.join(f'{s}: {dense_plan(s, a.warmup_steps)}' for s in ras_step_counts)}),"
        " paper starvation rule, scale 0.1, static schedule.",
        "Throughput is measured in this one process on one device, after an untimed warm-up that compiles every "
        "graph; the dense baseline is the model compiled with the same backend. On a CPU, timings move with "
        "other load; a CPU says little about a GPU's speed-ups.",
        "The Frechet distance is on the evaluator classifier's pooled features, with as many real images as "
        "samples; at a few hundred samples it is biased upward and noisy, so compare configurations with each "
        "other (and with the real-vs-real floor), not with published FIDs.",
        "flop_bound_speedup (JSON) is the speed-up RAS's plan would give if time were proportional to FLOPs.",
    ]
    report = {
        "name": a.name, "quick": a.quick,
        "command": " ".join(["python benchmarks/bench_quality.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {"device": str(device), "dtype": a.dtype, "samples": n, "batch_size": a.batch_size,
                     "guidance_scale": a.guidance_scale, "backend": a.backend or "none", "ratios": list(a.ratios),
                     "ras_steps": list(a.ras_steps), "dense_steps": list(a.dense_steps),
                     "converged_steps": a.converged_steps or None, "warmup_steps": a.warmup_steps,
                     "ablation_ratio": a.ablation_ratio, "ablation_steps": a.ablation_steps,
                     "ablations": list(a.ablations), "noise_seed": NOISE_SEED, "threads": torch.get_num_threads()},
        "machine": machine_info(device),
        "model": {"path": str(model_path), "stand_in": model_path != WEIGHTS_DIR.resolve(), "tokens": tokens,
                  "parameters": parameter_count(model), "class": type(model).__name__},
        "classifier": {"path": str(classifier_path),
                       "stand_in": classifier_path != (WEIGHTS_DIR / "classifier.safetensors").resolve()},
        "real": real_info, "configs": [config_row(c) for c in configs], "table2_order": table2_order,
        "claims": claims, "notes": notes, "wall_s": time.perf_counter() - started,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report["plot"], report["plot_note"] = save_plot(report, out / f"{a.name}.png")
    (out / f"{a.name}.json").write_text(json.dumps(_json_safe(report), indent=1))
    (out / f"{a.name}.md").write_text(render_markdown(report))
    print(f"wrote {out / a.name}.json, .md{', .png' if report['plot'] else ''} "
          f"({report['wall_s'] / 60:.1f} min)", flush=True)
    return report


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as exc:  # missing weights: say how to get them, no traceback
        sys.exit(f"bench_quality: {exc} Here: --model DIR / --classifier FILE.")
