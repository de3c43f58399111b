"""The requantize rule: a source whose weights are already quantized is refused unless asked.

A model file whose tensors are stored quantized (SmolLM2's package is Q4_1/Q8_0, Gemma's
Q4_K_M) is only an approximation of the model: every format at or above the source's own
reproduces the stored weights exactly (the source format itself, or anything finer), so the
quality measured against that source is optimistic.  llama.cpp's ``llama-quantize`` refuses
such a file without ``--allow-requantize``; autobits' ``search`` and ``export`` do the same.
A float source (F32 / F16 / BF16 GGUF, or a Hugging Face folder) is never refused.

The rule is computed from the tensors' own source types (:attr:`TensorSpec.source_type`).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from autobits.errors import AutobitsError

__all__ = ["FLOAT_SOURCE_TYPES", "RequantizeError", "source_types", "is_quantized_source",
           "check_requantize", "source_record"]

#: Storage types of a float source.
FLOAT_SOURCE_TYPES = frozenset({"F32", "F16", "BF16", "F64"})


class RequantizeError(AutobitsError):
    """A quantized source given to ``search``/``export`` without ``allow_requantize``."""


def source_types(specs: Iterable) -> dict[str, int]:
    """Source storage type -> number of quantizable tensors stored in it."""
    return dict(Counter(str(s.source_type).upper() for s in specs
                        if getattr(s, "quantizable", True)))


def is_quantized_source(specs: Iterable) -> bool:
    """Whether any quantizable tensor of the source is stored in a non-float type."""
    return any(t not in FLOAT_SOURCE_TYPES for t in source_types(specs))


def _describe(types: dict[str, int]) -> str:
    quant = sorted(((n, t) for t, n in types.items() if t not in FLOAT_SOURCE_TYPES), reverse=True)
    return ", ".join(f"{t} on {n} tensor{'s' * (n != 1)}" for n, t in quant)


def check_requantize(specs: Iterable, *, model: str, allow: bool) -> None:
    """Raise :class:`RequantizeError` (one line) when ``model``'s source is quantized and
    ``allow`` is False."""
    specs = list(specs)
    if allow or not is_quantized_source(specs):
        return
    raise RequantizeError(
        f"model {model!r} is already quantized ({_describe(source_types(specs))}): formats at "
        f"or above the source's own reproduce it exactly, so quality numbers would be "
        f"optimistic; use a float source (F32/F16/BF16 GGUF or a Hugging Face folder) or give "
        f"--allow-requantize"
    )


def source_record(specs: Iterable, *, allow: bool) -> dict:
    """What ``metrics.json`` records of the source: quantized or not, and its types."""
    specs = list(specs)
    types = source_types(specs)
    return {"quantized": is_quantized_source(specs), "types": dict(sorted(types.items())),
            "allow_requantize": bool(allow)}
