"""COCO run-length encoding of binary masks in plain numpy, the format of `pycocotools.mask.encode`.

The mask is read column by column (Fortran order). `counts` alternate runs of 0s and 1s and start
with a run of 0s (a first count of 0 when the mask starts with a 1). The compressed form is COCO's
string: every count (from the third on, minus the count two before it) as groups of 5 bits, low
group first, each group plus 48 as one character, 0x20 set on every group but the last, 0x10 of the
last group the sign.
"""
from __future__ import annotations

import numpy as np


def rle_counts(mask: np.ndarray) -> list[int]:
    """The uncompressed counts of a binary [H, W] mask."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return [0, *counts] if flat.size and flat[0] else counts


def compress_counts(counts: list[int]) -> str:
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            group = x & 0x1F
            x >>= 5  # arithmetic shift: a negative difference ends at -1
            more = x != -1 if group & 0x10 else x != 0
            chars.append(chr(group + 48 + (0x20 if more else 0)))
    return "".join(chars)


def decompress_counts(text: str) -> list[int]:
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        x, shift, more = 0, 0, True
        while more:
            group = ord(text[pos]) - 48
            x |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            pos += 1
            if not more and group & 0x10:
                x |= -1 << (shift + 5)
            shift += 5
        counts.append(x + counts[-2] if len(counts) > 2 else x)
    return counts


def encode(mask: np.ndarray, compressed: bool = True) -> dict:
    """{"size": [H, W], "counts": COCO string (compressed) or list of ints} of a binary [H, W] mask."""
    counts = rle_counts(mask)
    return {"size": list(np.shape(mask)), "counts": compress_counts(counts) if compressed else counts}


def decode(rle: dict) -> np.ndarray:
    """The binary [H, W] mask (bool) of an RLE in either form."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = decompress_counts(counts)
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape((h, w), order="F")


def encode_labels(labels: np.ndarray, num_labels: int, compressed: bool = True) -> list[dict]:
    """One RLE per label 0..num_labels-1 of a label map (each {"label", "size", "counts"})."""
    return [{"label": k, **encode(labels == k, compressed)} for k in range(num_labels)]
