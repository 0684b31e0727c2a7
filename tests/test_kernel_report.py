"""benchmarks/kernel_report.py: the kernels compiled for sm90 on this machine (no GPU) use
Hopper's instructions: warpgroup MMA in both, TMA tile loads in the TMA variants."""
from __future__ import annotations

import pytest
import torch

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def report():
    return load_benchmark("kernel_report", "kernel_report_under_test")


def test_sass_counts_reads_tritons_listing(report):
    sass = ("Function:k\n--:-:-:-:8\tLDC R1, c[0x0][0x28];\n--:-:1:-:1\t@P0 LDG.E.128 R4, desc[UR4][R2.64];\n"
            "--:-:-:-:1\tHGMMA.64x256x16.F32.BF16 R24, gdesc[UR8], R24;\n--:-:-:-:1\t@!PT STG.E.U16 [R2], R4;\n"
            "--:-:-:-:1\tUTMALDG.3D [UR8], [UR4];\n")
    counts = report.sass_counts(sass)
    assert counts["LDG"] == 1 and counts["LDG.128"] == 1 and counts["HGMMA"] == 1 and counts["UTMALDG"] == 1
    assert counts["STG"] == 1 and counts["STG.128"] == 0 and counts["LDGSTS"] == 0 and counts["HMMA"] == 0


@pytest.mark.parametrize("variant", ["pointer", "tma", "tma_persistent"])
def test_kernels_compile_for_sm90_to_wgmma_and_the_loads_they_mean(report, variant):
    """128x128x64, 8 warps, 3 stages (a shipped tiling) at FLUX.1-dev's width: HGMMA (not the
    older HMMA), no spills, inside Hopper's 227 KB of shared memory; the pointer kernel's
    operands come by cp.async (LDGSTS), the TMA variants' by TMA tile loads (UTMALDG)."""
    from triton.tools.disasm import get_sass

    from ras_compile.kernels.linear_scatter import HOPPER_CONFIGS

    config = next(c for c in HOPPER_CONFIGS if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) == (128, 128, 8))
    compiled = report.compile_for_sm90(variant, config, dims=3072, k=2048, dtype=torch.bfloat16)
    counts = report.sass_counts(get_sass(compiled.asm["cubin"]))
    assert counts["HGMMA"] > 0 and counts["HMMA"] == 0, counts
    assert compiled.metadata.shared <= 227 * 1024
    if variant == "pointer":
        assert counts["LDGSTS"] > 0 and counts["UTMALDG"] == 0, counts
    else:
        assert counts["UTMALDG"] > 0 and counts["LDGSTS"] == 0, counts
    resources = report.ptxas_resources(compiled.asm["ptx"])
    assert resources.get("spill_stores") == 0 and resources.get("spill_loads") == 0, resources
