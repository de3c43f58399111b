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

The same search runs in C (``_kscales_native.c``, on 16 blocks side by side, the GIL
released) when the extension is built; it is tested bit for bit against this NumPy code,
which stays the reference (``AUTOBITS_NATIVE_QUANT=0``).

(ggml's ``quantize_row_iq4_nl_ref`` uses ``ntry=-1`` and is *not* what llama.cpp writes;
gguf-py has no IQ4_NL quantizer.)
"""

from __future__ import annotations

import numpy as np

from autobits.formats.base import Format
from autobits.formats.kscales import native_extension
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
_NATIVE_CHUNK = 16384  # blocks per call of the C search

#: ggml's ``kvalues_iq4nl``.
KVALUES_IQ4NL = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8
)
_VALS = KVALUES_IQ4NL.astype(F32)


def _take_lower(v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """ggml's choice between neighbouring grid values ``lo < v <= hi`` (float32, ties up)."""
    return (v - lo) < (hi - v)


def _thresholds() -> np.ndarray:
    """Per pair of neighbouring grid values, the smallest float32 ``v`` that
    ``best_index_int8`` rounds up to the upper one.

    The rule ``v - lo < hi - v`` is monotone in ``v`` (each side is a rounded monotone
    function of ``v``), so the index of any ``v`` is the number of thresholds at or below
    it; found here by bisection over float32 values with the rule itself.
    """
    out = []
    for lo, hi in zip(_VALS[:-1], _VALS[1:]):
        a, b = F32(lo), F32(hi)  # the rule takes a's side at a and b's side at b
        while np.nextafter(a, b) != b:
            m = F32((a + b) / F32(2))
            if m in (a, b):
                m = np.nextafter(a, b)
            if _take_lower(m, lo, hi):
                a = m
            else:
                b = m
        out.append(b)
    return np.array(out, dtype=F32)


# The thresholds are the midpoints of neighbouring (integer) grid values, so the index of
# ``v`` depends only on ``floor(2 v)``: one table lookup per value.  The tables cover the
# keys from just below the first threshold to the last one; keys outside clamp to them.
_T2 = _thresholds() * F32(2)
if not np.array_equal(_T2, np.floor(_T2)):  # pragma: no cover - fixed by the grid
    raise AssertionError(f"IQ4_NL thresholds are not half-integers: {_T2 / 2}")
_KEY_LO = F32(_T2[0] - 1)
_KEY_SPAN = F32(_T2[-1] - _KEY_LO)
_INDEX = np.searchsorted(_T2, np.arange(_KEY_SPAN + 1) + _KEY_LO, side="right").astype(np.uint8)
_GRID = _VALS[_INDEX]


def _key(v2: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Table index (intp) of ``floor(v2)`` clamped to the tables, for ``v2 = 2 v`` (float32,
    overwritten); into ``out`` (intp, the shape of ``v2``) when given."""
    np.floor(v2, out=v2)
    np.clip(v2, _KEY_LO, _KEY_LO + _KEY_SPAN, out=v2)
    v2 -= _KEY_LO  # exact: small integers
    if out is None:
        return v2.astype(np.intp)
    np.copyto(out, v2, casting="unsafe")  # whole numbers >= 0: the cast is exact
    return out


def best_index_iq4nl(v: np.ndarray) -> np.ndarray:
    """ggml's ``best_index_int8(16, kvalues_iq4nl, v)`` elementwise.

    The binary search finds ``mu`` = first grid index above ``v``; then
    ``v - val[mu-1] < val[mu] - v ? mu-1 : mu`` (float32, ties go up).  Values beyond the grid
    clamp to the end indices.  Computed as a lookup by ``floor(2 v)`` (see :func:`_thresholds`).
    """
    with np.errstate(over="ignore"):  # 2 v overflows to +-inf: clamped like any large v
        v2 = np.multiply(np.asarray(v, dtype=F32), F32(2), dtype=F32)  # exact otherwise
    return _INDEX.take(_key(v2))


class _FitBuffers:
    """Scratch arrays of :meth:`fit` for up to ``n`` blocks, reused by every try of every
    chunk of a tensor (no allocation, hence no fresh pages, per try)."""

    def __init__(self, n: int, bs: int):
        self.size = n * bs
        self.f = np.empty(self.size, dtype=F32)
        self.key = np.empty(self.size, dtype=np.intp)
        self.q = np.empty(self.size, dtype=F32)
        self.wq = np.empty(self.size, dtype=F32)
        self.tmp = np.empty(self.size, dtype=F32)

    def fit(self, xt: np.ndarray, wt: np.ndarray, idv: np.ndarray):
        """Weighted sums ``(sumqx, sumq2)`` of the grid fit with inverse scale ``idv``.

        ``xt``/``wt`` are transposed blocks ``(32, n)`` so the sums run in C order along
        axis 0.  The grid value of ``v = idv * x`` is looked up by ``floor(2 v)``, with
        ``2 v`` computed as ``(2 idv) * x``: the same float32 value (scaling by 2 is exact),
        except that a product too small for a normal float32 may round differently, and
        every ``|v| < 1`` has the same grid index.  (``|v| <= 127 + NTRY``: no overflow.)
        """
        view = lambda a: a[: xt.size].reshape(xt.shape)  # noqa: E731 - C-contiguous
        f, key, q, wq, tmp = map(view, (self.f, self.key, self.q, self.wq, self.tmp))
        np.multiply((idv * F32(2))[None, :], xt, out=f)
        _GRID.take(_key(f, key), out=q)
        np.multiply(wt, q, out=wq)
        np.multiply(wq, xt, out=tmp)
        sumqx = seqsum(tmp)
        np.multiply(wq, q, out=tmp)
        return sumqx, seqsum(tmp)


def quantize_iq4_nl_blocks(blocks: np.ndarray, importance: np.ndarray | None,
                           buffers: _FitBuffers | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(d float32 (n,), codes uint8 (n, 32))`` exactly as ``quantize_row_iq4_nl_impl``
    (``buffers``: scratch arrays for at least these blocks, to reuse)."""
    x = np.ascontiguousarray(blocks, dtype=F32)
    n, bs = x.shape
    fit = (buffers if buffers is not None and buffers.size >= x.size else _FitBuffers(n, bs)).fit
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
    sumqx, sumq2 = fit(xt, wt, F32(1) / d0)
    pos = sumq2 > 0
    d = np.where(pos, sumqx / np.where(pos, sumq2, F32(1)), F32(0)).astype(F32)
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        idv = F32(itry + int(KVALUES_IQ4NL[0])) / safe_max
        sumqx, sumq2 = fit(xt, wt, idv)
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
        native = native_extension()
        if native is not None:
            # chunks bound the int32 codes and the contiguous importance copy
            for s in range(0, blocks.shape[0], _NATIVE_CHUNK):
                x = np.ascontiguousarray(blocks[s : s + _NATIVE_CHUNK], dtype=F32)
                imp = None if importance is None else np.ascontiguousarray(
                    importance[s : s + _NATIVE_CHUNK], dtype=F32)
                d, codes = np.empty(x.shape[0], dtype=F32), np.empty(x.shape, dtype=np.int32)
                native.iq4nl(x, imp, d, codes, 0)
                out[s : s + _NATIVE_CHUNK, 0:2] = fp16_bytes(d)
                out[s : s + _NATIVE_CHUNK, 2:] = pack_nibbles(codes)
            return out
        # chunks keep the (32, chunk) temporaries cache-sized and the memory bounded
        buffers = _FitBuffers(min(CHUNK, blocks.shape[0]), self.block_size)
        for s in range(0, blocks.shape[0], CHUNK):
            imp = None if importance is None else importance[s : s + CHUNK]
            d, codes = quantize_iq4_nl_blocks(blocks[s : s + CHUNK], imp, buffers)
            out[s : s + CHUNK, 0:2] = fp16_bytes(d)
            out[s : s + CHUNK, 2:] = pack_nibbles(codes)
        return out

    def _dequantize_blocks(self, data):
        d = fp16_from_bytes(data[:, 0:2])
        return _VALS[unpack_nibbles(data[:, 2:18])] * d[:, None]
