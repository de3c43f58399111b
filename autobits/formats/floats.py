"""Unquantized float formats: F32, F16 and BF16 (one value per "block").

* ``F32``: the float32 value, little-endian.
* ``F16``: IEEE half precision, round-to-nearest-even (numpy's cast, identical to ggml's
  ``GGML_FP32_TO_FP16``; values beyond 65504 round to infinity).
* ``BF16``: the top 16 bits of the float32 after round-to-nearest-even, exactly ggml's
  ``GGML_FP32_TO_BF16`` (``(u + 0x7fff + ((u >> 16) & 1)) >> 16``); a NaN keeps its top bits
  and is forced quiet (``| 0x40``).

None of them uses the importance vector.
"""

from __future__ import annotations

import numpy as np

from autobits.formats.base import Format
from autobits.formats.ggml import fp16_bits

__all__ = ["F32", "F16", "BF16", "fp32_to_bf16_bits", "bf16_bits_to_fp32"]


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 array -> uint16 bf16 bit patterns, as ggml's ``GGML_FP32_TO_BF16``."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # no uint32 overflow for non-NaN inputs (largest is -inf, 0xFF800000); NaNs are redone below
    r = u >> 16
    r &= 1
    r += u
    r += 0x7FFF
    r >>= 16
    out = r.astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        out[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)
    return out


def _bf16_bits_finite(x: np.ndarray) -> np.ndarray:
    """:func:`fp32_to_bf16_bits` for finite input (the NaN rule is not needed), fewer passes:
    the rounded word's high half is taken straight from a uint16 view."""
    u = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
    r = u >> np.uint32(16)
    r &= np.uint32(1)
    r += np.uint32(0x7FFF)
    r += u  # no overflow: the largest finite word is 0xFF7FFFFF
    return r.view(np.uint16)[1::2].copy() if np.little_endian else r.view(np.uint16)[0::2].copy()


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


class F32(Format):
    """32-bit IEEE float, stored as is."""

    name = "F32"

    def _quantize_blocks(
        self, blocks: np.ndarray, importance: np.ndarray | None, *, row_length: int
    ) -> np.ndarray:
        x = np.ascontiguousarray(blocks, dtype="<f4")
        return x.view(np.uint8).reshape(x.shape[0], 4)

    def _dequantize_blocks(self, data: np.ndarray) -> np.ndarray:
        d = np.ascontiguousarray(data, dtype=np.uint8)
        return d.view("<f4").astype(np.float32).reshape(d.shape[0], 1)


class F16(Format):
    """16-bit IEEE half float, round-to-nearest-even."""

    name = "F16"

    def _quantize_blocks(
        self, blocks: np.ndarray, importance: np.ndarray | None, *, row_length: int
    ) -> np.ndarray:
        h = fp16_bits(np.ascontiguousarray(blocks, dtype=np.float32).reshape(-1))
        return h.astype("<u2", copy=False).view(np.uint8).reshape(-1, 2)

    def _dequantize_blocks(self, data: np.ndarray) -> np.ndarray:
        d = np.ascontiguousarray(data, dtype=np.uint8)
        return d.view("<f2").astype(np.float32).reshape(d.shape[0], 1)


class BF16(Format):
    """bfloat16 (8-bit exponent, 7-bit mantissa), rounded as ggml rounds it."""

    name = "BF16"

    def _quantize_blocks(
        self, blocks: np.ndarray, importance: np.ndarray | None, *, row_length: int
    ) -> np.ndarray:
        b = _bf16_bits_finite(blocks).astype("<u2", copy=False)  # quantize() checked finiteness
        return b.view(np.uint8).reshape(-1, 2)

    def _dequantize_blocks(self, data: np.ndarray) -> np.ndarray:
        d = np.ascontiguousarray(data, dtype=np.uint8)
        return bf16_bits_to_fp32(d.view("<u2")).reshape(d.shape[0], 1)
