"""The input pipeline: DataLoader workers (same batches, bad files still counted) and the pre-decoded
uint8 cache of `fdm-train prepare-data` (same pixels, same training run as the JPEG/PNG folder)."""
import json
from functools import partial

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import train_options, write_images

from fdm_core.checkpoint import read_checkpoint
from fdm_core.images import DataError
from fdm_train.cli import main_group
from fdm_train.data import ImageCache, ImageFolder, ShardedBatches, make_loader, open_images
from fdm_train.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


options = partial(train_options, batch_size=4, iterations=4, save_every=100, log_every=2, seed=3, workers=0,
                  device="cpu")


def with_bad_files(folder):
    write_images(folder / "a", 5)
    (folder / "notes.jpg").write_text("not an image")
    good = (folder / "a" / "img000.jpg").read_bytes()
    (folder / "a" / "cut.jpg").write_bytes(good[: len(good) // 2])
    return folder


def test_prepare_data_cache_has_the_folders_pixels_and_trains_identically(tmp_path):
    folder = with_bad_files(tmp_path / "images")
    cache = tmp_path / "cache" / "faces16.npy"
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        result = CliRunner().invoke(main_group, ["prepare-data", str(folder), "-o", str(cache), "--image-size", "16",
                                                 "--workers", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "5 images of 16x16" in result.output and "2 unreadable skipped" in result.output
    manifest = json.loads((tmp_path / "cache" / "faces16.npy.json").read_text())
    assert manifest["count"] == 5 and manifest["image_size"] == 16
    assert sorted(s["file"] for s in manifest["skipped"]) == ["a/cut.jpg", "notes.jpg"]
    arr = np.load(cache)
    assert arr.dtype == np.uint8 and arr.shape == (5, 3, 16, 16)
    assert not list(cache.parent.glob(".*tmp*"))

    # The same pixels as decoding the files (flipped or not) ...
    clean = tmp_path / "clean"
    write_images(clean / "a", 5)
    from_files, from_cache = ImageFolder(clean, 16), open_images(cache, 16)
    assert isinstance(from_cache, ImageCache) and len(from_cache) == len(from_files) == 5
    for i in range(5):
        for flip in (False, True):
            assert torch.equal(from_cache[(i, flip)][0], from_files[(i, flip)][0])
    # ... so training on the cache is training on the folder, bit for bit.
    a = train(options(clean, tmp_path / "files"))
    b = train(options(cache, tmp_path / "cached"))
    for kind in ("model", "ema"):
        for name, tensor in a["weights"][kind].items():
            assert torch.equal(tensor, b["weights"][kind][name]), name
    _, _, meta = read_checkpoint(tmp_path / "cached" / "checkpoint.safetensors")
    assert json.loads(meta["extra"])["data"] == str(cache)


def test_cache_errors_are_one_line(tmp_path):
    folder = tmp_path / "images"
    write_images(folder, 3)
    cache = tmp_path / "c.npy"
    CliRunner().invoke(main_group, ["prepare-data", str(folder), "-o", str(cache), "--image-size", "16", "--workers", "1"],
                       catch_exceptions=False)
    with pytest.raises(DataError, match="holds 16x16 images, the model wants 32x32"):
        ImageCache(cache, 32)
    (tmp_path / "c.npy.json").unlink()
    with pytest.raises(DataError, match="no manifest"):
        ImageCache(cache, 16)
    with pytest.raises(DataError, match="must be a .npy file"):
        from fdm_train.data import prepare_cache
        prepare_cache(folder, tmp_path / "c.bin", 16)


def test_loader_workers_give_the_same_batches_and_report_bad_files(tmp_path):
    folder = with_bad_files(tmp_path / "images")
    dataset = ImageFolder(folder, 16)
    assert len(dataset) == 7

    def first_steps(workers, n=6):
        loader = make_loader(ImageFolder(folder, 16), ShardedBatches(7, 3, 4, rank=1, world=2, position=(1, 3)),
                             workers=workers)
        it = iter(loader)
        steps = [next(it) for _ in range(n)]
        del it
        return steps

    inline, workers = first_steps(0), first_steps(2)
    for (x0, y0, bad0), (x1, y1, bad1) in zip(inline, workers):
        assert x0.dtype == torch.uint8 and x0.shape == (2, 3, 16, 16)
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    # Each worker process finds the unreadable files on its own; the names come back with the batches.
    found = {path for _, _, bad in workers for path, _ in bad}
    assert {p.split("/")[-1] for p in found} == {"notes.jpg", "cut.jpg"}

    # In training, the main process reports and counts them once.
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        summary = train(options(folder, tmp_path / "run", workers=2, iterations=4))
    assert sorted(p.split("/")[-1] for p in summary["bad_files"]) == ["cut.jpg", "notes.jpg"]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["bad_files"] == 2 and log[-1]["images_per_s_per_device"] > 0
    assert 0 <= log[-1]["data_wait"] <= 1
    # ... and the run is the run without workers.
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        inline_run = train(options(folder, tmp_path / "inline", workers=0, iterations=4))
    for name, tensor in summary["weights"]["model"].items():
        assert torch.equal(tensor, inline_run["weights"]["model"][name]), name
