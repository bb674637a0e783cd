"""Where the evaluation data sit in a checkout: `../shared/data` beside the project root (see its README).
The benchmarks read LFW and DAVIS from here; nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LFW = SHARED_DATA / "lfw"
LFW_VAL = LFW / "val"
DAVIS = SHARED_DATA / "davis"
