"""The emergence study: train one recipe on synthetic scenes for a fixed CPU budget, scoring the masks
against the true regions as it goes.

    python benchmarks/emergence/run.py --recipe codes-t2 --kind a --minutes 20 --out runs/emergence

Each recipe is a set of `fdm-train` options (RECIPES below); the run goes through `fdm_train.train`
itself, in chunks of --eval-every steps (a resumed run equals an uninterrupted one), and after each
chunk the EMA weights are scored on held-out scenes (benchmarks/emergence/score.py). The curve is
appended to OUT/<kind>-<recipe>/curve.jsonl; `report.py` turns the curves into RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import score  # noqa: E402

from fdm_core.config import preset  # noqa: E402
from fdm_core.model import build_model  # noqa: E402
from fdm_train.options import TrainOptions
from fdm_train.synth import KINDS, make_scenes, write_scenes  # noqa: E402
from fdm_train.train import train  # noqa: E402

# name -> (model config overrides, training options), each explicit about region codes and t-power so that
# a change of fdm-train's defaults does not change a recipe. Learning rate and batch are the study's base.
PAPER = ({"region_codes": False}, {"t_power": 1.0})
RECIPES: dict[str, tuple[dict, dict]] = {
    "paper": PAPER,
    "t2": ({"region_codes": False}, {"t_power": 2.0}),
    "codes": ({"region_codes": True}, {"t_power": 1.0}),
    "codes-t2": ({"region_codes": True}, {"t_power": 2.0}),
    "codes-t3": ({"region_codes": True}, {"t_power": 3.0}),
    "codes-t2-scale2": ({"region_codes": True, "mask_scale": 2}, {"t_power": 2.0}),
    "entropy": (PAPER[0], {**PAPER[1], "mask_entropy": 0.05, "mask_shaping_steps": 1500}),
    "gumbel": (PAPER[0], {**PAPER[1], "hard_masks": True, "mask_shaping_steps": 1500}),
    "temperature": (PAPER[0], {**PAPER[1], "mask_temperature": 0.25, "mask_shaping_steps": 1500}),
    "no-share": ({"variant": "no-share"}, {"t_power": 1.0}),
    "codes-t2-entropy": ({"region_codes": True}, {"t_power": 2.0, "mask_entropy": 0.05, "mask_shaping_steps": 1500}),
    "codes-t2-replicate": ({"region_codes": True, "padding": "replicate"}, {"t_power": 2.0}),
    "codes-t2-shift": ({"region_codes": True}, {"t_power": 2.0, "shift_augment": 0.2}),
    "codes-t2-replicate-shift": ({"region_codes": True, "padding": "replicate"}, {"t_power": 2.0, "shift_augment": 0.2}),
    "codes-t2-scale2-replicate": ({"region_codes": True, "mask_scale": 2, "padding": "replicate"}, {"t_power": 2.0}),
    "codes-t2-scale4-replicate": ({"region_codes": True, "mask_scale": 4, "padding": "replicate"}, {"t_power": 2.0}),
    "codes-t2-scale2-replicate-cost": ({"region_codes": True, "mask_scale": 2, "padding": "replicate"},
                                       {"t_power": 2.0, "region_cost": 0.01}),
    "codes-t2-scale2-replicate-cost-start": ({"region_codes": True, "mask_scale": 2, "padding": "replicate"},
                                             {"t_power": 2.0, "region_cost": 0.01, "first_region_logit": 2.0}),
    "codes-t2-scale2-replicate-shift": ({"region_codes": True, "mask_scale": 2, "padding": "replicate"},
                                        {"t_power": 2.0, "shift_augment": 0.2}),
    "codes-t2-equivariance": ({"region_codes": True}, {"t_power": 2.0, "mask_equivariance": 1.0}),
    "paper-equivariance": (PAPER[0], {**PAPER[1], "mask_equivariance": 1.0}),
    "paper-equivariance-0.1": (PAPER[0], {**PAPER[1], "mask_equivariance": 0.1}),
    "codes-t2-equivariance-0.1": ({"region_codes": True}, {"t_power": 2.0, "mask_equivariance": 0.1}),
    "paper-information": (PAPER[0], {**PAPER[1], "mask_equivariance": 0.1, "equivariance_measure": "information"}),
    "codes-t2-information": ({"region_codes": True},
                             {"t_power": 2.0, "mask_equivariance": 0.1, "equivariance_measure": "information"}),
    "codes-t2-boundary": ({"region_codes": True}, {"t_power": 2.0, "mask_boundary": 0.1}),
    "codes-t2-circular": ({"region_codes": True, "padding": "circular"},
                          {"t_power": 2.0, "shift_augment": 0.2, "shift_edges": "circular"}),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, choices=list(RECIPES))
    p.add_argument("--kind", default="a", choices=list(KINDS))
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--preset", default="tiny-32")
    p.add_argument("--minutes", type=float, default=20, help="training wall-clock budget (scoring excluded)")
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
    regions = KINDS[a.kind]
    cfg = preset(a.preset, image_size=a.size, num_regions=regions, **overrides)
    empty = f"-empty{a.empty:g}" if a.empty else ""
    run = Path(a.out) / (f"{a.kind}{a.size}-{a.recipe}{empty}" + (f"-seed{a.seed}" if a.seed else ""))
    data = Path(a.out) / f"scenes-{a.kind}{a.size}{empty}.npy"
    if not data.exists():
        write_scenes(data, a.kind, a.train_scenes, a.size, seed=0, empty=a.empty)
    val_images, val_labels = make_scenes(a.kind, a.val_scenes, a.size, seed=1000)
    val_empty, _ = make_scenes(a.kind, a.val_scenes, a.size, seed=1000, empty=1.0)
    curve_path = run / "curve.jsonl"
    trained = 0.0
    step = 0
    if curve_path.exists():  # continue a run: the curve knows its time and steps so far
        last = json.loads(curve_path.read_text().splitlines()[-1])
        trained, step = last["train_seconds"], last["step"]
    recipe = {"recipe": a.recipe, "kind": a.kind, "size": a.size, "preset": a.preset, "config": overrides,
              "options": options, "empty": a.empty, "batch_size": a.batch_size, "lr": a.lr, "ema_decay": a.ema_decay,
              "seed": a.seed, "threads": torch.get_num_threads()}
    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    model = build_model(cfg)
    while trained < a.minutes * 60 and step < a.max_steps:
        step += a.eval_every
        start = time.perf_counter()
        summary = train(TrainOptions(
            data=str(data), out=str(run), model=cfg, batch_size=a.batch_size, iterations=step, lr=a.lr,
            ema_decay=a.ema_decay, seed=a.seed, save_every=a.eval_every, sample_every=0, log_every=50,
            resume="auto", progress=False, workers=0, channels_last=a.channels_last, **options))
        trained += time.perf_counter() - start
        model.load_state_dict(summary["weights"]["ema"])
        figures = score(model, val_images, val_labels, empty=val_empty)
        record = {"step": step, "images": step * a.batch_size, "train_seconds": round(trained, 1),
                  "loss": round(summary["loss"], 5), **figures}
        with curve_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps({"run": run.name, **record}), flush=True)


if __name__ == "__main__":
    main()
