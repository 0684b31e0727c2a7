"""What the compiler makes of the linear-scatter kernels for a Hopper GPU, on any machine.

    python benchmarks/kernel_report.py                 # D 3072, k 2048, bf16: four tilings, every variant
    python benchmarks/kernel_report.py --all-configs   # every Hopper tiling (about a minute)

No GPU is needed: Triton's own JIT compiles each kernel (`JITFunction.warmup`, which
compiles without launching) for an sm90 target reported by a stand-in driver, with CPU
tensors of the benchmark's shapes as arguments, so the specialisation (16-byte aligned
pointers and strides, unit strides folded) is what a launch on aligned CUDA tensors gets.
For every (variant, tiling) it reports:

* shared memory per program (Triton's metadata) and registers / spills (`ptxas -v`);
* counts of the SASS instructions that decide speed on sm90: `HGMMA` (warpgroup MMA, the
  tensor-core path Hopper's peak needs; `HMMA` is the older, slower one), `UTMALDG`
  (TMA tile loads), `LDGSTS` (cp.async copies), `LDG` / `STG` (plain global loads and
  stores) and how many of the global loads / stores move 16 bytes (`.128`).

This is what METHOD.md calls reading what costs no device time: whether the matrix
instructions and the copies meant are there. It says nothing about speed; the GPU
benchmark (`bench_linear_scatter.py`) does. Writes
`benchmarks/results/kernel_report_sm90_triton<version>.json` and `.md`.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
INSTRUCTIONS = ("HGMMA", "HMMA", "UTMALDG", "LDGSTS", "LDG", "STG", "LDS", "STS", "BAR")


class _Sm90Driver:
    """The few driver calls Triton's JIT makes before it compiles (nothing is launched)."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def sass_counts(sass: str) -> dict[str, int]:
    """Instruction counts of a SASS listing (Triton's `get_sass` format: control codes, a
    tab, an optional predicate, the opcode), by the prefixes in INSTRUCTIONS plus the
    16-byte global accesses."""
    opcodes = re.findall(r"^[^\t\n]*\t(?:@!?U?P[T\d]+ )?([A-Z][A-Z0-9_.]*)", sass, re.M)
    counts = collections.Counter()
    for op in opcodes:
        base = op.split(".")[0]
        if base in INSTRUCTIONS:
            counts[base] += 1
        if base in ("LDG", "STG") and ".128" in op:
            counts[f"{base}.128"] += 1
    return {key: counts.get(key, 0) for key in (*INSTRUCTIONS, "LDG.128", "STG.128")}


def ptxas_resources(ptx: str) -> dict:
    """Registers, spill bytes and stack frame from `ptxas -v` (Triton's bundled ptxas
    builds; the newest one that accepts the PTX's version). Empty when none does."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        for ptxas in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas"):
            if not ptxas.exists():
                continue
            out = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "k.o")],
                                 capture_output=True, text=True)
            if out.returncode == 0:
                text = out.stderr
                found = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else None  # noqa: E731
                return dict(registers=found(r"Used (\d+) registers"),
                            spill_stores=found(r"(\d+) bytes spill stores"),
                            spill_loads=found(r"(\d+) bytes spill loads"),
                            stack_frame=found(r"(\d+) bytes stack frame"))
    return {}


def compile_for_sm90(variant: str, config, dims: int, k: int, dtype: torch.dtype, tokens: int = 4096, batch: int = 2):
    """The compiled kernel (Triton's CompiledKernel) of ``variant`` at one tiling, for the
    benchmark's operands: x [batch, k, dims], weight [dims, dims], bias, cache
    [batch, tokens, dims]. The stand-in driver is installed for the call only."""
    import triton

    from ras_compile.kernels import linear_scatter as ls
    from ras_compile.kernels import linear_scatter_tma as tma

    x = torch.empty(batch, k, dims, dtype=dtype)
    w, b = torch.empty(dims, dims, dtype=dtype), torch.empty(dims, dtype=dtype)
    index, cache = torch.empty(batch, k, dtype=torch.long), torch.empty(batch, tokens, dims, dtype=dtype)
    precision = ls.precision_flags(dtype)
    saved = triton.runtime.driver._active
    triton.runtime.driver.set_active(_Sm90Driver())
    try:
        if variant == "pointer":
            args, flags = ls.pointer_kernel_args(x, w, b, index, cache, None, None, **precision)
            kernel = ls._linear_scatter_kernel
        else:
            args, flags = tma.tma_kernel_args(x, w, b, index, cache, None, **precision)
            kernel = tma._linear_scatter_tma_kernel
        return kernel.warmup(*args, **flags, **ls.config_meta(config), grid=(1,))
    finally:
        triton.runtime.driver._active = saved


def report_row(variant: str, config, dims: int, k: int, dtype: torch.dtype) -> dict:
    from triton.tools.disasm import get_sass

    compiled = compile_for_sm90(variant, config, dims, k, dtype)
    kw = config.kwargs
    return dict(variant=variant, tile=f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}", group_m=kw["GROUP_M"],
                num_warps=config.num_warps, num_stages=config.num_stages, shared_bytes=compiled.metadata.shared,
                **ptxas_resources(compiled.asm["ptx"]), sass=sass_counts(get_sass(compiled.asm["cubin"])))


def markdown(meta: dict, rows: list[dict]) -> str:
    head = ["variant", "tile", "warps", "stages", "shared KB", "registers", "spills (B)", *INSTRUCTIONS,
            "LDG.128", "STG.128"]
    lines = [
        "# What Triton compiles the linear-scatter kernels to for sm90",
        "",
        f"Triton {meta['triton']}, torch {meta['torch']}, compiled on {meta['machine']} for an sm90 target "
        f"(no GPU involved): D {meta['dims']}, k {meta['k']}, {meta['dtype']}, batch 2, N 4096. "
        "`python benchmarks/kernel_report.py` (see its docstring). Instruction columns count SASS "
        "instructions in the kernel's code (static counts, not executions).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        spills = (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0) if "spill_stores" in r else "?"
        cells = [r["variant"], r["tile"], r["num_warps"], r["num_stages"], f"{r['shared_bytes'] / 1024:.0f}",
                 r.get("registers", "?"), spills, *(r["sass"][i] for i in INSTRUCTIONS), r["sass"]["LDG.128"],
                 r["sass"]["STG.128"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, default=3072, help="D_in = D_out")
    parser.add_argument("--k", type=int, default=2048, help="active rows per batch element")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--variants", nargs="+", default=["pointer", "tma", "tma_persistent"],
                        choices=["pointer", "tma", "tma_persistent"])
    parser.add_argument("--all-configs", action="store_true", help="every Hopper tiling (default: the first four)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        import triton
        import triton.language as tl
    except ImportError:
        print("kernel_report: Triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    if not hasattr(tl, "make_tensor_descriptor") and any(v != "pointer" for v in args.variants):
        print("kernel_report: this Triton has no tl.make_tensor_descriptor; reporting the pointer kernel only",
              file=sys.stderr)
        args.variants = ["pointer"]
    from ras_compile.kernels import linear_scatter as ls

    if ls.triton_interpreting():
        print("kernel_report: unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    configs = ls.HOPPER_CONFIGS if args.all_configs else ls.HOPPER_CONFIGS[:4]
    rows = []
    for variant in args.variants:
        for config in configs:
            row = report_row(variant, config, args.dims, args.k, dtype)
            rows.append(row)
            print(f"{variant:15s} {row['tile']:11s} w{row['num_warps']} s{row['num_stages']}: "
                  f"{row['shared_bytes'] / 1024:.0f} KB shared, {row.get('registers', '?')} registers, "
                  + ", ".join(f"{key} {n}" for key, n in row["sass"].items() if n), flush=True)
    import platform

    meta = dict(triton=triton.__version__, torch=torch.__version__, machine=platform.machine(), dims=args.dims,
                k=args.k, dtype=args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "kernel_report_sm90_triton" + triton.__version__.replace(".", "_")
    (args.out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(meta, rows))
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
    sys.exit(main())
