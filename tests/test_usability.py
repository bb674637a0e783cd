"""What a user sees: a resumed run's target, progress when output is piped, the device a run uses, one
line on SIGTERM, what a long command plans, paths and errors that name the right thing, the API's
results and exceptions, and one vocabulary of options."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import make_checkpoint, run_infer, train_options, write_images

from fdm_train.cli import main_group as train_group
from fdm_train.run_folder import TRAINING_STATE

TRAIN_TINY = ["--preset", "tiny-32", "--image-size", "16", "--batch-size", "4", "--sample-every", "0",
              "--threads", "1", "-q", "--workers", "0"]


def fdm_train(*args):
    return CliRunner().invoke(train_group, ["train", *map(str, args)], catch_exceptions=False)


def logged_steps(run):
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


# ----- a resumed run keeps its target -----

def test_resume_keeps_the_runs_own_target_and_a_finished_run_says_so(tmp_path):
    data, run = tmp_path / "images", tmp_path / "run"
    write_images(data, 4)
    assert fdm_train("--data", data, "--out", run, "--iterations", "2", "--log-every", "1", *TRAIN_TINY).exit_code == 0
    # As if the run had been stopped at step 2 of 3: its training state names its target.
    state = torch.load(run / TRAINING_STATE, weights_only=True)
    state["options"]["iterations"] = 3
    torch.save(state, run / TRAINING_STATE)
    result = fdm_train("--data", data, "--out", run, "--resume", "auto", "--log-every", "1", *TRAIN_TINY)
    assert result.exit_code == 0 and "done: step 3" in result.output
    assert logged_steps(run) == [1, 2, 3]

    finished = fdm_train("--data", data, "--out", run, "--resume", "auto", *TRAIN_TINY)
    assert finished.exit_code == 0
    assert "the run is finished (step 3 of 3)" in finished.output and "loss nan" not in finished.output
    assert logged_steps(run) == [1, 2, 3]

    further = fdm_train("--data", data, "--out", run, "--resume", "auto", "--iterations", "4", "--log-every", "1",
                        *TRAIN_TINY)
    assert "done: step 4" in further.output and logged_steps(run) == [1, 2, 3, 4]


# ----- progress when the output is not a terminal -----

def piped(*argv, env=None):
    """A console command run as a user runs it, stdout and stderr piped (no terminal)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("TQDM_DISABLE", None)
    return subprocess.run([sys.executable, "-c", ("import sys; from fdm_infer.cli import main; sys.argv[0] = "
                           "'fdm-infer'; main()"), *map(str, argv)], capture_output=True, text=True, env=env,
                          check=False)


def test_piped_generate_prints_plain_progress_lines_with_rate_and_eta(tmp_path):
    model = tmp_path / "tiny.safetensors"
    make_checkpoint(model)
    proc = piped("generate", "--model", model, "-n", "2", "--steps", "100", "--out", tmp_path / "samples",
                 "--threads", "1", "--sampler", "ddpm")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("generating 2 image(s): 100 ddpm steps in batches of 2 on cpu; roughly ")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("generate (ddpm): ")]
    assert "\r" not in proc.stderr
    # The first step's line, with the rate and the time left; the last line, all steps done.
    assert re.fullmatch(r"generate \(ddpm\): 1/100 step \(1%\), [0-9.e+]+ step/s, ETA (\d+h)?(\d+m)?\d+s", lines[0]), lines
    assert re.fullmatch(r"generate \(ddpm\): 100/100 step \(100%\), [0-9.e+]+ step/s, \d+s in all", lines[-1]), lines


# ----- SIGTERM: one line -----

def test_sigterm_to_a_training_with_data_workers_prints_one_line(tmp_path):
    """What a scheduler does: SIGTERM to the whole process group (the run and its DataLoader workers)."""
    data, run = tmp_path / "images", tmp_path / "run"
    write_images(data, 8)
    args = ["--data", data, "--out", run, "--iterations", "100000", "--log-every", "1", "--no-compile",
            *TRAIN_TINY[:-1], "2"]  # two DataLoader workers; not compiling, which takes minutes before the first step
    proc = subprocess.Popen([sys.executable, "-c", ("import sys; from fdm_train.cli import main; "
                             "sys.argv[0] = 'fdm-train'; main()"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not ((run / "log.jsonl").exists() and (run / "log.jsonl").read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert len(err.strip().splitlines()) == 1 and err.strip().startswith("fdm-train: terminated at step "), err
    assert "saved" in err and (run / "checkpoint.safetensors").exists()
    assert not (run / "run.lock").exists()


# ----- the device a run uses -----

def test_training_says_its_device_precision_and_threads(tmp_path):
    data = tmp_path / "images"
    write_images(data, 4)
    result = fdm_train("--data", data, "--out", tmp_path / "run", "--iterations", "1", "--device", "cpu",
                       *[a for a in TRAIN_TINY if a != "-q"])
    assert result.exit_code == 0, result.output
    plan = next(line for line in result.output.splitlines() if line.startswith("training on "))
    assert plan.startswith("training on cpu (float32, 1 CPU thread, channels_last): steps 1 to 1, 4 images per step, "
                           "16x16; roughly ")
    assert "warning" not in result.output  # a CPU-sized model


def test_a_gpu_sized_preset_on_the_cpu_warns_with_a_time(capsys):
    from fdm_core.config import PRESETS
    from fdm_train.options import TrainOptions
    from fdm_train.train import _announce

    options = TrainOptions(data="unused", iterations=10_000, batch_size=64, progress=False)
    _announce(options, PRESETS["paper-64"], torch.device("cpu"), step=0)
    err = capsys.readouterr().err
    assert err.startswith("warning: a model sized for GPUs (247 GFLOP per image) training on the CPU: roughly "), err
    assert re.search(r"roughly \d+h\d\dm;", err)  # 10,000 steps of 64 images: hours, not minutes
    _announce(options, PRESETS["small-64"], torch.device("cpu"), step=0)
    assert capsys.readouterr().err == ""  # quiet, and no warning for a CPU-sized model


# ----- long commands: a plan first, sized for the device; bench keeps what it measured -----

def bench(*args):
    from fdm_infer.cli import main_group as infer_group

    return CliRunner().invoke(infer_group, ["bench", "--device", "cpu", "--inference-path", "fused", "--no-plain",
                                            "--no-sampling", "--repeats", "3", "--budget", "0.01", *map(str, args)])


def test_bench_on_a_cpu_plans_cpu_sized_batches_and_prints_each_row_as_measured(tmp_path):
    result = bench("--preset", "tiny-32", "--save-json", tmp_path / "bench.json")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("bench on cpu: tiny-32; batches 1, 8; ")
    assert [line.split(":")[0] for line in lines[1:]] == ["tiny-32 factorized, fused fp32, batch 1",
                                                           "tiny-32 factorized, fused fp32, batch 8"]
    assert json.loads((tmp_path / "bench.json").read_text())["settings"]["sample_steps"] == 50


def test_bench_interrupted_keeps_and_prints_what_it_measured(tmp_path, monkeypatch):
    from fdm_eval import bench as benchmark

    timed = []
    real = benchmark.median_ms

    def interrupted_at_the_second(*args, **kwargs):
        timed.append(1)
        if len(timed) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(benchmark, "median_ms", interrupted_at_the_second)
    result = bench("--preset", "tiny-32", "-o", tmp_path)
    assert result.exit_code == 130
    assert result.stderr.splitlines()[-1] == "fdm-infer: interrupted; the measurements made are above"
    assert "| tiny-32 | factorized | fused fp32 | 1 |" in result.stdout
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["interrupted"] and [r["batch"] for r in saved["rows"]] == [1]
    assert "| tiny-32 | factorized | fused fp32 | 1 |" in (tmp_path / "bench.md").read_text()


# ----- smaller things: hints that run, paths as written, errors that name the cause -----

def fdm_infer(*args):
    from fdm_infer.cli import main_group as infer_group

    return CliRunner().invoke(infer_group, list(map(str, args)))


def test_the_data_size_error_suggests_a_complete_prepare_data_command(tmp_path):
    from fdm_train.cli import main_group

    data = tmp_path / "images"
    write_images(data, 2)
    cache = tmp_path / "cache.npy"
    assert CliRunner().invoke(main_group, ["prepare-data", str(data), "-o", str(cache), "--image-size", "16", "-q"]).exit_code == 0
    result = CliRunner().invoke(main_group, ["train", "--data", str(cache), "--out", str(tmp_path / "run"),
                                             "--preset", "tiny-32", "--image-size", "32", "-q"])
    hint = re.search(r"run `(fdm-train prepare-data [^`]*)`", str(result.exception)).group(1)
    # The suggested command runs as written once its placeholder is filled.
    args = hint.split()[1:]
    args[args.index("CACHE.npy")] = str(tmp_path / "cache32.npy")
    assert CliRunner().invoke(main_group, args).exit_code == 0


def test_interpolate_prints_its_output_path_without_a_double_slash(tmp_path):
    model = tmp_path / "tiny.safetensors"
    make_checkpoint(model)
    a, b = write_images(tmp_path / "pair", 2)
    result = fdm_infer("interpolate", a, b, "--model", model, "--mix-steps", "2", "--steps", "4", "--timestep", "500",
                       "--out", f"{tmp_path}/interp/", "-q", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert f"-> {tmp_path}/interp/interpolation.png" in result.output and "//" not in result.output


def test_segment_of_a_missing_file_is_one_error_naming_the_cause(tmp_path, capsys, monkeypatch):
    model = tmp_path / "tiny.safetensors"
    make_checkpoint(model)
    result = run_infer(capsys, monkeypatch, "segment", tmp_path / "nope.jpg", "--model", model, "--out", tmp_path / "o")
    assert result.code == 1
    assert result.err_lines == [f"fdm-infer: error: no images to segment: {tmp_path / 'nope.jpg'}: no such file or folder"]


def test_segment_into_a_reused_folder_says_that_the_summary_lists_this_run_only(tmp_path):
    model = tmp_path / "tiny.safetensors"
    make_checkpoint(model)
    first, second = write_images(tmp_path / "a", 1), write_images(tmp_path / "b", 1, seed=1)
    out = tmp_path / "out"
    assert "earlier run" not in fdm_infer("segment", *first, "--model", model, "--out", out, "-q").stderr
    again = fdm_infer("segment", *second, "--model", model, "--out", out, "-q")
    assert again.exit_code == 0
    assert "holds an earlier run's files too (kept); summary.json lists this run's 1 image(s) only" in again.stderr


def test_the_onnx_cpu_benchmark_takes_its_threads_from_omp_num_threads(monkeypatch):
    from benchmarks.onnx_cpu import run as bench_onnx_cpu

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert bench_onnx_cpu.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert bench_onnx_cpu.default_threads() == os.cpu_count()


def test_benchmark_subcommands_run_the_named_one_and_refuse_an_unknown_name(capsys):
    from benchmarks.position import run as position
    from fdm_eval.subcommands import run_subcommand

    seen = []
    run_subcommand({"a": seen.append, "b": None}, "usage text", ["a", "--x", "1"])
    assert seen == [["--x", "1"]]
    for argv, status in ((["nope"], 2), ([], 0), (["--help"], 0)):
        with pytest.raises(SystemExit) as exit_:
            position.main(argv)
        assert exit_.value.code == status
        assert "evaluate" in capsys.readouterr().err  # the script's usage names its subcommands


# ----- README facts -----

def readme():
    from helpers import ROOT

    return (ROOT / "README.md").read_text()


def test_readme_install_line_is_the_makefiles():
    from helpers import ROOT

    makefile = (ROOT / "Makefile").read_text()
    for line in re.findall(r"pip install --quiet (.*)", makefile):
        if not line.startswith(("torch==", "--upgrade pip")):
            assert f"pip install {line}" in readme(), line


def test_readme_export_example_exports_the_run_the_training_examples_write():
    trained = set(re.findall(r"fdm-train --data \S+ .*?--out (\S+)", readme()))
    exported = re.findall(r"fdm-export onnx (\S+)/checkpoint\.safetensors", readme())
    assert exported and set(exported) <= trained


def test_readme_says_which_commands_print_their_help_without_arguments(capsys, monkeypatch):
    assert "`fdm-train`, `fdm-export` and `fdm-infer` run without arguments print\n  their help" in readme()
    for prog in ("fdm-train", "fdm-export", "fdm-infer"):
        module = __import__({"fdm-train": "fdm_train", "fdm-export": "fdm_export", "fdm-infer": "fdm_infer"}[prog]
                            + ".cli", fromlist=["main"])
        monkeypatch.setattr(sys, "argv", [prog])
        try:
            module.main()
        except SystemExit as exc:
            assert exc.code in (0, None)
        assert "Usage:" in capsys.readouterr().out
    missing = run_infer(capsys, monkeypatch, "segment")
    assert missing.code == 2 and "Missing argument" in missing.err


def test_readme_lfw_train_has_no_masks_as_the_data():
    from helpers import LFW_TRAIN

    assert "`../shared/data/lfw/train/images` (no masks" in readme()
    if LFW_TRAIN.exists():
        assert not (LFW_TRAIN / "masks").exists()


# ----- the Python API -----

def test_segmentation_results_behave_like_a_list_of_per_image_results(tmp_path, monkeypatch):
    from PIL import Image

    from fdm_infer import Segmenter

    model = tmp_path / "tiny.safetensors"
    make_checkpoint(model)
    seg = Segmenter.load(model, threads=1)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (24, 40, 3), dtype=np.uint8), rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)]
    res = seg(images)
    assert len(res) == 2 and [r.labels.shape for r in res] == [(24, 40), (30, 30)]
    first = res[0]
    assert np.array_equal(first.labels, res.labels[0]) and np.array_equal(first.foreground, res.foreground[0])
    overlay, plot = first.overlay(), first.plot()
    assert isinstance(overlay, Image.Image) and overlay.size == (40, 24)
    assert isinstance(plot, Image.Image) and plot.size[0] > 3 * 40
    # Per-region statistics, as SAM's: area, bounding box, share; in to_json() too.
    regions = first.regions
    assert sum(r["area"] for r in regions) == 24 * 40
    for r in regions:
        ys, xs = np.nonzero(first.labels == r["label"])
        assert r["share"] == round(len(xs) / (24 * 40), 4)
        assert r["bbox"] == (None if not len(xs) else [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                                       ys.max() - ys.min() + 1])
    assert json.loads(res.to_json())["images"][0]["regions"] == regions
    # Saving into the default folder, relative to where the user is.
    monkeypatch.chdir(tmp_path)
    files = first.save()
    assert files["overlay"] == Path("out") / "image_0000_overlay.png" and files["overlay"].is_file()
    assert res.save() == Path("out") / "summary.json"


def test_generate_returns_pil_images_that_save_to_a_default_folder(tmp_path, monkeypatch):
    from PIL import Image

    from fdm_infer import generate

    model = tmp_path / "tiny.safetensors"
    make_checkpoint(model)
    samples = generate(model, 2, steps=2, threads=1)
    assert len(samples) == 2 and all(isinstance(image, Image.Image) for image in samples)
    assert np.array_equal(np.asarray(samples[1]), samples.array[1])
    monkeypatch.chdir(tmp_path)
    assert Path("samples") / "sample_0000.png" in samples.save()


def test_api_errors_are_one_type_and_name_the_parameters(tmp_path):
    import pytest

    from fdm_infer import Segmenter, UserError, generate

    model = tmp_path / "tiny.safetensors"
    make_checkpoint(model)
    with pytest.raises(UserError, match=r"^classes: this model is not class-conditional$"):
        generate(model, 1, steps=2, classes=[1], threads=1)
    with pytest.raises(UserError, match=r"^smooth must be an odd number"):
        Segmenter.load(model, smooth=2, threads=1)
    res = Segmenter.load(model, threads=1)(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(UserError, match=r"^rle must be one of"):
        res.to_json(rle="gzip")
    with pytest.raises(UserError, match=r"^fg_channels must be between 0 and"):
        Segmenter.load(model, threads=1)(np.zeros((8, 8, 3), dtype=np.uint8), fg_channels=[9])


# ----- one vocabulary of options -----

def all_options():
    """(command, option) for every option of every command of the three command lines, with the
    context its help is shown in."""
    import click

    from fdm_export import cli as export_cli
    from fdm_infer import cli as infer_cli
    from fdm_train import cli as train_cli

    for prog, module in (("fdm-train", train_cli), ("fdm-export", export_cli), ("fdm-infer", infer_cli)):
        group = module.main_group
        parent = click.Context(group, info_name=prog, **group.context_settings)
        for name, command in group.commands.items():
            ctx = click.Context(command, info_name=name, parent=parent, **command.context_settings)
            for param in command.params:
                if isinstance(param, click.Option):
                    yield f"{prog} {name}", param, ctx


def takes(option) -> str:
    import click

    if option.is_flag:
        return "flag"
    kind = option.type
    if isinstance(kind, click.Path):
        return "PATH"
    if isinstance(kind, click.types.IntParamType):
        return "N"
    if isinstance(kind, click.types.FloatParamType):
        return "X"
    return "NAME"


def options_table():
    """{spelling: takes} of docs/options.md's table, and the names its "Not yet consistent" list names."""
    from helpers import ROOT

    text = (ROOT / "docs" / "options.md").read_text()
    table = {}
    for row in re.findall(r"^\| (`.+?) \| (.+?) \| .+ \|$", text, re.MULTILINE):
        for spelling in re.findall(r"`(-[^`]+)`", row[0]):
            table[spelling] = row[1]
    remaining = set(re.findall(r"^\* `(--[a-z-]+)`:", text.split("## Not yet consistent")[1], re.MULTILINE))
    return table, remaining


def test_every_shared_option_is_in_the_table_and_means_one_kind_of_value_everywhere():
    from collections import defaultdict

    table, remaining = options_table()
    uses = defaultdict(set)  # spelling -> {(command, what it takes)}
    for command, option, _ in all_options():
        for spelling in option.opts + option.secondary_opts:
            uses[spelling].add((command, takes(option)))
    shared = {spelling for spelling, where in uses.items() if len({c for c, _ in where}) > 1}
    assert shared - set(table) == set(), "shared options missing from docs/options.md"
    for spelling, documented in table.items():
        assert spelling in uses, f"{spelling}: in docs/options.md, taken by no command"
        kinds = {kind for _, kind in uses[spelling]}
        if spelling in remaining:
            continue
        assert kinds == {documented}, (spelling, uses[spelling])
    assert remaining == set(), "every shared name means one thing"
    # Names that did not explain themselves are gone.
    assert not [s for s in ("--t", "--frames", "--t-power", "--mask-scale", "--images", "--md") if s in uses]
    assert {c for c, _ in uses["--variant"]} <= {"fdm-train train", "fdm-train info"}  # the architecture only
    # Names that meant something else in one command are gone from it.
    assert not [c for c, _ in uses["-K"] if c == "fdm-infer baseline"]
    assert not [c for c, _ in uses["-n"] if c == "fdm-infer fid"]
    assert not [c for c, _ in uses["--iterations"] if c != "fdm-train train"]
    assert not [c for c, _ in uses["--size"]] and not [c for c, _ in uses["--batch"]]


def test_every_option_that_takes_a_value_shows_its_default():
    missing = []
    for command, option, ctx in all_options():
        if option.is_flag or option.required or option.hidden:
            continue
        if "[default: " not in option.get_help_record(ctx)[1]:
            missing.append(f"{command} {'/'.join(option.opts)}")
    assert missing == []


# ----- the GPU script without a GPU -----

def test_the_gpu_script_without_a_gpu_stops_with_one_line(tmp_path):
    import pytest
    from helpers import ROOT

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the script would run")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), str(tmp_path / "results")],
                          capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [("benchmarks/gpu/run.sh: no CUDA GPU here (torch sees none); SMOKE=1 "
                                        "rehearses every stage on the CPU")]
    assert not (tmp_path / "results").exists()


def test_usage_errors_and_the_tools_own_errors_read_alike(tmp_path, capsys, monkeypatch):
    usage = run_infer(capsys, monkeypatch, "generate", "--steps", "0")
    assert usage.code == 2
    assert usage.err_lines[0].startswith("Usage: fdm-infer generate ")
    assert usage.err_lines[-1].startswith("fdm-infer: error: Invalid value for '--steps'")
    own = run_infer(capsys, monkeypatch, "segment", tmp_path / "nope.jpg", "--out", tmp_path / "out")
    assert own.code == 1 and own.err_lines[-1].startswith("fdm-infer: error: ")
    assert "Error:" not in usage.err + own.err


def test_training_a_finished_run_through_the_api_returns_its_weights(tmp_path):
    from fdm_core.checkpoint import read_checkpoint
    from fdm_train.options import TrainOptions
    from fdm_train.train import train

    data = tmp_path / "images"
    write_images(data, 4)
    options = train_options(data, tmp_path / "run", batch_size=4, iterations=1, workers=0)
    first = train(options)
    again = train(TrainOptions(**{**options.__dict__, "resume": "auto", "iterations": None}))
    assert again["finished_before"] and again["step"] == 1 and again["parameters"] == first["parameters"]
    _, saved, _ = read_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    for name, tensor in saved["ema"].items():
        assert torch.equal(again["weights"]["ema"][name], tensor)
