"""Constants of the kernels, named once. The method constants come from ``tq_transformers.constants``."""

from __future__ import annotations

import math

from ..constants import KIVI_SCALE_EPS, METADATA_DTYPE, NORM_EPS

__all__ = ["KIVI_SCALE_EPS", "LOG2E", "METADATA_DTYPE", "NORM_EPS", "SM_COUNT_INTERPRETER"]

LOG2E = math.log2(math.e)  # the kernels keep softmax in base 2: exp(x) = exp2(x * LOG2E)
SM_COUNT_INTERPRETER = 132  # multiprocessors assumed under Triton's CPU interpreter (an H100 / H200's count)
