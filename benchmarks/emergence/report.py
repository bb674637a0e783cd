"""Turns the study's curves (OUT/<kind><size>-<recipe>/curve.jsonl) into a table and IoU-vs-images plots.

    python benchmarks/emergence/report.py --runs runs/emergence --out benchmarks/emergence
writes results.json (every run's recipe and curve), curves_<kind><size>.png and prints the Markdown table.
Runs already in OUT/results.json and absent from RUNS are kept (a run folder need not outlive its machine);
a run in RUNS replaces the stored one of the same name.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_runs(root: Path) -> list[dict]:
    runs = []
    for curve in sorted(root.glob("*/curve.jsonl")):
        points = [json.loads(line) for line in curve.read_text().splitlines() if line.strip()]
        if points:
            recipe = json.loads((curve.parent / "recipe.json").read_text())
            runs.append({"name": curve.parent.name, **recipe, "curve": points})
    return runs


def object_iou(point: dict) -> float:
    """The IoU of the objects (every true region but the background, label 0), averaged."""
    return sum(point["iou"][1:]) / len(point["iou"][1:])


def label(run: dict) -> str:
    """The recipe, the share of training scenes without objects and the training seed, where not 0."""
    extras = []
    if run.get("empty"):
        extras.append(f"{run['empty']:.0%} empty scenes")
    if run.get("seed"):
        extras.append(f"seed {run['seed']}")
    return run["recipe"] + (f" ({', '.join(extras)})" if extras else "")


def table(runs: list[dict]) -> str:
    lines = ["| scenes | recipe | steps | images | train min | object IoU | best | mIoU | entropy | shares | "
             "usefulness t<100 / 100-300 / 300-600 / 600+ | empty scenes: background |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        last = r["curve"][-1]
        best = max(object_iou(p) for p in r["curve"])
        use = " / ".join(f"{v:+.4f}" for v in last["usefulness"].values())
        shares = "/".join(f"{s:.2f}" for s in last["region_share"])
        empty = f"{last['empty_background']:.3f}" if "empty_background" in last else "–"
        lines.append(f"| {r['kind']}{r['size']} | {label(r)} | {last['step']} | {last['images']:,} | "
                     f"{last['train_seconds'] / 60:.1f} | {object_iou(last):.3f} | {best:.3f} | {last['miou']:.3f} | "
                     f"{last['mask_entropy']:.3f} | {shares} | {use} | {empty} |")
    return "\n".join(lines)


def plot(runs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for scenes in sorted({f"{r['kind']}{r['size']}" for r in runs}):
        group = [r for r in runs if f"{r['kind']}{r['size']}" == scenes]
        fig, (ax_iou, ax_h) = plt.subplots(1, 2, figsize=(10, 3.6))
        for r in group:
            x = [p["images"] / 1000 for p in r["curve"]]
            ax_iou.plot(x, [object_iou(p) for p in r["curve"]], marker=".", label=label(r))
            ax_h.plot(x, [p["mask_entropy"] for p in r["curve"]], marker=".", label=label(r))
        ax_iou.set(xlabel="images seen (thousands)", ylabel="object IoU (EMA, t=30)", ylim=(0, 1),
                   title=f"scenes {scenes}")
        ax_h.set(xlabel="images seen (thousands)", ylabel="mask entropy / log K", ylim=(0, 1))
        ax_iou.grid(alpha=0.3)
        ax_h.grid(alpha=0.3)
        ax_h.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"curves_{scenes}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", default="runs/emergence")
    p.add_argument("--out", default="benchmarks/emergence")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stored = out / "results.json"
    runs = {r["name"]: r for r in (json.loads(stored.read_text()) if stored.exists() else [])}
    runs.update({r["name"]: r for r in load_runs(Path(a.runs))})
    runs = [runs[name] for name in sorted(runs)]
    stored.write_text(json.dumps(runs, indent=1) + "\n")
    plot(runs, out)
    print(table(runs))


if __name__ == "__main__":
    main()
