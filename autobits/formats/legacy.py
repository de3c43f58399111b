"""ggml's legacy 32-value block formats: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0.

Byte layouts (little-endian, one block of 32 values; ``d``/``m`` are fp16):

========  =====  ====================================================  =====================
format    bytes  fields                                                value ``j``
========  =====  ====================================================  =====================
Q4_0      18     d, qs[16]                                             ``(q_j - 8) * d``
Q4_1      20     d, m, qs[16]                                          ``q_j * d + m``
Q5_0      22     d, qh[4], qs[16]                                      ``(q_j - 16) * d``
Q5_1      24     d, m, qh[4], qs[16]                                   ``q_j * d + m``
Q8_0      34     d, qs[32] (int8)                                      ``q_j * d``
========  =====  ====================================================  =====================

``qs[j]`` holds value ``j`` in its low nibble and value ``j + 16`` in its high nibble; the
fifth bit of value ``j`` is bit ``j`` of the little-endian uint32 ``qh``.

Without importance the bytes are identical to ggml's ``quantize_row_q*_ref`` (and gguf-py's
``gguf.quants.quantize``); Q4_0 ... Q5_1 take the fast paths of
:mod:`autobits.formats.legacy_fast` there.  With an importance vector they are identical to llama.cpp's
imatrix path (``quantize_q4_0`` -> ``quantize_row_q4_0_impl`` ...): every value gets the
weight ``importance_j * sqrt(sigma2 + x_j**2)`` where ``sigma2`` is the mean square of the
value's *whole row* (the format hook receives the tensor's row length), then Q4_0/Q5_0 use ``make_qx_quants(rmse_type=1)`` and Q4_1/Q5_1 use
``make_qkx3_quants(rmin=-0.9, rdelta=0.05, nstep=36)``.  Q8_0 ignores importance, as ggml does.

All arithmetic is float32 in the C code's order (sums run over the within-block or within-row
axis one element at a time, vectorised over blocks or rows), so results are bit-exact.
"""

from __future__ import annotations

import numpy as np

from autobits.formats.base import Format
from autobits.formats.ggml import (
    F32,
    first_min_max,
    fp16_bytes,
    fp16_from_bytes,
    pack_high_bits,
    pack_nibbles,
    safe_inverse,
    seqsum,
    unpack_high_bits,
    unpack_nibbles,
)
from autobits.formats.kscales import make_qkx3_quants, make_qx_quants
from autobits.formats.legacy_fast import quantize_plain_asym, quantize_plain_sym

__all__ = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


# ------------------------------------------------------------------ the imatrix path
def imatrix_weights(blocks: np.ndarray, importance: np.ndarray, row_length: int) -> np.ndarray:
    """``qw[j] * sqrtf(sigma2 + x[j]*x[j])`` as in ``quantize_row_q4_0_impl`` and friends.

    ``sigma2`` is the mean square of the block's whole row: (sum of x**2 over the row, in
    order) / ``row_length``; ``blocks`` are ``(n, 32)``, consecutive along rows of
    ``row_length`` values.
    """
    rows = blocks.reshape(-1, row_length)
    w = rows * rows
    sigma2 = seqsum(w, axis=1) / F32(row_length)
    # computed along whole rows (per-row broadcasts over long contiguous runs, not over
    # 32-value blocks); float addition and multiplication commute, so the values are C's
    w += sigma2[:, None]
    np.sqrt(w, out=w)
    w *= np.asarray(importance, dtype=F32).reshape(rows.shape)
    return w.reshape(blocks.shape)


def _qkx3_min(x: np.ndarray, d: np.ndarray, the_min: np.ndarray, nmax: int) -> np.ndarray:
    """The stored minimum ``-the_min`` with ggml's sign of zero.

    ggml starts ``make_qkx3_quants`` from ``min = x[0]`` and keeps the first value of the
    minimum (so a block whose minimum is zero keeps the sign of its first zero) unless the
    search replaces it.  When the minimum is zero and the returned scale is still the initial
    ``1 / (nmax / (max - min))``, the search kept it: store that zero with its sign.
    """
    m = -np.asarray(the_min, dtype=F32)
    min_c, max_c = first_min_max(x)
    min_c = np.where(min_c > 0, F32(0), min_c).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        init_scale = F32(1) / (F32(nmax) / (max_c - min_c))
    kept = (min_c == 0) & (m == 0) & (np.asarray(d, dtype=F32) == init_scale)
    return np.where(kept, min_c, m).astype(F32)


# ------------------------------------------------------------------ formats
class Q4_0(Format):
    """4-bit symmetric: 32 values, fp16 scale ``d``; value = (q - 8) * d."""

    name = "Q4_0"
    uses_importance = True
    checks_finite = True  # the plain path's block max/min reductions see NaN and Inf

    def _quantize_blocks(self, blocks, importance, *, row_length):
        x = np.asarray(blocks, dtype=F32)
        if importance is None:
            return quantize_plain_sym(x, 8)
        w = imatrix_weights(x, importance, row_length)
        d, q = make_qx_quants(x, 8, 1, w)
        d = np.asarray(d, dtype=F32)
        return np.concatenate([fp16_bytes(d), pack_nibbles(q)], axis=1)

    def _dequantize_blocks(self, data):
        d = fp16_from_bytes(data[:, 0:2])
        q = unpack_nibbles(data[:, 2:18]).astype(np.int8) - np.int8(8)
        return q.astype(F32) * d[:, None]


class Q4_1(Format):
    """4-bit asymmetric: fp16 scale ``d`` and minimum ``m``; value = q * d + m."""

    name = "Q4_1"
    uses_importance = True
    checks_finite = True  # the plain path's block max/min reductions see NaN and Inf

    def _quantize_blocks(self, blocks, importance, *, row_length):
        x = np.asarray(blocks, dtype=F32)
        if importance is None:
            return quantize_plain_asym(x, 15)
        w = imatrix_weights(x, importance, row_length)
        d, the_min, q = make_qkx3_quants(x, w, 15, -0.9, 0.05, 36, False)
        d = np.asarray(d, dtype=F32)
        m = _qkx3_min(x, d, the_min, 15)
        return np.concatenate([fp16_bytes(d), fp16_bytes(m), pack_nibbles(q)], axis=1)

    def _dequantize_blocks(self, data):
        d = fp16_from_bytes(data[:, 0:2])
        m = fp16_from_bytes(data[:, 2:4])
        q = unpack_nibbles(data[:, 4:20]).astype(F32)
        return q * d[:, None] + m[:, None]


class Q5_0(Format):
    """5-bit symmetric: fp16 scale ``d``; value = (q - 16) * d."""

    name = "Q5_0"
    uses_importance = True
    checks_finite = True  # the plain path's block max/min reductions see NaN and Inf

    def _quantize_blocks(self, blocks, importance, *, row_length):
        x = np.asarray(blocks, dtype=F32)
        if importance is None:
            return quantize_plain_sym(x, 16)
        w = imatrix_weights(x, importance, row_length)
        d, q = make_qx_quants(x, 16, 1, w)
        d = np.asarray(d, dtype=F32)
        return np.concatenate([fp16_bytes(d), pack_high_bits(q), pack_nibbles(q)], axis=1)

    def _dequantize_blocks(self, data):
        d = fp16_from_bytes(data[:, 0:2])
        q = unpack_nibbles(data[:, 6:22]) | unpack_high_bits(data[:, 2:6])
        return (q.astype(np.int8) - np.int8(16)).astype(F32) * d[:, None]


class Q5_1(Format):
    """5-bit asymmetric: fp16 scale ``d`` and minimum ``m``; value = q * d + m."""

    name = "Q5_1"
    uses_importance = True
    checks_finite = True  # the plain path's block max/min reductions see NaN and Inf

    def _quantize_blocks(self, blocks, importance, *, row_length):
        x = np.asarray(blocks, dtype=F32)
        if importance is None:
            return quantize_plain_asym(x, 31)
        w = imatrix_weights(x, importance, row_length)
        d, the_min, q = make_qkx3_quants(x, w, 31, -0.9, 0.05, 36, False)
        d = np.asarray(d, dtype=F32)
        m = _qkx3_min(x, d, the_min, 31)
        return np.concatenate(
            [fp16_bytes(d), fp16_bytes(m), pack_high_bits(q), pack_nibbles(q)], axis=1
        )

    def _dequantize_blocks(self, data):
        d = fp16_from_bytes(data[:, 0:2])
        m = fp16_from_bytes(data[:, 2:4])
        q = (unpack_nibbles(data[:, 8:24]) | unpack_high_bits(data[:, 4:8])).astype(F32)
        return q * d[:, None] + m[:, None]


def _roundf(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: nearest integer, halves away from zero (exact, no ``+0.5`` rounding).

    ``np.rint`` agrees except on exact halves, which it rounds to even; those are redone.
    """
    r = np.rint(v)
    d = r - v  # exact: |v| < 2**23 here
    ties = np.flatnonzero(np.abs(d) == F32(0.5))
    if ties.size:
        rf, vf = r.reshape(-1), v.reshape(-1)
        rf[ties] = vf[ties] + np.copysign(F32(0.5), vf[ties])
    return r


class Q8_0(Format):
    """8-bit symmetric: fp16 scale ``d``, 32 int8 codes; value = q * d.  Ignores importance."""

    name = "Q8_0"

    def _quantize_blocks(self, blocks, importance, *, row_length):
        x = np.asarray(blocks, dtype=F32)
        amax = np.abs(x).max(axis=1)
        d = amax / F32(127)
        idv = safe_inverse(d)
        q = _roundf(x * idv[:, None]).astype(np.int8)
        return np.concatenate([fp16_bytes(d), q.view(np.uint8)], axis=1)

    def _dequantize_blocks(self, data):
        d = fp16_from_bytes(data[:, 0:2])
        q = np.ascontiguousarray(data[:, 2:34]).view(np.int8)
        return q.astype(F32) * d[:, None]
