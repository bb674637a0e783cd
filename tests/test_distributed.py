"""Data-parallel training: 2 CPU processes (DDP over gloo, env:// rendezvous as torchrun sets it up)
against single-process references with the same global batch and seed."""
import json
import os
import socket
from functools import partial

import pytest
import torch
import torch.multiprocessing as mp
from helpers import TINY, train_options, write_images

from fdm_core.checkpoint import read_checkpoint
from fdm_core.diffusion import GaussianDiffusion
from fdm_core.model import build_model
from fdm_train.data import EpochOrder, ShardedBatches, split_sizes
from fdm_train.distributed import NOISE_CHUNK, step_draws
from fdm_train.options import TrainingError
from fdm_train.train import _micro_batches, train

options = partial(train_options, batch_size=8, iterations=4, save_every=100, log_every=1, seed=11, lr=1e-3,
                  workers=0, device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Every process here computes single-threaded, as torchrun's workers do (OMP_NUM_THREADS=1): on a busy 2-core
# machine, 2-thread CPU kernels are slower by far, and equal thread counts give equal bits.
pytestmark = pytest.mark.usefixtures("one_thread")


def _rank_main(rank, world, runs):
    """One DDP process: the environment torchrun would give it, then train() for each (port, opts, dump)."""
    torch.set_num_threads(1)
    for port, opts, dump in runs:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        summary = train(opts)
        assert summary["world_size"] == world and summary["rank"] == rank
        torch.save(summary["weights"], dump.format(rank=rank))


def assert_equal_weights(a, b, what):
    for kind in ("model", "ema"):
        assert a[kind].keys() == b[kind].keys()
        for name in a[kind]:
            assert torch.equal(a[kind][name], b[kind][name]), f"{what}: {kind}.{name} differs"


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_two_process_ddp_equals_single_process(tmp_path):
    data = tmp_path / "images"
    write_images(data, 10)  # 10 images, global batch 8: steps straddle epoch boundaries
    even = options(data, tmp_path / "ddp8")  # 4 images per rank
    uneven = options(data, tmp_path / "ddp7", batch_size=7, micro_batch=2)  # shares 4 + 3, in 2 micro-batches
    runs = [(free_port(), even, str(tmp_path / "even{rank}.pt")),
            (free_port(), uneven, str(tmp_path / "uneven{rank}.pt"))]
    mp.spawn(_rank_main, args=(2, runs), nprocs=2, join=True)

    ddp = {name: [torch.load(tmp_path / f"{name}{r}.pt") for r in range(2)] for name in ("even", "uneven")}
    # Every rank holds the same raw weights and the same EMA, bit for bit.
    for name, (w0, w1) in ddp.items():
        assert_equal_weights(w0, w1, f"{name}: rank 0 vs rank 1")
    # Rank 0 alone wrote the run folder: one log line per step, and the checkpoint holds its weights.
    log = [json.loads(line) for line in (tmp_path / "ddp8" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["world_size"] == 2 and r["images_per_s_per_device"] > 0 for r in log)
    _, on_disk, meta = read_checkpoint(tmp_path / "ddp8" / "checkpoint.safetensors")
    assert meta["step"] == "4"
    assert_equal_weights({"model": on_disk["model"], "ema": on_disk["ema"]}, ddp["even"][0], "checkpoint")

    # Reference 1: one process, the same global batch and seed, split into the same micro-batches
    # (gradient accumulation), single-threaded like the DDP workers: identical to the last bit.
    single4 = train(options(data, tmp_path / "single4", micro_batch=4))
    assert_equal_weights(single4["weights"], ddp["even"][0], "DDP 2x4 vs one process, micro-batch 4")

    # Reference 2: one process, the whole global batch in one forward pass (and, for the uneven split,
    # the global batch of 7 in micro-batches of 2). Same data, same noise: the same losses and weights up
    # to float rounding in the gradient sums.
    plain = train(options(data, tmp_path / "plain"))
    single7 = train(options(data, tmp_path / "single7", batch_size=7, micro_batch=2))
    for ref, run in (("plain", "ddp8"), ("single7", "ddp7")):
        ref_losses, run_losses = losses(tmp_path / ref), losses(tmp_path / run)
        assert ref_losses[0] == pytest.approx(run_losses[0], rel=1e-6)  # same weights, data and noise
        assert ref_losses == pytest.approx(run_losses, rel=2e-3)  # after Adam steps from rounded gradients
    assert_close_weights(plain["weights"], ddp["even"][0])
    assert_close_weights(single7["weights"], ddp["uneven"][0])


def assert_close_weights(a, b):
    """The same model up to float rounding, judged by what it computes: eps and masks on fixed inputs
    differ by under 2% of how far training moved them. (Element-wise the weights may not agree: Adam's
    step g/sqrt(v) turns rounding noise on gradients that are zero in exact arithmetic, such as those of
    per-channel biases followed by a GroupNorm of one channel per group, into full-size steps along
    directions the network does not depend on. A batch that differs by one image in eight moves eps
    by 12% and the masks by 55% here.)"""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 1000, (16,), generator=g)
    torch.manual_seed(11)
    nets = [build_model(TINY).eval()]
    for kind in ("model", "ema"):
        for weights in (a, b):
            net = build_model(TINY).eval()
            net.load_state_dict(weights[kind])
            nets.append(net)
        with torch.no_grad():
            (eps0, m0), (eps_a, m_a), (eps_b, m_b) = (net(x, t) for net in nets)
        assert (eps_a - eps_b).norm() < 0.02 * (eps_a - eps0).norm(), kind
        assert (m_a - m_b).norm() < 0.02 * (m_a - m0).norm(), kind
        del nets[1:]


def test_shards_partition_the_global_batch():
    size, seed = 10, 5
    for global_batch, world in ((8, 2), (7, 2), (9, 3), (5, 4)):
        reference = EpochOrder(size, seed)
        streams = [iter(ShardedBatches(size, seed, global_batch, r, world)) for r in range(world)]
        seen_in_epoch = {}
        for step in range(7):
            shares = [next(s) for s in streams]
            assert [len(s) for s in shares] == split_sizes(global_batch, world)
            assert [k for share in shares for k in share] == reference.next_batch(global_batch)
        # Within each epoch, every image appears exactly once over all ranks.
        order = EpochOrder(size, seed)
        keys = order.next_batch(global_batch * 7)
        for epoch in range(global_batch * 7 // size):
            indices = sorted(i for i, _ in keys[epoch * size:(epoch + 1) * size])
            assert indices == list(range(size)), seen_in_epoch
    # Started at a stored position, the shards continue exactly where an uninterrupted stream is.
    full = iter(ShardedBatches(size, seed, 8, 1, 2))
    for _ in range(3):
        next(full)
    order = EpochOrder(size, seed)
    for _ in range(3):
        order.next_batch(8)
    resumed = iter(ShardedBatches(size, seed, 8, 1, 2, position=order.position))
    assert [next(resumed) for _ in range(4)] == [next(full) for _ in range(4)]


def test_noise_of_a_row_does_not_depend_on_the_split():
    shape, dev = (3, 4, 4), torch.device("cpu")
    total = 3 * NOISE_CHUNK + 5
    t_all, n_all = step_draws(1, 7, 0, total, shape, GaussianDiffusion(), dev)
    assert t_all.shape == (total,) and n_all.shape == (total, *shape)
    for cuts in ([0, 13, total], [0, NOISE_CHUNK, NOISE_CHUNK + 1, 40, total], [0, 1, total]):
        pieces = [step_draws(1, 7, a, b, shape, GaussianDiffusion(), dev) for a, b in zip(cuts, cuts[1:])]
        assert torch.equal(torch.cat([t for t, _ in pieces]), t_all)
        assert torch.equal(torch.cat([n for _, n in pieces]), n_all)
    # Another step or seed draws other noise; the noise is standard normal.
    assert not torch.equal(step_draws(1, 8, 0, total, shape, GaussianDiffusion(), dev)[1], n_all)
    assert not torch.equal(step_draws(2, 7, 0, total, shape, GaussianDiffusion(), dev)[1], n_all)
    big = step_draws(0, 0, 0, 256, (3, 16, 16), GaussianDiffusion(), dev)
    assert abs(big[1].mean().item()) < 0.02 and abs(big[1].std().item() - 1) < 0.02
    assert 0 <= big[0].min() and big[0].max() < 1000


def test_micro_batch_settings(tmp_path):
    opts = lambda **kw: options(tmp_path, tmp_path, **kw)
    assert _micro_batches(opts(batch_size=8), 2) == 1
    assert _micro_batches(opts(batch_size=8, micro_batch=3), 2) == 2  # 4 per device, at most 3 per pass
    assert _micro_batches(opts(batch_size=7, grad_accum=3), 2) == 3  # shares 4 and 3
    with pytest.raises(TrainingError, match="leave a device"):
        _micro_batches(opts(batch_size=7, grad_accum=4), 2)
    with pytest.raises(TrainingError, match="smaller than the number of devices"):
        _micro_batches(opts(batch_size=2), 4)
    with pytest.raises(TrainingError, match="not both"):
        _micro_batches(opts(micro_batch=2, grad_accum=2), 1)
