"""Runs killed with SIGKILL (at a random step, inside a checkpoint write, one worker of a torchrun job)
and resumed with `--resume auto` (or by torchrun's elastic restart) end on the same weights as a run
that was never interrupted."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import make_checkpoint, train_options, write_images
from PIL import Image

from fdm_core.checkpoint import read_checkpoint
from fdm_core.errors import UserError
from fdm_core.lock import LOCK
from fdm_train.cli import main_group
from fdm_train.run_folder import (
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    PREVIOUS_STATE,
    TRAINING_STATE,
    _state_id,
    complete_checkpoints,
)
from fdm_train.train import train

ITERATIONS, SAVE_EVERY = 12, 3
ENV = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")

# fdm-train, with one optional fault: KILL_IN_WRITE=NAME:N kills the process (SIGKILL) during the N-th
# atomic write of the file NAME, after half of its bytes have gone to the temporary file.
LAUNCHER = """
import os, signal, sys, tempfile
from pathlib import Path
import torch
torch.set_num_threads(1)
target = os.environ.get("KILL_IN_WRITE")
if target:
    import fdm_core.checkpoint as ck
    name, nth = target.rsplit(":", 1)
    count, real = [0], ck.atomic_write
    def atomic_write(path, data):
        path = Path(path)
        if path.name == name:
            count[0] += 1
            if count[0] == int(nth):
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.write(fd, data[: len(data) // 2])
                os.fsync(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return real(path, data)
    ck.atomic_write = atomic_write
from fdm_train.cli import main
sys.argv[0] = "fdm-train"
main()
"""


def train_args(data, out, *extra, batch=4):
    return ["--data", str(data), "--out", str(out), "--preset", "tiny-32", "--image-size", "16",
            "--batch-size", str(batch), "--iterations", str(ITERATIONS), "--save-every", str(SAVE_EVERY),
            "--sample-every", "0", "--log-every", "1", "--seed", "5", "--lr", "1e-3", "--workers", "0",
            "--device", "cpu", *extra]


def fdm_train(args, fault=None, **kw):
    env = dict(ENV, KILL_IN_WRITE=fault) if fault else ENV
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def logged_steps(out: Path) -> list[int]:
    steps = []
    if (out / "log.jsonl").exists():
        for line in (out / "log.jsonl").read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except ValueError:
                pass  # a line cut by the kill
    return steps


def wait_for_step(proc, out: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while max(logged_steps(out), default=0) < step:
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before step {step}: {proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no step {step} within {timeout} s")
        time.sleep(0.005)


def finish(args) -> None:
    proc = fdm_train(args)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output


def weights(out: Path):
    _, states, meta = read_checkpoint(out / CHECKPOINT)
    return states, int(meta["step"])


def assert_same_weights(a: Path, b: Path) -> None:
    (wa, step_a), (wb, step_b) = weights(a), weights(b)
    assert step_a == step_b == ITERATIONS
    for kind in ("ema", "model"):
        for name, tensor in wa[kind].items():
            assert torch.equal(tensor, wb[kind][name]), f"{kind}.{name} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, 10)  # 10 images, batch 4: resumes land mid-epoch
    return folder


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run: the same command, in this process, single-threaded like the others."""
    out = tmp_path_factory.mktemp("reference") / "run"
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(main_group, train_args(data, out), catch_exceptions=False)
    finally:
        torch.set_num_threads(old)
    assert result.exit_code == 0, result.output
    assert logged_steps(out) == list(range(1, ITERATIONS + 1))
    return out


def test_sigkill_at_a_random_step_then_resume_auto(data, reference, tmp_path):
    kill_after = random.Random().randint(2, ITERATIONS - 4)
    out = tmp_path / "run"
    proc = fdm_train(train_args(data, out, "--resume", "auto"))
    wait_for_step(proc, out, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"killed after step {kill_after}"
    killed_at = max(logged_steps(out))
    assert killed_at < ITERATIONS, f"the run finished before the kill (after step {kill_after})"
    pairs = complete_checkpoints(out)
    resumable = pairs[0][0] if pairs else 0
    assert killed_at - SAVE_EVERY <= resumable <= killed_at  # lost at most the steps since the last save

    finish(train_args(data, out, "--resume", "auto"))
    assert_same_weights(out, reference)
    # The resumed run redid the lost steps; the log holds every step exactly once.
    assert logged_steps(out) == list(range(1, ITERATIONS + 1)), f"killed after step {killed_at}"


def test_sigkill_at_random_moments_with_samples_and_logs_then_resume_auto(data, tmp_path):
    """A run that logs every step and samples every other one is killed twice at random moments
    (a random step, then a random delay: inside a step, a log append, a sample grid or a save) and resumed
    with --resume auto each time: it ends on the weights, log and last sample grid of the same run never
    interrupted, and no file outside its folder is touched, not even through links planted in it."""
    sandbox = tmp_path / "sandbox"
    images = sandbox / "images"
    images.mkdir(parents=True)
    for image in sorted(data.iterdir())[:6]:
        (images / image.name).write_bytes(image.read_bytes())
    args = ["--sample-every", "2", "--sample-steps", "2"]
    reference = sandbox / "reference"
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(main_group, train_args(images, reference, *args), catch_exceptions=False)
    finally:
        torch.set_num_threads(old)
    assert result.exit_code == 0, result.output

    out = sandbox / "run"
    out.mkdir()
    for name in ("log.jsonl", PREVIOUS_CHECKPOINT, PREVIOUS_STATE):
        (out / name).symlink_to(sandbox / f"outside-{name}")  # dangling: must never be created
    before = {p: p.read_bytes() for p in sandbox.rglob("*") if p.is_file() and out not in p.parents}
    rng = random.Random()
    kills = []
    for _ in range(2):
        proc = fdm_train(train_args(images, out, *args, "--resume", "auto"))
        done = max(logged_steps(out), default=0)
        if done >= ITERATIONS - 1:
            proc.kill()
            break
        wait_for_step(proc, out, rng.randint(done + 1, ITERATIONS - 1))
        time.sleep(rng.uniform(0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        kills.append(max(logged_steps(out), default=0))
    finish(train_args(images, out, *args, "--resume", "auto"))

    assert_same_weights(out, reference)
    assert logged_steps(out) == list(range(1, ITERATIONS + 1)), f"killed after steps {kills}"
    last = f"samples/step{ITERATIONS:07d}.png"
    assert (out / last).read_bytes() == (reference / last).read_bytes()
    after = {p: p.read_bytes() for p in sandbox.rglob("*") if p.is_file() and out not in p.parents}
    assert after == before, f"killed after steps {kills}"
    assert not [p for p in sandbox.iterdir() if p.name.startswith("outside-")]
    assert not [p for p in out.rglob("*") if p.is_symlink()]
    assert not list(out.rglob(".*.tmp")), "leftover temporary files are cleaned up on resume"


@pytest.mark.parametrize("fault, state_step, resumes_from", [
    # The 2nd save (step 6) dies writing its checkpoint, after its training state: the latest pair is
    # torn (state 6, checkpoint 3) and the previous pair (step 3) is the one to resume from.
    ("checkpoint.safetensors:2", 2 * SAVE_EVERY, SAVE_EVERY),
    ("train_state.pt:2", SAVE_EVERY, SAVE_EVERY),  # the 2nd save dies in its first file
    ("checkpoint.safetensors:1", SAVE_EVERY, 0),  # the first save dies: nothing complete, auto starts afresh
])
def test_sigkill_during_a_checkpoint_write_then_resume_auto(data, reference, tmp_path, fault, state_step,
                                                            resumes_from):
    out = tmp_path / "run"
    proc = fdm_train(train_args(data, out, "--resume", "auto"), fault=fault)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, output
    name = fault.split(":")[0]
    assert list(out.glob(f".{name}.*.tmp")), "the kill should leave a half-written temporary file"
    assert _state_id(out / TRAINING_STATE)[0] == state_step
    if resumes_from:
        assert weights(out)[1] == SAVE_EVERY  # checkpoint.safetensors still holds the old save
    pairs = complete_checkpoints(out)
    assert (pairs[0][0] if pairs else 0) == resumes_from

    finish(train_args(data, out, "--resume", "auto"))
    assert_same_weights(out, reference)
    assert not list(out.glob(".*.tmp")), "leftover temporary files are cleaned up on resume"
    assert logged_steps(out) == list(range(1, ITERATIONS + 1))


@pytest.mark.usefixtures("one_thread")
def test_resume_modes_and_broken_files(data, tmp_path):
    small = partial(train_options, data, batch_size=4, iterations=2, save_every=1, workers=0, device="cpu",
                    seed=5)
    # auto on a folder without a run starts one
    fresh = train(small(tmp_path / "a", resume="auto"))
    assert fresh["step"] == 2
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert {CHECKPOINT, TRAINING_STATE, PREVIOUS_CHECKPOINT, PREVIOUS_STATE} <= set(names)
    assert [p[0] for p in complete_checkpoints(tmp_path / "a")] == [2, 1]

    # A truncated latest checkpoint (as a non-atomic copy leaves it) is passed over for the previous pair.
    blob = (tmp_path / "a" / CHECKPOINT).read_bytes()
    (tmp_path / "a" / CHECKPOINT).write_bytes(blob[: len(blob) // 2])
    assert [p[0] for p in complete_checkpoints(tmp_path / "a")] == [1]
    again = train(small(tmp_path / "a", resume="auto", iterations=3))
    assert again["step"] == 3 and weights(tmp_path / "a")[1] == 3

    # Files of two different saves never make a pair, even at the same step.
    train(small(tmp_path / "b"))
    train(small(tmp_path / "c", lr=1e-2))
    for name in (PREVIOUS_CHECKPOINT, PREVIOUS_STATE):
        (tmp_path / "b" / name).unlink()
    (tmp_path / "b" / TRAINING_STATE).write_bytes((tmp_path / "c" / TRAINING_STATE).read_bytes())
    assert complete_checkpoints(tmp_path / "b") == []
    with pytest.raises(UserError, match="disagree"):
        train(small(tmp_path / "b", resume=True))
    # ... and so does --resume auto, deleting nothing; --overwrite starts a new run there.
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir() if p.is_file()}
    with pytest.raises(UserError, match="disagree"):
        train(small(tmp_path / "b", resume="auto"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir() if p.is_file()} == before
    renewed = train(small(tmp_path / "b", resume="auto", overwrite=True))
    assert renewed["step"] == 2
    assert [p[0] for p in complete_checkpoints(tmp_path / "b")] == [2, 1]


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc")
def test_torchrun_elastic_restart_resumes_by_itself(data, tmp_path):
    """torchrun, 2 CPU workers (gloo), --max-restarts 1; rank 1 is SIGKILLed mid-run. torchrun restarts
    the group and the run, launched without --resume, goes on from its last checkpoint by itself. The
    result equals one uninterrupted process with the same global batch split the same way (2 x 4)."""
    out = tmp_path / "ddp"
    args = train_args(data, out, batch=8)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "--max-restarts", "1", "--monitor-interval", "0.2", "-m", "fdm_train", *args],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        kill_after = random.Random().randint(SAVE_EVERY + 1, ITERATIONS - 4)
        wait_for_step(proc, out, kill_after)
        victims = [pid for pid in _children(proc.pid) if _rank_of(pid) == 1]
        assert len(victims) == 1, _children(proc.pid)
        os.kill(victims[0], signal.SIGKILL)
        killed_at = max(logged_steps(out))
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert killed_at < ITERATIONS, "the run finished before the kill"
    assert "resuming" in output, output[-3000:]
    assert logged_steps(out) == list(range(1, ITERATIONS + 1))

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(main_group, train_args(data, tmp_path / "single", batch=8) + ["--micro-batch", "4"],
                                    catch_exceptions=False)
    finally:
        torch.set_num_threads(old)
    assert result.exit_code == 0, result.output
    assert_same_weights(out, tmp_path / "single")


def test_sigterm_stops_the_run_and_frees_its_folder(data, tmp_path):
    """What a scheduler sends: the run stops, its lock is released, and --resume auto goes on from the
    last checkpoint."""
    out = tmp_path / "run"
    proc = fdm_train(train_args(data, out, "--resume", "auto"))
    wait_for_step(proc, out, SAVE_EVERY + 1)
    assert (out / "run.lock").exists()
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate()[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert not (out / "run.lock").exists(), output
    assert (out / "checkpoint.safetensors").exists()


# ----- segment killed while it rewrites a complete output folder -----

# Imports fdm-infer once, then per line read from stdin ("DELAY"): forks a child that runs the command line
# given as arguments, kills it with SIGKILL after DELAY seconds (if it is still running), and answers
# "killed" or "finished". Forking spares every kill the seconds of importing torch.
SEGMENT_LAUNCHER = """
import os, signal, sys, time
import torch
torch.set_num_threads(1)
from fdm_infer.cli import main
args = sys.argv[1:]
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stdout is the answers
        sys.argv = ["fdm-infer", *args]
        try:
            main()
        finally:
            os._exit(0)
    deadline = time.monotonic() + float(line)
    while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
        time.sleep(0.005)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print("killed", flush=True)
    except (ProcessLookupError, ChildProcessError):
        print("finished", flush=True)
"""


def decodes(path: Path) -> bool:
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                return z["masks"].size > 0
        with Image.open(path) as img:
            img.load()
        return True
    except Exception:  # noqa: BLE001  (a truncated file fails in many ways)
        return False


def test_sigkill_while_segment_rewrites_a_complete_folder(tmp_path):
    images, out, model = tmp_path / "in", tmp_path / "out", tmp_path / "ck.safetensors"
    write_images(images, 4, size=48)
    make_checkpoint(model)
    args = ["segment", str(images), "--model", str(model), "-o", str(out), "--save-soft", "--save-channels",
            "--foreground", "--batch-size", "2", "--device", "cpu", "-q"]
    launcher = subprocess.Popen([sys.executable, "-c", SEGMENT_LAUNCHER, *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)

    def run(delay: float) -> str:
        launcher.stdin.write(f"{delay}\n")
        launcher.stdin.flush()
        return launcher.stdout.readline().strip()

    try:
        assert run(120) == "finished"
        start = time.monotonic()
        assert run(120) == "finished"  # a rewrite of the complete folder, as each run below begins
        duration = time.monotonic() - start
        summary = json.loads((out / "summary.json").read_text())
        names = {name for entry in summary["images"] for name in entry["outputs"].values()}
        assert len(names) == 4 * 5
        (out / "notes.txt").write_text("mine")  # a file that is no output
        inputs_before = {p.name: p.read_bytes() for p in images.iterdir()}
        rng = random.Random(0)
        kills = 0
        for _ in range(100):
            kills += run(rng.uniform(0.0, duration)) == "killed"
            listed = json.loads((out / "summary.json").read_text())
            broken = [name for entry in listed["images"] for name in entry["outputs"].values()
                      if not decodes(out / name)]
            assert broken == [], (kills, broken)
            assert (out / "notes.txt").read_text() == "mine"
            assert {p.name: p.read_bytes() for p in images.iterdir()} == inputs_before
            # a killed run leaves its lock, which the next run takes over
            others = {p.name for p in out.iterdir()} - names - {"summary.json", "notes.txt", LOCK}
            assert all(n.startswith(".") and n.endswith(".tmp") for n in others), others  # killed writes
            if kills == 20:
                break
        assert kills == 20
        assert run(120) == "finished"
        assert not (out / LOCK).exists()  # a run that ends frees its folder
    finally:
        launcher.stdin.close()
        launcher.wait(timeout=60)
