"""Quantization formats: ggml types byte-identical to llama.cpp, and packed integer formats.

Import side effects register every format class with :mod:`autobits.formats.base`.
"""

from __future__ import annotations

import importlib

from autobits.formats.base import (
    FORMAT_TABLE,
    Format,
    FormatSpec,
    dequantize,
    format_names,
    get_format,
    quantize,
)

# Each module registers its classes on import; a module not written yet is skipped so the
# registry holds exactly the formats that exist.
for _mod in ("floats", "legacy", "iq4nl", "kquants", "kquants_low", "packed"):
    try:
        importlib.import_module(f"autobits.formats.{_mod}")
    except ModuleNotFoundError as _e:  # pragma: no cover - only while a module is missing
        if _e.name != f"autobits.formats.{_mod}":
            raise
del _mod

__all__ = [
    "FORMAT_TABLE",
    "Format",
    "FormatSpec",
    "dequantize",
    "format_names",
    "get_format",
    "quantize",
]
