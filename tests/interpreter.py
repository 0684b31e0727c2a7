"""Running Triton kernel checks under the interpreter, shared by the kernel test files.

`TRITON_INTERPRET=1` must be set before `@triton.jit` decorates a kernel, and another
test module may already have imported the kernels in the pytest process, so each kernel
test file runs its interpreter checks as a script (`python tests/<file>.py --interpret`)
in a fresh process: `run_checks` is that script's body, `run_in_interpreter` the pytest
side that launches it and fails with its output.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

import ras_compile.kernels as kernels

REPO = Path(__file__).resolve().parents[1]


def run_checks(checks: Iterable[Callable[[], None]]) -> int:
    """Run every check (each raises on failure), print one status line per check and
    return the exit status: 0 if all passed, 1 if any failed, 2 outside the interpreter."""
    if not kernels.triton_interpreting():
        print("set TRITON_INTERPRET=1 to run the interpreter checks", file=sys.stderr)
        return 2
    failures = 0
    for check in checks:
        start = time.perf_counter()
        try:
            check()
        except Exception:  # report every check, then fail
            traceback.print_exc()
            failures += 1
            status = "FAILED"
        else:
            status = "ok"
        print(f"{check.__name__}: {status} ({time.perf_counter() - start:.1f}s)", flush=True)
    return 1 if failures else 0


def run_in_interpreter(test_file: str | Path, timeout: float = 900) -> None:
    """Run ``python test_file --interpret`` with ``TRITON_INTERPRET=1`` in a fresh process and
    assert it exits 0 (the failure message carries its output)."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(Path(test_file).resolve()), "--interpret"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    print(proc.stdout)
    assert proc.returncode == 0, f"interpreter checks failed:\n{proc.stdout}\n{proc.stderr[-20000:]}"
