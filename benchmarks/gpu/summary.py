"""The short table that benchmarks/gpu/run.sh prints last, from the files of its OUT_DIR: versions,
each stage's exit status, the kernel tests' result line, the kernels' GB/s at the largest batch, and
the inference variants' images/s with their errors and the sampling runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary(out: Path) -> str:
    lines = ["# GPU benchmark", ""]
    env = out / "env.txt"
    lines += [f"    {line}" for line in (env.read_text().splitlines() if env.exists() else ["(no env.txt)"])] + [""]
    stages = out / "stages.tsv"
    if stages.exists():
        rows = [line.split("\t") for line in stages.read_text().splitlines()[1:] if line]
        lines += ["| stage | exit status | seconds |", "|---|---|---|"]
        lines += [f"| {name} | {status} | {seconds} |" for name, status, seconds in rows] + [""]
    lines += [f"Kernel tests: {last_line(out / 'tests.log')}", ""]

    kernels = load(out / "kernels64.json")
    if kernels and kernels.get("rows"):
        top = max(r["batch"] for r in kernels["rows"])
        lines += [f"Kernels at batch {top} (copy bandwidth {fmt(kernels.get('copy_gbps'), '.0f')} GB/s):", "",
                  "| op | shape | impl | ms | GB/s | max err |", "|---|---|---|---|---|---|"]
        for r in kernels["rows"]:
            if r["batch"] == top and r["op"] in ("skips/pyramid", "masked_sum", "ddpm_step"):
                lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {fmt(r.get('ms'), '.4f')} | "
                             f"{fmt(r.get('gbps'), '.0f')} | {r.get('error') or fmt(r.get('max_err'), '.1e')} |")
        lines.append("")

    for name in ("bench64", "bench128"):
        bench = load(out / f"{name}.json")
        if not bench:
            continue
        rate = bench.get("matmul_bf16_tflops")
        lines += [f"{name}: inference variants" + (f" (bf16 matmul rate {rate:.0f} TFLOP/s)" if rate else ""), "",
                  "| preset | model | variant | batch | images/s | TFLOP/s | % matmul | err eps | status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in bench["rows"]:
            if r["status"].startswith("skipped"):
                continue
            frac = None if r.get("frac_matmul") is None else 100 * r["frac_matmul"]
            lines.append(f"| {r['preset']} | {r['model']} | {r['variant']} | {r['batch']} | "
                         f"{fmt(r.get('images_per_s'), '.1f')} | {fmt(r.get('tflops'), '.2f')} | {fmt(frac, '.0f')} | "
                         f"{fmt(r.get('err_eps'), '.1e')} | {r['status'][:60]} |")
        skipped = sorted({f"{r['variant']} ({r['status'][9:]})" for r in bench["rows"]
                          if r["status"].startswith("skipped")})
        if skipped:
            lines.append(f"\nSkipped: {'; '.join(skipped)}")
        for s in bench.get("sampling", []):
            total = s.get("total_s", s.get("total_s_estimated"))
            how = "measured" if "total_s" in s else "estimated"
            lines.append(f"\nSampling {s['preset']}, {s['variant']}: {s['images']} images, "
                         f"{fmt(s.get('step_ms'), '.2f')} ms/step, {fmt(total, '.1f')} s for {s['steps']} steps "
                         f"({how}; {s['status']})")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1])))
