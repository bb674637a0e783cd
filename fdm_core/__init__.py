"""The core of fdm, shared by training, inference and export: the model and its configuration, the
noise schedule and samplers, checkpoints, images in, errors, the CLI toolkit and the thread set-up."""
import os

# OpenMP threads that spin while waiting take the cores from any other busy process: on a shared machine
# spinning threads train and sample several times slower than passive ones (benchmarks/results/threads.md). Set before torch loads its OpenMP runtime, which reads it once;
# a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
