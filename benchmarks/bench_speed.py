"""Benchmark: whole sampling loops, dense vs RAS vs step caches, on diffusion-transformer presets.

    python benchmarks/bench_speed.py                  # the full suite (about 17 min on 2 CPU cores)
    python benchmarks/bench_speed.py --quick          # a tiny smoke run (2-3 min, mostly cold compiles)
    python benchmarks/bench_speed.py --model flux     # another family, scaled down for a CPU
    python benchmarks/bench_speed.py --model flux-dev --device cuda   # FLUX.1-dev's shapes, bf16 on a GPU

``--model`` picks a preset (random weights, no download):

* ``sd3`` (default): SD3's architecture (``SD3Transformer2DModel``, MMDiT) with SD3-medium's
  head dimension (64) but fewer heads and layers, so a CPU can run 28-step loops: 4 layers
  of 6 heads x 64 (width 384), a 64x64 latent with patch 2 (1024 image tokens), 77 text
  tokens, batch 2 (the classifier-free-guidance batch), tiny text embedders;
* ``flux`` / ``pixart`` / ``lumina``: ``FluxTransformer2DModel`` (2 double- + 4 single-stream
  blocks of 3 heads x 128, latent packed 2x2, 128 text tokens, batch 1: FLUX.1-dev is
  guidance-distilled, no CFG batch), ``PixArtTransformer2DModel`` (4 blocks of 6 heads x 72,
  cross-attention to 77 tokens) and ``LuminaNextDiT2DModel`` (4 blocks of 8 heads x 48 with
  2 K/V heads, cross-attention to 64 tokens), each at 1024 image tokens;
* ``sd3-medium`` / ``flux-dev`` / ``pixart-sigma`` / ``lumina-next``: the released models'
  transformer configs (2.0 B / 11.9 B / 0.61 B / 1.75 B parameters) at 1024x1024 pixels
  (4096 image tokens) with their text lengths (333 / 512 / 300 / 256), for a GPU: the
  weights are created on the device in the run's dtype (bf16 by default on cuda).

``--quick`` runs the preset's family at a tiny size (64 image tokens). Every
configuration samples the same noise with the same flow-matching Euler loop
(``FlowMatchEulerDiscreteScheduler``, shift 3.0 as SD3), the model getting the timestep
in its own convention (Flux ``t / 1000``, Lumina-Next ``1 - t / 1000``) and its output
turned into the velocity as its pipeline does (learned sigma dropped, Lumina's sign):

* ``eager``: the plain model;
* ``compiled``: ``torch.compile(model)`` (Inductor), the fair baseline for RAS;
* ``ras_r<ratio>``: ``ras_compile(model, RASPolicy(sample_ratio=ratio, warmup_steps=4,
  reset_steps=(12, 20)))`` (Inductor) for each ratio; ``ras_r1`` computes every token in
  its sparse steps, so it measures RAS's own overhead (cache writes, gather/scatter, token
  selection) against ``compiled``; dense steps run the sparse graph with every token
  active (one compiled graph);
* ``ras2g_r<ratio>`` (only when named in ``--configs``): the same with
  ``dense_graph=True``, a separate compiled dense graph for the dense steps;
* ``rasdyn_r<ratio>`` (only when named in ``--configs``): the dynamic (official linear)
  schedule at mean ratio ``<ratio>``, its count changing every step
  (``ras_compile.schedule.spread_dynamic_schedule``: 0.75x-1.25x of the mean dropped
  tokens); its FLOP bound is its own plan's;
* ``rassc<n>_r<ratio>`` (only when named in ``--configs``, ``n`` from 2 to 4): RAS with its
  step cache stacked on it (``RASPolicy(step_cache_interval=n)``: after each dense step one
  sparse step in every ``n`` runs, the others are extrapolated from the last two computed
  outputs); ``rassc<n>_r1`` is the step cache alone (every computed step dense-equivalent);
* ``fbc`` / ``taylorseer`` / ``taylorseer_lite``: diffusers' First Block Cache and
  TaylorSeer hooks on the eager model, where they apply (else the reason is recorded);
* ``compiled_again`` (last; by default except with ``--quick``, see
  ``--recheck-baseline``): ``compiled`` once more, in a fresh process after all the
  others. The same loop measured twice says how far a single run's baseline can be
  trusted: the report gives the drift and every RAS speed-up against both baselines.

Each configuration runs in its own Python process (clean Dynamo state, clean peak-RSS,
and by default an empty Inductor cache directory so the compile time is a cold one):
one warm-up generation (it compiles), then ``--repeats`` timed generations; the best
whole loop is reported, and each kind of step (dense / sparse / cached) as the median
of its calls over all timed generations. Every model call is timed with
``time.perf_counter()`` (on CUDA after a synchronize; on CPU no sync is needed).

CPU timings need a quiet machine. With torch's default of one OpenMP thread per core,
any other busy process makes the threads wait for each other at every parallel
region: on 2 cores with one core busy, a compiled step of the quick model went from
5 ms to 670 ms. Each worker therefore measures how much CPU *other* processes used
during its timed generations (``/proc/stat`` minus its own CPU time) and the report
flags contended configurations; rerun those on a quiet machine, or pass
``--threads`` below the core count to leave room for the other load.

Writes ``<out>/<name>.json`` and ``<out>/<name>.md`` (name ``<device>_<preset>``, e.g.
``cuda_flux_dev``, or ``<device>_<preset>_quick`` with ``--quick``; the default preset keeps
``cpu_sd3_scaled`` / ``cpu_sd3_quick``) and, when matplotlib is installed, ``<name>.png``.
The markdown records the command line that produced it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
if str(REPO) not in sys.path:  # run as a script from anywhere: import the checkout's ras_compile
    sys.path.insert(0, str(REPO))

from ras_compile.machine import (CONTENTION_MARGIN, cores_available, cpu_model, cpu_seconds,  # noqa: E402
                                  load_average, other_cpu_cores)
from ras_compile.runtime import COMPILE_MODES  # noqa: E402

# The loop: RAS's default schedule over a 28-step loop; a tiny one for --quick.
LOOP_FULL = dict(steps=28, warmup_steps=4, reset_steps=[12, 20])
LOOP_QUICK = dict(steps=8, warmup_steps=2, reset_steps=[4])
DEFAULT_RATIOS = [1.0, 0.5, 0.25, 0.125]
CACHE_KINDS = ("fbc", "taylorseer", "taylorseer_lite")
GEOMETRY_KEYS = ("layers", "single_layers", "heads", "kv_heads", "head_dim", "latent", "text_tokens", "batch")


# ------------------------------------------------------------------------------ model presets
#
# A preset is plain data: the diffusers class, the geometry of its default and --quick runs
# (blocks, heads, latent side in latent pixels, text tokens, batch; the text / pooled widths
# and latent channels of the embedders), a function from that geometry to the class's
# config, and how the sampling loop talks to the model (timestep convention, learned-sigma
# output, sign of the velocity). The real presets have the released models' transformer
# shapes (meant for a GPU, bf16); the others are scaled down for a CPU (fewer, narrower
# blocks, a 64x64 latent: 1024 image tokens). Every latent is square and every family here
# makes (latent / 2)^2 image tokens (patch 2; Flux: patch 1 on 2x2-packed latent pixels).


def _sd3_config(g: dict) -> dict:
    return dict(sample_size=g["latent"], patch_size=2, in_channels=g["channels"], out_channels=g["channels"],
                num_layers=g["layers"], attention_head_dim=g["head_dim"], num_attention_heads=g["heads"],
                joint_attention_dim=g["text_dim"], caption_projection_dim=g["heads"] * g["head_dim"],
                pooled_projection_dim=g["pooled_dim"],
                pos_embed_max_size=max(g["pos_embed_max_size"], g["latent"] // 2),
                dual_attention_layers=(), qk_norm=None)


def _flux_config(g: dict) -> dict:
    return dict(patch_size=1, in_channels=4 * g["channels"], out_channels=None, num_layers=g["layers"],
                num_single_layers=g["single_layers"], attention_head_dim=g["head_dim"],
                num_attention_heads=g["heads"], joint_attention_dim=g["text_dim"],
                pooled_projection_dim=g["pooled_dim"], guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def _pixart_config(g: dict) -> dict:
    inner = g["heads"] * g["head_dim"]
    return dict(num_attention_heads=g["heads"], attention_head_dim=g["head_dim"], in_channels=g["channels"],
                out_channels=2 * g["channels"], num_layers=g["layers"], cross_attention_dim=inner,
                caption_channels=g["text_dim"], sample_size=g["latent"], patch_size=2,
                use_additional_conditions=False)


def _lumina_config(g: dict) -> dict:
    return dict(sample_size=g["latent"], patch_size=2, in_channels=g["channels"],
                hidden_size=g["heads"] * g["head_dim"], num_layers=g["layers"], num_attention_heads=g["heads"],
                num_kv_heads=g["kv_heads"], multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5,
                learn_sigma=True, qk_norm=True, cross_attention_dim=g["text_dim"], scaling_factor=1.0)


class Preset:
    """One model preset (plain data; a class, not a dataclass, because ``ras-compile bench`` imports this file
    by path without registering it in ``sys.modules``, which dataclasses need).

    * ``cls``: the diffusers class; ``title``: what the shapes are;
    * ``full`` / ``quick``: geometry of the default and of the --quick run;
    * ``make_config``: geometry -> the class's config;
    * ``joint_text``: the text tokens run through the blocks with the image (joint attention), so the FLOP
      bound counts them; False: cross-attention to text (PixArt, Lumina-Next);
    * ``timestep``: what the model gets for the loop's t in [0, 1000]: ``t``, ``t/1000`` or ``1-t/1000``;
    * ``learned_sigma``: the output has twice the latent's channels, the first half is the prediction;
    * ``velocity_sign``: -1 for Lumina-Next (it predicts the negated velocity; its time runs 0 -> 1);
    * ``packed``: the latent goes in as 2x2-packed tokens ``[B, N, 4C]`` (Flux);
    * ``real``: the released model's shapes (meant for a GPU);
    * ``reinit``: ``(fnmatch pattern of parameter names, std)`` drawn from N(0, std^2): parameters diffusers
      makes with ``torch.empty`` or zeros that a checkpoint fills (finite outputs, open gates);
    * ``block_note``: config -> how the blocks are described in the report;
    * ``default_name``: result name without the device prefix (default: the preset name).
    """

    def __init__(self, name: str, *, cls: str, title: str, full: dict, quick: dict,
                 make_config: Callable[[dict], dict], joint_text: bool, timestep: str = "t",
                 learned_sigma: bool = False, velocity_sign: float = 1.0, packed: bool = False, real: bool = False,
                 reinit: tuple = (), block_note: Callable[[dict], str] | None = None,
                 default_name: str | None = None):
        self.name, self.cls, self.title, self.full, self.quick = name, cls, title, full, quick
        self.make_config, self.joint_text, self.timestep = make_config, joint_text, timestep
        self.learned_sigma, self.velocity_sign, self.packed, self.real = learned_sigma, velocity_sign, packed, real
        self.reinit, self.default_name = reinit, default_name
        self.block_note = block_note or (lambda c: f"{c['num_layers']} layers")

    def __repr__(self) -> str:
        return f"Preset({self.name!r}, {self.cls})"


_SD3_QUICK = dict(layers=2, heads=2, head_dim=64, latent=16, text_tokens=16, batch=2, channels=4, text_dim=64,
                  pooled_dim=48, pos_embed_max_size=64)
_FLUX_QUICK = dict(layers=1, single_layers=2, heads=2, head_dim=128, latent=16, text_tokens=16, batch=1,
                   channels=16, text_dim=64, pooled_dim=48)
_PIXART_QUICK = dict(layers=2, heads=2, head_dim=72, latent=16, text_tokens=16, batch=2, channels=4, text_dim=64)
_LUMINA_QUICK = dict(layers=2, heads=4, kv_heads=1, head_dim=32, latent=16, text_tokens=16, batch=2, channels=4,
                     text_dim=64)
_SD3 = dict(cls="SD3Transformer2DModel", make_config=_sd3_config, joint_text=True, quick=_SD3_QUICK)
_FLUX = dict(cls="FluxTransformer2DModel", make_config=_flux_config, joint_text=True, quick=_FLUX_QUICK,
             timestep="t/1000", packed=True,
             block_note=lambda c: f"{c['num_layers']} double-stream + {c['num_single_layers']} single-stream blocks")
_PIXART = dict(cls="PixArtTransformer2DModel", make_config=_pixart_config, joint_text=False, quick=_PIXART_QUICK,
               learned_sigma=True)
_LUMINA = dict(cls="LuminaNextDiT2DModel", make_config=_lumina_config, joint_text=False, quick=_LUMINA_QUICK,
               timestep="1-t/1000", learned_sigma=True, velocity_sign=-1.0,
               reinit=(("pad_token", 0.02), ("layers.*.gate", 1.0)),
               block_note=lambda c: f"{c['num_layers']} layers, {c['num_kv_heads']} K/V heads (GQA)")

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("sd3", title="scaled down from SD3-medium (its head dimension; fewer, narrower blocks; tiny embedders)",
           full=dict(_SD3_QUICK, layers=4, heads=6, latent=64, text_tokens=77), default_name="sd3_scaled", **_SD3),
    Preset("sd3-medium", title="SD3-medium's transformer (stabilityai/stable-diffusion-3-medium)", real=True,
           full=dict(layers=24, heads=24, head_dim=64, latent=128, text_tokens=333, batch=2, channels=16,
                     text_dim=4096, pooled_dim=2048, pos_embed_max_size=192), **_SD3),
    Preset("flux", title="scaled down from FLUX.1-dev (its head dimension and RoPE axes; fewer, narrower double- and "
                         "single-stream blocks; tiny embedders)",
           full=dict(_FLUX_QUICK, layers=2, single_layers=4, heads=3, latent=64, text_tokens=128), **_FLUX),
    Preset("flux-dev", title="FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev)", real=True,
           full=dict(layers=19, single_layers=38, heads=24, head_dim=128, latent=128, text_tokens=512, batch=1,
                     channels=16, text_dim=4096, pooled_dim=768), **_FLUX),
    Preset("pixart", title="scaled down from PixArt-Sigma XL/2 (its head dimension; fewer, narrower blocks; tiny "
                           "caption embedder)",
           full=dict(_PIXART_QUICK, layers=4, heads=6, latent=64, text_tokens=77), **_PIXART),
    Preset("pixart-sigma", title="PixArt-Sigma XL/2 1024's transformer (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS)",
           real=True, full=dict(layers=28, heads=16, head_dim=72, latent=128, text_tokens=300, batch=2, channels=4,
                                text_dim=4096), **_PIXART),
    Preset("lumina", title="scaled down from Lumina-Next-SFT (fewer, narrower blocks; grouped K/V heads; tiny text "
                           "embedder)",
           full=dict(_LUMINA_QUICK, layers=4, heads=8, kv_heads=2, head_dim=48, latent=64, text_tokens=64),
           **_LUMINA),
    Preset("lumina-next", title="Lumina-Next-SFT's transformer (Alpha-VLLM/Lumina-Next-SFT-diffusers)", real=True,
           full=dict(layers=24, heads=32, kv_heads=8, head_dim=72, latent=128, text_tokens=256, batch=2, channels=4,
                     text_dim=2048), **_LUMINA),
]}


def geometry(spec: dict) -> dict:
    """The preset's geometry with the run's overrides (layers, heads, latent, ...) applied."""
    preset = PRESETS[spec["model"]]
    base = preset.quick if spec.get("quick") else preset.full
    return dict(base, **{k: spec[k] for k in GEOMETRY_KEYS if spec.get(k) is not None})


def image_tokens_of(spec: dict) -> int:
    return (spec["latent"] // 2) ** 2


def flop_other_tokens(spec: dict) -> int:
    """Tokens that run through the blocks beside the image and are never dropped: the text of joint attention."""
    return spec["text_tokens"] if PRESETS[spec["model"]].joint_text else 0


# ------------------------------------------------------------------------------ arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/bench_speed.py",
        description="Whole-loop speed of dense, torch.compile, RAS and diffusers step caches on a diffusion "
                    "transformer preset (random weights; CPU or GPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="sd3", choices=list(PRESETS),
                   help="model preset: " + "; ".join(
                       f"{n}: {pr.cls}, {pr.title}" for n, pr in PRESETS.items()))
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run of the preset's family (2 blocks, 64 image tokens, 8 steps, ratio 0.5 "
                        "only, all configurations in this process, see --in-process); writes "
                        "<device>_<preset>_quick.* (cpu_sd3_quick.* for sd3) so full results are not overwritten")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON, markdown and PNG results")
    p.add_argument("--name", default=None,
                   help="base name of the result files (default <device>_<preset>, with '-' as '_': "
                        "cpu_sd3_scaled for sd3, cuda_flux_dev, ...; with --quick <device>_<preset>_quick, "
                        "cpu_sd3_quick for sd3)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed generations per configuration after the warm-up one; the best whole loop is "
                        "reported, step times are medians over all of them (default 3)")
    p.add_argument("--ratios", type=float, nargs="+", default=None,
                   help=f"RAS sample ratios (default {' '.join(map(str, DEFAULT_RATIOS))}; 0.5 with --quick)")
    p.add_argument("--layers", type=int, default=None,
                   help="transformer blocks (Flux: double-stream blocks) (default: the preset's)")
    p.add_argument("--single-layers", type=int, default=None,
                   help="Flux presets: single-stream blocks (default: the preset's)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: the preset's)")
    p.add_argument("--kv-heads", type=int, default=None,
                   help="Lumina presets: key/value heads of grouped-query attention (default: the preset's)")
    p.add_argument("--head-dim", type=int, default=None,
                   help="attention head dimension (default: the preset's, that of the model it stands for)")
    p.add_argument("--latent", type=int, default=None,
                   help="latent height = width in latent pixels; every preset makes (latent / 2)^2 image "
                        "tokens (default: the preset's, 64 for the CPU presets: 1024 image tokens, 128 for the "
                        "real ones: 4096)")
    p.add_argument("--text-tokens", type=int, default=None, help="text (context) tokens (default: the preset's)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (default: the preset's; 2, the classifier-free-guidance batch, except 1 for "
                        "the guidance-distilled Flux)")
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps (default {LOOP_FULL['steps']})")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help=f"RAS dense warm-up steps (default {LOOP_FULL['warmup_steps']})")
    p.add_argument("--reset-steps", type=int, nargs="*", default=None,
                   help=f"RAS dense reset steps, 0-based (default {' '.join(map(str, LOOP_FULL['reset_steps']))})")
    p.add_argument("--shift", type=float, default=3.0, help="flow-matching timestep shift (SD3 uses 3.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the noise and the conditioning")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of 'compiled' and the RAS runs")
    p.add_argument("--device", default="cpu", help="cpu or cuda (on cuda every call is synchronised)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads in every worker (default: torch's default, the core count)")
    p.add_argument("--configs", nargs="+", default=None,
                   help="run only these configurations (names: eager compiled ras_r<ratio> ras2g_r<ratio> "
                        "rasdyn_r<ratio> rassc<n>_r<ratio> fbc taylorseer taylorseer_lite compiled_again; ras2g "
                        "compiles a separate dense graph, see ras_compile's dense_graph; rasdyn runs the dynamic "
                        "schedule; rassc<n> stacks RAS's step cache with interval n = 2..4); eager and compiled are "
                        "always added, they are the references")
    p.add_argument("--compile-mode", default=None,
                   choices=[m for m in COMPILE_MODES if m is not None],
                   help="torch.compile mode of 'compiled' and the RAS runs (reduce-overhead: CUDA graphs on cuda)")
    p.add_argument("--no-caches", action="store_true", help="skip the First Block Cache / TaylorSeer runs")
    p.add_argument("--recheck-baseline", action=argparse.BooleanOptionalAction, default=None,
                   help="run 'compiled' again at the end (as compiled_again) and report how far the baseline "
                        "drifted between the two runs (default: on, off with --quick)")
    p.add_argument("--fbc-threshold", type=float, default=0.05,
                   help="First Block Cache threshold on the relative change of the first block's residual")
    p.add_argument("--taylorseer-interval", type=int, default=None,
                   help="TaylorSeer cache_interval: full computations every this many steps after the "
                        "warm-up (default 5, 2 with --quick)")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="keep Inductor's on-disk cache between workers and runs (default: a fresh, empty "
                        "cache directory per configuration, so compile times are cold)")
    p.add_argument("--in-process", action="store_true",
                   help="run every configuration in this process (faster start, but Dynamo state, peak RSS "
                        "and the compile cache are shared, so compile and RSS numbers are not clean; "
                        "implied by --quick)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG even if matplotlib is installed")
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(raw)
    args.command = "python benchmarks/bench_speed.py" + ("" if not raw else " " + shlex.join(map(str, raw)))

    preset = PRESETS[args.model]
    base = dict(preset.quick if args.quick else preset.full, **(LOOP_QUICK if args.quick else LOOP_FULL))
    for key in GEOMETRY_KEYS + ("steps", "warmup_steps", "reset_steps"):
        if getattr(args, key) is None:
            setattr(args, key, base.get(key))
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.repeats is None:
        args.repeats = 3
    if args.ratios is None:
        args.ratios = [0.5] if args.quick else list(DEFAULT_RATIOS)
    if args.quick:
        args.in_process = True
    if args.taylorseer_interval is None:
        args.taylorseer_interval = 2 if args.quick else 5
    if args.name is None:
        device = "cuda" if args.device.startswith("cuda") else "cpu"
        stem = (preset.default_name or preset.name).replace("-", "_").replace(".", "_")
        args.name = f"{device}_{args.model.replace('-', '_')}_quick" if args.quick else f"{device}_{stem}"
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.latent % 2:
        p.error(f"--latent must be even (patch 2 / 2x2 packing), got {args.latent}")
    if args.kv_heads is not None and args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    return args


# ------------------------------------------------------------------------------ helpers


STEP_CACHE_INTERVALS = (2, 3, 4)  # the rassc<n>_r<ratio> configurations


def ratio_name(ratio: float) -> str:
    return f"ras_r{ratio:g}"


def ras_policy(ratio: float, loop: dict, image_tokens: int, schedule: str = "static", step_cache_interval: int = 1):
    """The RASPolicy of a ``ras*`` configuration: ``loop`` holds steps, warmup_steps and
    reset_steps (a spec, the report's run, or the parsed arguments). ``schedule``
    "dynamic": the linear schedule at mean ratio ``ratio`` that
    ``ras_compile.schedule.spread_dynamic_schedule`` defines (the count spreads over
    0.75x-1.25x of its mean dropped tokens), centred on the loop. ``step_cache_interval``:
    RAS's step cache (``RASPolicy.step_cache_interval``, first-order extrapolation)."""
    from ras_compile import RASPolicy
    from ras_compile.schedule import spread_dynamic_schedule

    fields = dict(sample_ratio=ratio, warmup_steps=loop["warmup_steps"], reset_steps=tuple(loop["reset_steps"]),
                  step_cache_interval=step_cache_interval)
    if schedule == "dynamic":
        fields.update(num_steps=loop["steps"], **spread_dynamic_schedule(ratio, image_tokens,
                                                                          loop["steps"] - loop["warmup_steps"]))
    return RASPolicy(**fields)


def maxrss_mib() -> float:
    """Peak resident set of this process so far (Linux reports KiB)."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def machine_info(args) -> dict:
    import torch
    import diffusers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "cores_available": cores_available(),
        "torch_threads": args.threads or torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": args.device,
    }
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def construct(spec: dict, device: str | None = None):
    """The preset's model, random weights from ``spec["seed"]``, eval mode, in ``spec["dtype"]``.

    The weights are created on ``device`` (default ``spec["device"]``) in the target dtype
    (torch's default dtype is set to it while the model is built), so a real-size model
    never exists in fp32 or on the CPU: FLUX.1-dev's 11.9 B parameters are 24 GB in bf16.
    ``device="meta"`` builds the structure only (config and parameter count, no memory).
    On the CPU in fp32 this is exactly ``tiny_sd3_transformer``'s seeded build.
    """
    import fnmatch

    import diffusers
    import torch

    preset = PRESETS[spec["model"]]
    dtype = getattr(torch, spec["dtype"])
    device = spec["device"] if device is None else device
    config = preset.make_config(geometry(spec))
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(spec["seed"])
        torch.set_default_dtype(dtype)
        try:
            model = getattr(diffusers, preset.cls)(**config)
        finally:
            torch.set_default_dtype(previous)
        if preset.reinit and device != "meta":
            with torch.no_grad():
                for name, param in model.named_parameters():
                    std = next((s for pattern, s in preset.reinit if fnmatch.fnmatchcase(name, pattern)), None)
                    if std is not None:
                        param.normal_(std=std)
    if next(model.parameters()).dtype != dtype or any(b.is_floating_point() and b.dtype != dtype
                                                      for b in model.buffers()):
        model = model.to(dtype)
    return model.eval()


def build(spec: dict):
    import torch
    from ras_compile.tiny_models import example_inputs

    model = construct(spec)
    inputs = example_inputs(model, batch=spec["batch"], height=spec["latent"], width=spec["latent"],
                            seed=spec["seed"], text_len=spec["text_tokens"])
    inputs = {k: v.to(spec["device"]) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return model, inputs


def model_config(spec: dict) -> dict:
    """The model's config and sizes, from a structure-only (meta device) build: no weights are made."""
    preset = PRESETS[spec["model"]]
    model = construct(spec, device="meta")
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    cfg["class"] = preset.cls
    cfg["preset"] = preset.name
    cfg["preset_title"] = preset.title
    cfg["real_shapes"] = preset.real
    cfg["blocks"] = preset.block_note(cfg)
    cfg["parameters"] = sum(p.numel() for p in model.parameters())
    cfg["heads"] = spec["heads"]
    cfg["head_dim"] = spec["head_dim"]
    cfg["inner_dim"] = spec["heads"] * spec["head_dim"]
    cfg["latent_channels"] = geometry(spec)["channels"]
    cfg["packed_latent"] = preset.packed
    cfg["image_tokens"] = image_tokens_of(spec)
    cfg["text_tokens"] = spec["text_tokens"]
    cfg["text_in_blocks"] = preset.joint_text
    cfg["flop_other_tokens"] = flop_other_tokens(spec)
    cfg["batch"] = spec["batch"]
    cfg["dtype"] = spec["dtype"]
    return json.loads(json.dumps(cfg, default=str))


# ------------------------------------------------------------------------------ the worker


class Sampler:
    """A flow-matching Euler loop (as diffusers' SD3 / Flux / Lumina pipelines run it) that times every call.

    The scheduler's ``t`` runs 1000 -> 0; the model gets it in its own convention (SD3 and
    PixArt ``t``, Flux ``t / 1000``, Lumina-Next ``1 - t / 1000``), and its output becomes
    the velocity as the pipelines make it (learned-sigma models: the first half of the
    channels; Lumina-Next: negated). The latent is whatever ``example_inputs`` made
    (``[B, C, H, W]``, or Flux's packed ``[B, N, 4C]``); the Euler update is shape-agnostic.
    """

    def __init__(self, spec: dict, inputs: dict):
        self.spec = spec
        self.inputs = inputs
        self.preset = PRESETS[spec["model"]]
        self.sync = spec["device"].startswith("cuda")

    def model_timestep(self, t):
        convention = self.preset.timestep
        if convention == "t":
            return t
        if convention == "t/1000":
            return t / 1000
        if convention == "1-t/1000":
            return 1 - t / 1000
        raise ValueError(f"unknown timestep convention {convention!r}")

    def velocity(self, out, latents):
        if self.preset.learned_sigma:
            if out.shape[1] != 2 * latents.shape[1]:
                raise ValueError(f"a learned-sigma output should have twice the latent's {latents.shape[1]} "
                                 f"channels, got {tuple(out.shape)}")
            out = out[:, :latents.shape[1]]
        return out if self.preset.velocity_sign == 1.0 else out * self.preset.velocity_sign

    def __call__(self, model, on_step=None):
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(shift=self.spec["shift"])
        scheduler.set_timesteps(self.spec["steps"], device=self.spec["device"])
        latents = self.inputs["hidden_states"]
        batch = latents.shape[0]
        times, labels = [], []
        for i, t in enumerate(scheduler.timesteps):
            call = dict(self.inputs, hidden_states=latents, timestep=self.model_timestep(t).expand(batch))
            if self.sync:
                torch.cuda.synchronize()
            start = time.perf_counter()
            if on_step is not None:
                label, out = on_step(i, t, lambda: model(**call)[0])
            else:
                label, out = "dense", model(**call)[0]
            if self.sync:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            labels.append(label)
            latents = scheduler.step(self.velocity(out, latents), t, latents, return_dict=False)[0]
        return latents, times, labels


def apply_cache(kind: str, model, spec: dict):
    """Attach a diffusers step cache; returns (on_step, reset, description)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    name = type(model).__name__
    if kind == "fbc":
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        config = FirstBlockCacheConfig(threshold=spec["fbc_threshold"])
        try:
            apply_first_block_cache(model, config)
        except ValueError as exc:
            if "not registered" not in str(exc):
                raise
            raise CacheNotApplicable(
                f"diffusers' First Block Cache cannot run {name}: its block class is not in diffusers' "
                f"TransformerBlockRegistry, which tells the hooks which block outputs are the hidden states "
                f"({exc}){not_cache_mixin(model)}") from exc
        head = next((h for h in (getattr(m, "_diffusers_hook", None) for m in model.modules()) if h is not None
                     and "fbc_leader_block_hook" in h.hooks), None)
        if head is None:
            raise RuntimeError(f"First Block Cache hooked no head block of {type(model).__name__}")
        head = head.hooks["fbc_leader_block_hook"]

        def label():
            return "dense" if head.state_manager.get_state().should_compute else "cached"
    else:
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

        config = TaylorSeerCacheConfig(cache_interval=spec["taylorseer_interval"],
                                       disable_cache_before_step=spec["warmup_steps"], max_order=1,
                                       taylor_factors_dtype=getattr(__import__("torch"), spec["dtype"]),
                                       use_lite_mode=kind == "taylorseer_lite")
        apply_taylorseer_cache(model, config)
        hooks = [(n, HookRegistry.check_if_exists_or_initialize(m).hooks.get("taylorseer_cache"))
                 for n, m in model.named_modules()]
        hooks = [(n, h) for n, h in hooks if h is not None]
        if not hooks:
            from diffusers.hooks import taylorseer_cache as ts

            patterns = (ts._PROJ_OUT_IDENTIFIERS + ts._BLOCK_IDENTIFIERS) if config.use_lite_mode else \
                ts._TRANSFORMER_BLOCK_IDENTIFIERS
            attn = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1].startswith("attn")][:2]
            raise CacheNotApplicable(
                f"diffusers' TaylorSeer{' lite mode' if config.use_lite_mode else ''} caches nothing in {name}: "
                f"none of its module names fully matches the default patterns {list(patterns)} (its attention "
                f"modules are {', '.join(attn) or 'named otherwise'}, ...), so it would run the plain model"
                f"{not_cache_mixin(model)}")
        probe = hooks[0][1]

        def label():
            state = probe.state_manager.get_state()
            return "dense" if state.last_update_step == state.current_step else "cached"

    def on_step(i, t, run):
        # SD3Transformer2DModel (and PixArt, Lumina-Next) have no CacheMixin.cache_context in this diffusers
        # version, so the context the pipelines set is set here directly, for every model alike; one context:
        # the CFG batch is one call.
        _set_cache_context(model, CacheContext("cfg", step_index=i, num_inference_steps=spec["steps"],
                                               timestep=float(t)))
        try:
            out = run()
            return label(), out
        finally:
            _set_cache_context(model, None)

    def reset():
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)

    return on_step, reset, repr(config)


class CacheNotApplicable(RuntimeError):
    """A diffusers step cache cannot run (or would do nothing on) this model; the message says why."""


def not_cache_mixin(model) -> str:
    name = type(model).__name__
    return "" if hasattr(model, "enable_cache") else \
        f"; {name} is not a diffusers CacheMixin (no enable_cache), so diffusers does not claim support"


def cache_not_applicable(kind: str, model, exc: BaseException) -> str | None:
    """A one-line reason when a diffusers cache hook failed because it cannot handle this model.

    Known cases (diffusers 0.42.1): SD3's last ``JointTransformerBlock`` is built with
    ``context_pre_only=True`` and returns ``(None, hidden_states)``; First Block Cache's
    tail-block hook subtracts the head block's text stream from that ``None``, and
    TaylorSeer's lite mode (which hooks every block) reads ``.dtype`` of every block
    output. First Block Cache also needs a head and a distinct tail block, and a block
    class registered in diffusers' TransformerBlockRegistry (Lumina-Next's is not);
    TaylorSeer's default name patterns match no module of PixArt (``attn1`` / ``attn2``
    do not fully match ``^transformer_blocks.*attn``) or of Lumina-Next (``layers.*``):
    ``apply_cache`` raises :class:`CacheNotApplicable` for those. Anything else is
    returned as None and reported as a plain failure.
    """
    if isinstance(exc, CacheNotApplicable):
        return str(exc)
    name = type(model).__name__
    blocks = getattr(model, "transformer_blocks", None)
    last = blocks[-1] if blocks is not None and len(blocks) else None
    pre_only = bool(getattr(last, "context_pre_only", False))
    unsupported = not_cache_mixin(model)
    if kind == "fbc" and isinstance(exc, IndexError) and blocks is not None and len(blocks) < 2:
        return (f"First Block Cache needs >= 2 transformer blocks (a head and a tail block), this {name} has "
                f"{len(blocks)}; use --layers 2 or more")
    if kind == "fbc" and isinstance(exc, TypeError) and pre_only:
        return (f"diffusers' First Block Cache cannot run {name}: its last {type(last).__name__} has "
                f"context_pre_only=True and returns encoder_hidden_states=None, which the tail-block hook "
                f"(FBCBlockHook) subtracts the head block's output from{unsupported}")
    if kind == "taylorseer_lite" and isinstance(exc, AttributeError) and pre_only:
        return (f"diffusers' TaylorSeer lite mode cannot run {name}: it hooks every transformer block and "
                f"records each output's dtype (TaylorSeerState.update), but the last {type(last).__name__} "
                f"has context_pre_only=True and returns encoder_hidden_states=None{unsupported}")
    return None


def run_config(spec: dict) -> dict:
    """Build the model, run one configuration, return its measurements (latents saved to a file)."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    name, kind = spec["config"], spec["kind"]
    result = {"config": name, "kind": kind, "ratio": spec.get("ratio"), "ok": False}
    model, inputs = build(spec)
    sampler = Sampler(spec, inputs)
    on_step, reset, ras = None, None, None
    try:
        if kind == "eager":
            runner = model
        elif kind == "compiled":
            runner = torch.compile(model, backend=spec["backend"], mode=spec.get("compile_mode"))
        elif kind == "ras":
            from ras_compile import ras_compile

            policy = ras_policy(spec["ratio"], spec, image_tokens_of(spec), spec.get("schedule", "static"),
                                spec.get("step_cache_interval", 1))
            result["policy"] = repr(policy)
            result["schedule"] = policy.schedule
            result["step_cache_interval"] = policy.step_cache_interval
            ras = runner = ras_compile(model, policy, backend=spec["backend"],
                                       dense_graph=spec.get("dense_graph", False),
                                       compile_mode=spec.get("compile_mode"))
            reset = ras.ras_controller.reset

            def ras_step(i, t, run):  # reports whether the controller ran this step dense, sparse or predicted
                out = run()
                return ras.ras_controller.stats[-1].mode, out
            on_step = ras_step
        elif kind in CACHE_KINDS:
            on_step, reset, result["cache_config"] = apply_cache(kind, model, spec)
            runner = model
        else:
            raise ValueError(f"unknown configuration kind {kind!r}")
    except Exception as exc:  # a cache that does not apply is a result, not a crash
        return failed(result, "setup failed", exc, model, limit=6)

    result["load_before"] = load_average()
    result["torch_threads"] = torch.get_num_threads()
    result["cores_available"] = cores_available()
    rss_before = maxrss_mib()
    on_cuda = spec["device"].startswith("cuda")
    if on_cuda:
        torch.cuda.synchronize()
        result["gpu_allocated_before_mib"] = torch.cuda.memory_allocated() / 2 ** 20
        torch.cuda.reset_peak_memory_stats()
    generations = []
    try:
        with torch.no_grad():
            for g in range(1 + spec["repeats"]):
                if reset is not None:
                    reset()
                cpu_before = cpu_seconds()
                start = time.perf_counter()
                latents, times, labels = sampler(runner, on_step)
                total = time.perf_counter() - start
                cpu_after = cpu_seconds()
                generations.append({"total_s": total, "step_s": times, "labels": labels,
                                    "other_cpu_cores": other_cpu_cores(cpu_before, cpu_after, total)})
                if ras is not None:
                    stats = ras.ras_controller.stats
                    generations[-1]["active_tokens"] = [s.active_tokens for s in stats]
                other = generations[-1]["other_cpu_cores"]
                print(f"  [{name}] generation {g} ({'warm-up' if g == 0 else 'timed'}): {total:.2f} s  "
                      f"{''.join(l[0].upper() for l in labels)}"
                      + (f"  (other processes: {other:.2f} cores)" if other is not None else ""), flush=True)
    except Exception as exc:
        return failed(result, "run failed", exc, model, limit=8)
    result["load_after"] = load_average()
    rss_after = maxrss_mib()
    if on_cuda:
        # Peak GPU memory over all generations: weights, activations and (RAS) the caches.
        result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20

    first, timed = generations[0], generations[1:]
    best = min(timed, key=lambda g: g["total_s"])
    others = [g["other_cpu_cores"] for g in timed]
    other = None if None in others else sum(o * g["total_s"] for o, g in zip(others, timed)) / sum(
        g["total_s"] for g in timed)
    free = max(0, result["cores_available"] - result["torch_threads"])
    result.update(
        ok=True,
        first_generation_s=first["total_s"],
        steady_s=best["total_s"],
        steady_all_s=[g["total_s"] for g in timed],
        compile_s=first["total_s"] - best["total_s"],
        first_call_s=first["step_s"][0],
        step_labels=best["labels"],
        step_s=best["step_s"],
        step_s_all=[g["step_s"] for g in timed],
        other_cpu_cores=other,
        other_cpu_cores_all=others,
        contended=other is not None and other > free + CONTENTION_MARGIN,
        rss_before_mib=rss_before,
        rss_after_mib=rss_after,
        rss_growth_mib=rss_after - rss_before,
    )
    for label in sorted(set(best["labels"])):
        # the count is the best generation's (every generation runs the same plan); the time is the median
        # of all calls of this kind over the timed generations, robust to a descheduled call
        ts = [t for g in timed for t, l in zip(g["step_s"], g["labels"]) if l == label]
        best_ts = [t for t, l in zip(best["step_s"], best["labels"]) if l == label]
        result[f"{label}_steps"] = len(best_ts)
        result[f"{label}_step_ms"] = 1e3 * statistics.median(ts)
        result[f"{label}_step_ms_best_generation_mean"] = 1e3 * sum(best_ts) / len(best_ts)
    if "active_tokens" in best:
        result["active_tokens"] = best["active_tokens"]
    if kind == "ras":
        try:  # FLOPs of one sparse step at this ratio, counted on fake tensors (for a dynamic
            # schedule: at its mean ratio, which the counted bound then applies to every sparse step)
            from ras_compile import explain

            policy = ras_policy(spec["ratio"], spec, image_tokens_of(spec))
            result["counted_sparse_flop_fraction"] = explain(model, inputs, policy, ratio=spec["ratio"],
                                                             verbose=False).flop_fraction
        except Exception as exc:
            result["counted_sparse_flop_fraction"] = None
            result["explain_error"] = f"{type(exc).__name__}: {exc}"
    torch.save(latents.float().cpu(), spec["latents_path"])
    result["latents_path"] = spec["latents_path"]
    return result


def failed(result: dict, stage: str, exc: BaseException, model, limit: int) -> dict:
    reason = cache_not_applicable(result["kind"], model, exc) if result["kind"] in CACHE_KINDS else None
    if reason is not None:
        result["not_applicable"] = True
        result["error"] = f"not applicable: {reason}"
    else:
        result["error"] = f"{stage}: {type(exc).__name__}: {exc}"
    result["exception"] = f"{stage}: {type(exc).__name__}: {exc}"
    result["traceback"] = traceback.format_exc(limit=limit)
    return result


def worker_main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = run_config(spec)
    except Exception as exc:
        result = {"config": spec["config"], "kind": spec["kind"], "ratio": spec.get("ratio"), "ok": False,
                  "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
    Path(result_path).write_text(json.dumps(result, indent=1))
    return 0


# ------------------------------------------------------------------------------ the driver


def configurations(args) -> list[dict]:
    configs = [dict(config="eager", kind="eager"), dict(config="compiled", kind="compiled")]
    configs += [dict(config=ratio_name(r), kind="ras", ratio=r) for r in args.ratios]
    if not args.no_caches:
        configs += [dict(config=k, kind=k) for k in CACHE_KINDS]
    # ras2g_r<ratio>: the same with a separate dense graph (dense_graph=True); only when named
    two_graphs = [dict(config="ras2g" + ratio_name(r)[3:], kind="ras", ratio=r, dense_graph=True)
                  for r in args.ratios]
    # rasdyn_r<ratio>: the dynamic (official linear) schedule at mean ratio <ratio>; only when named
    two_graphs += [dict(config="rasdyn" + ratio_name(r)[3:], kind="ras", ratio=r, schedule="dynamic")
                   for r in args.ratios]
    # rassc<n>_r<ratio>: RAS's step cache stacked on it, interval n; only when named
    two_graphs += [dict(config=f"rassc{n}" + ratio_name(r)[3:], kind="ras", ratio=r, step_cache_interval=n)
                   for n in STEP_CACHE_INTERVALS for r in args.ratios]
    recheck = [dict(config="compiled_again", kind="compiled")]  # always last: the baseline, measured again
    if not args.configs:
        return configs + (recheck if args.recheck_baseline or (args.recheck_baseline is None and not args.quick)
                          else [])
    configs += two_graphs + recheck
    wanted = set(args.configs) | {"eager", "compiled"} | ({"compiled_again"} if args.recheck_baseline else set())
    unknown = wanted - {c["config"] for c in configs}
    if unknown:
        raise SystemExit(f"bench_speed: unknown configuration(s) {sorted(unknown)}; "
                         f"known: {[c['config'] for c in configs]}")
    return [c for c in configs if c["config"] in wanted]


def run_worker(spec: dict, tmp: Path, args) -> dict:
    if args.in_process:
        return run_config(spec)
    spec_path, result_path = tmp / f"{spec['config']}.spec.json", tmp / f"{spec['config']}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    if not args.warm_compile_cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / f"inductor_{spec['config']}")
        env["TRITON_CACHE_DIR"] = str(tmp / f"triton_{spec['config']}")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path),
                           str(result_path)], env=env, cwd=REPO)
    if result_path.exists():
        return json.loads(result_path.read_text())
    return {"config": spec["config"], "kind": spec["kind"], "ratio": spec.get("ratio"), "ok": False,
            "error": f"worker exited with status {proc.returncode} and wrote no result"}


def analyse(results: list[dict], args, cfg: dict) -> dict:
    """Speed-ups, FLOP bounds, differences from the dense compiled latents."""
    import torch
    from ras_compile.schedule import dense_flop_fraction

    by_name = {r["config"]: r for r in results}
    eager, compiled = by_name.get("eager", {}), by_name.get("compiled", {})
    again = by_name.get("compiled_again", {})
    recheck = compiled.get("ok") and again.get("ok")
    reference = torch.load(compiled["latents_path"]) if compiled.get("ok") else None
    image_tokens, other_tokens = cfg["image_tokens"], cfg["flop_other_tokens"]
    for r in results:
        if not r.get("ok"):
            continue
        if compiled.get("ok"):
            r["speedup_vs_compiled"] = compiled["steady_s"] / r["steady_s"]
        if recheck:
            r["speedup_vs_compiled_again"] = again["steady_s"] / r["steady_s"]
        if eager.get("ok"):
            r["speedup_vs_eager"] = eager["steady_s"] / r["steady_s"]
        if r["kind"] == "ras":
            policy = ras_policy(r["ratio"], vars(args), image_tokens, r.get("schedule", "static"),
                                r.get("step_cache_interval", 1))
            fraction = dense_flop_fraction(policy, args.steps, image_tokens, other_tokens)
            r["flop_fraction"] = fraction
            r["flop_bound_speedup"] = 1 / fraction
            if "speedup_vs_compiled" in r:
                r["fraction_of_bound"] = r["speedup_vs_compiled"] / r["flop_bound_speedup"]
            if recheck:
                r["fraction_of_bound_vs_compiled_again"] = r["speedup_vs_compiled_again"] / r["flop_bound_speedup"]
            f = r.get("counted_sparse_flop_fraction")
            if f is not None:
                dense_steps = sum(policy.is_dense_step(t) for t in range(args.steps))
                predicted = sum(policy.is_predicted_step(t) for t in range(args.steps))  # cost nothing
                r["counted_flop_bound_speedup"] = args.steps / (dense_steps + (args.steps - dense_steps - predicted) * f)
        if reference is not None:
            latents = torch.load(r["latents_path"])
            r["max_abs_diff_vs_compiled"] = (latents - reference).abs().max().item()
        r.pop("latents_path", None)
    drift = again["steady_s"] / compiled["steady_s"] - 1 if recheck else None
    return {"reference_latent_max_abs": reference.abs().max().item() if reference is not None else None,
            "baseline_drift": drift}


# ------------------------------------------------------------------------------ reports


def fmt(value, spec: str = ".2f", none: str = "—") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def step_plan(r: dict) -> str:
    labels = r.get("step_labels") or []
    counts = {}
    for l in labels:
        counts[l] = counts.get(l, 0) + 1
    letter = {"dense": "D", "sparse": "S", "predicted": "P", "cached": "C", "fallback": "F"}
    return " ".join(f"{counts[k]}{letter.get(k, k)}" for k in letter if k in counts)


def markdown(report: dict) -> str:
    m, cfg, run = report["machine"], report["model"], report["run"]
    load = ", ".join(f"{r['config']} {r['load_before'][0]:.2f}" for r in report["results"]
                     if r.get("load_before"))
    lines = [
        f"# RAS speed benchmark: {report['name']}",
        "",
        f"- machine: {m['cpu_model']}, {m['cores_available']} cores available, {m['torch_threads']} torch "
        f"threads; device {m['device']}" + (f" ({m['gpu']})" if m.get("gpu") else ""),
        f"- software: Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}; "
        f"{m['date']}; commit {(m.get('git_commit') or '?')[:10]}",
        f"- model: {cfg.get('class', 'SD3Transformer2DModel')}, random weights, "
        f"{cfg.get('blocks', str(cfg['num_layers']) + ' layers')}, "
        f"{cfg.get('heads', cfg.get('num_attention_heads'))} heads x "
        f"{cfg.get('head_dim', cfg.get('attention_head_dim'))} (width {cfg['inner_dim']}), {cfg['parameters'] / 1e6:.1f} M parameters, {cfg['dtype']}"
        + (f"; preset `{cfg['preset']}`: {cfg['preset_title']}" if cfg.get("preset") else ""),
        f"- input: {input_note(run, cfg)}",
        f"- loop: {run['steps']} flow-matching Euler steps (shift {run['shift']}); RAS dense steps: warm-up "
        f"{run['warmup_steps']}, resets {', '.join(map(str, run['reset_steps'])) or 'none'}; "
        f"backend {run['backend']}"
        + (f", compile mode {run['compile_mode']}" if run.get("compile_mode") else "")
        + f"; best of {run['repeats']} timed generations after one warm-up",
        f"- compile caches: {compile_cache_note(run)}",
        f"- 1-minute load average when each configuration started: {load or 'n/a'}",
    ]
    contended = [r["config"] for r in report["results"] if r.get("contended")]
    if contended:
        lines.append(f"- **WARNING: timings contended**: other processes kept more CPU busy than the cores left free "
                     f"by {m['torch_threads']} torch threads during the timed generations of "
                     f"{', '.join(contended)} (column *other load*); rerun on a quiet machine")
    lines += [
        "",
        "| configuration | steps | first gen (s) | compile (s) | steady (s) | dense step (ms) | "
        "sparse/cached step (ms) | speed-up vs compiled | vs eager | FLOP bound | counted-FLOP bound | "
        "% of FLOP bound | peak RSS growth (MiB) | max abs diff vs compiled | other load (cores) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in report["results"]:
        if not r.get("ok"):
            lines.append(f"| {r['config']} | {'n/a' if r.get('not_applicable') else 'failed'} "
                         f"| | | | | | | | | | | | | |")
            notes.append(f"- `{r['config']}`: {r.get('error', 'failed')}")
            continue
        light = r.get("sparse_step_ms", r.get("cached_step_ms"))
        compile_s = r["compile_s"] if r["kind"] not in ("eager",) + CACHE_KINDS else None
        lines.append(
            f"| {r['config']} | {step_plan(r)} | {fmt(r['first_generation_s'], '.1f')} | "
            f"{fmt(compile_s, '.1f')} | {fmt(r['steady_s'])} | {fmt(r.get('dense_step_ms'), '.0f')} | "
            f"{fmt(light, '.0f')} | {fmt(r.get('speedup_vs_compiled'))}x | {fmt(r.get('speedup_vs_eager'))}x | "
            f"{fmt(r.get('flop_bound_speedup'))} | {fmt(r.get('counted_flop_bound_speedup'))} | "
            f"{fmt(100 * r['fraction_of_bound'] if 'fraction_of_bound' in r else None, '.0f')} | "
            f"{fmt(r['rss_growth_mib'], '.0f')} | {fmt(r.get('max_abs_diff_vs_compiled'), '.2e')} | "
            f"{fmt(r.get('other_cpu_cores'))}{' (!)' if r.get('contended') else ''} |")
        if r.get("cache_config"):
            notes.append(f"- `{r['config']}`: {r['cache_config']}")
    gpu = [r for r in report["results"] if r.get("gpu_peak_mib") is not None]
    if gpu:
        base = next((r["gpu_peak_mib"] for r in gpu if r["config"] == "compiled"), None)
        lines += ["", "Peak GPU memory (`torch.cuda.max_memory_allocated` over the generations: weights, "
                      "activations, RAS caches): " + ", ".join(
                          f"{r['config']} {r['gpu_peak_mib']:.0f} MiB"
                          + (f" ({100 * (r['gpu_peak_mib'] / base - 1):+.1f} % vs compiled)" if base else "")
                          for r in gpu) + "."]
    lines += baseline_recheck_lines(report)
    lines += ["", f"Reference scale: max |latent| of the compiled dense result = "
                  f"{fmt(report['summary']['reference_latent_max_abs'], '.3f')}.", ""]
    if run.get("command"):
        lines += ["Command that produced this report:", "", "```bash", run["command"], "```", ""]
    lines += [
        "Columns: *steps* D dense, S sparse (RAS), P predicted (RAS's step cache ran no model call), "
        "C cached (a diffusers step cache skipped the full model); "
        "*first gen* the warm-up generation; *compile* first gen minus steady (compiled configurations); "
        "*steady* best whole-loop time (model calls, RAS token selection and the scheduler); "
        "*dense/sparse step* median time of one model call of that kind (for RAS including the controller's "
        "token selection after it) over all timed generations; *speed-up* steady time of the reference / "
        "steady time; *FLOP bound* the speed-up vs compiled that the FLOPs allow, "
        "`1 / dense_flop_fraction(policy, steps, image_tokens, text_tokens)` (text tokens counted where they run "
        "through the blocks, joint attention; 0 for cross-attention models); "
        "*counted-FLOP bound* the same with a sparse step's FLOPs counted by `ras_compile.explain`; "
        "*% of FLOP bound* 100 x speed-up vs compiled / FLOP bound; *peak RSS growth* growth of the worker "
        "process's `ru_maxrss` over the generations (activations, compiled code, RAS caches; Inductor's "
        "compile subprocesses are not included); *max abs diff* max |final latent - compiled dense final latent|; "
        "*other load* mean number of cores other processes kept busy during the timed generations "
        "(`/proc/stat` minus this process), (!) when more than the cores the torch threads leave free "
        f"+ {CONTENTION_MARGIN}: such a row's times are not trustworthy.",
    ]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def baseline_recheck_lines(report: dict) -> list[str]:
    """The markdown paragraph on the baseline measured twice (empty without a recheck)."""
    drift = report["summary"].get("baseline_drift")
    if drift is None:
        return []
    by_name = {r["config"]: r for r in report["results"]}
    first, again = by_name["compiled"]["steady_s"], by_name["compiled_again"]["steady_s"]
    ras = [r for r in report["results"] if r.get("ok") and r["kind"] == "ras" and "speedup_vs_compiled_again" in r]
    pairs = "; ".join(
        f"{r['config']} {r['speedup_vs_compiled']:.2f}x / {r['speedup_vs_compiled_again']:.2f}x"
        + (f" ({100 * r['fraction_of_bound']:.0f} % / {100 * r['fraction_of_bound_vs_compiled_again']:.0f} % "
           f"of the FLOP bound)" if "fraction_of_bound_vs_compiled_again" in r else "")
        for r in ras)
    where = "" if report["run"].get("in_process") else " in a fresh process"
    return ["", f"Baseline recheck: the compiled dense loop, run again{where} after every other "
                f"configuration (`compiled_again`), took {again:.2f} s against {first:.2f} s the first time "
                f"({100 * drift:+.1f} %). Speed-ups against the first / the second baseline: "
                + (pairs or "no RAS row") + ". A difference this large is what one run's figures are good to "
                "on this machine."]


def input_note(run: dict, cfg: dict) -> str:
    side, channels = run["latent"], cfg.get("latent_channels", cfg["in_channels"])
    if cfg.get("packed_latent"):
        latent = (f"latent {side}x{side}x{channels} packed 2x2 into {cfg['in_channels']}-channel tokens "
                  f"(patch {cfg['patch_size']})")
    else:
        latent = f"latent {side}x{side}x{channels}, patch {cfg['patch_size']}"
    text = "joint attention" if cfg.get("text_in_blocks", True) else "cross-attention"
    return (f"{latent} -> {cfg['image_tokens']} image tokens + {cfg['text_tokens']} text tokens ({text}), "
            f"batch {cfg['batch']}")


def compile_cache_note(run: dict) -> str:
    if run["warm_compile_cache"]:
        return "warm (Inductor's default on-disk cache, shared with earlier runs)"
    if run.get("in_process"):
        return ("cold at the start of the run, then one Inductor cache shared by all configurations of this "
                "process (--in-process: compile times and RSS are not clean)")
    return "cold (an empty Inductor cache per configuration)"


def plot(report: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    from ras_compile.schedule import dense_flop_fraction

    run, cfg = report["run"], report["model"]
    grid = [i / 100 for i in range(5, 101)]
    bound = [1 / dense_flop_fraction(ras_policy(r, run, cfg["image_tokens"]), run["steps"], cfg["image_tokens"],
                                     cfg["flop_other_tokens"]) for r in grid]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(grid, bound, "k--", label="FLOP bound of the schedule")
    ras = [r for r in report["results"] if r.get("ok") and r["kind"] == "ras" and "speedup_vs_compiled" in r]
    ras.sort(key=lambda r: r["ratio"])
    # The line: the shipped configuration (ras_r*); variants (ras2g_r*, rasdyn_r*) as markers
    # (a dynamic row's bound is its own, not the static line's).
    for i, r in enumerate(r for r in ras if not r["config"].startswith("ras_r")):
        ax.plot([r["ratio"]], [r["speedup_vs_compiled"]], "D", color=f"C{i + 5}", label=f"{r['config']} vs compiled")
    ras = [r for r in ras if r["config"].startswith("ras_r")]
    if ras:
        ax.plot([r["ratio"] for r in ras], [r["speedup_vs_compiled"] for r in ras], "o-", color="C0",
                label="RAS vs torch.compile dense")
        if all("speedup_vs_eager" in r for r in ras):
            ax.plot([r["ratio"] for r in ras], [r["speedup_vs_eager"] for r in ras], "s:", color="C1",
                    label="RAS vs eager dense")
        counted = [r for r in ras if r.get("counted_flop_bound_speedup")]
        if counted:
            ax.plot([r["ratio"] for r in counted], [r["counted_flop_bound_speedup"] for r in counted], "x",
                    color="k", label="counted-FLOP bound")
    for i, r in enumerate(r for r in report["results"] if r.get("ok") and r["kind"] in CACHE_KINDS):
        if "speedup_vs_compiled" in r:
            ax.axhline(r["speedup_vs_compiled"], color=f"C{i + 2}", lw=1, alpha=0.7,
                       label=f"{r['config']} (eager hooks) vs compiled dense")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("RAS sample_ratio (fraction of image tokens computed in a sparse step)")
    ax.set_ylabel("whole-loop speed-up")
    m = report["machine"]
    ax.set_title(f"{report['name']}: {m['cpu_model'][:40]}, {m['torch_threads']} threads", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    spec_base = dict(model=args.model, quick=args.quick, layers=args.layers, single_layers=args.single_layers,
                     heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, latent=args.latent,
                     text_tokens=args.text_tokens, batch=args.batch, steps=args.steps,
                     warmup_steps=args.warmup_steps, reset_steps=list(args.reset_steps), shift=args.shift,
                     seed=args.seed, backend=args.backend, device=args.device, dtype=args.dtype,
                     threads=args.threads, repeats=args.repeats, fbc_threshold=args.fbc_threshold,
                     taylorseer_interval=args.taylorseer_interval, compile_mode=args.compile_mode)
    machine = machine_info(args)
    cfg = model_config(spec_base)
    print(f"machine: {machine['cpu_model']}, {machine['cores_available']} cores, {machine['torch_threads']} "
          f"torch threads, torch {machine['torch']}, diffusers {machine['diffusers']}, load {load_average()}")
    print(f"model: preset {args.model} ({cfg['preset_title']}): {cfg['class']} {cfg['blocks']}, {cfg['heads']} "
          f"heads x {cfg['head_dim']} (width {cfg['inner_dim']}), {cfg['parameters'] / 1e6:.2f} M params, "
          f"{args.dtype}, random weights")
    print(f"input: {input_note(dict(latent=args.latent), cfg)}; {args.steps} steps, RAS warm-up "
          f"{args.warmup_steps} resets {args.reset_steps}; best of {args.repeats} after a warm-up")
    if PRESETS[args.model].real and not args.device.startswith("cuda") and not args.quick:
        print(f"WARNING: preset {args.model} has the real model's shapes ({cfg['parameters'] / 1e9:.1f} B "
              f"parameters): meant for a GPU (--device cuda); on a CPU a generation takes a very long time",
              flush=True)
    print("exact config: " + json.dumps(cfg, sort_keys=True), flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as tmp:
        tmp = Path(tmp)
        if args.in_process and not args.warm_compile_cache:
            # Inductor reads the variable whenever it needs its cache (nothing has compiled yet): a cold cache
            # for this run instead of the user's default one filled by earlier runs
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor_in_process")
            os.environ["TRITON_CACHE_DIR"] = str(tmp / "triton_in_process")
        for c in configurations(args):
            spec = dict(spec_base, **c, latents_path=str(tmp / f"{c['config']}.latents.pt"))
            print(f"[{time.perf_counter() - start:5.0f} s] {c['config']} (load {load_average()})", flush=True)
            r = run_worker(spec, tmp, args)
            if not r.get("ok"):
                print(f"  [{c['config']}] not run: {r.get('error')}", flush=True)
            elif r.get("contended"):
                print(f"  [{c['config']}] WARNING: other processes kept {r['other_cpu_cores']:.2f} cores busy "
                      f"while it was timed ({r['torch_threads']} torch threads on {r['cores_available']} "
                      "cores): its times are not trustworthy", flush=True)
            results.append(r)
        summary = analyse(results, args, cfg)
    report = {
        "name": args.name,
        "machine": machine,
        "model": cfg,
        "run": dict(spec_base, ratios=args.ratios, warm_compile_cache=args.warm_compile_cache,
                    in_process=args.in_process, command=args.command,
                    rss_note="ru_maxrss of the worker process (peak resident set, KiB on Linux) after the "
                             "generations minus before them, in MiB; it covers activations, compiled code "
                             "and RAS caches of this process, not Inductor's compile subprocesses"),
        "summary": dict(summary, total_wall_s=time.perf_counter() - start),
        "results": results,
    }
    json_path, md_path = args.out / f"{args.name}.json", args.out / f"{args.name}.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    md_path.write_text(md)
    print("\n" + md)
    print(f"wrote {json_path} and {md_path}")
    print(plot(report, args.out / f"{args.name}.png") if not args.no_plot else "plot skipped (--no-plot)")
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
