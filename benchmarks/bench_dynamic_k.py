"""Benchmark: a dynamic active-token dimension against graphs specialised to one k.

    python benchmarks/bench_dynamic_k.py                 # scaled SD3 (as bench_speed.py), ratios 0.5 and 0.125
    python benchmarks/bench_dynamic_k.py --quick         # a tiny smoke run

``ras_compile`` compiles one sparse graph whose active-token count k is a dynamic
dimension (``torch._dynamo.mark_dynamic``), so every k >= 2 runs the same compiled code.
The alternative is fixed buckets: a few static k, the active set padded up to the next
one, one graph per bucket. Buckets only pay off if a graph specialised to its k runs a
sparse step faster than the dynamic graph does at that k. This script measures that,
for each ratio, in two fresh processes:

* ``dynamic``: ``ras_compile`` as shipped;
* ``static``: the same, with ``mark_dynamic`` switched off and Dynamo's automatic
  dynamic shapes disabled, so the sparse graph is compiled for exactly this k (what one
  bucket would compile).

Each process fills the caches with one dense step, then times ``--calls`` sparse steps
on the same input and active set (``override_next_step``) and reports the median, and
the first sparse call (which compiles). Writes ``<out>/<device>_dynamic_k.json`` and
``.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FULL = dict(layers=4, heads=6, head_dim=64, latent=64, text_tokens=77, batch=2, calls=15)
QUICK = dict(layers=1, heads=2, head_dim=32, latent=16, text_tokens=8, batch=2, calls=3)


def measure(mode: str, ratio: float, size: dict, backend: str, threads: int | None) -> dict:
    """Run in a fresh process: compile, then time sparse steps at ``ratio``."""
    import torch

    from ras_compile import RASPolicy, ras_compile
    from ras_compile.machine import cpu_seconds, other_cpu_cores
    from ras_compile.tiny_models import example_inputs, tiny_sd3_transformer

    if threads:
        torch.set_num_threads(threads)
    if mode == "static":
        torch._dynamo.mark_dynamic = lambda *args, **kwargs: None
        torch._dynamo.config.automatic_dynamic_shapes = False
    model = tiny_sd3_transformer(num_layers=size["layers"], num_attention_heads=size["heads"],
                                 attention_head_dim=size["head_dim"], sample_size=size["latent"],
                                 joint_attention_dim=64, pooled_projection_dim=48)
    inputs = example_inputs(model, batch=size["batch"], height=size["latent"], width=size["latent"],
                            text_len=size["text_tokens"])
    ras = ras_compile(model, RASPolicy(sample_ratio=ratio), backend=backend)
    n = (size["latent"] // 2) ** 2
    k = max(1, round(ratio * n))
    gen = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(size["batch"])])
    with torch.no_grad():
        start = time.perf_counter()
        ras(**inputs)  # dense: compiles the dense graph, fills the caches
        dense_first = time.perf_counter() - start
        times = []
        cpu_before, wall_before = cpu_seconds(), time.perf_counter()
        for _ in range(1 + size["calls"]):
            ras.ras_controller.override_next_step("sparse", index)
            start = time.perf_counter()
            ras(**inputs)
            times.append(time.perf_counter() - start)
        other = other_cpu_cores(cpu_before, cpu_seconds(), time.perf_counter() - wall_before)
    assert all(s.mode == "sparse" for s in ras.ras_controller.stats[1:])
    return dict(mode=mode, ratio=ratio, k=k, image_tokens=n, dense_first_call_s=dense_first,
                sparse_first_call_s=times[0], sparse_median_ms=1e3 * statistics.median(times[1:]),
                sparse_ms=[1e3 * t for t in times[1:]], other_cpu_cores=other, torch_threads=torch.get_num_threads())


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Dynamic active-token dimension vs a graph specialised to k ({report['name']})", "",
             f"- machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}; backend {report['backend']}",
             f"- model: scaled SD3 ({report['size']['layers']} blocks of {report['size']['heads']} x "
             f"{report['size']['head_dim']}), {report['results'][0]['image_tokens']} image tokens + "
             f"{report['size']['text_tokens']} text, batch {report['size']['batch']}",
             f"- command: `{report['command']}`", "",
             "| ratio | k | dynamic: sparse step (ms) | static: sparse step (ms) | static / dynamic | "
             "dynamic: first sparse call (s) | static: first sparse call (s) | other load (cores) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["ratio"], r["mode"]): r for r in report["results"]}
    for ratio in report["ratios"]:
        d, s = by[(ratio, "dynamic")], by[(ratio, "static")]
        lines.append(f"| {ratio} | {d['k']} | {d['sparse_median_ms']:.1f} | {s['sparse_median_ms']:.1f} | "
                     f"{s['sparse_median_ms'] / d['sparse_median_ms']:.3f} | {d['sparse_first_call_s']:.1f} | "
                     f"{s['sparse_first_call_s']:.1f} | {max(d['other_cpu_cores'] or 0, s['other_cpu_cores'] or 0):.2f} |")
    lines += ["", "*sparse step*: median of the timed sparse calls after the first; *static / dynamic* below 1 "
                  "means a specialised graph (one bucket) runs faster; *first sparse call*: includes compiling "
                  "the sparse graph (a static graph is compiled once per bucket, the dynamic one once)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model (smoke run)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.125])
    p.add_argument("--backend", default="inductor")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the workers")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default=None)
    p.add_argument("--worker", nargs=3, metavar=("MODE", "RATIO", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size = QUICK if args.quick else FULL
    if args.worker:
        mode, ratio, result = args.worker
        Path(result).write_text(json.dumps(measure(mode, float(ratio), size, args.backend, args.threads)))
        return 0

    import torch

    from ras_compile.machine import cores_available, cpu_model

    name = args.name or ("cpu_dynamic_k_quick" if args.quick else "cpu_dynamic_k")
    results = []
    for ratio in args.ratios:
        for mode in ("dynamic", "static"):
            out = args.out / f".{name}_{mode}_{ratio}.json"
            args.out.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, "--worker", mode, str(ratio), str(out), "--backend", args.backend]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            subprocess.run(cmd, check=True)
            results.append(json.loads(out.read_text()))
            out.unlink()
            r = results[-1]
            print(f"ratio {ratio} {mode}: sparse step {r['sparse_median_ms']:.1f} ms (first call "
                  f"{r['sparse_first_call_s']:.1f} s)", flush=True)
    report = dict(name=name, backend=args.backend, ratios=args.ratios, size=size, results=results,
                  command="python benchmarks/bench_dynamic_k.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  machine=dict(cpu=cpu_model(), cores=cores_available(), torch=torch.__version__,
                               python=platform.python_version()))
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
