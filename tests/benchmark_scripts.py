"""The scripts of benchmarks/ imported by path for their tests (benchmarks/ is not a
package; `ras-compile bench` imports bench_speed the same way)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str, module_name: str | None = None, register: bool = False) -> ModuleType:
    """``benchmarks/<name>.py`` as a fresh module called ``module_name`` (default ``name``);
    ``register`` puts it in ``sys.modules`` first (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(module_name or name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[module_name or name] = module
    spec.loader.exec_module(module)
    return module
