"""fdm-export: ONNX export against eager PyTorch, the onnx engine, plan files, and the one-line errors.
TensorRT and onnxruntime-gpu tests run only where those are installed with a CUDA device."""
import importlib.util
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import LFW_VAL, make_checkpoint, run_tool
from helpers import assert_one_line_error as one_line_error
from onnx import TensorProto, helper
from PIL import Image

from fdm_core.config import preset
from fdm_core.errors import UserError
from fdm_core.onnx_format import example_inputs
from fdm_export.onnx_export import export_onnx
from fdm_export.trt_build import build_plan, pack_plan
from fdm_infer.engines import ENGINES, open_engine
from fdm_infer.engines.onnx_engine import read_onnx_metadata
from fdm_infer.engines.trt_engine import MAGIC, MISSING_TENSORRT, TensorRTError, read_plan

TINY = preset("tiny-32")
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny-32 checkpoint with random non-zero weights and its fp32 ONNX export (parity check off:
    the tests below do their own)."""
    folder = tmp_path_factory.mktemp("export")
    model = make_checkpoint(folder / "tiny.safetensors", config=TINY, step=11, seed_torch=True)
    export_onnx(folder / "tiny.safetensors", folder / "tiny.onnx", check=False)
    return model, folder / "tiny.safetensors", folder / "tiny.onnx"


def run_export(capsys, monkeypatch, *args):
    return run_tool(capsys, monkeypatch, "fdm-export", *args)


assert_one_line_error = partial(one_line_error, code=1, prog="fdm-export")


# ------------------------------------------------------------------------------------------ ONNX parity

def test_one_onnx_file_matches_pytorch_at_batches_1_3_8(tiny):
    model, _, onnx_path = tiny
    engine = open_engine("onnx", onnx_path, device="cpu")
    assert engine.config == TINY and engine.device.type == "cpu"
    # One file, a dynamic batch dimension: the graph's input shape is symbolic in the batch.
    dims = onnx.load(str(onnx_path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    for batch in (1, 3, 8):
        x, t, _ = example_inputs(TINY, batch, seed=batch)
        with torch.no_grad():
            ref_eps, ref_masks = model(x, t)
        eps, masks = engine.denoise(x, t)
        assert eps.shape == (batch, 3, 32, 32) and masks.shape == (batch, 3, 32, 32)
        assert eps.dtype == torch.float32
        assert ref_eps.abs().max() > 0.1  # non-trivial outputs
        torch.testing.assert_close(eps, ref_eps, atol=1e-4, rtol=0)
        torch.testing.assert_close(masks, ref_masks, atol=1e-4, rtol=0)
        # and against the unfused reference (K separate decoder calls)
        with torch.no_grad():
            unfused_eps, _ = model.forward_unfused(x, t)
        torch.testing.assert_close(eps, unfused_eps, atol=1e-4, rtol=0)


def test_config_travels_in_onnx_metadata(tiny):
    _, ckpt, onnx_path = tiny
    meta = read_onnx_metadata(onnx_path)
    assert meta["config"] == TINY
    assert meta["dtype"] == "fp32" and meta["opset"] == "17" and meta["step"] == "11"
    assert onnx.load(str(onnx_path)).opset_import[0].version == 17


@pytest.mark.parametrize("overrides", [
    dict(num_regions=2, image_size=16, num_classes=4),  # class-conditional, K=2, 16x16
    dict(num_regions=2, image_size=32),
    dict(num_regions=4, image_size=16, variant="mask-mid"),
    dict(image_size=16, variant="concat"),
    dict(image_size=16, variant="no-share", num_regions=2),
    dict(image_size=16, variant="plain"),
    dict(num_regions=3, image_size=16, region_codes=True),
    dict(num_regions=3, image_size=16, mask_downsample=4),
], ids=["K2-16-classes", "K2-32", "mask-mid", "concat", "no-share", "plain", "region-codes", "mask-scale"])
def test_non_default_configs_export_without_flags(tmp_path, capsys, overrides, monkeypatch):
    cfg = TINY.replace(**overrides)
    model = make_checkpoint(tmp_path / "m.safetensors", 3, config=cfg, step=11, seed_torch=True)
    code, out, err = run_export(capsys, monkeypatch, "onnx", tmp_path / "m.safetensors", "-o", tmp_path / "m.onnx")
    assert code == 0, err
    assert "parity (onnxruntime CPU vs PyTorch fp32, max abs error): batch 1: eps" in out
    engine = open_engine("onnx", tmp_path / "m.onnx", device="cpu")
    assert engine.config == cfg
    x, t, y = example_inputs(cfg, 3, seed=5)
    with torch.no_grad():
        ref_eps, ref_masks = model(x, t, y)
    eps, masks = engine.denoise(x, t, y)
    k = 1 if cfg.variant == "plain" else cfg.num_regions
    assert masks.shape == (3, k, cfg.image_size, cfg.image_size)
    torch.testing.assert_close(eps, ref_eps, atol=1e-4, rtol=0)
    torch.testing.assert_close(masks, ref_masks, atol=1e-4, rtol=0)
    if cfg.num_classes:  # the labels reach the graph: other classes, other eps
        assert [i.name for i in engine.session.get_inputs()] == ["x_t", "t", "y"]
        other, _ = engine.denoise(x, t, (y + 1) % cfg.num_classes)
        assert (other - eps).abs().max() > 1e-3
        with pytest.raises(ValueError, match="class-conditional"):
            engine.denoise(x, t)


def test_fp16_export_is_close_and_bf16_is_written_unchecked(tiny, tmp_path, capsys, monkeypatch):
    model, ckpt, _ = tiny
    code, out, err = run_export(capsys, monkeypatch, "onnx", ckpt, "-o", tmp_path / "h.onnx", "--dtype", "fp16")
    assert code == 0, err
    assert "fp16" in out and "parity (onnxruntime" in out
    engine = open_engine("onnx", tmp_path / "h.onnx", device="cpu")
    assert engine.metadata["dtype"] == "fp16"
    x, t, _ = example_inputs(TINY, 4, seed=9)
    eps, masks = engine.denoise(x, t)
    with torch.no_grad():
        ref_eps, ref_masks = model(x, t)
    assert eps.dtype == torch.float32  # float32 at the boundary
    assert 0 < (eps - ref_eps).abs().max() < 5e-2 and (masks - ref_masks).abs().max() < 1e-2
    # half the size of the fp32 file
    assert (tmp_path / "h.onnx").stat().st_size < 0.6 * tiny[2].stat().st_size

    code, out, err = run_export(capsys, monkeypatch, "onnx", ckpt, "-o", tmp_path / "b.onnx", "--dtype", "bf16")
    assert code == 0, err
    assert "parity: skipped" in out
    assert read_onnx_metadata(tmp_path / "b.onnx")["dtype"] == "bf16"
    types = {i.data_type for i in onnx.load(str(tmp_path / "b.onnx")).graph.initializer}
    assert TensorProto.BFLOAT16 in types


def test_parity_check_failure_writes_nothing(tiny, tmp_path, capsys, monkeypatch):
    _, ckpt, _ = tiny
    # An impossible tolerance makes the built-in check fail: one line, exit 1, no file.
    r = run_export(capsys, monkeypatch, "onnx", ckpt, "-o", tmp_path / "x.onnx", "--tolerance", "1e-12")
    assert_one_line_error(r, "parity check failed")
    assert not (tmp_path / "x.onnx").exists()


# ------------------------------------------------------------------------------------------ bad files

def foreign_onnx(path: Path):
    node = helper.make_node("Add", ["a", "b"], ["c"])
    graph = helper.make_graph([node], "add", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def bad_files(folder: Path, good_onnx: Path):
    folder.mkdir(exist_ok=True)
    files = {}
    files["garbage.onnx"] = folder / "garbage.onnx"
    files["garbage.onnx"].write_bytes(np.random.default_rng(0).bytes(4000))
    files["truncated.onnx"] = folder / "truncated.onnx"
    files["truncated.onnx"].write_bytes(good_onnx.read_bytes()[:200_000])
    files["foreign.onnx"] = folder / "foreign.onnx"
    foreign_onnx(files["foreign.onnx"])
    files["empty.onnx"] = folder / "empty.onnx"
    files["empty.onnx"].write_bytes(b"")
    return files


@pytest.mark.parametrize("name", ["garbage.onnx", "truncated.onnx", "foreign.onnx", "empty.onnx"])
def test_corrupt_or_foreign_onnx_is_a_one_line_error(tiny, tmp_path, capsys, name, monkeypatch):
    path = bad_files(tmp_path / "bad", tiny[2])[name]
    with pytest.raises(UserError) as info:
        open_engine("onnx", path, device="cpu")
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    if name == "foreign.onnx":
        assert "not an fdm ONNX export" in message
    # through the CLI: building a plan from it
    assert_one_line_error(run_export(capsys, monkeypatch, "trt", path, "-o", tmp_path / "x.plan"), str(path))
    assert not (tmp_path / "x.plan").exists()


def test_corrupt_or_foreign_plan_is_a_one_line_error(tiny, tmp_path):
    good_header = pack_plan({"format": "fdm-trt-v1", "config": TINY.to_json(), "tensorrt_version": "0"}, b"xx")
    cases = {
        "onnx-as-plan.plan": tiny[2].read_bytes(),  # a foreign file
        "bare.plan": b"ftrt" + bytes(1000),  # a bare TensorRT engine has no fdm header
        "empty.plan": b"",
        "short.plan": MAGIC + b"\x01",
        "cut.plan": good_header[:30],
        "nojson.plan": MAGIC + (5).to_bytes(8, "little") + b"{oops" + b"engine",
        "noengine.plan": good_header[:-2],
        "badconfig.plan": pack_plan({"format": "fdm-trt-v1", "config": '{"nope": 1}'}, b"e"),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        for opener in (lambda p: read_plan(p), lambda p: open_engine("trt", p)):
            with pytest.raises(TensorRTError) as info:
                opener(path)
            assert str(path) in str(info.value) and "\n" not in str(info.value), name
    meta, engine = read_plan(_write(tmp_path / "ok.plan", good_header))
    assert meta["config"] == TINY and engine == b"xx"


def _write(path, data):
    path.write_bytes(data)
    return path


def test_bad_checkpoint_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 100)
    r = run_export(capsys, monkeypatch, "onnx", tmp_path / "bad.safetensors", "-o", tmp_path / "x.onnx")
    assert_one_line_error(r, "bad.safetensors")
    assert_one_line_error(run_export(capsys, monkeypatch, "onnx", tmp_path / "missing.safetensors"), "checkpoint not found")


def test_console_script_prints_one_line_for_a_corrupt_file(tmp_path):
    script = shutil.which("fdm-export") or str(Path(sys.executable).parent / "fdm-export")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    proc = subprocess.run([script, "trt", str(tmp_path / "bad.onnx")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("fdm-export: error:")
    assert "bad.onnx" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ missing TensorRT

def test_missing_tensorrt_is_a_one_line_error(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    r = run_export(capsys, monkeypatch, "trt", tiny[2], "-o", tmp_path / "m.plan")
    assert_one_line_error(r, "pip install tensorrt")
    assert MISSING_TENSORRT in r.err and not (tmp_path / "m.plan").exists()
    assert "--engine" not in r.err and "fdm-infer" in r.err  # fdm-infer's options are named as fdm-infer's
    # A well-formed plan file: the engine gets as far as needing TensorRT, and says so.
    plan = _write(tmp_path / "m.plan", pack_plan({"format": "fdm-trt-v1", "config": TINY.to_json()}, b"engine"))
    with pytest.raises(TensorRTError, match="pip install tensorrt"):
        open_engine("trt", plan)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_tensorrt_absent_here_says_so(tiny, tmp_path):
    with pytest.raises(TensorRTError, match="TensorRT is not installed"):
        build_plan(tiny[2], tmp_path / "m.plan")


def test_engines_are_registered():
    assert {"torch", "onnx", "trt"} <= set(ENGINES)


# ------------------------------------------------------------------------------------------ GPU-only

@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRT and HAS_CUDA), reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_plan_matches_pytorch(tiny, tmp_path, capsys, monkeypatch):
    model, _, onnx_path = tiny
    cache = tmp_path / "timing.cache"
    code, out, err = run_export(capsys, monkeypatch, "trt", onnx_path, "-o", tmp_path / "m.plan", "--min-batch", "1", "--opt-batch", "4",
                              "--max-batch", "8", "--timing-cache", cache, "--no-tf32")
    assert code == 0, err
    assert cache.is_file() and cache.stat().st_size > 0
    engine = open_engine("trt", tmp_path / "m.plan")
    assert engine.config == TINY and engine.max_batch == 8 and engine.metadata["gpu"] != "unknown"
    model = model.cuda()
    for batch in (1, 3, 8, 11):  # 11 > max batch: split in two calls
        x, t, _ = example_inputs(TINY, batch, seed=batch)
        x, t = x.cuda(), t.cuda()
        eps, masks = engine.denoise(x, t)
        assert eps.is_cuda and eps.shape == (batch, 3, 32, 32)
        with torch.no_grad():
            ref_eps, ref_masks = model(x, t)
        torch.testing.assert_close(eps, ref_eps, atol=1e-3, rtol=0)
        torch.testing.assert_close(masks, ref_masks, atol=1e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or importlib.util.find_spec("onnxruntime") is None, reason="needs CUDA")
def test_onnx_cuda_provider_keeps_tensors_on_gpu(tiny):
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu not installed")
    model, _, onnx_path = tiny
    engine = open_engine("onnx", onnx_path, device="cuda")
    x, t, _ = example_inputs(TINY, 3, seed=1)
    eps, masks = engine.denoise(x.cuda(), t.cuda())
    assert eps.is_cuda and masks.is_cuda
    with torch.no_grad():
        ref_eps, _ = model(x, t)
    torch.testing.assert_close(eps.cpu(), ref_eps, atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------------------ segment

def _segment_cli_ready() -> bool:
    return (importlib.util.find_spec("fdm_infer.cli") is not None
            and importlib.util.find_spec("fdm_infer.segment") is not None)


@pytest.mark.skipif(not LFW_VAL.is_dir(), reason="LFW val images not in shared/")
@pytest.mark.skipif(not _segment_cli_ready(), reason="fdm-infer segment not built yet")
def test_segment_onnx_equals_torch_on_lfw_val(tiny, tmp_path):
    _, ckpt, onnx_path = tiny
    images = sorted((LFW_VAL / "images").glob("*.jpg"))[:12]
    assert len(images) == 12
    src = tmp_path / "faces"
    src.mkdir()
    for p in images:
        shutil.copy(p, src / p.name)
    script = shutil.which("fdm-infer") or str(Path(sys.executable).parent / "fdm-infer")
    runs = {"torch": ["--checkpoint", str(ckpt)], "onnx": ["--engine", "onnx", "--model", str(onnx_path)]}
    labels = {}
    for engine, extra in runs.items():
        out = tmp_path / engine
        proc = subprocess.run([script, "segment", str(src), "--out", str(out), "--device", "cpu", *extra],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        labels[engine] = {p.name: np.array(Image.open(out / f"{p.stem}_labels.png")) for p in images}
    total = same = 0
    for name, torch_map in labels["torch"].items():
        onnx_map = labels["onnx"][name]
        assert onnx_map.shape == torch_map.shape
        total += torch_map.size
        same += int((onnx_map == torch_map).sum())
    assert len({v for m in labels["torch"].values() for v in np.unique(m)}) > 1  # not one label everywhere
    assert same / total >= 0.999, f"{same}/{total} pixels agree"
