import json
import math
import subprocess
import sys

from conftest import ROOT


def test_latency_benchmark_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "latency.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_latency.py"), "--smoke",
                           "--json", str(out), "--md", str(tmp_path / "latency.md")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    variants = {r["variant"] for r in result["rows"]}
    assert {"naive fp32 (K decoder calls)", "fused fp32", "plain U-Net, fastest path"} <= variants
    for row in result["rows"]:
        assert row["images_per_s"] > 0 and row["ms"] > 0
        if not math.isnan(row["rel_err_eps"]):
            # every variant was checked against the fp32 reference before timing
            assert row["rel_err_eps"] < 1e-5 and row["rel_err_masks"] < 1e-5
    assert [s["steps"] for s in result["sampling"]] == [5, 5]
    assert "| tiny-32 | fused fp32 | 2 |" in (tmp_path / "latency.md").read_text()
