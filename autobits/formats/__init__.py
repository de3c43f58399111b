"""Quantization formats: ggml types byte-identical to llama.cpp, and packed integer formats.

Import side effects register every format class with :mod:`autobits.formats.base`.
"""

from __future__ import annotations

from autobits.formats.base import (
    FORMAT_TABLE,
    Format,
    FormatSpec,
    dequantize,
    format_names,
    get_format,
    quantize,
)

# Importing a format module registers its classes (listings follow FORMAT_TABLE order).
from autobits.formats import floats, iq4nl, kquants, kquants_low, legacy, packed  # noqa: F401

__all__ = [
    "FORMAT_TABLE",
    "Format",
    "FormatSpec",
    "dequantize",
    "format_names",
    "get_format",
    "quantize",
]
