import os

import pytest
import torch

pytest.register_assert_rewrite("helpers")  # the checks in helpers.py report their values as a test's own do

from helpers import write_images  # noqa: E402  (after the rewrite hook, which must see it first)

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    write_images(folder, 6)
    return folder


@pytest.fixture
def one_thread():
    """Single-threaded torch for the test: equal thread counts give equal bits, and 2 threads are slow
    when the 2 cores are shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
