"""Plain (no importance) Q4_0, Q4_1, Q5_0 and Q5_1: ggml's ``quantize_row_q*_ref``, fast.

Without an importance vector the legacy 32-value formats are quantized by a few elementwise
passes, and NumPy is slow on ``(n, 32)`` block arrays: every reduction or broadcast along
the short last axis runs one tiny inner loop per block.  So each tensor chunk is moved once
into the *lanes* layout ``(8, n, 4)`` (``Y[k, i, p] = x[i, 4k + p]``, one cheap transposed
copy of 16-byte groups), where per-block reductions become 8 contiguous vector operations
and per-block scales broadcast along contiguous rows; the codes are packed in that layout
and written back through views of the output bytes.

* symmetric Q4_0 / Q5_0 (:func:`quantize_plain_sym`): ``d = max / -nmax`` (``max`` the value
  of largest magnitude), codes ``MIN(cap, (int)(x/d + nmax + 0.5f))``;
* asymmetric Q4_1 / Q5_1 (:func:`quantize_plain_asym`): ``d = (max - min) / nmax``, codes
  ``(int)((x - min)/d + 0.5f)``; the lane maxima and minima of both statistics are
  transposed together once, the two per-block operands (``min`` and ``1/d``) spread back to
  lanes together, and fp16 ``d``/``m``, nibbles and high bits are written straight into the
  uint32 words of the output blocks.

Every value is computed as C does (float32, no fused or reassociated operations; the lanes
reductions only pick existing values), so the bytes are ggml's.  The per-block max/min
reductions see every NaN and Inf: a non-finite input raises
:class:`~autobits.formats.base.NonFiniteInput` (:func:`require_finite`), which spares
:meth:`Format.quantize <autobits.formats.base.Format.quantize>` its own pass over the data.
"""

from __future__ import annotations

import numpy as np

from autobits.formats.base import NonFiniteInput
from autobits.formats.ggml import F32, const, first_absmax, fp16_bits, safe_inverse

__all__ = ["LANES_CHUNK", "quantize_plain_sym", "quantize_plain_asym"]

#: Blocks handled together (2 MiB of float32 input): bounds the temporaries; larger chunks
#: amortise the per-call cost of the many per-block (n,) operations.
LANES_CHUNK = 16384
_V16 = np.dtype("V16")
_F32_TINY = np.finfo(F32).tiny  # smallest normal float32


# ---------------------------------------------------------------------- the lanes layout
def to_lanes(blocks: np.ndarray) -> np.ndarray:
    """``float32 (n, 32)`` -> ``(8, n, 4)`` with ``Y[k, i, p] = blocks[i, 4k + p]`` (a copy)."""
    b = np.ascontiguousarray(blocks, dtype=F32)
    n = b.shape[0]
    return np.ascontiguousarray(b.view(_V16).T).view(F32).reshape(8, n, 4)


def _reduce4(m: np.ndarray, op) -> np.ndarray:
    # (n, 4) -> (n,): transposed first, NumPy loops over short rows are slow
    return op.reduce(np.ascontiguousarray(m.T), axis=0)


def lanes_max(y: np.ndarray) -> np.ndarray:
    """Per block maximum value ``(n,)`` of a lanes array (sign of a zero result unspecified)."""
    return _reduce4(np.maximum.reduce(y, axis=0), np.maximum)


def lanes_min(y: np.ndarray) -> np.ndarray:
    """Per block minimum value ``(n,)`` of a lanes array (sign of a zero result unspecified)."""
    return _reduce4(np.minimum.reduce(y, axis=0), np.minimum)


def repeat4(v: np.ndarray) -> np.ndarray:
    """``(n,)`` -> ``(n*4,)``: a per-block value for each ``(i, p)`` of a lanes row."""
    return np.repeat(v, 4)


def _words(q: np.ndarray) -> np.ndarray:
    """uint8 lanes ``(8, n, 4)`` (C-contiguous) -> ``uint32 (8, n, 1)``: the 4 codes of each
    (k, i) as one little-endian word (a view)."""
    return q.view("<u4")


def cap_codes(q: np.ndarray, bit: int) -> None:
    """``q = MIN(2**bit - 1, q)`` in place for uint8 lanes codes that are at most ``2**bit``.

    Works on 4 codes per uint32 word: a code equal to ``2**bit`` has bit ``bit`` set and
    drops by one; NumPy's own uint8 minimum is several times slower.
    """
    w = _words(q)
    w -= (w >> np.uint32(bit)) & np.uint32(0x01010101)


def pack_nibbles_lanes(q: np.ndarray) -> np.ndarray:
    """uint8 codes ``(8, n, 4)`` -> ``uint32 (4, n)``: the little-endian words
    ``qs[4k:4k+4]`` of every block (low nibble value ``j``, high nibble value ``j+16``)."""
    w = _words(q)
    hi = w[4:8] << np.uint32(4)
    hi &= np.uint32(0xF0F0F0F0)
    hi |= w[0:4] & np.uint32(0x0F0F0F0F)
    return hi.reshape(4, q.shape[1])


def high_bits_lanes(q: np.ndarray, bit: int = 4) -> np.ndarray:
    """Bit ``bit`` of each code of uint8 lanes ``(8, n, 4)`` -> ``uint32 (n,)``: bit ``j`` of
    block ``i`` is that bit of value ``j`` (ggml's little-endian ``qh``)."""
    w = _words(q).reshape(8, q.shape[1]) >> np.uint32(bit)
    w &= np.uint32(0x01010101)  # bits at 0, 8, 16, 24 (p = 0..3)
    # multiply by 1 + 2**7 + 2**14 + 2**21: bit 8p lands on 21 + p with no carries
    w *= np.uint32(0x00204081)
    w >>= np.uint32(21)
    w &= np.uint32(0xF)
    w <<= _NIBBLE_SHIFTS
    return np.bitwise_or.reduce(w, axis=0)


_NIBBLE_SHIFTS = (np.arange(8, dtype=np.uint32) * np.uint32(4))[:, None]
_DTYPES: dict[tuple, np.dtype] = {}


def block_output(n: int, layout: list[tuple[str, str, int]]) -> np.ndarray:
    """An empty structured array of ``n`` blocks whose fields are ``(name, dtype, offset)``;
    ``.view(np.uint8)`` gives the block bytes."""
    key = tuple(layout)
    dt = _DTYPES.get(key)
    if dt is None:
        names = [f[0] for f in layout]
        fmts = [f[1] for f in layout]
        offs = [f[2] for f in layout]
        size = max(o + np.dtype(f).itemsize for f, o in zip(fmts, offs))
        dt = _DTYPES[key] = np.dtype({"names": names, "formats": fmts, "offsets": offs,
                                      "itemsize": size})
    return np.empty(n, dtype=dt)


def put_lanes_u32(field: np.ndarray, words: np.ndarray) -> None:
    """Store ``uint32 (m, n)`` per-block words into an ``('<u4', (m,))`` output field."""
    for k in range(words.shape[0]):  # one long strided copy per word beats (n, m) loops
        field[:, k] = words[k]


def require_finite(stat: np.ndarray, *parts: np.ndarray) -> None:
    """Raise :class:`NonFiniteInput` unless the per-block statistics ``parts`` are finite.

    ``parts`` come from the block max/min reductions (NaN and Inf propagate through those,
    so this covers every input value); ``stat`` is computed from them (say ``max - min``)
    and is non-finite whenever one of them is.  Its sum is finite in the common case; a
    non-finite sum (maybe an overflow) falls back to the exact test of ``parts``.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(stat)):
            return
    if not all(np.isfinite(p).all() for p in parts or (stat,)):
        raise NonFiniteInput("input contains NaN or Inf")


# ------------------------------------------------------- symmetric: Q4_0, Q5_0
# (codes cap, block fields (name, dtype, offset)) of Q4_0 (nmax 8) and Q5_0 (nmax 16)
_SYM = {
    8: (15, [("d", "<u2", 0), ("qs", "(4,)<u4", 2)]),
    16: (31, [("d", "<u2", 0), ("qh", "<u4", 2), ("qs", "(4,)<u4", 6)]),
}


def _sym_codes(x: np.ndarray, nmax: int, cap: int):
    """``(d, codes uint8 lanes (8, n, 4))`` of ``quantize_row_q{4,5}_0_ref`` for blocks ``x``."""
    n = x.shape[0]
    y = to_lanes(x)  # our own copy: the arithmetic below runs in place on it
    hi, lo = lanes_max(y), lanes_min(y)
    yf = y.reshape(8, 4 * n)
    # ggml keeps the first value of largest |x|: hi if hi >= -lo else lo (the sign of
    # hi + lo is exact); hi == -lo (+a and -a both present, or an all-zero block, whose
    # max stays +0.0) needs a look at the block
    neg = -lo
    amax = np.maximum(hi, neg)
    require_finite(amax)
    mx = np.copysign(amax, hi + lo)
    rare = np.flatnonzero(hi == neg)
    if rare.size:
        mx[rare] = first_absmax(x[rare])[1]
    d = mx / F32(-nmax)
    # a zero or subnormal d (|d| < 2**-126) takes the careful path below
    tiny = bool(amax.min() < F32(2 * nmax) * _F32_TINY)
    np.multiply(yf, repeat4(safe_inverse(d) if tiny else F32(1) / d), out=yf)
    yf += F32(nmax + 0.5)  # x*id + 8.5f (16.5f)
    if tiny:
        # MIN(cap, (int)v) == (int)MIN(v, cap) for v >= 0 (only non-finite or >= 256
        # values, undefined behaviour in C, could tell them apart)
        np.minimum(yf, const(cap, yf.shape), out=yf)
    # C truncates to an integer: values are >= 0 (up to rounding of -0.5 ulp + 0.5)
    q = yf.astype(np.uint8).reshape(8, n, 4)
    if not tiny:
        # with a normal d, |x*id| <= nmax*(1 + 3 ulp): codes are at most 2*nmax, and reach
        # it (x close to -max) often
        cap_codes(q, cap.bit_length())
    return d, q


def quantize_plain_sym(x: np.ndarray, nmax: int) -> np.ndarray:
    """Plain Q4_0 (``nmax`` 8) or Q5_0 (``nmax`` 16) bytes of blocks ``x (n, 32)``."""
    cap, layout = _SYM[nmax]
    n = x.shape[0]
    out = block_output(n, layout)
    for s in range(0, n, LANES_CHUNK):
        d, q = _sym_codes(x[s : s + LANES_CHUNK], nmax, cap)
        o = out[s : s + LANES_CHUNK]
        o["d"] = fp16_bits(d)
        if "qh" in out.dtype.names:
            o["qh"] = high_bits_lanes(q)
        put_lanes_u32(o["qs"], pack_nibbles_lanes(q))
    return out.view(np.uint8).reshape(n, -1)


# ------------------------------------------------------ asymmetric: Q4_1, Q5_1
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

    :func:`autobits.formats._fp16_bits` on the magnitudes, with the range test folded
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
    require_finite(rng, hi, lo)
    # a zero extreme has the sign of the block's first such zero in C: the stored min
    # keeps it, and an all-zero block has max - min = +0 (the lanes' zeros are unordered)
    z = np.flatnonzero((lo == 0) | (hi == 0))
    if z.size:
        lo[z] = _first_min(x[z])
        rng[z] = np.maximum.reduce(x[z], axis=1) - lo[z]
        rng[z] += F32(0)  # -0 -> +0 (all-zero blocks)
    d = np.divide(rng, F32(nmax), out=rng)
    h = fp16_bits(v[0:2]).astype(np.uint32)
    h[1] <<= np.uint32(16)
    h[1] |= h[0]
    return h[1], bool(d.min() < _F32_TINY)


def _asym_chunk(x: np.ndarray, out: np.ndarray, nmax: int, cap: int | None) -> None:
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
        np.minimum(yf, const(cap, yf.shape), out=yf)
    # C truncates toward zero (values >= 0).  With a normal d the codes stay <= nmax:
    # (x - min) <= (max - min) in float, so (x - min)*id + 0.5 < nmax + 1 and C's MIN
    # never bites
    q = yf.astype(np.uint8)
    w = q.view(np.uint32)  # (8, n): the 4 codes of lane row k of each block
    hi_words = np.left_shift(w[4:8], _4)
    if cap is None:  # Q5_1: bit 4 goes to qh, nibbles are masked
        out[:, 1] = high_bits_lanes(q.reshape(8, n, 4))
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
        for a in range(0, n, LANES_CHUNK):
            b = a + LANES_CHUNK
            _asym_chunk(x[a:b], out[a:b], nmax, None if q5 else 15)
    return out.view(np.uint8).reshape(n, 4 * words)
