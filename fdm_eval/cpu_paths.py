"""The model's paths on the CPU, measured side by side on one machine: torch eager (the reference),
channels_last, torch.compile (inductor), onnxruntime (passive or spinning threads) and onnxruntime int8,
for the segmentation pass (the masks alone) and for a sampling step's model call (eps and masks); the
machine's own fp32 matmul and 3x3 convolution rates beside them; and `fdm-infer segment` end to end.

Every path is checked against torch eager on the same inputs (the share of label pixels that agree, the
largest difference of the soft masks or of eps), then timed in interleaved rounds, so that a load from
other processes falls on all of them alike; a figure is the median of the rounds, a ratio is to torch
eager measured in the same run. `fdm-infer bench --cpu` and benchmarks/cpu/run.py report them."""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fdm_core.diffusion import GaussianDiffusion
from fdm_core.errors import one_line
from fdm_core.model import count_flops
from fdm_core.onnx_format import onnx_model_bytes
from fdm_eval.measure import cpu_name
from fdm_infer.engines.onnx_engine import OnnxEngine
from fdm_infer.engines.torch_engine import TorchEngine
from fdm_infer.segment import DEFAULT_T, segment_tensor

# The timestep of the sampling step measured: the middle of the schedule (its cost does not depend on it).
SAMPLING_T = 500


@dataclass(frozen=True)
class CpuPath:
    key: str
    label: str
    engine: str  # "torch" or "onnx"
    options: dict = field(default_factory=dict)
    compiles: bool = False  # takes minutes to prepare on a small CPU


CPU_PATHS = [
    CpuPath("eager", "torch eager (fp32, NCHW): the reference", "torch", {"channels_last": False, "compile": False}),
    CpuPath("channels_last", "torch channels_last", "torch", {"channels_last": True, "compile": False}),
    CpuPath("compile", "torch.compile (inductor) + channels_last", "torch", {"channels_last": True, "compile": True},
            compiles=True),
    CpuPath("onnx", "onnxruntime (all graph optimizations, passive threads)", "onnx", {"spinning": False}),
    CpuPath("onnx-spinning", "onnxruntime, spinning threads", "onnx", {"spinning": True}),
]
INT8 = "int8"  # onnxruntime's static int8 quantization of the masks graph (`int8_engine`): segmentation only
PATH_KEYS = [*(p.key for p in CPU_PATHS), INT8]


def open_path(path: CpuPath, model, threads: int | None = None):
    """The engine of `path` over a copy of `model` (a path may change its copy's memory format)."""
    model = copy.deepcopy(model).cpu().float().eval()
    if path.engine == "onnx":
        return OnnxEngine.from_model(model, device="cpu", threads=threads, **path.options)
    if path.compiles:
        torch._dynamo.reset()
    return TorchEngine.from_model(model, device="cpu", **path.options)


class WholeForward(TorchEngine):
    """The torch engine as segmentation ran before the masks had their own pass: the whole forward, eps and
    the K decoder branches included, for the masks alone."""

    def masks(self, x_t, t, y=None):
        return self.denoise(x_t, t, y)[1]


# ----- timing -----

def rate(fn: Callable[[], object], work: float, seconds: float) -> float:
    """work / second of fn(), called until `seconds` have passed (at least twice, after one call not timed)."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return work * calls / (time.perf_counter() - start)


def interleaved(fns: dict[str, Callable[[], object]], work: float, seconds: float, rounds: int,
                log: Callable[[str], None] = lambda line: None) -> dict[str, float]:
    """The median over `rounds` of each fn's rate (`rate`), the fns taking turns within every round."""
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            rates[name].append(rate(fn, work, seconds))
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()))
    return {name: statistics.median(values) for name, values in rates.items()}


def machine_rates(seconds: float = 1.0, rounds: int = 3) -> dict:
    """GFLOP/s of this process's torch on the CPU: an fp32 matmul (1024 x 1024) and a 3x3 convolution of
    64 channels on 16 images of 32 x 32 (the faster of NCHW and channels_last): the best of `rounds`, as
    the limit a model's convolutions can approach."""
    g = torch.Generator().manual_seed(0)
    n = 1024
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    x = torch.randn(16, 64, 32, 32, generator=g)
    w = torch.randn(64, 64, 3, 3, generator=g)
    conv_flops = 2 * 16 * 64 * 32 * 32 * 64 * 9
    xl, wl = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        matmul = max(rate(lambda: a @ b, 2 * n ** 3, seconds) for _ in range(rounds))
        conv = max(max(rate(lambda: F.conv2d(x, w, padding=1), conv_flops, seconds),
                       rate(lambda: F.conv2d(xl, wl, padding=1), conv_flops, seconds)) for _ in range(rounds))
    return {"matmul_gflops": matmul / 1e9, "conv_gflops": conv / 1e9, "threads": torch.get_num_threads()}


def environment() -> dict:
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "onnxruntime": ort, "load_average": None if load is None else round(load, 2)}


# ----- inputs -----

def real_inputs(paths: list[Path], size: int) -> torch.Tensor:
    """Images [N, 3, S, S] in [-1, 1], read and resized as `fdm-infer segment` does."""
    from fdm_infer.image_files import model_input, read_image

    return torch.stack([model_input(np.asarray(read_image(p), dtype=np.uint8), size) for p in paths])


def random_inputs(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images [N, 3, S, S] in [-1, 1] (a stand-in where no images are given)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def noised(images: torch.Tensor, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tt = torch.full((images.shape[0],), t, dtype=torch.long)
    return GaussianDiffusion().q_sample(images, tt, torch.randn(images.shape, generator=g))


def _batched(fn, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


# ----- the tables -----

def open_paths(paths: list[CpuPath], model, threads: int | None = None, log=print, batch: int = 16) -> dict:
    """Each path's engine, prepared by a first call of each of its graphs at `batch` (traced, compiled for the
    batch the tables time), or the reason it could not be opened."""
    engines = {}
    x = random_inputs(batch, model.cfg.image_size)
    t = torch.full((batch,), DEFAULT_T, dtype=torch.long)
    for path in paths:
        start = time.perf_counter()
        try:
            engine = open_path(path, model, threads)
            engine.masks(x, t)
            engine.denoise(x, t)
            engines[path.key] = engine
            log(f"{path.label}: ready in {time.perf_counter() - start:.1f} s")
        except Exception as exc:  # noqa: BLE001  (a path that cannot run here is a row of the table)
            engines[path.key] = f"failed: {one_line(exc)}"
            log(f"{path.label}: {engines[path.key]}")
    return engines


def _checked_paths(engines: dict, labels: dict[str, str] | None, batch: int, check) -> tuple[list[dict], dict]:
    """A row per engine (a string instead of an engine: the reason it is absent) and the calls to time:
    check(engine) gives (label agreement, largest difference, the call to time) against the first engine's
    outputs; a path that fails says so in its row and is not timed, the others go on."""
    rows, timed = [], {}
    for name, engine in engines.items():
        row = {"path": name, "label": (labels or {}).get(name, name), "batch": batch}
        if isinstance(engine, str):
            rows.append({**row, "status": engine})
            continue
        try:
            row["label_agreement"], row["max_abs_diff"], timed[name] = check(engine)
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001  (one path failing must not lose the others)
            row["status"] = f"failed: {one_line(exc)}"
        rows.append(row)
    return rows, timed


def segmentation_rows(engines: dict, model, images: torch.Tensor, batch: int, machine: dict, seconds: float = 1.0,
                      rounds: int = 3, log=print, labels: dict[str, str] | None = None) -> list[dict]:
    """Per engine (the first one is the reference, torch eager), the segmentation pass (`Engine.masks` on a
    batch noised to t=30): images/s, its ratio to torch eager, GFLOP/s (the masks' FLOPs) and its share of
    the machine's convolution rate; and, on every image of `images`, the share of label pixels equal to the
    reference's (`segment_tensor`: smoothed, at the model's size) and the largest difference of the soft
    masks."""
    flops = count_flops(model.cfg, masks_only=True)
    x_t = noised(images[:batch], DEFAULT_T)
    tt = torch.full((x_t.shape[0],), DEFAULT_T, dtype=torch.long)
    reference = None

    def check(engine):
        nonlocal reference
        masks = _batched(lambda b: segment_tensor(engine, b), images, batch)
        if reference is None:
            reference = masks
        return ((masks.argmax(1) == reference.argmax(1)).float().mean().item(),
                (masks - reference).abs().max().item(), lambda: engine.masks(x_t, tt))

    rows, timed = _checked_paths(engines, labels, x_t.shape[0], check)
    log(f"segmentation pass, batch {x_t.shape[0]}: {len(timed)} paths in {rounds} rounds")
    _add_speeds(rows, interleaved(timed, x_t.shape[0], seconds, rounds, log), flops, machine)
    return rows


def sampling_rows(engines: dict, model, images: torch.Tensor, batch: int, machine: dict, seconds: float = 1.0,
                  rounds: int = 3, log=print, labels: dict[str, str] | None = None) -> list[dict]:
    """Per engine (the first one the reference), a sampling step's model call (`Engine.denoise`: eps and
    masks, at t=SAMPLING_T): images/s, its ratio to torch eager, GFLOP/s and share of the convolution rate;
    the largest difference of eps from the reference's and the share of mask labels that agree, on the same
    noisy batch."""
    flops = count_flops(model.cfg)
    x_t = noised(images[:batch], SAMPLING_T)
    tt = torch.full((x_t.shape[0],), SAMPLING_T, dtype=torch.long)
    reference = None

    def check(engine):
        nonlocal reference
        eps, masks = engine.denoise(x_t, tt)
        if reference is None:
            reference = eps, masks
        return ((masks.argmax(1) == reference[1].argmax(1)).float().mean().item(),
                (eps - reference[0]).abs().max().item(), lambda: engine.denoise(x_t, tt))

    rows, timed = _checked_paths(engines, labels, x_t.shape[0], check)
    log(f"sampling step, batch {x_t.shape[0]}: {len(timed)} paths in {rounds} rounds")
    _add_speeds(rows, interleaved(timed, x_t.shape[0], seconds, rounds, log), flops, machine)
    return rows


def batch_rows(engine, model, images: torch.Tensor, batches: list[int], machine: dict, seconds: float = 1.0,
               rounds: int = 3, log=print) -> list[dict]:
    """The segmentation pass of one engine at each batch size: images/s and GFLOP/s."""
    flops = count_flops(model.cfg, masks_only=True)
    fns = {}
    for b in batches:
        x = noised(images.repeat(-(-b // images.shape[0]), 1, 1, 1)[:b], DEFAULT_T)
        tt = torch.full((b,), DEFAULT_T, dtype=torch.long)
        fns[str(b)] = lambda x=x, tt=tt: engine.masks(x, tt)
    log(f"segmentation pass by batch size ({', '.join(map(str, batches))})")
    calls = interleaved(fns, 1, seconds, rounds, log)
    rows = []
    for b in batches:
        per_s = calls[str(b)] * b
        rows.append({"batch": b, "images_per_s": per_s, "gflops": per_s * flops / 1e9,
                     "of_conv": per_s * flops / 1e9 / machine["conv_gflops"]})
    return rows


LABELS = {**{p.key: p.label for p in CPU_PATHS}, INT8: "onnxruntime int8 (static, QDQ, per-channel weights)"}


def _add_speeds(rows: list[dict], speeds: dict[str, float], flops: int, machine: dict) -> None:
    eager = speeds.get("eager")
    for row in rows:
        if row["path"] not in speeds:
            continue
        per_s = speeds[row["path"]]
        row["images_per_s"] = per_s
        row["vs_eager"] = per_s / eager if eager else None
        row["gflops"] = per_s * flops / 1e9
        row["of_conv"] = row["gflops"] / machine["conv_gflops"] if machine.get("conv_gflops") else None


# ----- int8 -----

def int8_masks_graph(model, calibration: torch.Tensor, t: int = DEFAULT_T) -> bytes:
    """The masks graph of `model` quantized to int8 by onnxruntime (static, QDQ, weights per channel),
    calibrated on `calibration`: images [N, 3, S, S] in [-1, 1], noised to t as segmentation does."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    x_t = noised(calibration, t, seed=1)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter({"x_t": x_t[i:i + 16].numpy(), "t": np.full(min(16, len(x_t) - i), t, np.int64)}
                              for i in range(0, len(x_t), 16))

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory(prefix="fdm-int8-") as tmp, _quiet_root_logger():
        fp32, prepared, quantized = (Path(tmp) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        fp32.write_bytes(onnx_model_bytes(copy.deepcopy(model).cpu().float(), masks_only=True))
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized), Batches(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
        return quantized.read_bytes()


def int8_engine(model, calibration: torch.Tensor, threads: int | None = None) -> OnnxEngine:
    """An onnx engine whose masks come from `int8_masks_graph` (its denoise stays float32)."""
    engine = OnnxEngine.from_model(copy.deepcopy(model).cpu().float(), device="cpu", threads=threads, spinning=False)
    graph = int8_masks_graph(model, calibration)
    engine._graphs["masks"] = lambda: graph
    return engine


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime's quantization logs a warning per tensor it leaves in float; none is news here."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def lfw_scores(engine, images_dir: Path, masks_dir: Path, limit: int) -> tuple[dict, list[np.ndarray]]:
    """(foreground IoU and parts mIoU in percent, the label maps) of `engine` on the first `limit` images of
    an evaluation set (fdm_eval.evaluate), with the default read-out."""
    from fdm_eval.evaluate import load_eval_set, predict_with_engine, score, summary_figures

    evalset = load_eval_set(images_dir, masks_dir, limit=limit, warn=lambda message: None)
    predictions = predict_with_engine(engine, evalset)
    figures = summary_figures(score(predictions, evalset))
    return {"fg_iou": figures["fg_iou"], "parts_miou": figures["parts_miou"], "images": len(evalset)}, predictions.labels


# ----- end to end -----

def segment_run(engine, inputs: list[Path], out: Path, batch_size: int, workers: int) -> dict:
    """`fdm-infer segment` over `inputs` into `out` with `engine` (Segmenter.segment_files, default
    settings): images/s as summary.json counts them (decoding, model, read-out and writing), seconds."""
    from fdm_infer.api import Segmenter

    segmenter = Segmenter(engine, batch_size=batch_size)
    report = segmenter.segment_files(inputs, out, progress=False, workers=workers, warn=lambda message: None)
    return {"images": report.written, "images_per_s": report.images_per_s, "seconds": report.seconds}


def end_to_end_rows(runs: list[tuple], inputs: list[Path], batch_size: int, log=print) -> list[dict]:
    """Per (label, engine, workers[, context]), a segmentation of `inputs` (`segment_run`, inside `context()`
    where given) into a temporary folder, and the share of its label pixels equal to the first run's."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="fdm-segment-") as tmp:
        for i, (label, engine, workers, *context) in enumerate(runs):
            out = Path(tmp) / f"run{i}"
            row = {"label": label, "workers": workers, "engine": getattr(engine, "name", "?")}
            try:
                with (context[0]() if context else contextlib.nullcontext()):
                    row.update(segment_run(engine, inputs, out, batch_size, workers))
                row["label_agreement"] = label_agreement(Path(tmp) / "run0", out)
                row["status"] = "ok"
                log(f"{label}: {row['images']} images, {row['images_per_s']:.1f} images/s")
            except Exception as exc:  # noqa: BLE001  (one run failing must not lose the others)
                row["status"] = f"failed: {one_line(exc)}"
                log(f"{label}: {row['status']}")
            rows.append(row)
    return rows


def label_agreement(folder_a: Path, folder_b: Path) -> float:
    """The share of label pixels equal between the *_labels.png files of two segment folders (those of a)."""
    from PIL import Image

    equal = total = 0
    for path in sorted(folder_a.rglob("*_labels.png")):
        with Image.open(path) as a, Image.open(folder_b / path.relative_to(folder_a)) as b:
            a, b = np.asarray(a), np.asarray(b)
        equal += int((a == b).sum())
        total += a.size
    return equal / total if total else float("nan")


# ----- what `fdm-infer bench --cpu` runs -----

def report(model, images: torch.Tensor, *, batch: int = 16, keys: list[str] | None = None, threads: int | None = None,
           seconds: float = 1.0, rounds: int = 3, batches: list[int] | None = None, files: list[Path] | None = None,
           log=print) -> dict:
    """The machine's rates, then the segmentation pass and a sampling step's model call on every CPU path
    (`keys`; torch eager always, first; int8 in the segmentation pass only, calibrated on `images`), the
    default engine's segmentation pass by batch size (`batches`), and with `files`, a segmentation of them end
    to end by torch eager without the pipeline (as before) and by the default engine with it. `images`:
    [N, 3, S, S] in [-1, 1], the inputs of the label agreement."""
    from fdm_infer.engines import cpu_engine
    from fdm_infer.pipeline import DEFAULT_WORKERS

    chosen = [p for p in CPU_PATHS if p.key == "eager" or keys is None or p.key in keys]
    with_int8 = keys is None or INT8 in keys
    result = {"environment": environment(), "settings": {"batch": batch, "seconds": seconds, "rounds": rounds,
                                                         "paths": [p.key for p in chosen] + [INT8] * with_int8}}
    log("the machine's matmul and convolution rates")
    result["machine"] = machine_rates(seconds)
    engines = open_paths(chosen, model, threads, log, batch)
    measured = dict(engines)
    if with_int8:
        log("int8: quantizing the masks graph")
        try:
            measured[INT8] = int8_engine(model, images[:64], threads)
        except Exception as exc:  # noqa: BLE001  (reported in its row)
            measured[INT8] = f"failed: {one_line(exc)}"
    result["segmentation"] = segmentation_rows(measured, model, images, batch, result["machine"], seconds, rounds, log,
                                               LABELS)
    result["sampling"] = sampling_rows(engines, model, images, batch, result["machine"], seconds, rounds, log, LABELS)
    default = engines.get(cpu_engine())
    if isinstance(default, str) or default is None:
        default = engines["eager"]
    if batches:
        result["batches"] = batch_rows(default, model, images, batches, result["machine"], seconds, rounds, log)
    if files:
        runs = [("torch eager, one thread for everything (the reference)", engines["eager"], 0),
                (f"{default.name} (the default engine), {DEFAULT_WORKERS} worker threads (the default)", default,
                 DEFAULT_WORKERS)]
        result["end_to_end"] = end_to_end_rows(runs, files, batch, log)
    return result


# ----- markdown -----

def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.3f}%"


def machine_lines(env: dict, machine: dict) -> list[str]:
    return [f"Machine: {env['cpu']}, {env['cores']} cores; {env['threads']} threads for torch and onnxruntime; "
            f"torch {env['torch']}, onnxruntime {env['onnxruntime']}; load average {env['load_average']} at the start.",
            "",
            "| the machine's measured rate (torch, fp32) | GFLOP/s |", "|---|---|",
            f"| matmul 1024 x 1024 | {machine['matmul_gflops']:.1f} |",
            f"| 3x3 convolution, 64 -> 64 channels, 16 x 32 x 32 | {machine['conv_gflops']:.1f} |", ""]


def path_table(rows: list[dict], diff_name: str) -> list[str]:
    lines = ["| path | images/s | x torch eager | GFLOP/s | % of the conv rate | label pixels equal to eager | "
             f"max abs diff {diff_name} | status |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {_num(r.get('images_per_s'), '.1f')} | {_num(r.get('vs_eager'), '.2f')} | "
                     f"{_num(r.get('gflops'), '.1f')} | {_num(None if r.get('of_conv') is None else 100 * r['of_conv'], '.0f')} | "
                     f"{_pct(r.get('label_agreement'))} | {_num(r.get('max_abs_diff'), '.1e')} | {r['status']} |")
    return [*lines, ""]


def batch_table(rows: list[dict]) -> list[str]:
    lines = ["| batch | images/s | GFLOP/s | % of the conv rate |", "|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['images_per_s']:.1f} | {r['gflops']:.1f} | {100 * r['of_conv']:.0f} |" for r in rows]
    return [*lines, ""]


def markdown(result: dict) -> str:
    """The tables of a `fdm-infer bench --cpu` run (or the inference part of benchmarks/cpu/run.py)."""
    batch = result["settings"]["batch"]
    lines = [*machine_lines(result["environment"], result["machine"])]
    if result.get("segmentation"):
        lines += [f"### Segmentation: the model pass (the masks alone), batch {batch}", "",
                  *path_table(result["segmentation"], "of the masks")]
    if result.get("batches"):
        lines += ["### The segmentation pass by batch size (the default engine)", "", *batch_table(result["batches"])]
    if result.get("sampling"):
        lines += [f"### One sampling step: the model call (eps and masks), batch {batch}", "",
                  *path_table(result["sampling"], "of eps")]
    if result.get("end_to_end"):
        count = result["end_to_end"][0].get("images", "-")
        lines += [f"### `fdm-infer segment` end to end: {count} images (decoding, resizing, noise, the model, "
                  "read-out, PNG writes)", "", *end_to_end_table(result["end_to_end"])]
    return "\n".join(lines) + "\n"


def end_to_end_table(rows: list[dict]) -> list[str]:
    lines = ["| run | images/s | x the first row | seconds | label pixels equal to the first row's | status |",
             "|---|---|---|---|---|---|"]
    base = rows[0].get("images_per_s") if rows else None
    for r in rows:
        ratio = r["images_per_s"] / base if base and r.get("images_per_s") else None
        lines.append(f"| {r['label']} | {_num(r.get('images_per_s'), '.1f')} | {_num(ratio, '.2f')} | "
                     f"{_num(r.get('seconds'), '.1f')} | {_pct(r.get('label_agreement'))} | {r['status']} |")
    return [*lines, ""]
