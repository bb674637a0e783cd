"""The options the three command lines share (-o/--out, --limit, -q, --threads, --overwrite, --max-pixels,
--version, help without arguments, defaults shown), and what a command says about its model and its
--timestep."""
import importlib.metadata
import json
import sys

import click
import numpy as np
import pytest
import torch
from helpers import run_tool, tiny_checkpoint_fixture
from PIL import Image

from fdm_core.checkpoint import save_checkpoint
from fdm_core.config import preset
from fdm_core.model import build_model
from fdm_export import cli as export_cli
from fdm_infer import cli as infer_cli
from fdm_train import cli as train_cli
from fdm_train.data import open_images

tiny_checkpoint = tiny_checkpoint_fixture()
CLIS = {"fdm-train": train_cli, "fdm-export": export_cli, "fdm-infer": infer_cli}


def images(folder, n, size=(20, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def commands():
    for prog, module in CLIS.items():
        for name, command in module.main_group.commands.items():
            yield prog, name, command


def options(command) -> dict[str, click.Option]:
    return {opt: p for p in command.params if isinstance(p, click.Option) for opt in p.opts}


# ----- the same options everywhere -----

@pytest.mark.parametrize("prog", CLIS)
def test_version_and_help_without_arguments(prog, capsys, monkeypatch):
    r = run_tool(capsys, monkeypatch, prog, "--version")
    assert r.code == 0 and r.out.strip() == f"{prog} {importlib.metadata.version('fdm')}"
    r = run_tool(capsys, monkeypatch, prog)
    assert r.code == 0 and r.out.startswith(f"Usage: {prog} ") and "Commands:" in r.out and not r.err


def test_every_command_spells_the_shared_options_the_same():
    folder_readers = {("fdm-infer", "segment"), ("fdm-infer", "evaluate"), ("fdm-infer", "baseline"),
                      ("fdm-infer", "fid"), ("fdm-infer", "bench"), ("fdm-train", "train"), ("fdm-train", "prepare-data")}
    threaded = {("fdm-infer", n) for n in ("segment", "generate", "interpolate", "evaluate", "bench", "baseline", "fid")}
    threaded.add(("fdm-train", "train"))
    overwriting = {("fdm-train", "train"), ("fdm-train", "slim"), ("fdm-train", "split-region"), ("fdm-export", "onnx"),
                   ("fdm-export", "trt"), ("fdm-export", "segmentation"), ("fdm-infer", "generate")}
    pixel_budget = {("fdm-infer", "segment")}
    for prog, name, command in commands():
        opts = options(command)
        where = f"{prog} {name}"
        writes = [p for p in command.params if isinstance(p, click.Option) and p.name in ("out", "output", "out_dir")]
        for p in writes:
            assert {"-o", "--out"} <= set(p.opts), where
            assert "folder" in p.help.lower() or "file" in p.help.lower(), where
        if name != "info":
            assert {"-q", "--quiet"} <= set(opts), where
        assert ("--limit" in opts) == ((prog, name) in folder_readers), where
        assert ("--threads" in opts) == ((prog, name) in threaded), where
        assert ("--overwrite" in opts) == ((prog, name) in overwriting), where
        assert "--overwrite" not in opts or opts["--overwrite"].is_flag, where
        assert ("--max-pixels" in opts) == ((prog, name) in pixel_budget), where
        for p in command.params:
            if isinstance(p, click.Option) and not p.hidden:
                assert p.help, f"{where} {p.opts[0]} has no help"
    for group in (train_cli.main_group, export_cli.main_group, infer_cli.main_group):
        assert group.context_settings["show_default"] is True


def test_training_options_have_help_and_show_their_defaults(capsys, monkeypatch):
    r = run_tool(capsys, monkeypatch, "fdm-train", "train", "--help")
    assert r.code == 0
    text = " ".join(r.out.split())
    for fragment in ("--seed INTEGER Seed of the initial weights", "[default: 0; 0<=x<2^63]", "--save-every",
                     "resumes from there. [default: 1000", "--log-every", "log.jsonl every N steps. [default: 10",
                     "-o, --out DIRECTORY Run folder", "--threads", "--limit"):
        assert fragment in text, fragment


def test_train_passes_limit_threads_and_quiet_to_the_run(monkeypatch, capsys, tmp_path):
    import fdm_train.train

    seen = {}

    def fake_train(opts):
        seen["opts"] = opts
        return {"rank": 0, "step": 1, "steps_run": 1, "loss": 0.0, "checkpoint": "x"}

    monkeypatch.setattr(fdm_train.train, "train", fake_train)
    r = run_tool(capsys, monkeypatch, "fdm-train", "--data", tmp_path, "-o", tmp_path / "run", "--limit", 3,
                 "--threads", 1, "-q")
    assert r.code == 0, r.err
    opts = seen["opts"]
    assert (opts.limit, opts.threads, opts.progress, opts.out) == (3, 1, False, str(tmp_path / "run"))
    folder = images(tmp_path / "data", 5)
    dataset = open_images(folder, 16, limit=3)
    assert [p.name for p in dataset.files] == ["im0.png", "im1.png", "im2.png"] and len(dataset) == 3


def test_threads_reach_torch_and_onnxruntime(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from fdm_export.onnx_export import export_onnx
    from fdm_infer.engines import open_engine

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        r = run_tool(capsys, monkeypatch, "fdm-infer", "segment", images(tmp_path / "in", 1), "--model",
                     tiny_checkpoint, "-o", tmp_path / "out", "--threads", 1)
        assert r.code == 0, r.err
        assert torch.get_num_threads() == 1
        assert json.loads((tmp_path / "out" / "summary.json").read_text())["run"]["threads"] == 1
        export_onnx(tiny_checkpoint, tmp_path / "m.onnx", check=False)
        engine = open_engine("onnx", tmp_path / "m.onnx", device="cpu", threads=1)
        assert engine.session.get_session_options().intra_op_num_threads == 1
    finally:
        torch.set_num_threads(before)


def test_limit_takes_the_first_images(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    folder = images(tmp_path / "in", 5)
    r = run_tool(capsys, monkeypatch, "fdm-infer", "segment", folder, "--model", tiny_checkpoint, "-o",
                 tmp_path / "out", "--limit", 2)
    assert r.code == 0 and "segmented 2 image(s)" in r.out, r.err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [e["input"] for e in summary["images"]] == [str(folder / "im0.png"), str(folder / "im1.png")]
    r = run_tool(capsys, monkeypatch, "fdm-train", "prepare-data", folder, "-o", tmp_path / "c.npy",
                 "--image-size", 8, "--limit", 3, "--workers", 1)
    assert r.code == 0, r.err
    assert np.load(tmp_path / "c.npy").shape == (3, 3, 8, 8)


# ----- what a command says -----

def test_a_placeholder_model_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    cfg = preset("tiny-32")
    full = tmp_path / "full.safetensors"
    save_checkpoint(full, cfg, build_model(cfg).state_dict(), None, step=0)
    r = run_tool(capsys, monkeypatch, "fdm-train", "slim", full, "-o", tmp_path / "p.safetensors",
                 "--placeholder", "untrained weights, the masks mean nothing")
    assert r.code == 0, r.err
    r = run_tool(capsys, monkeypatch, "fdm-infer", "segment", images(tmp_path / "in", 1), "--model",
                 tmp_path / "p.safetensors", "-o", tmp_path / "out")
    assert r.code == 0
    assert r.err_lines == ["fdm-infer: note: p.safetensors is a placeholder model: untrained weights, the masks "
                           "mean nothing"]
    r = run_tool(capsys, monkeypatch, "fdm-export", "onnx", tmp_path / "p.safetensors", "-o",
                 tmp_path / "p.onnx", "-q")
    assert r.code == 0 and "parity" not in r.out, r.out
    r = run_tool(capsys, monkeypatch, "fdm-infer", "generate", "-n", 1, "--steps", 2, "--model",
                 tmp_path / "p.onnx", "-o", tmp_path / "gen")
    assert r.code == 0 and r.err_lines == ["fdm-infer: note: p.onnx is a placeholder model: untrained weights, the "
                                           "masks mean nothing"]
    # Without the mark, nothing is said (the bundled default has none: see test_api).
    r = run_tool(capsys, monkeypatch, "fdm-infer", "segment", tmp_path / "in", "--model", full, "-o",
                 tmp_path / "o2")
    assert r.code == 0 and not r.err


def test_interpolate_says_which_t_it_used_and_refuses_one_that_denoises_nothing(tiny_checkpoint, tmp_path, capsys,
                                                                                monkeypatch):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for path in (a, b):
        Image.fromarray(np.random.default_rng(len(str(path))).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
    grid = np.round(np.linspace(0, 999, 40)).astype(int)  # the 40-step schedule, independently
    used = int(grid[grid <= 250].max())
    r = run_tool(capsys, monkeypatch, "fdm-infer", "interpolate", a, b, "--timestep", 250, "--steps", 40,
                 "--sampler", "ddim", "--mix-steps", 2, "--model", tiny_checkpoint, "-o", tmp_path / "i")
    assert r.code == 0, r.err
    assert r.err_lines == [f"fdm-infer: note: --timestep 250 is not a step of the 40-step schedule: interpolating from "
                           f"t={used}, its largest step at or below --timestep"]
    assert f"from t={used} " in r.out
    r = run_tool(capsys, monkeypatch, "fdm-infer", "interpolate", a, b, "--timestep", 5, "--steps", 40,
                 "--model", tiny_checkpoint, "-o", tmp_path / "i")
    assert r.code == 1 and len(r.err_lines) == 1 and r.err_lines[0].startswith("fdm-infer: error: --timestep 5")
    assert f"give --timestep {int(grid[grid > 0].min())} or more" in r.err
    r = run_tool(capsys, monkeypatch, "fdm-infer", "interpolate", a, b, "--timestep", 5, "--model",
                 tiny_checkpoint, "-o", tmp_path / "i", "--mix-steps", 2,
                 "--sampler", "ddim")  # 1000 steps: t=5 is a step
    assert r.code == 0 and not r.err and "from t=5 " in r.out


def test_unknown_model_suffix_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "model.pt").write_bytes(b"x")
    r = run_tool(capsys, monkeypatch, "fdm-infer", "segment", images(tmp_path / "in", 1), "--model",
                 tmp_path / "model.pt", "-o", tmp_path / "out")
    assert r.code == 1 and len(r.err_lines) == 1
    assert r.err_lines[0].startswith("fdm-infer: error: cannot tell which of the engines runs model.pt")
    assert "--engine" in r.err_lines[0]


# Records OMP_WAIT_POLICY at the moment torch is first imported (the OpenMP runtime reads it only then):
# after the module given, which need not load torch itself (a command loads it once it runs).
POLICY_AT_TORCH_IMPORT = """
import importlib, os, sys
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "POLICY_SEEN" not in os.environ:
            os.environ["POLICY_SEEN"] = str(os.environ.get("OMP_WAIT_POLICY"))
        return None
sys.meta_path.insert(0, Spy())
importlib.import_module(sys.argv[1])
import torch
print(os.environ["POLICY_SEEN"])
"""


@pytest.mark.parametrize("module", ["fdm_train.cli", "fdm_infer.cli", "fdm_export.cli", "fdm_infer"])
def test_threads_wait_passively_unless_the_user_says_otherwise(module):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    seen = subprocess.run([sys.executable, "-c", POLICY_AT_TORCH_IMPORT, module], env=env, check=True,
                          capture_output=True, text=True).stdout.split()[-1]
    assert seen == "PASSIVE"
    mine = subprocess.run([sys.executable, "-c", POLICY_AT_TORCH_IMPORT, module], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                          check=True, capture_output=True, text=True).stdout.split()[-1]
    assert mine == "ACTIVE"


@pytest.mark.parametrize("policy, spinning", [("PASSIVE", "0"), ("passive", "0"), ("ACTIVE", None), (None, None)])
def test_onnxruntime_threads_spin_only_when_openmp_threads_may(policy, spinning, monkeypatch):
    pytest.importorskip("onnxruntime")
    from fdm_infer.engines.onnx_engine import session_options

    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    opts = session_options(threads=2)
    assert opts.intra_op_num_threads == 2
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        try:
            value = opts.get_session_config_entry(key)
        except RuntimeError:  # onnxruntime's answer for a key never set: its default, spinning
            value = None
        assert value == spinning


def test_a_setting_is_its_option_its_default_and_its_check():
    """One declaration (fdm_core.settings.Setting) gives the click option, the library's default and its check."""
    from click.testing import CliRunner

    from fdm_core.errors import UserError
    from fdm_core.settings import SEED, Setting
    from fdm_infer.settings import INTERPOLATE_TIMESTEP, TIMESTEP

    @click.command()
    @TIMESTEP.option()
    @Setting(("--mix",), "linear", choices=("linear", "slerp")).option()
    @Setting(("--budget",), 10.0, type=float, low=0, low_open=True).option()
    def command(t, mix, budget):
        click.echo(f"{t} {mix} {budget}")

    runner = CliRunner()
    assert runner.invoke(command, []).output == "30 linear 10.0\n"
    assert runner.invoke(command, ["--timestep", "1000"]).exit_code == 2  # the bounds, as click refuses them
    assert runner.invoke(command, ["--budget", "0"]).exit_code == 2
    assert runner.invoke(command, ["--mix", "cubic"]).exit_code == 2
    # a derived declaration: another default and help, the rest the same
    assert (INTERPOLATE_TIMESTEP.default, INTERPOLATE_TIMESTEP.param, INTERPOLATE_TIMESTEP.high) == (250, "t", 999)
    assert TIMESTEP.check(999) == 999
    with pytest.raises(UserError, match=r"^timestep must be between 0 and 999, got 1000$"):
        TIMESTEP.check(1000, "timestep")
    with pytest.raises(UserError, match=r"^budget must be a number above 0, got 0$"):
        Setting(("--budget",), 10.0, type=float, low=0, low_open=True).check(0)
    with pytest.raises(UserError, match=r"^mix must be one of linear, slerp, got 'cubic'$"):
        Setting(("--mix",), "linear", choices=("linear", "slerp")).check("cubic")
    with pytest.raises(UserError, match=r"^seed must be a whole number"):
        SEED.check(1.5)
