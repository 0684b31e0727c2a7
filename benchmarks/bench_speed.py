"""Benchmark: whole sampling loops, dense vs RAS vs step caches, on a scaled-down SD3.

    python benchmarks/bench_speed.py                  # the full suite (about 15 min on 2 CPU cores)
    python benchmarks/bench_speed.py --quick          # a tiny smoke run (2-3 min, mostly cold compiles)

The model is SD3's architecture (``SD3Transformer2DModel``, MMDiT) with SD3-medium's
head dimension (64) but fewer heads and layers, so a CPU can run 28-step loops:
by default 4 layers of 6 heads x 64 (width 384), a 64x64 latent with patch 2
(1024 image tokens), 77 text tokens, batch 2 (the classifier-free-guidance batch),
fp32, random weights. Every configuration samples the same noise with the same
flow-matching Euler loop (``FlowMatchEulerDiscreteScheduler``, shift 3.0 as SD3):

* ``eager``: the plain model;
* ``compiled``: ``torch.compile(model)`` (Inductor), the fair baseline for RAS;
* ``ras_r<ratio>``: ``ras_compile(model, RASPolicy(sample_ratio=ratio, warmup_steps=4,
  reset_steps=(12, 20)))`` (Inductor) for each ratio; ``ras_r1`` computes every token in
  its sparse steps, so it measures RAS's own overhead (cache writes, gather/scatter, token
  selection) against ``compiled``;
* ``fbc`` / ``taylorseer`` / ``taylorseer_lite``: diffusers' First Block Cache and
  TaylorSeer hooks on the eager model, where they apply (else the reason is recorded).

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

Writes ``<out>/<name>.json`` and ``<out>/<name>.md`` (name ``cpu_sd3_scaled``, or
``cpu_sd3_quick`` with ``--quick``) and, when matplotlib is installed, ``<name>.png``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
if str(REPO) not in sys.path:  # run as a script from anywhere: import the checkout's ras_compile
    sys.path.insert(0, str(REPO))

FULL = dict(layers=4, heads=6, head_dim=64, latent=64, text_tokens=77, batch=2, steps=28, warmup_steps=4,
            reset_steps=[12, 20])
QUICK = dict(layers=2, heads=2, head_dim=64, latent=16, text_tokens=16, batch=2, steps=8, warmup_steps=2,
             reset_steps=[4])
DEFAULT_RATIOS = [1.0, 0.5, 0.25, 0.125]
CACHE_KINDS = ("fbc", "taylorseer", "taylorseer_lite")


# ------------------------------------------------------------------------------ arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/bench_speed.py",
        description="Whole-loop speed of dense, torch.compile, RAS and diffusers step caches on a "
                    "scaled-down SD3 transformer (CPU or GPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run (2 layers, 64 image tokens, 8 steps, ratio 0.5 only, all "
                        "configurations in this process, see --in-process); writes cpu_sd3_quick.* so the "
                        "committed full results are not overwritten")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON, markdown and PNG results")
    p.add_argument("--name", default=None,
                   help="base name of the result files (default cpu_sd3_scaled, or cpu_sd3_quick with --quick; "
                        "a 'cpu' prefix is replaced by 'cuda' when --device cuda)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed generations per configuration after the warm-up one; the best whole loop is "
                        "reported, step times are medians over all of them (default 3)")
    p.add_argument("--ratios", type=float, nargs="+", default=None,
                   help=f"RAS sample ratios (default {' '.join(map(str, DEFAULT_RATIOS))}; 0.5 with --quick)")
    p.add_argument("--layers", type=int, default=None, help=f"transformer blocks (default {FULL['layers']})")
    p.add_argument("--heads", type=int, default=None, help=f"attention heads (default {FULL['heads']})")
    p.add_argument("--head-dim", type=int, default=None,
                   help=f"attention head dimension (default {FULL['head_dim']}, SD3-medium's)")
    p.add_argument("--latent", type=int, default=None,
                   help=f"latent height = width in latent pixels, patch 2 (default {FULL['latent']}: "
                        f"{(FULL['latent'] // 2) ** 2} image tokens)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help=f"text (context) tokens (default {FULL['text_tokens']})")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 2: the CFG batch)")
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps (default {FULL['steps']})")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help=f"RAS dense warm-up steps (default {FULL['warmup_steps']})")
    p.add_argument("--reset-steps", type=int, nargs="*", default=None,
                   help=f"RAS dense reset steps, 0-based (default {' '.join(map(str, FULL['reset_steps']))})")
    p.add_argument("--shift", type=float, default=3.0, help="flow-matching timestep shift (SD3 uses 3.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the noise and the conditioning")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of 'compiled' and the RAS runs")
    p.add_argument("--device", default="cpu", help="cpu or cuda (on cuda every call is synchronised)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads in every worker (default: torch's default, the core count)")
    p.add_argument("--configs", nargs="+", default=None,
                   help="run only these configurations (names: eager compiled ras_r<ratio> fbc taylorseer "
                        "taylorseer_lite); eager and compiled are always added, they are the references")
    p.add_argument("--no-caches", action="store_true", help="skip the First Block Cache / TaylorSeer runs")
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
    args = p.parse_args(argv)

    base = QUICK if args.quick else FULL
    for key in ("layers", "heads", "head_dim", "latent", "text_tokens", "batch", "steps", "warmup_steps",
                "reset_steps"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    if args.repeats is None:
        args.repeats = 3
    if args.ratios is None:
        args.ratios = [0.5] if args.quick else list(DEFAULT_RATIOS)
    if args.quick:
        args.in_process = True
    if args.taylorseer_interval is None:
        args.taylorseer_interval = 2 if args.quick else 5
    if args.name is None:
        args.name = "cpu_sd3_quick" if args.quick else "cpu_sd3_scaled"
        if args.device.startswith("cuda"):
            args.name = "cuda" + args.name[3:]
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


# ------------------------------------------------------------------------------ helpers


def ratio_name(ratio: float) -> str:
    return f"ras_r{ratio:g}"


def maxrss_mib() -> float:
    """Peak resident set of this process so far (Linux reports KiB)."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has been busy, CPU seconds this process has used), or None off Linux.

    Their differences over an interval give the CPU that *other* processes used in it
    (Inductor's idle compile workers count as other; they are idle while we time)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    busy = sum(fields[:8]) - fields[3] - fields[4]
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def other_cpu_cores(before, after, wall_s: float) -> float | None:
    """Mean number of cores other processes kept busy between two ``cpu_seconds()`` readings."""
    if before is None or after is None or wall_s <= 0:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall_s)


def cores_available() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


CONTENTION_MARGIN = 0.25  # cores of other load beyond the cores our threads leave free that flag a run


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(args) -> dict:
    import torch
    import diffusers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
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


def build(spec: dict):
    import torch
    from ras_compile.tiny_models import example_inputs, tiny_sd3_transformer

    dtype = getattr(torch, spec["dtype"])
    model = tiny_sd3_transformer(num_layers=spec["layers"], num_attention_heads=spec["heads"],
                                 attention_head_dim=spec["head_dim"], patch_size=2, sample_size=spec["latent"],
                                 joint_attention_dim=64, pooled_projection_dim=48, seed=spec["seed"], dtype=dtype)
    model = model.to(spec["device"])
    inputs = example_inputs(model, batch=spec["batch"], height=spec["latent"], width=spec["latent"],
                            seed=spec["seed"], text_len=spec["text_tokens"])
    inputs = {k: v.to(spec["device"]) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return model, inputs


def model_config(spec: dict) -> dict:
    model, _ = build(dict(spec, device="cpu"))
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    cfg["parameters"] = sum(p.numel() for p in model.parameters())
    cfg["inner_dim"] = spec["heads"] * spec["head_dim"]
    cfg["image_tokens"] = (spec["latent"] // 2) ** 2
    cfg["text_tokens"] = spec["text_tokens"]
    cfg["batch"] = spec["batch"]
    cfg["dtype"] = spec["dtype"]
    return json.loads(json.dumps(cfg, default=str))


# ------------------------------------------------------------------------------ the worker


class Sampler:
    """A flow-matching Euler loop (as diffusers' SD3 pipeline runs it) that times every call."""

    def __init__(self, spec: dict, inputs: dict):
        self.spec = spec
        self.inputs = inputs
        self.sync = spec["device"].startswith("cuda")

    def __call__(self, model, on_step=None):
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(shift=self.spec["shift"])
        scheduler.set_timesteps(self.spec["steps"], device=self.spec["device"])
        latents = self.inputs["hidden_states"]
        batch = latents.shape[0]
        times, labels = [], []
        for i, t in enumerate(scheduler.timesteps):
            call = dict(self.inputs, hidden_states=latents, timestep=t.expand(batch))
            if self.sync:
                torch.cuda.synchronize()
            start = time.perf_counter()
            if on_step is not None:
                label, velocity = on_step(i, t, lambda: model(**call)[0])
            else:
                label, velocity = "dense", model(**call)[0]
            if self.sync:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            labels.append(label)
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        return latents, times, labels


def apply_cache(kind: str, model, spec: dict):
    """Attach a diffusers step cache; returns (on_step, reset, description)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    if kind == "fbc":
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        config = FirstBlockCacheConfig(threshold=spec["fbc_threshold"])
        apply_first_block_cache(model, config)
        head = HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0]).hooks["fbc_leader_block_hook"]

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
            raise RuntimeError("TaylorSeer hooked no module of SD3Transformer2DModel")
        probe = hooks[0][1]

        def label():
            state = probe.state_manager.get_state()
            return "dense" if state.last_update_step == state.current_step else "cached"

    def on_step(i, t, run):
        # SD3Transformer2DModel has no CacheMixin.cache_context in this diffusers version, so the
        # context the pipelines set is set here directly; one context: the CFG batch is one call.
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


def cache_not_applicable(kind: str, model, exc: BaseException) -> str | None:
    """A one-line reason when a diffusers cache hook failed because it cannot handle this model.

    Known cases (diffusers 0.42.1): SD3's last ``JointTransformerBlock`` is built with
    ``context_pre_only=True`` and returns ``(None, hidden_states)``; First Block Cache's
    tail-block hook subtracts the head block's text stream from that ``None``, and
    TaylorSeer's lite mode (which hooks every block) reads ``.dtype`` of every block
    output. First Block Cache also needs a head and a distinct tail block. Anything
    else is returned as None and reported as a plain failure.
    """
    name = type(model).__name__
    blocks = getattr(model, "transformer_blocks", None)
    last = blocks[-1] if blocks is not None and len(blocks) else None
    pre_only = bool(getattr(last, "context_pre_only", False))
    unsupported = "" if hasattr(model, "enable_cache") else \
        f"; {name} is not a diffusers CacheMixin (no enable_cache), so diffusers does not claim support"
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
            runner = torch.compile(model, backend=spec["backend"])
        elif kind == "ras":
            from ras_compile import RASPolicy, ras_compile

            policy = RASPolicy(sample_ratio=spec["ratio"], warmup_steps=spec["warmup_steps"],
                               reset_steps=tuple(spec["reset_steps"]))
            result["policy"] = repr(policy)
            ras = runner = ras_compile(model, policy, backend=spec["backend"])
            reset = ras.ras_controller.reset

            def on_step(i, t, run):
                out = run()
                return ras.ras_controller.stats[-1].mode, out
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
        try:  # FLOPs of one sparse step at this ratio, counted on fake tensors
            from ras_compile import RASPolicy, explain

            policy = RASPolicy(sample_ratio=spec["ratio"], warmup_steps=spec["warmup_steps"],
                               reset_steps=tuple(spec["reset_steps"]))
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
    if args.configs:
        wanted = set(args.configs) | {"eager", "compiled"}
        unknown = wanted - {c["config"] for c in configs}
        if unknown:
            raise SystemExit(f"bench_speed: unknown configuration(s) {sorted(unknown)}; "
                             f"known: {[c['config'] for c in configs]}")
        configs = [c for c in configs if c["config"] in wanted]
    return configs


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


def analyse(results: list[dict], args) -> dict:
    """Speed-ups, FLOP bounds, differences from the dense compiled latents."""
    import torch
    from ras_compile import RASPolicy
    from ras_compile.schedule import dense_flop_fraction

    by_name = {r["config"]: r for r in results}
    eager, compiled = by_name.get("eager", {}), by_name.get("compiled", {})
    reference = torch.load(compiled["latents_path"]) if compiled.get("ok") else None
    image_tokens = (args.latent // 2) ** 2
    for r in results:
        if not r.get("ok"):
            continue
        if compiled.get("ok"):
            r["speedup_vs_compiled"] = compiled["steady_s"] / r["steady_s"]
        if eager.get("ok"):
            r["speedup_vs_eager"] = eager["steady_s"] / r["steady_s"]
        if r["kind"] == "ras":
            policy = RASPolicy(sample_ratio=r["ratio"], warmup_steps=args.warmup_steps,
                               reset_steps=tuple(args.reset_steps))
            fraction = dense_flop_fraction(policy, args.steps, image_tokens, args.text_tokens)
            r["flop_fraction"] = fraction
            r["flop_bound_speedup"] = 1 / fraction
            if "speedup_vs_compiled" in r:
                r["fraction_of_bound"] = r["speedup_vs_compiled"] / r["flop_bound_speedup"]
            f = r.get("counted_sparse_flop_fraction")
            if f is not None:
                dense_steps = sum(policy.is_dense_step(t) for t in range(args.steps))
                r["counted_flop_bound_speedup"] = args.steps / (dense_steps + (args.steps - dense_steps) * f)
        if reference is not None:
            latents = torch.load(r["latents_path"])
            r["max_abs_diff_vs_compiled"] = (latents - reference).abs().max().item()
        r.pop("latents_path", None)
    return {"reference_latent_max_abs": reference.abs().max().item() if reference is not None else None}


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
    letter = {"dense": "D", "sparse": "S", "cached": "C", "fallback": "F"}
    return " ".join(f"{counts[k]}{letter.get(k, k)}" for k in ("dense", "sparse", "cached", "fallback") if k in counts)


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
        f"- model: SD3Transformer2DModel, random weights, {cfg['num_layers']} layers, "
        f"{cfg['num_attention_heads']} heads x {cfg['attention_head_dim']} (width {cfg['inner_dim']}), "
        f"{cfg['parameters'] / 1e6:.1f} M parameters, {cfg['dtype']}",
        f"- input: latent {run['latent']}x{run['latent']}x{cfg['in_channels']}, patch {cfg['patch_size']} -> "
        f"{cfg['image_tokens']} image tokens + {cfg['text_tokens']} text tokens, batch {cfg['batch']}",
        f"- loop: {run['steps']} flow-matching Euler steps (shift {run['shift']}); RAS dense steps: warm-up "
        f"{run['warmup_steps']}, resets {', '.join(map(str, run['reset_steps'])) or 'none'}; "
        f"backend {run['backend']}; best of {run['repeats']} timed generations after one warm-up",
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
    lines += ["", f"Reference scale: max |latent| of the compiled dense result = "
                  f"{fmt(report['summary']['reference_latent_max_abs'], '.3f')}.", ""]
    lines += [
        "Columns: *steps* D dense, S sparse (RAS), C cached (the step cache skipped the full model); "
        "*first gen* the warm-up generation; *compile* first gen minus steady (compiled configurations); "
        "*steady* best whole-loop time (model calls, RAS token selection and the scheduler); "
        "*dense/sparse step* median time of one model call of that kind (for RAS including the controller's "
        "token selection after it) over all timed generations; *speed-up* steady time of the reference / "
        "steady time; *FLOP bound* the speed-up vs compiled that the FLOPs allow, "
        "`1 / dense_flop_fraction(policy, steps, image_tokens, text_tokens)`; "
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
    from ras_compile import RASPolicy
    from ras_compile.schedule import dense_flop_fraction

    run = report["run"]
    image_tokens = (run["latent"] // 2) ** 2
    grid = [i / 100 for i in range(5, 101)]
    bound = [1 / dense_flop_fraction(RASPolicy(sample_ratio=r, warmup_steps=run["warmup_steps"],
                                               reset_steps=tuple(run["reset_steps"])),
                                     run["steps"], image_tokens, run["text_tokens"]) for r in grid]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(grid, bound, "k--", label="FLOP bound of the schedule")
    ras = [r for r in report["results"] if r.get("ok") and r["kind"] == "ras" and "speedup_vs_compiled" in r]
    ras.sort(key=lambda r: r["ratio"])
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
    spec_base = dict(layers=args.layers, heads=args.heads, head_dim=args.head_dim, latent=args.latent,
                     text_tokens=args.text_tokens, batch=args.batch, steps=args.steps,
                     warmup_steps=args.warmup_steps, reset_steps=list(args.reset_steps), shift=args.shift,
                     seed=args.seed, backend=args.backend, device=args.device, dtype=args.dtype,
                     threads=args.threads, repeats=args.repeats, fbc_threshold=args.fbc_threshold,
                     taylorseer_interval=args.taylorseer_interval)
    machine = machine_info(args)
    cfg = model_config(spec_base)
    print(f"machine: {machine['cpu_model']}, {machine['cores_available']} cores, {machine['torch_threads']} "
          f"torch threads, torch {machine['torch']}, diffusers {machine['diffusers']}, load {load_average()}")
    print(f"model: SD3Transformer2DModel {cfg['num_layers']} layers x {cfg['num_attention_heads']} heads x "
          f"{cfg['attention_head_dim']} (width {cfg['inner_dim']}), {cfg['parameters'] / 1e6:.2f} M params, "
          f"{args.dtype}, random weights")
    print(f"input: latent {args.latent}x{args.latent} patch 2 -> {cfg['image_tokens']} image + "
          f"{args.text_tokens} text tokens, batch {args.batch}; {args.steps} steps, RAS warm-up "
          f"{args.warmup_steps} resets {args.reset_steps}; best of {args.repeats} after a warm-up")
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
        summary = analyse(results, args)
    report = {
        "name": args.name,
        "machine": machine,
        "model": cfg,
        "run": dict(spec_base, ratios=args.ratios, warm_compile_cache=args.warm_compile_cache,
                    in_process=args.in_process, quick=args.quick,
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
