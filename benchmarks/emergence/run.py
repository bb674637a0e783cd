"""The emergence study: does segmentation emerge, with which recipe? Small models trained on synthetic
scenes (fdm_core.scenes), whose masks are scored against the true regions as they train.

    python benchmarks/emergence/run.py --recipe codes-t2 --kind a --minutes 20 --out runs/emergence
    python benchmarks/emergence/run.py report --runs runs/emergence --out benchmarks/emergence
    python benchmarks/emergence/run.py masks runs/emergence/c32-codes-t2 --out benchmarks/emergence/masks_c32.png
    python benchmarks/emergence/run.py readout --runs runs/emergence

train (the default, no subcommand): one recipe on one kind of scenes for a training-time budget. Each
recipe is a set of `fdm-train` options (RECIPES below); the run goes through the `fdm-train` loop itself in
chunks of --eval-every steps (fdm_train.chunks: a resumed run equals an uninterrupted one), and after each
chunk the EMA weights are scored on held-out scenes (fdm_eval.scene_scores.segmentation_scores). The curve
is appended to OUT/<kind code><size>-<recipe>/curve.jsonl; running the command again continues the run.
report: the curves into results.json (beside RESULTS.md), curves_<kind code><size>.png and the Markdown table
(`report.py` is the same command under the name it has always had).
masks: a picture of a run's masks on held-out scenes: per scene the input, the true regions and the argmax
of the model's masks.
readout: how the masks are read, on every run: the noise level t, smoothing, which channels are foreground.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from fdm_core.checkpoint import load_model
from fdm_core.config import preset
from fdm_core.model import build_model
from fdm_core.scenes import KIND_CHOICES, make_scenes, scene_kind
from fdm_eval.metrics import confusion_matrix, parts_scores
from fdm_eval.scene_scores import scene_masks, segmentation_scores, to_model_range
from fdm_infer.foreground import ChannelPresence, foreground_channels
from fdm_infer.segment import DEFAULT_T, smooth_masks
from fdm_train.chunks import train_in_chunks
from fdm_train.options import TrainOptions
from fdm_train.synth import write_scenes

HERE = Path(__file__).resolve().parent
HELD_OUT_SEED = 1000  # the held-out scenes: this seed plus the study's seed; training scenes use seed 0

# name -> (model config overrides, training options), each explicit about region codes and t-power so that
# a change of fdm-train's defaults does not change a recipe. Learning rate and batch are the study's base.
PAPER = ({"region_codes": False}, {"t_power": 1.0})
RECIPES: dict[str, tuple[dict, dict]] = {
    "paper": PAPER,
    "t2": ({"region_codes": False}, {"t_power": 2.0}),
    "codes": ({"region_codes": True}, {"t_power": 1.0}),
    "codes-t2": ({"region_codes": True}, {"t_power": 2.0}),
    "codes-t3": ({"region_codes": True}, {"t_power": 3.0}),
    "codes-t2-scale2": ({"region_codes": True, "mask_downsample": 2}, {"t_power": 2.0}),
    "entropy": (PAPER[0], {**PAPER[1], "mask_entropy": 0.05, "mask_shaping_steps": 1500}),
    "gumbel": (PAPER[0], {**PAPER[1], "hard_masks": True, "mask_shaping_steps": 1500}),
    "temperature": (PAPER[0], {**PAPER[1], "mask_temperature": 0.25, "mask_shaping_steps": 1500}),
    "no-share": ({"variant": "no-share"}, {"t_power": 1.0}),
    "codes-t2-entropy": ({"region_codes": True}, {"t_power": 2.0, "mask_entropy": 0.05, "mask_shaping_steps": 1500}),
    "codes-t2-replicate": ({"region_codes": True, "padding": "replicate"}, {"t_power": 2.0}),
    "codes-t2-shift": ({"region_codes": True}, {"t_power": 2.0, "shift_augment": 0.2}),
    "codes-t2-replicate-shift": ({"region_codes": True, "padding": "replicate"}, {"t_power": 2.0, "shift_augment": 0.2}),
    "codes-t2-scale2-replicate": ({"region_codes": True, "mask_downsample": 2, "padding": "replicate"}, {"t_power": 2.0}),
    "codes-t2-scale4-replicate": ({"region_codes": True, "mask_downsample": 4, "padding": "replicate"}, {"t_power": 2.0}),
    "codes-t2-scale2-replicate-cost": ({"region_codes": True, "mask_downsample": 2, "padding": "replicate"},
                                       {"t_power": 2.0, "region_cost": 0.01}),
    "codes-t2-scale2-replicate-cost-start": ({"region_codes": True, "mask_downsample": 2, "padding": "replicate"},
                                             {"t_power": 2.0, "region_cost": 0.01, "first_region_logit": 2.0}),
    "codes-t2-scale2-replicate-shift": ({"region_codes": True, "mask_downsample": 2, "padding": "replicate"},
                                        {"t_power": 2.0, "shift_augment": 0.2}),
    "codes-t2-equivariance": ({"region_codes": True}, {"t_power": 2.0, "mask_equivariance": 1.0}),
    "paper-equivariance": (PAPER[0], {**PAPER[1], "mask_equivariance": 1.0}),
    "paper-equivariance-0.1": (PAPER[0], {**PAPER[1], "mask_equivariance": 0.1}),
    "codes-t2-equivariance-0.1": ({"region_codes": True}, {"t_power": 2.0, "mask_equivariance": 0.1}),
    "paper-information": (PAPER[0], {**PAPER[1], "mask_equivariance": 0.1, "equivariance_measure": "information"}),
    "codes-t2-information": ({"region_codes": True},
                             {"t_power": 2.0, "mask_equivariance": 0.1, "equivariance_measure": "information"}),
    "codes-t2-scale2-replicate-information": ({"region_codes": True, "mask_downsample": 2, "padding": "replicate"},
                                              {"t_power": 2.0, "mask_equivariance": 0.1,
                                               "equivariance_measure": "information"}),
    "codes-t2-boundary": ({"region_codes": True}, {"t_power": 2.0, "mask_boundary": 0.1}),
    "codes-t2-circular": ({"region_codes": True, "padding": "circular"},
                          {"t_power": 2.0, "shift_augment": 0.2, "shift_edges": "circular"}),
    "t2-mask-mid": ({"region_codes": False, "variant": "mask-mid"}, {"t_power": 2.0}),
}



# ----- train -----

def train_main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, choices=list(RECIPES))
    p.add_argument("--kind", default="ellipse", choices=KIND_CHOICES, help="the scenes: a kind's name or its code")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--preset", default="tiny-32")
    p.add_argument("--minutes", type=float, default=20, help="training time budget (scoring excluded)")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--train-scenes", type=int, default=20_000)
    p.add_argument("--val-scenes", type=int, default=256)
    p.add_argument("--seed", type=int, default=0,
                   help="training seed (weights, noise, batches); the scenes are the same for every seed")
    p.add_argument("--empty", type=float, default=0.0,
                   help="share of training scenes drawn without objects (the held-out scenes all have them)")
    p.add_argument("--channels-last", action="store_true", help="train in NHWC (faster on CPUs; same recipe)")
    p.add_argument("--out", default="runs/emergence")
    a = p.parse_args(argv)

    overrides, options = RECIPES[a.recipe]
    kind = scene_kind(a.kind)
    cfg = preset(a.preset, image_size=a.size, num_regions=kind.regions, **overrides)
    empty = f"-empty{a.empty:g}" if a.empty else ""
    run = Path(a.out) / (f"{kind.code}{a.size}-{a.recipe}{empty}" + (f"-seed{a.seed}" if a.seed else ""))
    data = Path(a.out) / f"scenes-{kind.code}{a.size}{empty}.npy"
    if not data.exists():
        write_scenes(data, kind, a.train_scenes, a.size, seed=0, empty=a.empty)
    val_images, val_labels = make_scenes(kind, a.val_scenes, a.size, seed=HELD_OUT_SEED)
    val_empty, _ = make_scenes(kind, a.val_scenes, a.size, seed=HELD_OUT_SEED, empty=1.0)
    curve_path = run / "curve.jsonl"
    trained, step = 0.0, 0
    if curve_path.exists():  # continue a run: the curve knows its time and steps so far
        last = json.loads(curve_path.read_text().splitlines()[-1])
        trained, step = last["train_seconds"], last["step"]
    recipe = {"recipe": a.recipe, "kind": kind.code, "size": a.size, "preset": a.preset, "config": overrides,
              "options": options, "empty": a.empty, "batch_size": a.batch_size, "lr": a.lr, "ema_decay": a.ema_decay,
              "seed": a.seed, "threads": torch.get_num_threads()}
    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    model = build_model(cfg)
    budget = {"trained": trained}

    def score_chunk(chunk) -> None:
        budget["trained"] += chunk.seconds
        model.load_state_dict(chunk.summary["weights"]["ema"])
        figures = segmentation_scores(model, val_images, val_labels, empty=val_empty)
        record = {"step": chunk.step, "images": chunk.step * a.batch_size, "train_seconds": round(budget["trained"], 1),
                  "loss": round(chunk.summary["loss"], 5), **figures}
        with curve_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps({"run": run.name, **record}), flush=True)

    train_in_chunks(
        TrainOptions(data=str(data), out=str(run), model=cfg, batch_size=a.batch_size, lr=a.lr,
                     ema_decay=a.ema_decay, seed=a.seed, save_every=a.eval_every, sample_every=0, log_every=50,
                     resume="auto", progress=False, workers=0, channels_last=a.channels_last, **options),
        last_step=a.max_steps, every=a.eval_every, step=step, count_after=False,
        time_left=lambda: a.minutes * 60 - budget["trained"], after_chunk=score_chunk)


# ----- report -----

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


def report_main(argv=None) -> None:
    p = argparse.ArgumentParser(description="The study's curves (RUNS/<kind code><size>-<recipe>/curve.jsonl) "
                                "into results.json, curves_<kind code><size>.png and the Markdown table. Runs "
                                "already in OUT/results.json and absent from RUNS are kept (a run folder need not "
                                "outlive its machine); a run in RUNS replaces the stored one of the same name.")
    p.add_argument("--runs", default="runs/emergence")
    p.add_argument("--out", default=str(HERE))
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


# ----- masks -----

COLORS = np.array([[40, 40, 40], [230, 160, 40], [60, 150, 230], [200, 60, 160], [90, 200, 90]], np.uint8)


def masks_main(argv=None) -> None:
    from PIL import Image

    p = argparse.ArgumentParser(description="A picture of a run's masks on held-out scenes: per scene the input, "
                                "the true regions and the argmax of the model's masks (EMA weights, read as "
                                "`fdm-infer segment --smooth 1` reads them).")
    p.add_argument("run", type=Path, help="A run folder of `run.py` (holds recipe.json and checkpoint.safetensors).")
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="The study's seed (held-out scenes use it plus 1000).")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    recipe = json.loads((a.run / "recipe.json").read_text())
    images, labels = make_scenes(recipe["kind"], a.scenes, recipe["size"], seed=a.seed + HELD_OUT_SEED)
    model = load_model(a.run / "checkpoint.safetensors")[0]
    predicted = scene_masks(model, to_model_range(images)).argmax(1).numpy()
    rows = [np.concatenate([images[i].transpose(1, 2, 0), COLORS[labels[i]], COLORS[predicted[i]]], axis=1)
            for i in range(a.scenes)]
    picture = np.concatenate(rows, axis=0).repeat(3, 0).repeat(3, 1)
    Image.fromarray(picture).save(a.out)
    print(f"-> {a.out}")


# ----- readout -----

READOUTS = ((30, 1), (30, 3), (30, 5), (60, 1), (60, 3), (100, 1))  # (t, smoothing window)


def region_scores(masks: torch.Tensor, truth: np.ndarray) -> tuple[float, float]:
    k = masks.shape[1]
    conf = sum(confusion_matrix(p, g, k, k) for p, g in zip(masks.argmax(1).numpy(), truth))
    r = parts_scores(conf)
    return float(np.mean(r["iou_per_label"][1:])), r["miou"]


def foreground_iou(labels: np.ndarray, truth: np.ndarray, channels: list[int]) -> float:
    pred, gt = np.isin(labels, channels), truth > 0
    inter, union = (pred & gt).sum((1, 2)), (pred | gt).sum((1, 2))
    return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))


def readout_main(argv=None) -> None:
    p = argparse.ArgumentParser(description="How the masks are read, on the study's runs (RUNS/*/checkpoint."
                                "safetensors, EMA weights, held-out scenes): object IoU / mIoU per noise level "
                                "t and smoothing window, and the foreground IoU of the channels picked by the "
                                "rule of fdm_infer.foreground and by the earlier rule (only the channel most on "
                                "the border is background).")
    p.add_argument("--runs", default="runs/emergence")
    p.add_argument("--val-scenes", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="the study's seed (held-out scenes: it plus 1000)")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    runs = sorted(Path(a.runs).glob("*/checkpoint.safetensors"))
    readout_rows, rule_rows = [], []
    for run in runs:
        name = run.parent.name
        kind, size = name[0], int(name[1:].split("-")[0])
        model = load_model(run)[0]
        images, truth = make_scenes(kind, a.val_scenes, size, seed=a.seed + HELD_OUT_SEED)
        x = to_model_range(images)
        by_t = {t: scene_masks(model, x, t=t) for t in sorted({t for t, _ in READOUTS})}
        cells = [region_scores(smooth_masks(by_t[t], s), truth) for t, s in READOUTS]
        readout_rows.append(f"| {name} | " + " | ".join(f"{o:.3f} / {m:.3f}" for o, m in cells) + " |")
        masks = by_t[DEFAULT_T]
        presence = ChannelPresence(masks.shape[1])
        presence.add_masks(masks)
        labels = masks.argmax(1).numpy()
        old, new = foreground_channels(presence.border), presence.foreground()
        shares = [" / ".join(f"{v:.3f}" for v in s) for s in (presence.border_share, presence.image_share)]
        rule_rows.append(f"| {name} | {shares[0]} | {shares[1]} | {'+'.join(map(str, old))}: "
                         f"{foreground_iou(labels, truth, old):.3f} | {'+'.join(map(str, new))}: "
                         f"{foreground_iou(labels, truth, new):.3f} |")
        print(f"scored {name}", file=sys.stderr, flush=True)
    print("Object IoU / mIoU per read-out (t, smoothing window):\n")
    print("| run | " + " | ".join(f"t={t}, {s}x{s}" for t, s in READOUTS) + " |")
    print("|---|" + "---|" * len(READOUTS))
    print("\n".join(readout_rows))
    print(f"\nForeground channels without labels (t={DEFAULT_T}, not smoothed):\n")
    print("| run | border shares | image shares | border-most rule: channels: FG IoU | rule now: channels: FG IoU |")
    print("|---|---|---|---|---|")
    print("\n".join(rule_rows))


COMMANDS = {"report": report_main, "masks": masks_main, "readout": readout_main}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
    else:
        train_main(argv)


if __name__ == "__main__":
    main()
