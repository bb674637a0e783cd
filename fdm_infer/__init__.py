"""fdm inference: segmentation and generation with any engine, the `fdm-infer` CLI and the Python API
(`from fdm_infer import Segmenter, generate`; see fdm_infer.api). The API is imported on first use, so
that the command line starts without it."""

__all__ = ["Segmenter", "Segmentation", "Generation", "generate"]


def __getattr__(name: str):
    if name in __all__:
        from fdm_infer import api

        return getattr(api, name)
    raise AttributeError(f"module 'fdm_infer' has no attribute {name!r}")
