#!/usr/bin/env python3
"""LFW val segmentation: the bundled model (`default`: the README's table) and the baselines of the paper's
comparisons (`baselines`), scored by the evaluator of `fdm-infer evaluate`. Results beside this file:
default.md / .json and baselines.md / .json.

    python benchmarks/lfw/run.py default
    python benchmarks/lfw/run.py baselines [--plain-checkpoint plain_ema_bf16.safetensors] [--only kmeans-ddpm]

default: `fdm-infer evaluate` of the bundled model on all of LFW val (a few minutes on 2 cores).
baselines:

  rectangle     GrabCut's initial centered rectangle (10% margins) alone: the floor GrabCut starts from
  grabcut       OpenCV GrabCut from that rectangle, 5 iterations (CPU)
  kmeans-ddpm   K-means (K=3) on a plain DDPM's decoder features (t = 50, 150, 250): needs a trained plain
                U-Net checkpoint (--plain-checkpoint; from benchmarks/lfw_gpu), else recorded as pending

baselines writes baselines.json (every figure, the confusion matrices, timings) and baselines.md (the table
and how to read it). The label maps go to --work (default runs/lfw_baselines/<method>).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from fdm_eval.baselines import run_grabcut, run_kmeans_ddpm
from fdm_eval.evaluate import describe_result, evaluate, load_eval_set, markdown_table, summary_figures
from fdm_eval.shared_data import LFW_VAL
from fdm_eval.subcommands import run_subcommand

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
METHODS = ("rectangle", "grabcut", "kmeans-ddpm")
NAMES = {"rectangle": "centered rectangle (10% margins)", "grabcut": "GrabCut (OpenCV, rectangle 10% margins, 5 it.)",
         "kmeans-ddpm": "K-means-DDPM (K=3, plain DDPM decoder features, t=50/150/250)"}


def default_main(argv=None) -> None:
    p = argparse.ArgumentParser(description="The bundled model on LFW val, as the README's table reports it.")
    p.add_argument("--out", default=str(HERE / "default.json"))
    a = p.parse_args(argv)
    subprocess.run([sys.executable, "-m", "fdm_infer.cli", "evaluate", str(LFW_VAL / "images"), "--masks",
                    str(LFW_VAL / "masks"), "--name", "default", "-o", a.out], check=True)


def baselines_main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(LFW_VAL / "images"))
    parser.add_argument("--masks", default=str(LFW_VAL / "masks"))
    parser.add_argument("--plain-checkpoint", default=None, help="a plain U-Net DDPM for kmeans-ddpm")
    parser.add_argument("--only", choices=METHODS, action="append", help="run these methods only (repeatable); "
                        "the others keep their recorded results")
    parser.add_argument("--work", default=str(ROOT / "runs" / "lfw_baselines"))
    parser.add_argument("--out", default=str(HERE / "baselines"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    out_json = Path(args.out).with_suffix(".json")
    record = json.loads(out_json.read_text()) if out_json.is_file() else {}
    evalset = load_eval_set(args.images, args.masks)
    for method in args.only or METHODS:
        folder = Path(args.work) / method
        t0 = time.perf_counter()
        if method == "kmeans-ddpm":
            if not args.plain_checkpoint:
                record.setdefault(method.replace("-", "_"), {"status": "pending: needs a trained plain U-Net DDPM "
                                                             "(benchmarks/lfw_gpu, plain_ema_bf16.safetensors)"})
                print("kmeans-ddpm: pending (no --plain-checkpoint)")
                continue
            report = run_kmeans_ddpm(args.plain_checkpoint, [args.images], folder, device=args.device)
        else:
            report = run_grabcut([args.images], folder, rectangle_only=method == "rectangle")
        seconds = time.perf_counter() - t0
        result = evaluate(evalset, predictions=folder, name=NAMES[method])
        result["method"] = {**report.info, "seconds": round(seconds, 1), "images_per_s": round(report.written / seconds, 1),
                            "machine": f"{platform.machine()} CPU" if args.device in ("auto", "cpu") else args.device}
        record[method.replace("-", "_")] = {"compact": summary_figures(result), "result": result}
        print(describe_result(result))
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(record, indent=1) + "\n")
    rows = [r["result"] for r in record.values() if "result" in r]
    table = markdown_table(rows)
    pending = [k for k, r in record.items() if "result" not in r]
    timing = "; ".join(f"{r['result']['method']['method']} {r['result']['method']['images_per_s']} images/s"
                       for r in record.values() if "result" in r)
    bg = sum(float((m == 0).sum()) for m in evalset.masks) / sum(m.size for m in evalset.masks)
    Path(args.out).with_suffix(".md").write_text(REPORT.format(
        n=len(evalset), table=table, timing=timing, bg=100 * bg, bg_miou=100 * bg / evalset.num_labels,
        pending="".join(f"\n  * `{k}`: {record[k]['status']}" for k in pending) or " none"))
    print(table)


REPORT = """# LFW baselines

LFW val, {n} images (../shared/data/lfw/val; 128x128 images and masks: 0 background, 1 skin, 2 hair), scored by
`fdm-infer evaluate --predictions` (fdm_eval/evaluate.py, fdm_eval/metrics.py). Written by
`python benchmarks/lfw/run.py baselines`; every figure, confusion matrix and timing is in baselines.json.

{table}
* Figures in percent. Foreground = skin + hair (as ReDO scores LFW); FG Acc / IoU / DICE are means over images,
  the foreground channels chosen without labels (the background is the channel most present on the image
  border over the set). "best-of-inverse" is the ReDO / IEM figure: per image and per metric, the better of the
  mask and its inverse (it looks at the labels).
* Parts: pixel accuracy and mIoU over {{background, skin, hair}} after Hungarian matching of the predicted
  channels to the labels on the confusion matrix of the whole set. A 2-label method (GrabCut, the rectangle)
  can match only 2 of the 3 labels: hair gets IoU 0 and its pixels count as wrong, which caps its parts mIoU;
  that is the protocol, not a bug.
* Floor: background everywhere scores FG Acc {bg:.1f} / IoU 0 / DICE 0 and parts Acc {bg:.1f} / mIoU {bg_miou:.1f}
  (background is {bg:.1f}% of the pixels); a model's masks must beat that to carry anything.
* The label maps are at 128x128 (the images' resolution), so no resizing takes place.
* Speed: {timing} (this project's 2-core CPU machine, shared).
* Pending:{pending}
"""


COMMANDS = {"default": default_main, "baselines": baselines_main}


def main(argv=None) -> None:
    run_subcommand(COMMANDS, __doc__, argv)


if __name__ == "__main__":
    main()
