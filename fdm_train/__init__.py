"""fdm training: model, diffusion, data, checkpoints and the `fdm-train` CLI."""
import os

# OpenMP threads that spin while waiting take the cores from any other busy process: on a shared 2-core
# machine torch's 2 spinning threads trained ~4x and sampled ~7x slower than with passive waiting
# (benchmarks/results/threads.md). Set before torch loads its OpenMP runtime, which reads it once;
# a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
