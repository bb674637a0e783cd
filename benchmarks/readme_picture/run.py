#!/usr/bin/env python3
"""The README's picture of `make demo`: each example image, its overlay and its --foreground mask, one
column per image, from what `fdm-infer segment examples/ --foreground` writes.

    python benchmarks/readme_picture/run.py [--out docs/segment_examples.png]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TILE = 128


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", default=str(ROOT / "examples"))
    p.add_argument("--out", default=str(ROOT / "docs" / "segment_examples.png"))
    a = p.parse_args()
    images = sorted(q for q in Path(a.examples).iterdir() if q.suffix.lower() in {".jpg", ".jpeg", ".png"})
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "fdm_infer.cli", "segment", a.examples, "-o", tmp, "--foreground",
                        "-q"], check=True)
        sheet = Image.new("RGB", (TILE * len(images), TILE * 3), "white")
        for i, image in enumerate(images):
            rows = [image, Path(tmp) / f"{image.stem}_overlay.png", Path(tmp) / f"{image.stem}_fg.png"]
            for j, path in enumerate(rows):
                tile = Image.open(path).convert("RGB").resize((TILE, TILE), Image.Resampling.LANCZOS)
                sheet.paste(tile, (i * TILE, j * TILE))
    sheet.save(a.out)
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
