#!/usr/bin/env python3
"""Prototype, not an fdm-train option yet: the codes-t2-scale2 run on scenes c with every padded
convolution padding by replicating the border instead of with zeros (Conv2d's padding_mode patched
before the model is built). Writes OUT/c32-codes-t2-scale2/curve.jsonl as run.py does.

    python benchmarks/emergence/prototypes/replicate_padding.py --out runs/padding
"""
import argparse
import sys
from pathlib import Path

from torch import nn

HERE = Path(__file__).resolve().parent
_init = nn.Conv2d.__init__


def replicate_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if any(p > 0 for p in self.padding if isinstance(p, int)):
        self.padding_mode = "replicate"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/padding")
    p.add_argument("--max-steps", type=int, default=600)
    a = p.parse_args()
    nn.Conv2d.__init__ = replicate_init
    sys.path.insert(0, str(HERE.parent))
    import run

    run.main(["--recipe", "codes-t2-scale2", "--kind", "c", "--max-steps", str(a.max_steps), "--minutes", "600",
              "--out", a.out])
