"""`python -m fdm_train` is `fdm-train` (so that `torchrun -m fdm_train ...` launches it)."""
from fdm_train.cli import main

if __name__ == "__main__":
    main()
