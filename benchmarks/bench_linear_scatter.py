"""Benchmark: K/V projection + cache write, unfused vs the fused Triton op.

    python benchmarks/bench_linear_scatter.py              # needs a CUDA GPU
    python benchmarks/bench_linear_scatter.py --quick      # one D, two k

For every (D, k) it times, in bf16 with batch 2 and a cache of N = 4096 tokens:

* `aten`:     `F.linear` (cuBLAS) then `index_copy_` into the cache (what the graph
              does without the fused op);
* `inductor`: the same two ops under `torch.compile` (Inductor; it cannot fuse the
              scatter into the matmul epilogue, pytorch#143130 / #142315);
* `fused`:    `torch.ops.ras_compile.linear_scatter_` (the Triton kernel, autotuned);
* `gemm`:     `F.linear` alone, the floor an ideal fusion approaches;

and, with the gather prologue (x is the full [B, N, D] sequence, `rows` = the active
positions): `aten_gather` (index_select + linear + index_copy_) vs `fused_gather`.

The norm variant (a K projection with a per-head q/k RMSNorm, for every head dim in
`--head-dims`, default 64 and 128; `--no-norm` skips it, `--norm-only` runs only it):

* `aten_norm`:     `F.linear`, view to heads, `F.rms_norm` over the head dim with an
                   affine weight, `index_copy_`;
* `inductor_norm`: the same under `torch.compile` (Inductor fuses the norm into one
                   kernel after cuBLAS's GeMM; the scatter stays a separate write);
* `fused_norm`:    `ras_compile.kernels.linear_norm_scatter_` (the norm in the Triton
                   GeMM's epilogue, autotuned over `norm_configs(head_dim)`).

`--variants tma tma_persistent` (default: every variant) also times the TMA kernels
(`ras_compile/kernels/linear_scatter_tma.py`, each autotuned) through the direct launcher
(`linear_scatter_triton_(..., variant=...)`) as `fused_<variant>`, in both the plain and
the norm rows; `pointer` is the shipped kernel, the op's `fused`. `--variants pointer`
times the shipped kernel only.

Writes `benchmarks/results/linear_scatter_<gpu>.json` and `.md`. Times are medians of
`triton.testing.do_bench` (CUDA events, L2 flushed between runs), in microseconds.
Every fused result is checked against the ATen result before it is timed.
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1536, 3072], help="D_in = D_out")
    parser.add_argument("--ks", type=int, nargs="+", default=[512, 1024, 2048, 3072, 4096], help="active tokens")
    parser.add_argument("--tokens", type=int, default=4096, help="N, the cache length")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-compile", action="store_true", help="skip the Inductor baseline")
    parser.add_argument("--quick", action="store_true", help="D 1536, k 512 and 2048 only")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128],
                        help="head dims of the per-head norm variant")
    parser.add_argument("--no-norm", action="store_true", help="skip the per-head norm variant")
    parser.add_argument("--norm-only", action="store_true", help="run only the per-head norm variant")
    parser.add_argument("--variants", nargs="+", default=["pointer", "tma", "tma_persistent"],
                        choices=["pointer", "tma", "tma_persistent"],
                        help="kernel variants to time besides the op (the op runs the shipped default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.no_norm and args.norm_only:
        parser.error("--no-norm and --norm-only exclude each other")

    if not torch.cuda.is_available():
        print("bench_linear_scatter: CUDA is not available on this machine; this benchmark times GPU "
              "kernels and has nothing to measure without one. Run it in a session with a GPU.",
              file=sys.stderr)
        return 2
    try:
        import triton
        from triton.testing import do_bench, do_bench_cudagraph
    except ImportError:
        print("bench_linear_scatter: Triton is not installed.", file=sys.stderr)
        return 2

    from ras_compile.kernels import linear_scatter_, linear_scatter_triton_
    from ras_compile.kernels.linear_scatter import _linear_scatter_autotuned
    from ras_compile.kernels.linear_scatter_tma import tma_ineligible_reason

    extra = [v for v in args.variants if v != "pointer"]
    probe = torch.empty(1, 8, 64, device="cuda", dtype=getattr(torch, args.dtype))
    why = tma_ineligible_reason(probe, probe[0], None) if extra else None
    if why is not None:
        print(f"bench_linear_scatter: skipping {', '.join(extra)}: {why}", file=sys.stderr)
        extra = []
    args.extra_variants = extra

    if args.quick:
        args.dims, args.ks, args.head_dims = [1536], [512, 2048], [128]
    dtype = getattr(torch, args.dtype)
    B, N = args.batch, args.tokens
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(dev)

    def aten(x, w, b, index, cache):
        out = F.linear(x, w, b)
        flat = (index + torch.arange(B, device=dev).unsqueeze(1) * N).flatten()
        cache.view(B * N, -1).index_copy_(0, flat, out.reshape(B * index.shape[1], -1))
        return cache

    def aten_gather(x_full, w, b, index, cache):
        x = torch.gather(x_full, 1, index.unsqueeze(-1).expand(-1, -1, x_full.shape[2]))
        return aten(x, w, b, index, cache)

    # One static-shape graph per (D, k): allow as many recompiles as there are shapes.
    torch._dynamo.config.recompile_limit = max(64, 2 * len(args.dims) * len(args.ks))
    inductor = None if args.no_compile else torch.compile(aten, fullgraph=True, dynamic=False)

    rows_out = []
    for D in ([] if args.norm_only else args.dims):
        w = torch.randn(D, D, device=dev, dtype=dtype) / D ** 0.5
        b = torch.randn(D, device=dev, dtype=dtype)
        x_full = torch.randn(B, N, D, device=dev, dtype=dtype)
        cache = torch.randn(B, N, D, device=dev, dtype=dtype)
        for k in args.ks:
            if k > N:
                continue
            index = torch.stack([torch.randperm(N, device=dev)[:k] for _ in range(B)])
            x = torch.randn(B, k, D, device=dev, dtype=dtype)

            want = aten(x, w, b, index, cache.clone())
            got = linear_scatter_(x, w, b, index, cache.clone())  # also runs the autotuner
            err = (got.float() - want.float()).abs().max().item()
            want_g = aten_gather(x_full, w, b, index, cache.clone())
            got_g = linear_scatter_(x_full, w, b, index, cache.clone(), rows=index)
            err = max(err, (got_g.float() - want_g.float()).abs().max().item())
            for v in extra:  # also runs each variant's autotuner
                got_v = linear_scatter_triton_(x, w, b, index, cache.clone(), variant=v)
                err = max(err, (got_v.float() - want.float()).abs().max().item())
            if err > 0.1:
                print(f"bench_linear_scatter: fused result differs from ATen by {err} at D={D} k={k}",
                      file=sys.stderr)
                return 1
            best = getattr(_linear_scatter_autotuned, "best_config", None)

            fns = {
                "aten": lambda: aten(x, w, b, index, cache),
                "fused": lambda: linear_scatter_(x, w, b, index, cache),
                "gemm": lambda: F.linear(x, w, b),
                "aten_gather": lambda: aten_gather(x_full, w, b, index, cache),
                "fused_gather": lambda: linear_scatter_(x_full, w, b, index, cache, rows=index),
            }
            for v in extra:
                fns[f"fused_{v}"] = functools.partial(linear_scatter_triton_, x, w, b, index, cache, variant=v)
            if inductor is not None:
                inductor(x, w, b, index, cache)
                fns["inductor"] = lambda: inductor(x, w, b, index, cache)
            # GPU time: each variant replayed from a CUDA graph, so the host's launch cost
            # (Python, dispatch, the autotuner's lookup) is out of the measurement; this is
            # what the kernels cost inside a GPU-bound model step. Eager: the plain call as
            # a Python program makes it, launch overhead included.
            us = {name: do_bench_cudagraph(fn) * 1e3 for name, fn in fns.items()}
            us_eager = {name: do_bench(fn) * 1e3 for name, fn in fns.items()}
            flops = 2 * B * k * D * D
            row = dict(D=D, k=k, N=N, B=B, dtype=args.dtype, max_abs_err=err,
                       best_config=str(best) if best is not None else None,
                       us=us, us_eager=us_eager, fused_tflops=flops / (us["fused"] * 1e-6) / 1e12,
                       gemm_tflops=flops / (us["gemm"] * 1e-6) / 1e12,
                       speedup_vs_aten=us["aten"] / us["fused"],
                       speedup_vs_inductor=(us["inductor"] / us["fused"]) if "inductor" in us else None,
                       speedup_gather_vs_aten=us["aten_gather"] / us["fused_gather"],
                       speedup_vs_aten_eager=us_eager["aten"] / us_eager["fused"],
                       variant_speedup_vs_aten={v: us["aten"] / us[f"fused_{v}"] for v in extra},
                       variant_tflops={v: flops / (us[f"fused_{v}"] * 1e-6) / 1e12 for v in extra})
            rows_out.append(row)
            print(f"D={D} k={k}: GPU time " + ", ".join(f"{n} {v:.1f}us" for n, v in us.items())
                  + f" | fused x{row['speedup_vs_aten']:.2f} vs aten (eager calls: x{row['speedup_vs_aten_eager']:.2f})"
                  + f" | {best}", flush=True)

    norm_rows = [] if args.no_norm else _bench_norm(args, dtype, dev, aten)
    if norm_rows is None:
        return 1
    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                cuda=torch.version.cuda, allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "linear_scatter_" + re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
    (args.out / f"{stem}.json").write_text(
        json.dumps(dict(meta=meta, results=rows_out, norm_results=norm_rows), indent=2) + "\n")
    (args.out / f"{stem}.md").write_text((_markdown(meta, rows_out) if rows_out else "")
                                         + ("\n" if rows_out and norm_rows else "") + _norm_markdown(meta, norm_rows))
    print(f"wrote {args.out / stem}.json and .md")
    return 0


def aten_norm(x, w, b, index, cache, norm_weight, head_dim: int, eps: float = 1e-6):
    """The unfused K path: cuBLAS GeMM, per-head RMSNorm, `index_copy_` into the cache."""
    B, N = cache.shape[:2]
    out = F.linear(x, w, b)
    heads = F.rms_norm(out.unflatten(-1, (-1, head_dim)), (head_dim,), norm_weight, eps).flatten(-2)
    flat = (index + torch.arange(B, device=x.device).unsqueeze(1) * N).flatten()
    cache.view(B * N, -1).index_copy_(0, flat, heads.reshape(B * index.shape[1], -1))
    return cache


def _bench_norm(args, dtype, dev, _aten) -> list | None:
    """Rows of the per-head norm variant, or None when the fused result is wrong."""
    from triton.testing import do_bench, do_bench_cudagraph

    from ras_compile.kernels import linear_norm_scatter_, linear_norm_scatter_triton_

    B, N = args.batch, args.tokens
    inductor = None if args.no_compile else torch.compile(aten_norm, fullgraph=True, dynamic=False)
    rows = []
    for D in args.dims:
        w = torch.randn(D, D, device=dev, dtype=dtype) / D ** 0.5
        b = torch.randn(D, device=dev, dtype=dtype)
        cache = torch.randn(B, N, D, device=dev, dtype=dtype)
        for head_dim in args.head_dims:
            nw = torch.randn(head_dim, device=dev, dtype=dtype)
            for k in args.ks:
                if k > N:
                    continue
                index = torch.stack([torch.randperm(N, device=dev)[:k] for _ in range(B)])
                x = torch.randn(B, k, D, device=dev, dtype=dtype)

                def fused():
                    return linear_norm_scatter_(x, w, b, index, cache, norm="rms", norm_weight=nw, eps=1e-6,
                                                head_dim=head_dim)

                want = aten_norm(x, w, b, index, cache.clone(), nw, head_dim)
                got = linear_norm_scatter_(x, w, b, index, cache.clone(), norm="rms", norm_weight=nw, eps=1e-6,
                                           head_dim=head_dim)  # also runs the autotuner
                err = (got.float() - want.float()).abs().max().item()
                for v in args.extra_variants:
                    got_v = linear_norm_scatter_triton_(x, w, b, index, cache.clone(), norm="rms", norm_weight=nw,
                                                        eps=1e-6, head_dim=head_dim, variant=v)
                    err = max(err, (got_v.float() - want.float()).abs().max().item())
                if err > 0.1:
                    print(f"bench_linear_scatter: fused norm result differs from ATen by {err} at D={D} "
                          f"head_dim={head_dim} k={k}", file=sys.stderr)
                    return None
                fns = {"gemm": lambda: F.linear(x, w, b),
                       "aten_norm": lambda: aten_norm(x, w, b, index, cache, nw, head_dim),
                       "fused_norm": fused}
                for v in args.extra_variants:
                    fns[f"fused_norm_{v}"] = functools.partial(
                        linear_norm_scatter_triton_, x, w, b, index, cache, norm="rms", norm_weight=nw, eps=1e-6,
                        head_dim=head_dim, variant=v)
                if inductor is not None:
                    inductor(x, w, b, index, cache, nw, head_dim)
                    fns["inductor_norm"] = lambda: inductor(x, w, b, index, cache, nw, head_dim)
                us = {name: do_bench_cudagraph(fn) * 1e3 for name, fn in fns.items()}
                us_eager = {name: do_bench(fn) * 1e3 for name, fn in fns.items()}
                row = dict(D=D, head_dim=head_dim, k=k, N=N, B=B, dtype=args.dtype, max_abs_err=err, us=us,
                           us_eager=us_eager, speedup_vs_aten=us["aten_norm"] / us["fused_norm"],
                           variant_speedup_vs_aten={v: us["aten_norm"] / us[f"fused_norm_{v}"]
                                                    for v in args.extra_variants},
                           speedup_vs_inductor=(us["inductor_norm"] / us["fused_norm"]) if "inductor_norm" in us
                           else None)
                rows.append(row)
                print(f"D={D} head_dim={head_dim} k={k}: GPU time "
                      + ", ".join(f"{n} {v:.1f}us" for n, v in us.items())
                      + f" | fused norm x{row['speedup_vs_aten']:.2f} vs aten", flush=True)
    return rows


def _norm_markdown(meta, rows) -> str:
    """The per-head norm variant's table ("" without rows)."""
    if not rows:
        return ""
    has_ind = any(r["us"].get("inductor_norm") is not None for r in rows)
    variants = list(rows[0].get("variant_speedup_vs_aten", {}))
    head = ["D", "head_dim", "k", "gemm", "aten + norm", *(["inductor + norm"] if has_ind else []), "fused norm",
            "x vs aten", *(["x vs inductor"] if has_ind else []),
            *[c for v in variants for c in (f"fused norm {v}", f"x {v}")]]
    lines = [
        "# linear_norm_scatter_ benchmark (K projection + per-head RMSNorm + cache write)",
        "",
        f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}. Batch {rows[0]['B']}, N {rows[0]['N']}, "
        f"{rows[0]['dtype']}, D_in = D_out = D. GPU time in microseconds (CUDA graphs, as above).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        u = r["us"]
        cells = [r["D"], r["head_dim"], r["k"], f"{u['gemm']:.1f}", f"{u['aten_norm']:.1f}",
                 *([f"{u['inductor_norm']:.1f}"] if has_ind else []), f"{u['fused_norm']:.1f}",
                 f"{r['speedup_vs_aten']:.2f}", *([f"{r['speedup_vs_inductor']:.2f}"] if has_ind else []),
                 *[c for v in variants for c in (f"{u[f'fused_norm_{v}']:.1f}",
                                                 f"{r['variant_speedup_vs_aten'][v]:.2f}")]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _markdown(meta, rows) -> str:
    has_ind = any(r["us"].get("inductor") is not None for r in rows)
    variants = list(rows[0].get("variant_speedup_vs_aten", {})) if rows else []
    head = ["D", "k", "gemm", "aten", *(["inductor"] if has_ind else []), "fused", "x vs aten",
            *(["x vs inductor"] if has_ind else []), "aten gather", "fused gather", "x gather", "gemm TFLOP/s",
            "fused TFLOP/s", "x eager",
            *[c for v in variants for c in (f"fused {v}", f"x {v}", f"{v} TFLOP/s")]]
    lines = [
        "# linear_scatter_ benchmark",
        "",
        f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}. "
        f"Batch {rows[0]['B'] if rows else '?'}, N {rows[0]['N'] if rows else '?'}, "
        f"{rows[0]['dtype'] if rows else '?'}, D_in = D_out = D. GPU time in microseconds: each "
        "variant replayed from a CUDA graph (`triton.testing.do_bench_cudagraph`), so the host's "
        "launch cost is excluded, as in a GPU-bound model step. `x`: speed-up of the fused op. "
        "`x eager`: the same ratio for plain eager calls (`do_bench`), launch overhead included. "
        "`fused <variant>`: the same kernel family through the direct launcher with that variant "
        "(`tma`: TMA operand loads, one program per tile; `tma_persistent`: one program per SM).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        u = r["us"]
        cells = [r["D"], r["k"], f"{u['gemm']:.1f}", f"{u['aten']:.1f}",
                 *([f"{u['inductor']:.1f}"] if has_ind else []), f"{u['fused']:.1f}",
                 f"{r['speedup_vs_aten']:.2f}",
                 *([f"{r['speedup_vs_inductor']:.2f}"] if has_ind else []),
                 f"{u['aten_gather']:.1f}", f"{u['fused_gather']:.1f}", f"{r['speedup_gather_vs_aten']:.2f}",
                 f"{r['gemm_tflops']:.0f}", f"{r['fused_tflops']:.0f}", f"{r['speedup_vs_aten_eager']:.2f}",
                 *[c for v in variants for c in (f"{u[f'fused_{v}']:.1f}", f"{r['variant_speedup_vs_aten'][v]:.2f}",
                                                 f"{r['variant_tflops'][v]:.0f}")]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
