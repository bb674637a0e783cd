"""CPU threads: training and sampling speed with 1 and 2 torch threads, on an idle machine and beside a
competing CPU-bound process, to choose the default of `--threads` (DEFAULT_THREADS in fdm_core/settings.py);
and onnxruntime's spinning threads beside a training run (`onnx-spinning`).

    python benchmarks/threads/run.py                  # writes threads.md and threads.json beside this file
    python benchmarks/threads/run.py --quick          # a rehearsal (a few minutes; its figures mean nothing)
    python benchmarks/threads/run.py onnx-spinning    # writes onnx_spinning.md and .json beside this file

Run it on an otherwise quiet machine: "idle" means nothing else runs. Each measurement is a fresh process
(`--worker`) with OMP_NUM_THREADS and torch.set_num_threads at the thread count:
* train: the tiny-32 preset (K=3, the default recipe), batch 32: forward, backward and Adam on fixed random
  images; images/s over the timed steps after the warm-up steps;
* sample: a DDIM run of a few steps on a small batch (random tiny-32 weights, the torch engine as
  `fdm-infer generate` uses it); seconds per run, the median of the repeats;
* onnx: segmentation of one batch with the onnx engine (onnxruntime, random tiny-32 weights exported
  in the process, what `fdm-infer segment --model X.onnx` runs per batch); seconds per batch, the median
  of the repeats. Its threads are onnxruntime's own: with OMP_WAIT_POLICY=PASSIVE the engine tells them
  not to spin (`session.intra_op.allow_spinning=0`), otherwise they keep onnxruntime's default.
"Contended": the script first starts a competitor, another python process doing float32 matrix
products on 2 threads without pause (what a second training run does to the cores), and stops it after
the measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = {"train_warmup": 3, "train_steps": 24, "train_batch": 32, "sample_images": 8, "sample_steps": 20,
        "sample_repeats": 3, "onnx_batch": 16, "onnx_repeats": 15}
QUICK = {"train_warmup": 1, "train_steps": 2, "train_batch": 4, "sample_images": 2, "sample_steps": 2,
         "sample_repeats": 1, "onnx_batch": 2, "onnx_repeats": 2}
TASKS = ("train", "sample", "onnx")
UNITS = {"train": "images/s", "sample": "s", "onnx": "s"}
COMPETITOR = """
import sys, torch
torch.set_num_threads(2)
a = torch.randn(1024, 1024)
print("ready", flush=True)
while True:
    a = (a @ a).clamp_(-1, 1)
"""


# ----- the measurements, each in its own process -----

def measure_train(settings: dict) -> float:
    """images/s of training steps of tiny-32 (fixed random images, the default recipe)."""
    import torch

    from fdm_core.config import preset
    from fdm_core.diffusion import GaussianDiffusion
    from fdm_core.model import build_model

    torch.manual_seed(0)
    cfg = preset("tiny-32")
    model = build_model(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    diffusion = GaussianDiffusion()
    batch = settings["train_batch"]
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    t = diffusion.sample_timesteps(batch, generator=g, power=2.0)
    noise = torch.randn(x0.shape, generator=g)

    def step():
        loss, _ = diffusion.loss(model, x0, t, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(settings["train_warmup"]):
        step()
    start = time.perf_counter()
    for _ in range(settings["train_steps"]):
        step()
    return settings["train_steps"] * batch / (time.perf_counter() - start)


def measure_sample(settings: dict) -> float:
    """Seconds of one DDIM run (median of the repeats, after one untimed run)."""
    from fdm_core.config import preset
    from fdm_eval.measure import random_model
    from fdm_infer.engines.torch_engine import TorchEngine
    from fdm_infer.sampling import generate

    engine = TorchEngine.from_model(random_model(preset("tiny-32")), device="cpu")

    def run():
        generate(engine, settings["sample_images"], steps=settings["sample_steps"], sampler="ddim", seed=0,
                 batch_size=settings["sample_images"])

    run()
    times = []
    for _ in range(settings["sample_repeats"]):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_onnx(settings: dict, threads: int) -> float:
    """Seconds per batch segmented by the onnx engine (median of the repeats, after one untimed batch)."""
    import torch

    from fdm_core.config import preset
    from fdm_eval.measure import random_model
    from fdm_infer.engines.onnx_engine import OnnxEngine
    from fdm_infer.segment import segment_tensor

    cfg = preset("tiny-32")
    engine = OnnxEngine.from_model(random_model(cfg), device="cpu", threads=threads)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(settings["onnx_batch"], 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    segment_tensor(engine, images)
    times = []
    for _ in range(settings["onnx_repeats"]):
        start = time.perf_counter()
        segment_tensor(engine, images)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(task: str, threads: int, settings: dict) -> None:
    # Read before anything imports fdm_train, which would set its own default; torch (imported first) has
    # read it by then.
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    import torch

    torch.set_num_threads(threads)
    value = {"train": measure_train, "sample": measure_sample,
             "onnx": lambda s: measure_onnx(s, threads)}[task](settings)
    print(json.dumps({"task": task, "threads": torch.get_num_threads(),
                      "wait_policy": policy, "value": value}))


# ----- the driver -----

def run_worker(task: str, threads: int, policy: str, settings: dict) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY=policy)
    if policy == "default":  # the OpenMP runtime's own: threads spin a while before they sleep
        del env["OMP_WAIT_POLICY"]
    proc = subprocess.run([sys.executable, __file__, "--worker", task, "--threads", str(threads),
                           "--settings", json.dumps(settings)], capture_output=True, text=True, env=env,
                          timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"threads: the {task} measurement with {threads} thread(s) failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if (result["threads"], result["wait_policy"]) != (threads, policy):
        raise SystemExit(f"threads: asked for {threads} thread(s) with wait policy {policy}, the process had "
                         f"{result['threads']} with {result['wait_policy']}")
    return result["value"]


def start_competitor() -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.Popen([sys.executable, "-c", COMPETITOR], stdout=subprocess.PIPE, text=True, env=env)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise SystemExit("threads: the competing process did not start")
    return proc


def configurations(thread_counts: list[int], policies: list[str]) -> list[tuple[int, str]]:
    """(threads, OMP_WAIT_POLICY) pairs; the wait policy only matters with more than one thread."""
    return [(n, policy) for n in thread_counts for policy in (policies if n > 1 else ["default"])]


def measure_all(settings: dict, configs: list[tuple[int, str]], tasks, log) -> list[dict]:
    rows = []
    for condition in ("idle", "contended"):
        competitor = start_competitor() if condition == "contended" else None
        try:
            for task in tasks:
                for threads, policy in configs:
                    value = run_worker(task, threads, policy, settings)
                    rows.append({"task": task, "condition": condition, "threads": threads, "wait_policy": policy,
                                 "value": value})
                    log(f"{task:6s} {condition:9s} {threads} thread(s), wait policy {policy}: "
                        + (f"{value:.1f} images/s" if task == "train" else f"{value:.3f} s per run"))
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
    return rows


def markdown(result: dict) -> str:
    s, env = result["settings"], result["environment"]
    tasks = [t for t in TASKS if any(r["task"] == t for r in result["rows"])]
    lines = [f"# CPU threads: {', '.join(tasks)} with {', '.join(map(str, result['threads']))} threads",
             "", f"Machine: {env['cpu']}, {env['cores']} cores, torch {env['torch']}, Python {env['python']}; "
             f"load average before the run {env['load_before']:.2f}." + (" QUICK REHEARSAL: the figures mean nothing."
                                                                           if result["quick"] else ""), "",
             f"* train: tiny-32, batch {s['train_batch']}, {s['train_steps']} timed steps after {s['train_warmup']} "
             "warm-up steps: images/s (higher is better);",
             f"* sample: DDIM, {s['sample_steps']} steps, {s['sample_images']} images, median of "
             f"{s['sample_repeats']} runs: seconds per run (lower is better);",
             f"* onnx: the onnx engine segmenting {s.get('onnx_batch', 16)} images, median of "
             f"{s.get('onnx_repeats', 15)} batches: seconds per batch (lower is better); with wait policy PASSIVE "
             "its threads do not spin (`session.intra_op.allow_spinning=0`);",
             "* contended: beside another process doing float32 matmuls on 2 threads;",
             "* wait policy: OMP_WAIT_POLICY of the measured process (default: unset, the OpenMP runtime's own).",
             "", "| task | threads | wait policy | idle | contended | contended vs idle |", "|---|---|---|---|---|---|"]
    by_key = {(r["task"], r["condition"], r["threads"], r["wait_policy"]): r["value"] for r in result["rows"]}
    for task in tasks:
        unit = UNITS[task]
        for threads, policy in result["configurations"]:
            idle, busy = by_key[(task, "idle", threads, policy)], by_key[(task, "contended", threads, policy)]
            slowdown = idle / busy if task == "train" else busy / idle
            digits = 3 if unit == "s" and idle < 1 else 2
            lines.append(f"| {task} | {threads} | {policy} | {idle:.{digits}f} {unit} | {busy:.{digits}f} {unit} | "
                         f"{slowdown:.1f}x slower |")
    if len({r.get("measured") for r in result["rows"]}) > 1:
        lines += ["", "Measured in separate runs of this script (each on a quiet machine): "
                  + "; ".join(f"{t} {', '.join(sorted({r.get('measured', 'an earlier run') for r in result['rows'] if r['task'] == t}))}"
                              for t in tasks) + "."]
    return "\n".join(lines) + "\n"


def threads_main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Tiny settings: checks that the script runs.")
    p.add_argument("--out", default=None,
                   help="Output folder for threads.md and threads.json [default: this study's folder; with --quick, "
                        "a folder in the system's temporary directory, so that a rehearsal is never committed].")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="Thread counts to compare.")
    p.add_argument("--wait-policies", nargs="+", default=["default", "PASSIVE"],
                   help="OMP_WAIT_POLICY values to compare for more than one thread (default = unset).")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS),
                   help="What to measure; the rows of other tasks already in --out/threads.json are kept.")
    p.add_argument("--worker", choices=TASKS, help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker, a.threads[0], json.loads(a.settings))
        return
    import torch

    from fdm_eval.measure import cpu_name

    settings = QUICK if a.quick else FULL
    env = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
           "load_before": os.getloadavg()[0]}
    configs = configurations(a.threads, a.wait_policies)
    default_out = Path(tempfile.gettempdir()) / "fdm-threads-quick" if a.quick else HERE
    out = Path(a.out) if a.out else default_out
    rows = measure_all(settings, configs, a.tasks, lambda line: print(line, flush=True))
    measured = time.strftime("%Y-%m-%d")
    rows = [{**r, "measured": measured} for r in rows]
    previous = out / "threads.json"
    if previous.exists():
        old = json.loads(previous.read_text())
        if old.get("quick") == a.quick and old.get("configurations") == [list(c) for c in configs]:
            rows = [r for r in old["rows"] if r["task"] not in a.tasks] + rows
            settings = {**old["settings"], **{k: v for k, v in settings.items() if k.split("_")[0] in a.tasks}}
    result = {"quick": a.quick, "settings": settings, "threads": a.threads, "configurations": configs,
              "environment": env, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "threads.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "threads.md").write_text(markdown(result))
    print(markdown(result))
    print(f"-> {out / 'threads.md'}, {out / 'threads.json'}")


# ----- onnx-spinning -----

SPINNING = """"""
SPINNING_TRAIN = {"train_warmup": 3, "train_steps": 24, "train_batch": 32}


def onnx_loop(seconds: float, spin: bool) -> None:
    """Segments a batch of 16 random images with the onnx engine for `seconds`; prints batches/s."""
    import onnxruntime as ort
    import torch

    from fdm_core.config import preset
    from fdm_eval.measure import random_model
    from fdm_infer.engines.onnx_engine import OnnxEngine
    from fdm_infer.segment import segment_tensor

    if spin:  # onnxruntime's own default: keep the engine from turning spinning off
        ort.SessionOptions.add_session_config_entry = lambda self, key, value: None
    cfg = preset("tiny-32")
    engine = OnnxEngine.from_model(random_model(cfg), device="cpu", threads=2)
    images = torch.rand(16, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    segment_tensor(engine, images)
    print("ready", flush=True)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        segment_tensor(engine, images)
        count += 1
    print(json.dumps({"batches_per_s": count / (time.perf_counter() - start)}), flush=True)


def measure_spinning(spin: bool, seconds: float) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="2")
    loop = subprocess.Popen([sys.executable, __file__, "onnx-spinning", "--loop", str(seconds)]
                            + (["--spin"] if spin else []), stdout=subprocess.PIPE, text=True, env=env)
    if loop.stdout.readline().strip() != "ready":
        loop.kill()
        raise SystemExit("onnx-spinning: the onnx loop did not start")
    train = subprocess.run([sys.executable, __file__, "--worker", "train", "--threads", "2", "--settings",
                            json.dumps(SPINNING_TRAIN)], capture_output=True, text=True, env=env, check=True)
    onnx = json.loads(loop.communicate()[0].strip().splitlines()[-1])
    return {"spin": spin, "onnx_batches_per_s": onnx["batches_per_s"],
            "train_images_per_s": json.loads(train.stdout.strip().splitlines()[-1])["value"]}


def onnx_spinning_main(argv=None) -> None:
    p = argparse.ArgumentParser(description=SPINNING, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="how long the onnx loop runs (the training "
                   "measurement must end within it)")
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--loop", type=float, help=argparse.SUPPRESS)
    p.add_argument("--spin", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.loop is not None:
        onnx_loop(a.loop, a.spin)
        return
    from fdm_eval.measure import cpu_name

    rows = [measure_spinning(spin, a.seconds) for spin in (True, False)]
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



def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "onnx-spinning":
        onnx_spinning_main(argv[1:])
    else:
        threads_main(argv)


if __name__ == "__main__":
    main()
