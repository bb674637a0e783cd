"""fdm inference: segmentation and generation with any engine, the `fdm-infer` CLI and the Python API
(fdm_infer.api): `from fdm_infer import Segmenter, generate`."""

import fdm_core  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)
from fdm_core.errors import UserError
from fdm_infer.api import Generation, ImageSegmentation, Segmentation, Segmenter, generate

__all__ = ["Generation", "ImageSegmentation", "Segmentation", "Segmenter", "UserError", "generate"]
