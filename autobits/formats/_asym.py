"""Plain (no importance) Q4_1 and Q5_1: ``quantize_row_q4_1_ref`` / ``quantize_row_q5_1_ref``.

The asymmetric legacy formats on the lanes layout of :mod:`autobits.formats._lanes`, with
as few passes over the data as the float32 arithmetic allows:

* the lane maxima and minima ``(n, 4)`` of both statistics are transposed together once
  and reduced to per-block values; the two per-block operands of the elementwise pass
  (``min`` and ``1/d``) are spread back to lanes together;
* fp16 ``d`` and ``m``, the nibbles and (Q5_1) the high bits are written straight into
  the uint32 words of the output blocks, no structured array or extra copies.

Every value is computed as C does (``(x - min)*id + 0.5f`` truncated, in float32, no
fused or reassociated operations), so the bytes are ggml's.
"""

from __future__ import annotations

import numpy as np

from autobits.formats import _lanes as lanes

__all__ = ["quantize_plain_asym"]

F32 = np.float32
_F32_TINY = np.finfo(F32).tiny  # smallest normal float32
_V16 = np.dtype("V16")


def _u32(v: int) -> np.ndarray:
    # 0-d array constants: NumPy converts a scalar operand on every call (a microsecond
    # each, and these per-chunk calls are many)
    return np.array(v, dtype=np.uint32)


_HALF = np.array(0.5, dtype=F32)
_ONE = np.array(1, dtype=F32)
_NMAX = {15: np.array(15, dtype=F32), 31: np.array(31, dtype=F32)}
_1, _4, _13, _16 = _u32(1), _u32(4), _u32(13), _u32(16)
_NIB_LO = _u32(0x0F0F0F0F)
_NIB_HI = _u32(0xF0F0F0F0)
_ABS = _u32(0x7FFFFFFF)
_SIGN = _u32(0x80000000)
_F16_MIN_NORMAL = _u32(0x38800000)  # 2**-14
_F16_SPAN = 0x477FF000 - 0x38800000  # [2**-14, 65520): normal, no overflow
_F16_ADD = _u32(0x38800000 + 0xFFF - 0x38000000)  # undo the bias, rebase, round


def _first_min(x: np.ndarray) -> np.ndarray:
    """Per row the first occurrence of the minimum (ggml's ``if (v < min) min = v;``)."""
    return x[np.arange(x.shape[0]), np.argmin(x, axis=1)]


def _spread4(v: np.ndarray) -> np.ndarray:
    """``(k, n)`` -> ``(k, 4n)``: each per-block value for the 4 lanes of its block (four
    strided copies beat ``np.repeat``)."""
    r = np.empty(v.shape + (4,), dtype=F32)
    for p in range(4):
        r[..., p] = v
    return r.reshape(v.shape[0], -1)


def _dm_words(dm: np.ndarray) -> np.ndarray | None:
    """fp16 ``d | m << 16`` words of ``dm (2, n)`` (``d >= 0``), or None unless every value
    is a normal half (no zero, subnormal, overflowing or non-finite ``d`` or ``m``).

    :func:`autobits.formats._lanes.fp16_bits` on the magnitudes, with the range test folded
    into the rebased word, and ``m``'s sign moved straight to bit 31.  Constants are 0-d
    arrays: cheaper operands than NumPy scalars on these short rows.
    """
    u = dm.view(np.uint32)
    a = np.bitwise_and(u, _ABS)
    a -= _F16_MIN_NORMAL  # (bit 13 and below unchanged) wraps below 2**-14
    if np.maximum.reduce(a, axis=None) >= _F16_SPAN:
        return None
    lsb = np.right_shift(a, _13)
    lsb &= _1
    a += lsb  # round half to even
    a += _F16_ADD
    a >>= _13
    word = np.left_shift(a[1], _16)
    word |= a[0]
    word |= np.bitwise_and(u[1], _SIGN)
    return word


def _dm_careful(x, hi, lo, v, nmax) -> tuple[np.ndarray, bool]:
    """The rare chunks :func:`_dm_words` declines: finiteness, C's signs of zero, zero or
    subnormal scales.  Fixes ``v[0]`` (d) and ``v[1]`` (min) in place; returns the fp16
    words and whether some ``d`` is below the smallest normal float32."""
    rng = np.subtract(hi, lo, out=v[0])
    lanes.require_finite(rng, hi, lo)
    # a zero extreme has the sign of the block's first such zero in C: the stored min
    # keeps it, and an all-zero block has max - min = +0 (the lanes' zeros are unordered)
    z = np.flatnonzero((lo == 0) | (hi == 0))
    if z.size:
        lo[z] = _first_min(x[z])
        rng[z] = np.maximum.reduce(x[z], axis=1) - lo[z]
        rng[z] += F32(0)  # -0 -> +0 (all-zero blocks)
    d = np.divide(rng, F32(nmax), out=rng)
    h = lanes.fp16_bits(v[0:2]).astype(np.uint32)
    h[1] <<= np.uint32(16)
    h[1] |= h[0]
    return h[1], bool(d.min() < _F32_TINY)


def _chunk(x: np.ndarray, out: np.ndarray, nmax: int, cap: int | None) -> None:
    """Quantize blocks ``x (n, 32)`` into the uint32 block words ``out (n, 5 or 6)``."""
    n = x.shape[0]
    y = np.empty((8, n, 4), dtype=F32)  # lanes: the arithmetic runs in place on it
    np.copyto(y.view(_V16).reshape(8, n), x.view(_V16).T)
    # per-lane maxima and minima s (2, n, 4), then per block from their transpose t (there
    # by pairwise ufunc calls: a reduce call costs several times more on short arrays)
    s = np.empty((2, n, 4), dtype=F32)
    np.maximum.reduce(y, axis=0, out=s[0])
    np.minimum.reduce(y, axis=0, out=s[1])
    t = np.empty((2, 4, n), dtype=F32)
    np.copyto(t, s.transpose(0, 2, 1))
    np.maximum(t[0, 0:2], t[0, 2:4], out=t[0, 0:2])
    np.minimum(t[1, 0:2], t[1, 2:4], out=t[1, 0:2])
    v = np.empty((3, n), dtype=F32)  # rows: d, min, 1/d
    hi = np.maximum(t[0, 0], t[0, 1], out=t[0, 2])
    lo = np.minimum(t[1, 0], t[1, 1], out=v[1])
    d = np.subtract(hi, lo, out=v[0])
    np.divide(d, _NMAX[nmax], out=d)
    words = _dm_words(v[0:2])
    tiny = False  # zero or subnormal d: C's ``d ? 1/d : 0`` matters
    if words is None:
        words, tiny = _dm_careful(x, hi, lo, v, nmax)
    out[:, 0] = words
    if tiny:
        v[2] = 0
        np.divide(_ONE, d, out=v[2], where=d != 0)
    else:
        np.divide(_ONE, d, out=v[2])
    r = _spread4(v[1:3])
    yf = y.reshape(8, 4 * n)
    yf -= r[0]  # x - min
    yf *= r[1]  # (x - min)*id
    yf += _HALF
    if cap is not None and tiny:
        # MIN(cap, (int)v) == (int)MIN(v, cap) for v >= 0 (only non-finite or >= 256
        # values, undefined behaviour in C, could tell them apart)
        np.minimum(yf, lanes.const(cap, yf.shape), out=yf)
    # C truncates toward zero (values >= 0).  With a normal d the codes stay <= nmax:
    # (x - min) <= (max - min) in float, so (x - min)*id + 0.5 < nmax + 1 and C's MIN
    # never bites
    q = yf.astype(np.uint8)
    w = q.view(np.uint32)  # (8, n): the 4 codes of lane row k of each block
    hi_words = np.left_shift(w[4:8], _4)
    if cap is None:  # Q5_1: bit 4 goes to qh, nibbles are masked
        out[:, 1] = lanes.high_bits_lanes(q.reshape(8, n, 4))
        hi_words &= _NIB_HI
        lo_words = np.bitwise_and(w[0:4], _NIB_LO)
        np.bitwise_or(hi_words, lo_words, out=out[:, 2:6].T)
    elif tiny:  # a NaN or inf product: keep the codes in their nibbles, as ggml's packing
        hi_words &= _NIB_HI
        np.bitwise_or(hi_words, np.bitwise_and(w[0:4], _NIB_LO), out=out[:, 1:5].T)
    else:  # codes <= 15: no masking needed
        np.bitwise_or(hi_words, w[0:4], out=out[:, 1:5].T)


def quantize_plain_asym(x: np.ndarray, nmax: int) -> np.ndarray:
    """Plain Q4_1 (``nmax`` 15) or Q5_1 (``nmax`` 31) bytes of blocks ``x (n, 32)``."""
    q5 = nmax == 31
    words = 6 if q5 else 5
    n = x.shape[0]
    out = np.empty((n, words), dtype=np.uint32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for a in range(0, n, lanes.LANES_CHUNK):
            b = a + lanes.LANES_CHUNK
            _chunk(x[a:b], out[a:b], nmax, None if q5 else 15)
    return out.view(np.uint8).reshape(n, 4 * words)
