"""IQ4_NL: 4-bit non-linear quantization, 32 values per block, byte-identical to llama.cpp.

Layout (18 bytes per block): fp16 scale ``d``, then 16 bytes ``qs``; ``qs[j]`` holds the code
of value ``j`` in its low nibble and of value ``j + 16`` in its high nibble.  Value ``j`` is
``d * KVALUES_IQ4NL[code_j]`` with the fixed non-uniform grid :data:`KVALUES_IQ4NL`.

Quantization follows ``quantize_iq4_nl`` -> ``quantize_row_iq4_nl_impl(32, 32, ..., ntry=7)``
exactly (that is what ``ggml_quantize_chunk`` and ``llama-quantize`` run, with or without an
imatrix):

* weights: ``importance_j * sqrt(sigma2 + x_j**2)`` with ``sigma2 = 2 * sum(x**2) / 32`` over
  the block when an importance vector is given, otherwise ``x_j**2``;
* start from ``d = max / 127`` (``max`` = the value of largest magnitude), pick each value's
  nearest grid point, take the weighted least-squares scale; then try the 15 inverse scales
  ``(itry - 127) / max`` for ``itry`` in ``-7..7`` and keep the best weighted fit;
* finally re-pick every code with the chosen (float32, not fp16-rounded) scale.

(ggml's ``quantize_row_iq4_nl_ref`` uses ``ntry=-1`` and is *not* what llama.cpp writes;
gguf-py has no IQ4_NL quantizer.)
"""

from __future__ import annotations

import numpy as np

from autobits.formats.base import Format
from autobits.formats.ggml import (
    F32,
    GROUP_MAX_EPS,
    first_absmax,
    fp16_bytes,
    fp16_from_bytes,
    pack_nibbles,
    safe_inverse,
    seqsum,
    unpack_nibbles,
)

__all__ = ["IQ4_NL", "KVALUES_IQ4NL", "best_index_iq4nl"]

NTRY = 7
CHUNK = 4096  # blocks quantized together

#: ggml's ``kvalues_iq4nl``.
KVALUES_IQ4NL = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8
)
_VALS = KVALUES_IQ4NL.astype(F32)


# Lookup by floor(v): the grid values are integers, so "first grid index above v" depends only
# on floor(v) (clamped to the grid's range); _MU is that index clipped to 1..15.
_KEYS = np.arange(-128, 114)
_MU = np.clip(np.searchsorted(_VALS, _KEYS, side="right"), 1, 15).astype(np.uint8)
_LO = _VALS[_MU.astype(np.intp) - 1]
_HI = _VALS[_MU.astype(np.intp)]


def _nearest(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(take_lower bool, key intp)`` for :func:`best_index_iq4nl` and its grid value."""
    f = np.floor(v)
    np.clip(f, -128, 113, out=f)
    key = f.astype(np.intp)
    key += 128
    lower = (v - _LO[key]) < (_HI[key] - v)
    return lower, key


def best_index_iq4nl(v: np.ndarray) -> np.ndarray:
    """ggml's ``best_index_int8(16, kvalues_iq4nl, v)`` elementwise.

    The binary search finds ``mu`` = first grid index above ``v``; then
    ``v - val[mu-1] < val[mu] - v ? mu-1 : mu`` (float32, ties go up).  Values beyond the grid
    clamp to the end indices, which the same formula yields once ``mu`` is clipped to 1..15.
    """
    v = np.asarray(v, dtype=F32)
    lower, key = _nearest(v)
    return _MU[key] - lower.view(np.uint8)


def _grid_value(v: np.ndarray) -> np.ndarray:
    """``kvalues_iq4nl[best_index_iq4nl(v)]`` as float32, without forming the index."""
    lower, key = _nearest(v)
    return np.where(lower, _LO[key], _HI[key])


def _fit(xt: np.ndarray, wt: np.ndarray, idv: np.ndarray):
    """Weighted sums ``(sumqx, sumq2)`` of the grid fit with inverse scale ``idv``.

    ``xt``/``wt`` are transposed blocks ``(32, n)`` so the sums run in C order along axis 0.
    """
    q = _grid_value(idv[None, :] * xt)
    wq = wt * q
    return seqsum(wq * xt), seqsum(wq * q)


def quantize_iq4_nl_blocks(blocks: np.ndarray, importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``(d float32 (n,), codes uint8 (n, 32))`` exactly as ``quantize_row_iq4_nl_impl``."""
    x = np.ascontiguousarray(blocks, dtype=F32)
    n, bs = x.shape
    xt = np.ascontiguousarray(x.T)
    if importance is not None:
        sigma2 = seqsum(xt * xt) * (F32(2) / F32(bs))
        wt = np.ascontiguousarray(np.asarray(importance, dtype=F32).T) * np.sqrt(sigma2[None, :] + xt * xt)
    else:
        wt = xt * xt

    amax, mx = first_absmax(x)
    live = amax >= GROUP_MAX_EPS
    safe_max = np.where(live, mx, F32(1))  # dead blocks are overwritten below
    d0 = -safe_max / _VALS[0]
    sumqx, sumq2 = _fit(xt, wt, F32(1) / d0)
    pos = sumq2 > 0
    d = np.where(pos, sumqx / np.where(pos, sumq2, F32(1)), F32(0)).astype(F32)
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        idv = F32(itry + int(KVALUES_IQ4NL[0])) / safe_max
        sumqx, sumq2 = _fit(xt, wt, idv)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        if better.any():
            nd = sumqx[better] / sumq2[better]
            d[better] = nd
            best[better] = nd * sumqx[better]
    d = np.where(live, d, F32(0)).astype(F32)
    codes = best_index_iq4nl(safe_inverse(d)[:, None] * x)
    return d, codes


class IQ4_NL(Format):
    """4-bit codes on ggml's non-linear grid with one fp16 scale per 32 values."""

    name = "IQ4_NL"
    uses_importance = True

    def _quantize_blocks(self, blocks, importance, *, row_length):
        out = np.empty((blocks.shape[0], self.type_size), dtype=np.uint8)
        # chunks keep the (32, chunk) temporaries cache-sized and the memory bounded
        for s in range(0, blocks.shape[0], CHUNK):
            imp = None if importance is None else importance[s : s + CHUNK]
            d, codes = quantize_iq4_nl_blocks(blocks[s : s + CHUNK], imp)
            out[s : s + CHUNK, 0:2] = fp16_bytes(d)
            out[s : s + CHUNK, 2:] = pack_nibbles(codes)
        return out

    def _dequantize_blocks(self, data):
        d = fp16_from_bytes(data[:, 0:2])
        return _VALS[unpack_nibbles(data[:, 2:18])] * d[:, None]
