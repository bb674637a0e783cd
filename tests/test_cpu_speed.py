"""The fast CPU paths give the reference's label maps, and the pipelined segmentation writes the files of the
unpipelined run, in order, and only whole files when interrupted."""
from __future__ import annotations

import json
import signal
import sys
import threading
import time

import numpy as np
import pytest
import torch
from helpers import make_checkpoint, perturb, tiny_checkpoint_fixture
from PIL import Image

from fdm_core.config import preset
from fdm_core.model import build_model, count_flops

tiny_checkpoint = tiny_checkpoint_fixture()


def small_model(**overrides):
    return perturb(build_model(preset("tiny-32", image_size=16, **overrides)), scale=0.05).eval()


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def assert_same_labels(masks: torch.Tensor, reference: torch.Tensor, tol: float = 1e-4) -> None:
    """The labels of soft masks [B, K, H, W] equal the reference's, but where the reference's top two masks
    are within `tol` of each other (a tie that float rounding may break either way)."""
    top2 = reference.topk(2, dim=1).values
    differ = masks.argmax(1) != reference.argmax(1)
    margins = (top2[:, 0] - top2[:, 1])[differ]
    assert margins.numel() == 0 or margins.max() < tol, differ.float().mean()
    assert differ.float().mean() < 0.01
    torch.testing.assert_close(masks, reference, atol=tol, rtol=0)


# ----- the masks alone -----

@pytest.mark.parametrize("variant", ["factorized", "mask-mid", "plain"])
def test_the_masks_alone_are_the_masks_of_the_whole_forward(variant):
    from fdm_infer.engines.torch_engine import TorchEngine

    model = small_model(variant=variant, num_regions=3)
    engine = TorchEngine.from_model(model, device="cpu")
    x, t = images(3), torch.tensor([30, 400, 999])
    _, whole = engine.denoise(x, t)
    assert torch.equal(engine.masks(x, t), whole)  # the same operations on the same inputs: the same bits
    if variant != "plain":
        assert count_flops(model.cfg, masks_only=True) < count_flops(model.cfg) / 2  # the K decoder branches left out


def test_onnx_masks_alone_equal_its_whole_graph_from_a_file_and_from_memory(tmp_path):
    from fdm_export.onnx_export import export_onnx
    from fdm_infer.engines.onnx_engine import OnnxEngine

    path = tmp_path / "m.safetensors"
    model = make_checkpoint(path, image_size=16)
    export_onnx(path, tmp_path / "m.onnx", check=False)
    x, t = images(4), torch.full((4,), 30)
    from_file = OnnxEngine(tmp_path / "m.onnx", device="cpu")
    _, whole = from_file.denoise(x, t)
    torch.testing.assert_close(from_file.masks(x, t), whole, atol=1e-6, rtol=0)
    from_memory = OnnxEngine.from_checkpoint(path, device="cpu")
    assert from_memory.path == path and from_memory.config == model.cfg
    torch.testing.assert_close(from_memory.masks(x, t), whole, atol=1e-6, rtol=0)
    eps, _ = from_memory.denoise(x, t)
    with torch.no_grad():
        reference_eps, reference_masks = model(x, t)
    torch.testing.assert_close(eps, reference_eps, atol=1e-4, rtol=0)
    assert_same_labels(whole, reference_masks)


# ----- every CPU path gives the reference's labels -----

def cpu_path_cases():
    from fdm_eval.cpu_paths import CPU_PATHS

    return [pytest.param(p.key, marks=[pytest.mark.slow] if p.compiles else []) for p in CPU_PATHS if p.key != "eager"]


@pytest.mark.parametrize("key", cpu_path_cases())
def test_each_cpu_path_gives_the_reference_labels(key, one_thread):
    from fdm_eval.cpu_paths import CPU_PATHS, open_path
    from fdm_infer.segment import segment_tensor

    model = small_model(num_regions=4)
    paths = {p.key: p for p in CPU_PATHS}
    reference_engine = open_path(paths["eager"], model)
    engine = open_path(paths[key], model)
    x = images(8, seed=3)
    reference = segment_tensor(reference_engine, x, smooth=1)
    assert_same_labels(segment_tensor(engine, x, smooth=1), reference)
    # a sampling step's model call: eps as well
    x_t, t = images(4, seed=4), torch.full((4,), 500)
    eps, masks = engine.denoise(x_t, t)
    reference_eps, reference_masks = reference_engine.denoise(x_t, t)
    torch.testing.assert_close(eps, reference_eps, atol=1e-4, rtol=0)
    assert_same_labels(masks, reference_masks)


def test_a_checkpoint_runs_on_onnxruntime_on_the_cpu_unless_an_engine_is_named(tiny_checkpoint):
    from fdm_infer.engines import open_model

    assert open_model(tiny_checkpoint, device="cpu")[0].name == "onnx"
    assert open_model(tiny_checkpoint, "auto", device="cpu")[0].name == "onnx"
    assert open_model(tiny_checkpoint, "torch", device="cpu")[0].name == "torch"


# ----- the pipeline -----

def test_read_ahead_and_write_behind_keep_the_order_and_stop_whole():
    from fdm_infer.pipeline import ReadAhead, WriteBehind

    rng = np.random.default_rng(0)
    delays = rng.uniform(0, 0.01, 40)

    def slow(i):
        time.sleep(delays[i])
        return i

    with ReadAhead(iter(slow(i) for i in range(10))) as values:
        assert list(values) == list(range(10))
    writer = WriteBehind(workers=3, depth=5)
    taken = []
    for i in range(40):
        taken += writer.submit(slow, i)
        assert len(writer._pending) <= 5
    assert taken + writer.drain() == list(range(40))

    started, release = [], threading.Event()

    def blocked(i):
        started.append(i)
        release.wait(5)
        return i

    writer = WriteBehind(workers=2, depth=10)
    for i in range(6):
        writer.submit(blocked, i)
    while len(started) < 2:
        time.sleep(0.01)
    threading.Timer(0.2, release.set).start()
    assert writer.stop(finish=False) == [0, 1]  # the two running were finished, the four waiting dropped
    assert started == [0, 1]


def folder_of_images(folder, n: int = 7):
    """Images of several sizes and one file that is not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        shape = (24 + 7 * (i % 3), 30 + 5 * (i % 2), 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"im{i}.{'png' if i % 2 else 'jpg'}")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def files_of(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "summary.json"}


def test_the_pipelined_run_writes_the_files_of_the_unpipelined_run_in_order(tiny_checkpoint, tmp_path):
    from fdm_infer import Segmenter
    from fdm_infer.outputs import OutputOptions

    inputs = folder_of_images(tmp_path / "in")
    segmenter = Segmenter.load(tiny_checkpoint, device="cpu", batch_size=3)
    options = OutputOptions(save_soft=True, save_channels=True, foreground=True, rle="compressed")
    reports = {workers: segmenter.segment_files([inputs], tmp_path / f"w{workers}", options, progress=False,
                                                workers=workers, warn=lambda message: None)
               for workers in (0, 3)}
    one, three = files_of(tmp_path / "w0"), files_of(tmp_path / "w3")
    assert len(one) == 7 * 5 and one == three
    summaries = [json.loads((tmp_path / f"w{w}" / "summary.json").read_text()) for w in (0, 3)]
    assert summaries[0]["images"] == summaries[1]["images"]
    assert [e["input"] for e in summaries[1]["images"]] == [str(inputs / f"im{i}.{'png' if i % 2 else 'jpg'}")
                                                            for i in range(7)]
    assert reports[0].failed == reports[3].failed and "broken.png" in reports[3].failed[0][0]
    # the in-memory API too
    arrays = [np.asarray(Image.open(inputs / f"im{i}.png")) for i in (1, 3, 5)]
    alone, threaded = segmenter(arrays, workers=0), segmenter(arrays, workers=2)
    for a, b in zip(alone.labels, threaded.labels):
        np.testing.assert_array_equal(a, b)


def test_ctrl_c_twice_in_a_pipelined_run_leaves_only_whole_files_and_a_summary_of_them(tiny_checkpoint, tmp_path,
                                                                                        monkeypatch):
    """The first Ctrl-C (in the model pass of the fourth batch) lets the images segmented be written; the
    second (a real SIGINT, while the run waits for those writes) lets the writes under way finish and drops
    the others. The writes are held until the run is stopping, so each event has one place to happen."""
    import fdm_infer.image_files as images_module
    from fdm_infer import Segmenter, pipeline

    inputs = folder_of_images(tmp_path / "in", 12)
    (inputs / "broken.png").unlink()
    segmenter = Segmenter.load(tiny_checkpoint, device="cpu", batch_size=2)
    real_save, real_masks, real_stop, passes = images_module.save_png, segmenter.engine.masks, pipeline.WriteBehind.stop, []
    stopping, second_sent, signal_lock = threading.Event(), [], threading.Lock()

    def waits_in_threading(thread_id) -> bool:
        frame = sys._current_frames().get(thread_id)
        return frame is not None and frame.f_code.co_name == "wait" and frame.f_code.co_filename == threading.__file__

    def held_save(*args, **kwargs):
        # Held until the run stops; then the first write under way sends Ctrl-C again once the run waits for the
        # writes (a signal that comes before the wait blocks is only seen when the wait ends).
        assert stopping.wait(60), "the run never stopped"
        with signal_lock:
            if not second_sent:
                main = threading.main_thread().ident
                deadline = time.monotonic() + 60
                while not waits_in_threading(main) and time.monotonic() < deadline:
                    time.sleep(0.005)
                time.sleep(0.05)
                second_sent.append(1)
                signal.pthread_kill(main, signal.SIGINT)
        time.sleep(0.05)
        real_save(*args, **kwargs)

    def masks(*args):
        passes.append(1)
        if len(passes) == 5:  # the empty image's pass, then batches 1, 2, 3; Ctrl-C in batch 4's
            raise KeyboardInterrupt
        return real_masks(*args)

    def stop(self, finish=True):
        stopping.set()
        return real_stop(self, finish)

    monkeypatch.setattr(images_module, "save_png", held_save)
    monkeypatch.setattr(segmenter.engine, "masks", masks)
    monkeypatch.setattr(pipeline.WriteBehind, "stop", stop)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    out = tmp_path / "out"
    try:
        with pytest.raises(KeyboardInterrupt, match=r"after \d+ of 12 images"):
            segmenter.segment_files([inputs], out, progress=False, workers=2)
    finally:
        stopping.set()
        signal.signal(signal.SIGINT, previous)
    assert second_sent
    summary = json.loads((out / "summary.json").read_text())
    listed = {name for entry in summary["images"] for name in entry["outputs"].values()}
    on_disk = {p.name for p in out.iterdir() if p.name != "summary.json"}
    assert not [name for name in on_disk if name.endswith(".tmp")]
    assert on_disk == listed  # every file written belongs to an image whose files are all there
    assert 0 < len(summary["images"]) < 6 == 2 * 3  # some of the three batches segmented were dropped
    assert summary["run"]["interrupted"]["done"] == len(summary["images"])
    for name in on_disk:
        with Image.open(out / name) as image:
            image.load()  # a whole PNG
