"""fdm inference: segmentation and generation with any engine, the `fdm-infer` CLI and the Python API
(fdm_infer.api): `from fdm_infer import Segmenter, generate`."""

import fdm_core  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)
from fdm_core.errors import UserError

__all__ = ["Generation", "ImageSegmentation", "Segmentation", "Segmenter", "UserError", "generate"]
# The API's names load with the API (and torch) on first use, so that the command line's --help and
# --version, which import this package, do not wait for torch.
_API_NAMES = {"Generation", "ImageSegmentation", "Segmentation", "Segmenter", "generate"}


def __getattr__(name: str):
    if name in _API_NAMES:
        from fdm_infer import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API_NAMES)
