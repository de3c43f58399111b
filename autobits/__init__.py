"""autobits: mixed-precision quantization search for language models.

Public entry points::

    autobits.quantize(array, "Q4_K", importance=None) -> uint8 bytes
    autobits.dequantize(data, "Q4_K", shape)          -> float32 array
"""

from __future__ import annotations

__version__ = "0.1.0"

from autobits.errors import (  # noqa: E402
    AllocationError,
    AutobitsError,
    BudgetError,
    FormatError,
    ModelLoadError,
)
from autobits.formats import dequantize, format_names, get_format, quantize  # noqa: E402

__all__ = [
    "__version__",
    "AllocationError",
    "AutobitsError",
    "BudgetError",
    "FormatError",
    "ModelLoadError",
    "dequantize",
    "format_names",
    "get_format",
    "quantize",
]
