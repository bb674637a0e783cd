"""Evaluation of segmentations against ground-truth masks (paper §4; docs/design.md "Evaluation").

Two sources of predictions, one scorer:
* a model (any engine): each image is resized whole to the model's S x S, noised to t (30) with the
  seeded noise of `fdm_infer.segment.segment_tensor`, one forward pass gives K soft masks;
* a folder of label maps from any method (`--predictions DIR`): `<key>.png` or `<key>_labels.png`
  (what `fdm-infer segment` writes), values 0..K-1, or a binary 0/255 mask (read as 0/1).

Resolution (`size_mode`):
* "upsample" (default): predictions are brought to the ground-truth masks' resolution (LFW: 128x128):
  a model's soft masks bilinearly, then argmax; a label-map file with nearest neighbour;
* "downsample": the ground-truth masks are resized to the prediction's resolution (nearest neighbour).

Ground truth: label maps 0..L-1 (LFW: 0 background, 1 skin, 2 hair); a mask holding only 0 and 255
(DAVIS) is read as 0/1. Foreground = every non-zero label (LFW: skin + hair, as ReDO scores LFW).
Definitions and edge cases of the metrics: `fdm_eval.metrics`; the foreground channels of a
prediction: `fdm_infer.foreground`.
"""
from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fdm_core.diffusion import GaussianDiffusion
from fdm_core.errors import UserError, one_line
from fdm_core.files import atomic_write, json_text
from fdm_core.images import IMAGE_EXTENSIONS, MAX_PIXELS, TooManyPixels, find_images, shift_offset, translate
from fdm_core.settings import SEED
from fdm_core.visualize import mask_statistics
from fdm_eval.metrics import ForegroundAccumulator, PartsAccumulator
from fdm_eval.settings import SIZE_MODE
from fdm_infer.foreground import RULE, ChannelPresence
from fdm_infer.image_files import model_input, read_image, resize_labels
from fdm_infer.segment import check_channels, check_settings, read_labels, segment_checked
from fdm_infer.settings import ENSEMBLE, REFINE, SEGMENT_BATCH_SIZE, SMOOTH, TIMESTEP

PROTOCOLS = ("foreground", "parts")
SIZE_MODES = SIZE_MODE.choices
LFW_LABELS = ("background", "skin", "hair")
MAX_CHANNELS = 64  # the most channels a folder of label maps is taken to have without --num-channels


# ----- the evaluation set -----

@dataclass
class EvalSet:
    """Images paired with their ground-truth masks by relative path: `<images>/<key>.<ext>` with
    `<masks>/<key>.png` (any image extension). A shifted set (`shifted`) holds the masks moved and the
    offsets its images are moved by when they are read."""
    keys: list[str]
    image_paths: list[Path]
    masks: list[np.ndarray]  # uint8 [H, W] label maps
    images_dir: Path | None = None
    masks_dir: Path | None = None
    skipped: list[str] = field(default_factory=list)  # images without a mask
    shift: dict | None = None  # how the set was shifted: max_fraction, seed
    offsets: list[tuple[int, int]] | None = None  # (dy, dx) per image, in mask pixels
    _inputs: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    def files(self, predictions: str | Path | None = None) -> list[Path]:
        """The files an evaluation reads: the images, their masks and (`predictions`) the label maps scored."""
        found = list(self.image_paths)
        for folder, suffixes in ((self.masks_dir, ("",)), (predictions, ("", "_labels"))):
            if folder is not None:
                found += [_find_label_file(Path(folder), key, suffixes) for key in self.keys]
        return [path for path in found if path is not None]

    @property
    def num_labels(self) -> int:
        return int(max(int(m.max()) for m in self.masks)) + 1

    def model_inputs(self, size: int) -> torch.Tensor:
        """All images as model inputs [N, 3, S, S] in [-1, 1] (decoded once per size, then cached)."""
        if size not in self._inputs:
            self._inputs[size] = torch.stack([model_input(self.image(i), size) for i in range(len(self))])
        return self._inputs[size]

    def image(self, i: int, size: tuple[int, int] | None = None) -> np.ndarray:
        """Image i as RGB uint8 [H, W, 3], moved as its mask is in a shifted set; resized to `size` (H, W)."""
        image = np.asarray(read_image(self.image_paths[i]), dtype=np.uint8)
        if self.offsets:
            (dy, dx), (h, w) = self.offsets[i], self.masks[i].shape
            image = translate(image, round(dy * image.shape[0] / h), round(dx * image.shape[1] / w))
        if size is not None and image.shape[:2] != tuple(size):
            image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
        return image

    def shifted(self, max_fraction: float, seed: int = SEED.default) -> EvalSet:
        """The set with each image and its mask translated by one offset (`shift_offset`, seeded by `seed`
        and the image's index), their edges replicated."""
        check_shift(max_fraction)
        offsets = [shift_offset(m.shape, max_fraction, seed, i) for i, m in enumerate(self.masks)]
        masks = [translate(m, dy, dx) for m, (dy, dx) in zip(self.masks, offsets)]
        return EvalSet(self.keys, self.image_paths, masks, self.images_dir, self.masks_dir, self.skipped,
                       {"max_fraction": max_fraction, "seed": seed}, offsets)


def check_shift(max_fraction: float) -> None:
    if not 0 <= max_fraction < 0.5:
        raise UserError(f"`shift` must be in [0, 0.5) (a fraction of the image size), got {max_fraction}", ("shift",))


def read_mask(path: str | Path) -> np.ndarray:
    """A ground-truth or predicted label map as uint8 [H, W]; a 0/255 binary mask becomes 0/1. A color
    image is refused (an RGB file of grey values is read as those values)."""
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise TooManyPixels(f"{img.width}x{img.height} is over the limit of {MAX_PIXELS / 1e6:.0f} megapixels")
            img.load()
            arr = np.asarray(img)
    except Exception as exc:  # noqa: BLE001  (PIL raises many types)
        raise UserError(f"cannot read label map {path}: {one_line(exc)}") from None
    if arr.ndim == 3 and (arr[..., :3] == arr[..., :1]).all():  # grey values stored as RGB(A)
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise UserError(f"{path}: a label map must be one channel of labels, not a color image ({img.mode}, "
                        f"shape {list(arr.shape)}); save it as a grey or palette PNG")
    if arr.max(initial=0) > 255:
        raise UserError(f"{path}: labels above 255")
    arr = arr.astype(np.uint8)
    values = np.unique(arr)
    if values.size and values.max() == 255 and set(values.tolist()) <= {0, 255}:
        arr = (arr == 255).astype(np.uint8)
    return arr


def _find_label_file(folder: Path, key: str, suffixes=("", "_labels")) -> Path | None:
    for suffix in suffixes:
        for ext in (".png", *IMAGE_EXTENSIONS):
            path = folder / f"{key}{suffix}{ext}"
            if path.is_file():
                return path
    return None


def load_eval_set(images: str | Path, masks: str | Path, limit: int | None = None,
                  warn: Callable[[str], None] | None = None) -> EvalSet:
    """Every image under `images` (recursively, sorted) that has a mask under `masks` with the same
    relative path (suffix aside); the first `limit` of them if given."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    images, masks = Path(images), Path(masks)
    if not images.is_dir():
        raise UserError(f"`images`: no such folder: {images}", ("images",))
    if not masks.is_dir():
        raise UserError(f"`masks`: no such folder: {masks}", ("masks",))
    keys, paths, maps, skipped = [], [], [], []
    for path in find_images(images):
        key = path.relative_to(images).with_suffix("").as_posix()
        mask_path = _find_label_file(masks, key, suffixes=("",))
        if mask_path is None:
            skipped.append(key)
            continue
        keys.append(key)
        paths.append(path)
        maps.append(read_mask(mask_path))
        if limit and len(keys) == limit:
            break
    if skipped:
        warn(f"{len(skipped)} image(s) under {images} have no mask under {masks} and are not scored "
             f"(first: {skipped[0]})")
    if not keys:
        raise UserError(f"no image under {images} has a mask under {masks} (masks are matched by relative "
                        "path: <masks>/<name>.png)")
    return EvalSet(keys, paths, maps, images, masks, skipped)


# ----- predictions -----

@dataclass
class Predictions:
    labels: list[np.ndarray]  # uint8 [h, w] per image
    num_channels: int
    presence: ChannelPresence | None = None  # border and image shares of the soft masks (a model)
    mask_entropy: float | None = None  # soft masks only
    region_share: list[float] | None = None  # soft masks only
    model_size: int | None = None
    seconds: float = 0.0
    source: dict = field(default_factory=dict)


def predict_with_engine(engine, evalset: EvalSet, *, t: int = TIMESTEP.default, seed: int = SEED.default,
                        ensemble: int = ENSEMBLE.default, smooth: int = SMOOTH.default, refine: str = REFINE.default,
                        batch_size: int = SEGMENT_BATCH_SIZE.default, size_mode: str = SIZE_MODE.default,
                        class_label: int | None = None, progress: Callable[[int], None] | None = None) -> Predictions:
    """Segments every image of `evalset` with `engine` (fdm_infer.segment.segment_tensor: the image
    resized whole to S x S, noised to t with the seeded noise, one forward pass); with `refine`, the masks
    are refined at each ground-truth mask's size with the image at that size (fdm_infer.refine)."""
    check_settings(t, ensemble, smooth, refine)
    SIZE_MODE.check(size_mode)
    SEGMENT_BATCH_SIZE.check(batch_size)
    return _predict_with_engine(engine, evalset, t, seed, ensemble, smooth, refine, batch_size, size_mode, class_label,
                                progress)


@torch.no_grad()
def _predict_with_engine(engine, evalset: EvalSet, t: int, seed: int, ensemble: int, smooth: int, refine: str,
                         batch_size: int, size_mode: str, class_label: int | None,
                         progress: Callable[[int], None] | None) -> Predictions:
    """`predict_with_engine` of settings checked before."""
    cfg = engine.config
    if cfg.variant == "plain":
        raise UserError("this checkpoint is a plain U-Net (no masks): evaluate its K-means baseline with "
                        "`fdm-infer baseline kmeans-ddpm` and `predictions`", ("predictions",))
    k = engine.num_regions
    size = cfg.image_size
    diffusion = GaussianDiffusion()
    start = time.perf_counter()
    inputs = evalset.model_inputs(size)
    labels: list[np.ndarray] = []
    presence = ChannelPresence(k)
    entropy_sum = 0.0
    for first in range(0, len(evalset), batch_size):
        x = inputs[first:first + batch_size]
        y = None if class_label is None else torch.full((x.shape[0],), class_label, dtype=torch.long)
        masks = segment_checked(engine, x, t, seed, ensemble, y, diffusion, smooth).float()
        presence.add_masks(masks)
        entropy_sum += mask_statistics(masks)["mask_entropy"] * x.shape[0]
        if size_mode == "upsample":
            for i, m in enumerate(masks):
                gt_size = evalset.masks[first + i].shape
                if refine != "none":
                    labels.append(read_labels(m.cpu(), evalset.image(first + i, gt_size), refine))
                    continue
                if tuple(m.shape[-2:]) != tuple(gt_size):
                    m = F.interpolate(m[None], size=gt_size, mode="bilinear", align_corners=False)[0]
                labels.append(m.argmax(0).to(torch.uint8).cpu().numpy())
        else:
            labels.extend(masks.argmax(1).to(torch.uint8).cpu().numpy())
        if progress is not None:
            progress(x.shape[0])
    n = len(evalset)
    return Predictions(labels, k, presence, round(entropy_sum / n, 4), presence.image_share,
                       size, time.perf_counter() - start)


def load_predictions(folder: str | Path, evalset: EvalSet, num_channels: int | None = None) -> Predictions:
    """The label maps of `folder` for every image of `evalset` (<key>.png or <key>_labels.png)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"`predictions`: no such folder: {folder}", ("predictions",))
    start = time.perf_counter()
    labels, missing = [], []
    for key in evalset.keys:
        path = _find_label_file(folder, key)
        if path is None:
            missing.append(key)
            continue
        labels.append(read_mask(path))
    if missing:
        raise UserError(f"`predictions`: {len(missing)} of {len(evalset)} image(s) have no label map in {folder} "
                        f"(looked for <name>.png and <name>_labels.png; first missing: {missing[0]})", ("predictions",))
    values = sorted(set().union(*(np.unique(m).tolist() for m in labels)))
    top = values[-1] + 1
    if num_channels is None and (top > MAX_CHANNELS or values != list(range(top))):
        shown = ", ".join(map(str, values[:6])) + (", ..." if len(values) > 6 else "")
        raise UserError(f"`predictions`: the label maps hold the values {shown}, not channels 0..K-1 (K at most "
                        f"{MAX_CHANNELS}); if they are, give K with `num_channels`", ("predictions", "num_channels"))
    k = num_channels or max(top, 2)
    if top > k:
        raise UserError(f"`predictions`: labels go up to {top - 1}, more than `num_channels` {k} allows", ("predictions", "num_channels"))
    return Predictions(labels, k, seconds=time.perf_counter() - start, source={"predictions": str(folder)})


# ----- scoring -----

def score(pred: Predictions, evalset: EvalSet, protocols=PROTOCOLS, *, size_mode: str = SIZE_MODE.default,
          fg_channels: list[int] | None = None, num_labels: int | None = None) -> dict:
    """The figures of `protocols` for predictions of `evalset` (fractions in [0, 1]); see
    fdm_eval.metrics for the definitions. `fg_channels`: the foreground channels [default: chosen
    without labels, fdm_infer.foreground]."""
    SIZE_MODE.check(size_mode)
    return _score(pred, evalset, protocols, size_mode, fg_channels, num_labels)


def _score(pred: Predictions, evalset: EvalSet, protocols, size_mode: str, fg_channels: list[int] | None,
           num_labels: int | None) -> dict:
    """`score` of a size mode checked before."""
    k = pred.num_channels
    check_channels(fg_channels, k)
    num_labels = num_labels or evalset.num_labels
    pairs = []
    for p, g in zip(pred.labels, evalset.masks):
        if p.shape != g.shape:
            if size_mode == "upsample":
                p = resize_labels(p, g.shape)
            else:
                g = resize_labels(g, p.shape)
        pairs.append((p, g))
    scored_at = sorted({f"{p.shape[1]}x{p.shape[0]}" for p, _ in pairs})
    label_share = np.zeros(k)
    for p, _ in pairs:
        label_share += np.bincount(p.ravel(), minlength=k)[:k] / p.size
    result: dict = {
        "images": len(pairs), "num_channels": k, "num_labels": num_labels, "size_mode": size_mode,
        "scored_at": scored_at[0] if len(scored_at) == 1 else scored_at,
        "masks": {"mask_entropy": pred.mask_entropy, "region_share": pred.region_share,
                  "label_share": [round(float(s), 4) for s in label_share / max(len(pairs), 1)]},
    }
    if "foreground" in protocols:
        presence, source = pred.presence, "soft masks"
        if presence is None:
            presence, source = ChannelPresence(k), "label maps"
            for p, _ in pairs:
                presence.add_labels(p)
        if fg_channels:
            channels, rule = sorted(set(fg_channels)), "given (--fg-channel)"
        else:
            channels, rule = presence.foreground(), f"{RULE}, over the set ({source})"
        fg_acc = ForegroundAccumulator()
        for p, g in pairs:
            fg_acc.update(np.isin(p, channels), g > 0)
        fg = fg_acc.result()
        fg.update(channels=channels, channel_rule=rule, border_share=presence.border_share,
                  image_share=presence.image_share)
        result["foreground"] = fg
    if "parts" in protocols:
        acc = PartsAccumulator(k, num_labels)
        for p, g in pairs:
            if g.max(initial=0) >= num_labels:
                raise UserError(f"a ground-truth mask holds label {int(g.max())}; `num_labels` is {num_labels}", ("num_labels",))
            acc.update(p, g)
        result["parts"] = acc.result()
    return result


# ----- the position prior -----

def read_label_maps(folder: str | Path) -> tuple[list[str], list[np.ndarray]]:
    """Every label map `<folder>/<key>.png` (recursively, sorted): (keys, maps)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"`prior_from`: no such folder: {folder}", ("prior_from",))
    paths = sorted(folder.rglob("*.png"))
    if not paths:
        raise UserError(f"`prior_from`: no label maps (.png) under {folder}", ("prior_from",))
    maps = [read_mask(p) for p in paths]
    if not any(m.any() for m in maps):
        raise UserError(f"`prior_from`: the {len(maps)} label map(s) under {folder} hold no label but 0 (background)", ("prior_from",))
    return [p.relative_to(folder).with_suffix("").as_posix() for p in paths], maps


def _top_folder(key: str) -> str:
    return key.split("/", 1)[0] if "/" in key else ""


def evaluate_prior(evalset: EvalSet, prior_from: str | Path, protocols=PROTOCOLS, *, leave_out_folder: bool = False,
                   name: str = "position prior") -> dict:
    """Scores the position prior (fdm_eval.baselines.position_prior) of the label maps under
    `prior_from` on `evalset`: parts by its per-pixel argmax, foreground by its non-zero labels'
    frequency above one half. `leave_out_folder`: each image's prior leaves out the maps in the image's
    top-level folder (with DAVIS: leave-one-sequence-out)."""
    from fdm_eval.baselines import position_prior

    start = time.perf_counter()
    keys, maps = read_label_maps(prior_from)
    # counted at the evaluated masks' size: a huge map in `prior_from` costs its own pixels, not a huge prior
    total = position_prior(maps, Counter(m.shape for m in evalset.masks).most_common(1)[0][0])
    priors = [total] * len(evalset)
    if leave_out_folder:
        groups: dict[str, list[np.ndarray]] = {}
        for key, m in zip(keys, maps):
            groups.setdefault(_top_folder(key), []).append(m)
        size = total.counts.shape[1:]
        held_out = {group: total.without(position_prior(group_maps, size, total.values))
                    for group, group_maps in groups.items()}
        priors = [held_out.get(_top_folder(key), total) for key in evalset.keys]
    sizes = [m.shape for m in evalset.masks]
    parts = Predictions([p.labels(size) for p, size in zip(priors, sizes)], max(int(total.values.max()) + 1, 2))
    in_sample = evalset.masks_dir is not None and Path(prior_from).resolve() == Path(evalset.masks_dir).resolve()
    result = {"name": name, "prior": {
        "from": str(prior_from), "maps": total.maps, "size": f"{total.counts.shape[2]}x{total.counts.shape[1]}",
        "leave_out": "the image's top-level folder" if leave_out_folder else None,
        "from_the_evaluated_masks": in_sample}, "shift": evalset.shift}
    result.update(score(parts, evalset, [p for p in protocols if p != "foreground"]))
    if "foreground" in protocols:
        fg = Predictions([p.foreground(size) for p, size in zip(priors, sizes)], 2)
        result["foreground"] = score(fg, evalset, ("foreground",), fg_channels=[1])["foreground"]
        result["foreground"]["channel_rule"] = "the non-zero labels' frequency above one half"
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["images_dir"] = str(evalset.images_dir) if evalset.images_dir else None
    result["masks_dir"] = str(evalset.masks_dir) if evalset.masks_dir else None
    return result


def _shift_of(result: dict) -> float:
    return (result.get("shift") or {}).get("max_fraction", 0.0)


def add_above_prior(rows: list[dict]) -> None:
    """Gives every row `above_prior`: its FG IoU and parts mIoU minus the position prior's on the same
    set (the same shift), where the rows hold a prior for that set."""
    priors = {_shift_of(r): r for r in rows if "prior" in r}
    for r in rows:
        prior = priors.get(_shift_of(r))
        if prior is None:
            continue
        above = {}
        if "foreground" in r and "foreground" in prior:
            above["fg_iou"] = r["foreground"]["iou"] - prior["foreground"]["iou"]
        if "parts" in r and "parts" in prior:
            above["parts_miou"] = r["parts"]["miou"] - prior["parts"]["miou"]
        r["above_prior"] = above


# ----- reports -----

def _pct(value, sign: str = "") -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:{sign}.1f}"


def markdown_table(results: list[dict]) -> str:
    """One row per result (from `evaluate` / `score`); figures in percent as the paper gives them."""
    fg = any("foreground" in r for r in results)
    parts = any("parts" in r for r in results)
    head = ["method", "images"]
    if fg:
        head += ["FG Acc", "FG IoU", "FG DICE", "best-of-inverse Acc / IoU / DICE", "fg channels"]
    if parts:
        head += ["Parts Acc", "Parts mIoU", "IoU per label"]
    above = any("above_prior" in r for r in results)
    if above:
        head += ["above prior: FG IoU / mIoU"]
    head += ["K", "mask entropy", "region shares"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r.get("name", "?"), str(r.get("images", ""))]
        if fg:
            f = r.get("foreground")
            if f:
                b = f["best_of_inverse"]
                row += [_pct(f["acc"]), _pct(f["iou"]), _pct(f["dice"]),
                        f"{_pct(b['acc'])} / {_pct(b['iou'])} / {_pct(b['dice'])}",
                        "+".join(str(c) for c in f["channels"])]
            else:
                row += ["–"] * 5
        if parts:
            p = r.get("parts")
            row += ([_pct(p["acc"]), _pct(p["miou"]), "/".join(_pct(v) for v in p["iou_per_label"])] if p
                    else ["–"] * 3)
        if above:
            a = r.get("above_prior", {})
            row.append(f"{_pct(a.get('fg_iou'), '+')} / {_pct(a.get('parts_miou'), '+')}")
        m = r.get("masks", {})
        shares = m.get("region_share") or m.get("label_share") or []
        entropy = m.get("mask_entropy")
        row += [str(r.get("num_channels", "")), "–" if entropy is None else f"{entropy:.2f}",
                "/".join(f"{s:.2f}" for s in shares)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def summary_figures(result: dict) -> dict:
    """The headline figures of one result in percent (2 decimals): fg_acc / fg_iou / fg_dice,
    fg_best_* (ReDO/IEM best of mask and inverse), parts_acc / parts_miou / parts_iou_per_label,
    above_prior_fg_iou / above_prior_parts_miou (with a prior row), mask statistics."""
    out: dict = {}
    if "foreground" in result:
        f = result["foreground"]
        b = f["best_of_inverse"]
        out.update(fg_acc=100 * f["acc"], fg_iou=100 * f["iou"], fg_dice=100 * f["dice"], fg_best_acc=100 * b["acc"],
                   fg_best_iou=100 * b["iou"], fg_best_dice=100 * b["dice"], fg_channels=f["channels"])
    if "parts" in result:
        out.update(parts_acc=100 * result["parts"]["acc"], parts_miou=100 * result["parts"]["miou"],
                   parts_iou_per_label=[round(100 * v, 2) for v in result["parts"]["iou_per_label"]])
    for key, value in result.get("above_prior", {}).items():
        out[f"above_prior_{key}"] = 100 * value
    m = result.get("masks", {})
    out.update(mask_entropy=m.get("mask_entropy"), region_share=m.get("region_share"),
               label_share=m.get("label_share"))
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in out.items()}


def describe_result(r: dict) -> str:
    """A few lines for the terminal."""
    lines = [(f"{r.get('name', 'evaluation')}: {r['images']} image(s), K={r['num_channels']}, "
             f"scored at {r['scored_at']} ({r['size_mode']})")]
    if "foreground" in r:
        f, b = r["foreground"], r["foreground"]["best_of_inverse"]
        shares = " ".join(f"{b:.2f}/{s:.2f}" for b, s in zip(f["border_share"], f["image_share"]))
        lines.append(f"  foreground (channels {'+'.join(map(str, f['channels']))}; border/image shares {shares}): "
                     f"Acc {_pct(f['acc'])}  IoU {_pct(f['iou'])}  DICE {_pct(f['dice'])}")
        lines.append(f"    best of mask/inverse (ReDO/IEM): Acc {_pct(b['acc'])}  IoU {_pct(b['iou'])}  "
                     f"DICE {_pct(b['dice'])}")
    if "parts" in r:
        p = r["parts"]
        ious = ", ".join(_pct(v) for v in p["iou_per_label"])
        lines.append(f"  parts: Acc {_pct(p['acc'])}  mIoU {_pct(p['miou'])}  (IoU per label: {ious}; "
                     f"label->channel {p['match']})")
    if r.get("above_prior"):
        a = r["above_prior"]
        lines.append("  above the position prior: " + "  ".join(
            f"{label} {_pct(a[key], '+')}" for key, label in (("fg_iou", "FG IoU"), ("parts_miou", "parts mIoU"))
            if key in a))
    m = r["masks"]
    if m.get("mask_entropy") is not None:
        lines.append(f"  masks: entropy {m['mask_entropy']:.3f} of log K, soft shares {m['region_share']}, "
                     f"label shares {m['label_share']}")
    else:
        lines.append(f"  label shares {m['label_share']}")
    return "\n".join(lines)


def write_reports(results: dict | list[dict], out: str | Path, markdown: str | Path | None = None) -> tuple[Path, Path]:
    """JSON (`out`) and a Markdown table (`markdown`, default `out` with .md)."""
    out, md = report_paths(out, markdown)
    rows = results if isinstance(results, list) else [results]
    try:
        atomic_write(out, (json_text(results, indent=1, default=_json_default) + "\n").encode())
        atomic_write(md, markdown_table(rows).encode())
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out, md


def report_paths(out: str | Path, markdown: str | Path | None = None) -> tuple[Path, Path]:
    """The files `write_reports` writes: `out` and `markdown` (default `out` with .md)."""
    return Path(out), Path(markdown) if markdown else Path(out).with_suffix(".md")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def evaluate(evalset: EvalSet, *, engine=None, predictions: str | Path | None = None, protocols=PROTOCOLS,
             t: int = TIMESTEP.default, seed: int = SEED.default, ensemble: int = ENSEMBLE.default,
             smooth: int = SMOOTH.default, refine: str = REFINE.default, batch_size: int = SEGMENT_BATCH_SIZE.default,
             size_mode: str = SIZE_MODE.default,
             fg_channels: list[int] | None = None, num_labels: int | None = None, num_channels: int | None = None,
             class_label: int | None = None, name: str | None = None,
             progress: Callable[[int], None] | None = None) -> dict:
    """Scores a model (`engine`) or a folder of label maps (`predictions`) on `evalset`."""
    if (engine is None) == (predictions is None):
        raise ValueError("give an engine or a predictions folder")
    SIZE_MODE.check(size_mode)
    if engine is not None:
        check_settings(t, ensemble, smooth, refine)
        SEGMENT_BATCH_SIZE.check(batch_size)
        pred = _predict_with_engine(engine, evalset, t, seed, ensemble, smooth, refine, batch_size, size_mode,
                                    class_label, progress)
        source = {"engine": getattr(engine, "name", "?"), "t": t, "seed": seed, "ensemble": ensemble, "smooth": smooth,
                  "refine": refine, "model_size": pred.model_size, "variant": engine.config.variant,
                  "resize": ("soft masks bilinear to the mask size, then argmax" if size_mode == "upsample"
                             else "ground truth nearest to the model size")}
    else:
        pred = load_predictions(predictions, evalset, num_channels)
        source = {"predictions": str(predictions),
                  "resize": ("label maps nearest to the mask size" if size_mode == "upsample"
                             else "ground truth nearest to the label maps' size")}
    result = {"name": name or ("predictions" if engine is None else "model"), **source}
    result.update(_score(pred, evalset, protocols, size_mode, fg_channels, num_labels))
    if evalset.shift:
        result["shift"] = evalset.shift
    result["seconds"] = round(pred.seconds, 2)
    result["images_dir"] = str(evalset.images_dir) if evalset.images_dir else None
    result["masks_dir"] = str(evalset.masks_dir) if evalset.masks_dir else None
    return result


def small_labelled_images(folder: str | Path, size: int, every: int = 1,
                          limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, S, S, 3] uint8, labels [N, S, S]) of every `every`-th image of `folder`/images (JPEGs, name
    order) with its `folder`/masks label map, both at S = size: the model's own size, for whole-set arrays."""
    folder = Path(folder)
    names = sorted((folder / "images").glob("*.jpg"))[::every][:limit]
    images = np.stack([np.asarray(Image.open(n).convert("RGB").resize((size, size), Image.BILINEAR)) for n in names])
    labels = np.stack([np.asarray(Image.open(folder / "masks" / f"{n.stem}.png").resize((size, size), Image.NEAREST))
                       for n in names])
    return images, labels


__all__ = [
    "LFW_LABELS",
    "PROTOCOLS",
    "SIZE_MODES",
    "EvalSet",
    "Predictions",
    "add_above_prior",
    "describe_result",
    "evaluate",
    "evaluate_prior",
    "load_eval_set",
    "load_predictions",
    "markdown_table",
    "predict_with_engine",
    "read_label_maps",
    "read_mask",
    "score",
    "small_labelled_images",
    "summary_figures",
    "write_reports",
]
