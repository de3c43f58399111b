"""Fast paths shared by the 32-value block formats: the "lanes" layout, fp16 bits, finiteness.

NumPy is slow on ``(n, 32)`` block arrays: every reduction or broadcast along the short
last axis runs one tiny inner loop per block.  These helpers move each tensor chunk once
into the *lanes* layout ``(8, n, 4)`` (``Y[k, i, p] = x[i, 4k + p]``, one cheap transposed
copy of 16-byte groups), where per-block reductions become 8 contiguous vector operations
and per-block scales broadcast along contiguous rows; the codes are packed in that layout
and written back through a structured view of the output bytes.

Everything here is exact: reductions only pick existing values (max/min), the arithmetic
is left to the callers, and :func:`fp16_bits` is bit-identical to NumPy's float16 cast
(round to nearest even, subnormals, overflow to infinity), which is ggml's
``GGML_FP32_TO_FP16``.
"""

from __future__ import annotations

import math

import numpy as np

from autobits.formats.base import NonFiniteInput

__all__ = [
    "LANES_CHUNK",
    "all_finite",
    "fp16_bits",
    "to_lanes",
    "lanes_max",
    "lanes_min",
    "repeat4",
    "pack_nibbles_lanes",
    "high_bits_lanes",
    "block_output",
    "put_lanes_u32",
    "const",
    "require_finite",
]

F32 = np.float32
#: Blocks handled together (2 MiB of float32 input): bounds the temporaries; larger chunks
#: amortise the per-call cost of the many per-block (n,) operations.
LANES_CHUNK = 16384
_V16 = np.dtype("V16")

# fp16 conversion by integer arithmetic, valid for |x| in [2**-14, 65520) (normal halves):
# rebase the exponent, add 0xfff plus the lowest kept bit (round half to even), shift.
_F16_MIN_NORMAL = np.uint32(0x38800000)  # 2**-14
_F16_OVERFLOW = np.uint32(0x477FF000)  # 65520: rounds to infinity
_F16_REBASE = np.uint32((0xFFF - 0x38000000) & 0xFFFFFFFF)
_SMALL = 8192  # below this many values NumPy's own cast is as fast


def all_finite(x: np.ndarray) -> bool:
    """``np.isfinite(x).all()`` without a full boolean temporary in the common case.

    ``x . x`` is finite only if every value is finite (NaN and inf propagate; a sum of
    squares never cancels); a huge but finite tensor may overflow it, then the exact
    check decides.
    """
    flat = np.asarray(x).reshape(-1)
    if flat.dtype == F32 and flat.size:
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.dot(flat, flat)):
                return True
    return bool(np.isfinite(flat).all())


def fp16_bits(x: np.ndarray) -> np.ndarray:
    """float32 array -> uint16 IEEE half bit patterns, exactly ``x.astype(np.float16)``."""
    x = np.ascontiguousarray(x, dtype=F32)
    if x.size < _SMALL:
        return x.astype("<f2").view(np.uint16)
    u = x.view(np.uint32)
    a = u & np.uint32(0x7FFFFFFF)
    r = a >> np.uint32(13)
    r &= np.uint32(1)
    r += a
    r += _F16_REBASE
    r >>= np.uint32(13)
    s = u >> np.uint32(16)
    s &= np.uint32(0x8000)
    r |= s
    out = r.astype(np.uint16)
    if a.min() < _F16_MIN_NORMAL or a.max() >= _F16_OVERFLOW:
        # subnormal, zero, overflowing or non-finite values: NumPy's cast for those
        odd = (a < _F16_MIN_NORMAL) | (a >= _F16_OVERFLOW)
        with np.errstate(over="ignore"):
            out[odd] = x[odd].astype("<f2").view(np.uint16)
    return out


_CONSTS: dict[tuple, np.ndarray] = {}


def const(value, shape: tuple[int, ...], dtype=F32) -> np.ndarray:
    """A read-only array of ``shape`` filled with ``value`` (cached, grown on demand).

    NumPy's ``minimum``/``maximum``/``clip`` take a slow path for a scalar or broadcast
    operand (about ten times slower than for two contiguous arrays), so hot loops compare
    against one of these instead.
    """
    size = math.prod(shape)
    key = (dtype, value)
    buf = _CONSTS.get(key)
    if buf is None or buf.size < size:
        buf = np.full(max(size, 1 << 16), value, dtype=dtype)
        buf.flags.writeable = False
        _CONSTS[key] = buf
    return buf[:size].reshape(shape)


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
