#!/usr/bin/env python3
"""onnxruntime's spinning threads beside a training run: the onnx engine segmenting in a loop while
`fdm-train`'s training step runs in another process (both with 2 threads, OMP_WAIT_POLICY=PASSIVE as
fdm sets it), once with onnxruntime's default (its intra-op threads spin while they wait) and once with
`session.intra_op.allow_spinning=0` (what the onnx engine sets when OpenMP's threads are passive).

    python benchmarks/onnx_spinning.py [--seconds 60] [--out benchmarks/results]

Run it on an otherwise quiet machine. Writes onnx_spinning.md and .json: the segmentation batches/s of
the onnx loop and the training images/s (tiny-32, batch 32, the measurement of benchmarks/threads.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN = {"train_warmup": 3, "train_steps": 24, "train_batch": 32}


def onnx_loop(seconds: float, spin: bool) -> None:
    """Segments a batch of 16 random images with the onnx engine for `seconds`; prints batches/s."""
    import tempfile

    import onnxruntime as ort
    import torch

    from fdm_core.config import preset
    from fdm_infer.engines.onnx_engine import OnnxEngine, onnx_model_bytes
    from fdm_infer.measure import random_model
    from fdm_infer.segment import segment_tensor

    if spin:  # onnxruntime's own default: keep the engine from turning spinning off
        ort.SessionOptions.add_session_config_entry = lambda self, key, value: None
    cfg = preset("tiny-32")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        path.write_bytes(onnx_model_bytes(random_model(cfg)))
        engine = OnnxEngine(path, device="cpu", threads=2)
    images = torch.rand(16, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    segment_tensor(engine, images)
    print("ready", flush=True)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        segment_tensor(engine, images)
        count += 1
    print(json.dumps({"batches_per_s": count / (time.perf_counter() - start)}), flush=True)


def measure(spin: bool, seconds: float) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    loop = subprocess.Popen([sys.executable, __file__, "--loop", str(seconds)] + (["--spin"] if spin else []),
                            stdout=subprocess.PIPE, text=True, env=env)
    if loop.stdout.readline().strip() != "ready":
        loop.kill()
        raise SystemExit("onnx_spinning.py: the onnx loop did not start")
    train = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "threads.py"), "--worker", "train",
                            "--threads", "2", "--settings", json.dumps(TRAIN)], capture_output=True, text=True,
                           env=env, check=True)
    onnx = json.loads(loop.communicate()[0].strip().splitlines()[-1])
    return {"spin": spin, "onnx_batches_per_s": onnx["batches_per_s"],
            "train_images_per_s": json.loads(train.stdout.strip().splitlines()[-1])["value"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="how long the onnx loop runs (the training "
                   "measurement must end within it)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--loop", type=float, help=argparse.SUPPRESS)
    p.add_argument("--spin", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.loop is not None:
        onnx_loop(a.loop, a.spin)
        return
    from fdm_infer.measure import cpu_name

    rows = [measure(spin, a.seconds) for spin in (True, False)]
    lines = ["# onnxruntime's spinning threads beside a training run", "",
             (f"Machine: {cpu_name()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}. The onnx engine segments "
              "batches of 16 random 32x32 images (tiny-32, 2 intra-op threads) in a loop while a tiny-32 training "
              "step (batch 32, 2 threads) is timed in another process; both with OMP_WAIT_POLICY=PASSIVE."), "",
             "| onnxruntime threads | onnx segmentation | training beside it |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {'spin (onnxruntime default)' if r['spin'] else 'do not spin (allow_spinning=0)'} | "
                     f"{r['onnx_batches_per_s']:.2f} batches/s | {r['train_images_per_s']:.1f} images/s |")
    text = "\n".join(lines) + "\n"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx_spinning.md").write_text(text)
    (out / "onnx_spinning.json").write_text(json.dumps({"seconds": a.seconds, "rows": rows}, indent=1) + "\n")
    print(text + f"-> {out / 'onnx_spinning.md'}")


if __name__ == "__main__":
    main()
