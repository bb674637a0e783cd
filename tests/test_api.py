"""The Python API (fdm_infer.Segmenter, fdm_infer.generate): every kind of input, label maps at the
input's own size against an independent reference, soft masks, save / to_json, the engine chosen by the
model file's suffix, and the README's example run as written."""
import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, refined_reference, smoothed_reference, tiny_checkpoint_fixture
from PIL import Image

from fdm_core.checkpoint import read_checkpoint, save_checkpoint
from fdm_core.config import preset
from fdm_core.errors import UserError
from fdm_core.model import build_model
from fdm_infer import Segmenter, generate
from fdm_infer.engines import DEFAULT_MODEL, engine_for, open_model
from fdm_infer.rle import decode
from fdm_infer.sampling import generate as sample

tiny_checkpoint = tiny_checkpoint_fixture()


def reference_labels(tiny_checkpoint, rgb: np.ndarray, t: int = 30, seed: int = 0):
    """Labels and soft masks computed without fdm_infer: PIL bicubic to 32x32, the schedule from numpy, the
    model's K separate decoder calls, bilinear back to the input's size, the guided filter written out."""
    cfg, states, _ = read_checkpoint(tiny_checkpoint)
    model = build_model(cfg)
    model.load_state_dict(states["ema"])
    model.eval()
    small = np.asarray(Image.fromarray(rgb).resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32)
    x = torch.from_numpy(small).permute(2, 0, 1)[None] / 127.5 - 1
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))[t]
    noise = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        masks = model.forward_unfused((abar ** 0.5 * x + (1 - abar) ** 0.5 * noise).float(), torch.full((1,), t))[1]
    masks = torch.from_numpy(smoothed_reference(masks)).float()  # the default read-out: 3 x 3 smoothing
    soft = F.interpolate(masks, size=rgb.shape[:2], mode="bilinear", align_corners=False)[0]
    soft = refined_reference(soft.numpy(), rgb)  # the default read-out: snapped to the image's edges
    return soft.argmax(0), soft


def assert_labels_match(labels: np.ndarray, ref_labels: np.ndarray, ref_soft: np.ndarray):
    """Equal up to float noise: any differing pixel is a near-tie of the reference's two best masks."""
    assert labels.shape == ref_labels.shape and labels.dtype == np.uint8
    top2 = np.sort(ref_soft, axis=0)[-2:]
    differ = labels != ref_labels
    assert differ.mean() < 0.01 and (top2[1] - top2[0])[differ].max(initial=0) < 1e-4


def test_every_kind_of_input_gives_labels_at_its_own_size(tiny_checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)  # odd sizes, taller than wide
    wide = rng.integers(0, 256, (19, 61, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (23, 37), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    inputs = {
        "path": str(tmp_path / "rgb.png"),
        "rgb uint8": rgb,
        "rgb float": rgb.astype(np.float64) / 255,
        "rgba array": np.dstack([rgb, np.full((37, 23), 7, np.uint8)]),
        "PIL RGBA": Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (37, 23), dtype=np.uint8)])),
        "tensor CHW float": torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,
        "wide": wide,
        "PIL L": Image.fromarray(gray),
        "gray float32": gray.astype(np.float32) / 255,
        "gray tensor uint8": torch.from_numpy(gray),
    }
    seg = Segmenter.load(tiny_checkpoint, device="cpu")
    res = seg(list(inputs.values()))
    assert len(res) == len(inputs)
    labels = dict(zip(inputs, res.labels))
    soft = dict(zip(inputs, res.soft))
    for name, image in (("rgb uint8", rgb), ("wide", wide), ("PIL L", np.repeat(gray[..., None], 3, axis=2))):
        assert_labels_match(labels[name], *reference_labels(tiny_checkpoint, image))
    # The same pixels in any container give the same labels: alpha is dropped, floats are [0, 1].
    for name in ("path", "rgb float", "rgba array", "PIL RGBA", "tensor CHW float"):
        np.testing.assert_array_equal(labels[name], labels["rgb uint8"], err_msg=name)
    for name in ("gray float32", "gray tensor uint8"):
        np.testing.assert_array_equal(labels[name], labels["PIL L"], err_msg=name)
    for name, masks in soft.items():
        assert masks.shape == (3, *labels[name].shape) and masks.dtype == np.float32
        np.testing.assert_allclose(masks.sum(0), 1, atol=1e-5)
        np.testing.assert_array_equal(masks.argmax(0), labels[name])
    fg = res.foreground
    assert [f.shape for f in fg] == [lab.shape for lab in res.labels]
    np.testing.assert_array_equal(fg[0], np.isin(res.labels[0], res.fg_channels))


def test_batches_folders_and_single_images(tiny_checkpoint, tmp_path):
    rng = np.random.default_rng(1)
    batch = torch.rand(3, 3, 20, 28, generator=torch.Generator().manual_seed(1))
    seg = Segmenter.load(tiny_checkpoint, device="cpu", batch_size=2)
    res = seg(batch)  # a 4-D tensor is a batch
    assert [lab.shape for lab in res.labels] == [(20, 28)] * 3
    one = seg(batch[1])  # one image alone: the same masks, whatever its batch
    np.testing.assert_array_equal(one.labels[0], res.labels[1])
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name, shape in (("b.png", (9, 13, 3)), ("a.jpg", (17, 5, 3)), ("sub/c.png", (8, 8, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name)
    res = seg(folder)
    assert [item.source for item in res.items] == [str(folder / n) for n in ("a.jpg", "b.png", "sub/c.png")]
    assert [lab.shape for lab in res.labels] == [(17, 5), (9, 13), (8, 8)]


def test_save_and_to_json_round_trip(tiny_checkpoint, tmp_path):
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (31, 45, 3), dtype=np.uint8), rng.random((12, 40)), str(ROOT / "examples" /
                                                                                          "Mark_Warner_0001.jpg")]
    res = Segmenter.load(tiny_checkpoint, device="cpu")(images)
    out = tmp_path / "out"
    summary_path = res.save(out, foreground=True, save_soft=True, rle="compressed")
    saved = json.loads(summary_path.read_text())
    described = json.loads(res.to_json(rle="compressed"))
    assert saved["run"]["model"] == str(tiny_checkpoint) and saved["run"]["engine"] == "onnx"  # the CPU's engine
    assert saved["run"]["t"] == 30 and saved["run"]["foreground"]["channels"] == res.fg_channels
    assert [e["input"] for e in saved["images"]] == ["<image_0000>", "<image_0001>", images[2]]
    for i, (entry, plain) in enumerate(zip(saved["images"], described["images"])):
        files = entry.pop("outputs")
        assert entry == plain  # to_json says what save wrote, but the files
        labels = Image.open(out / files["labels"])
        assert labels.mode == "P"
        np.testing.assert_array_equal(np.asarray(labels), res.labels[i])
        np.testing.assert_array_equal(np.asarray(Image.open(out / files["foreground"])), res.foreground[i] * 255)
        np.testing.assert_array_equal(np.load(out / files["soft"])["masks"], res.soft[i].astype(np.float16))
        for rle in entry["rle"]:
            np.testing.assert_array_equal(decode(rle), res.labels[i] == rle["label"])
        shares = np.bincount(res.labels[i].ravel(), minlength=3) / res.labels[i].size
        np.testing.assert_allclose(entry["region_share"], shares, atol=1e-4)
        assert entry["size"] == list(res.labels[i].shape)
        assert entry["foreground_channels"] == res.fg_channels
    assert {p.name for p in out.iterdir()} >= {"image_0000_labels.png", "image_0001_overlay.png",
                                               "Mark_Warner_0001_labels.png", "summary.json"}


def test_bad_inputs_are_one_line_errors(tiny_checkpoint, tmp_path):
    seg = Segmenter.load(tiny_checkpoint, device="cpu")
    cases = [([1, 2, 3], "cannot read an image from a list"), (np.zeros((4, 5, 2)), "[H, W] or [H, W, 3|4]"),
             (torch.zeros(5, 4, 4), "[1|3|4, H, W]"), (str(tmp_path / "missing.png"), "no such file or folder"),
             (np.zeros((0, 3, 3)), "[H, W] or [H, W, 3|4]")]
    (tmp_path / "bad.jpg").write_text("not an image")
    cases.append((str(tmp_path / "bad.jpg"), "not a readable image"))
    for images, message in cases:
        with pytest.raises(UserError, match=re.escape(message)) as info:
            seg(images if isinstance(images, str) else [images])
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="timestep must be between 0 and 999"):
        Segmenter.load(tiny_checkpoint, timestep=1000)


# ----- the engine follows the file -----

def test_engine_from_the_suffix():
    assert [engine_for(name) for name in ("a.safetensors", "b.onnx", "c.plan", "d.engine", "E.ONNX")] == [
        "torch", "onnx", "trt", "trt", "onnx"]
    with pytest.raises(UserError) as info:
        engine_for("model.bin")
    message = str(info.value)
    assert "model.bin" in message and ".safetensors (torch)" in message and ".onnx" in message and ".plan" in message
    assert "\n" not in message


def test_each_engine_opened_by_its_file(tiny_checkpoint, tmp_path):
    from fdm_export.onnx_export import export_onnx
    from fdm_infer.engines.trt_engine import TensorRTError

    onnx_file = tmp_path / "tiny.onnx"
    export_onnx(tiny_checkpoint, onnx_file, check=False)
    image = np.random.default_rng(3).integers(0, 256, (29, 33, 3), dtype=np.uint8)
    by_torch = Segmenter.load(tiny_checkpoint, engine="torch", device="cpu")
    by_onnx = Segmenter.load(onnx_file, device="cpu")
    assert (by_torch.engine.name, by_onnx.engine.name) == ("torch", "onnx")
    np.testing.assert_allclose(by_onnx([image]).soft[0], by_torch([image]).soft[0], atol=1e-4)
    # A plan goes to the TensorRT engine, which reads the file before it needs TensorRT.
    (tmp_path / "junk.plan").write_bytes(b"not a plan")
    with pytest.raises(TensorRTError, match="not an fdm TensorRT plan"):
        open_model(tmp_path / "junk.plan")
    # An unknown suffix runs only when the engine is named; a known suffix must match the named engine.
    renamed = tmp_path / "weights.bin"
    shutil.copy(tiny_checkpoint, renamed)
    with pytest.raises(UserError, match="cannot tell which of the engines runs weights.bin"):
        Segmenter.load(renamed)
    assert Segmenter.load(renamed, engine="torch").engine.name == "torch"
    with pytest.raises(UserError, match="the trt engine cannot run tiny.safetensors"):
        Segmenter.load(tiny_checkpoint, engine="trt")
    assert Segmenter.load().model == DEFAULT_MODEL


def test_placeholder_models_say_so_and_the_default_is_not_one(tmp_path):
    assert "placeholder" not in read_checkpoint(DEFAULT_MODEL)[2]
    notes = []
    Segmenter.load(notify=notes.append)
    assert notes == []
    cfg = preset("tiny-32")
    path = tmp_path / "p.safetensors"
    save_checkpoint(path, cfg, build_model(cfg).state_dict(), None, step=0, placeholder="untrained weights")
    Segmenter.load(path, notify=notes.append)
    assert notes == ["p.safetensors is a placeholder model: untrained weights"]


# ----- generation -----

def test_generate_returns_images_and_masks(tiny_checkpoint, tmp_path):
    samples = generate(tiny_checkpoint, 3, steps=3, sampler="ddim", seed=4, batch_size=2, device="cpu")
    assert samples.array.shape == (3, 32, 32, 3) and samples.array.dtype == np.uint8
    assert samples.soft.shape == (3, 3, 32, 32) and samples.labels.shape == (3, 32, 32)
    np.testing.assert_allclose(samples.soft.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(samples.labels, samples.soft.argmax(1))
    # The same run as the sampler underneath (what fdm-infer generate ran before the API).
    engine, _ = open_model(tiny_checkpoint, device="cpu")
    direct, _ = sample(engine, 3, steps=3, sampler="ddim", seed=4, batch_size=2)
    assert torch.equal(samples.result.images, direct.images)
    written = samples.save(tmp_path / "s")
    assert sorted(p.name for p in written) == sorted(
        [f"sample_{i:04d}{s}" for i in range(3) for s in (".png", "_labels.png")] + ["grid.png", "summary.json"])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "s" / "sample_0002_labels.png")), samples.labels[2])


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no python example"
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    res, samples = namespace["res"], namespace["samples"]
    assert res.labels[2].shape == (37, 23)
    assert json.loads((tmp_path / "out" / "api" / "summary.json").read_text())["images"][0]["input"].startswith(
        "examples/")
    assert (tmp_path / "out" / "samples" / "grid.png").is_file() and samples.array.shape[0] == 4
