"""The core of fdm, shared by training, inference and export: the model and its configuration, the
noise schedule and samplers, checkpoints, images in, errors, the CLI toolkit and the thread set-up."""
import os

# OpenMP threads that spin while waiting take the cores from any other busy process: on a shared 2-core
# machine torch's 2 spinning threads trained ~4x and sampled ~7x slower than with passive waiting
# (benchmarks/results/threads.md). Set before torch loads its OpenMP runtime, which reads it once;
# a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
