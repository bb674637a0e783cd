"""The masked skip multiply and masked sum of the fused K-branch decoder.

`masked_skip` and `masked_sum` are the names the model calls; today they are the plain-torch
references in `kernels.reference` (Triton kernels plug in behind the same names)."""
from kernels.reference import masked_skip, masked_sum, pool_mask

__all__ = ["masked_skip", "masked_sum", "pool_mask"]
