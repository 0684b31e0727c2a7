"""benchmarks/bench_dynamic_k.py runs end to end (quick mode, cheap backend); its timings
are a benchmark's business, not asserted here."""
from __future__ import annotations

import json

from benchmark_scripts import load_benchmark


def _bench():
    return load_benchmark("bench_dynamic_k")


def test_quick_run_measures_both_modes(tmp_path):
    assert _bench().main(["--quick", "--backend", "eager", "--ratios", "0.5", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "cpu_dynamic_k_quick.json").read_text())
    modes = {r["mode"]: r for r in report["results"]}
    assert set(modes) == {"dynamic", "static"}
    for r in modes.values():
        assert r["k"] == 32 and r["image_tokens"] == 64
        assert r["sparse_median_ms"] > 0 and len(r["sparse_ms"]) == 3
    md = (tmp_path / "cpu_dynamic_k_quick.md").read_text()
    assert "| 0.5 | 32 |" in md and "bench_dynamic_k.py" in md
