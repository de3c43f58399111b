"""ggml's numeric conventions, vectorised: what every port of ``ggml-quants.c`` here relies on.

The ggml formats are byte-identical to llama.cpp only if every step is evaluated as the C code
evaluates it.  This module holds the shared pieces of that:

* constants: ``F32``, ``QK_K`` (values per K-quant super-block), ``GROUP_MAX_EPS``;
* rounding: :func:`nearest_int` (ggml's magic-number rounding, bit for bit), the bound
  :data:`SAFE_ABS` below which it equals ``np.rint``, :func:`rint_is_exact` and the switch
  :data:`FAST_ROUNDING` that every such shortcut in the ports obeys;
* in-order float32 sums (:func:`seqsum`), never NumPy's pairwise ones;
* fp16: :func:`fp16_bits` (``GGML_FP32_TO_FP16`` as uint16 bits, fast), :func:`fp16_round`,
  and the byte views :func:`fp16_bytes`, :func:`half_bytes`, :func:`fp16_from_bytes`;
* C's scans and guards: :func:`first_absmax`, :func:`first_min_max`, :func:`safe_inverse`;
* the nibble and fifth-bit packing of the 32-value blocks (Q4_0 ... Q5_1, IQ4_NL);
* :func:`const`, cached constant arrays for the hot loops (NumPy is slow with scalar operands).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "F32",
    "QK_K",
    "GROUP_MAX_EPS",
    "SAFE_ABS",
    "FAST_ROUNDING",
    "nearest_int",
    "rint_is_exact",
    "seqsum",
    "fp16_bits",
    "fp16_round",
    "fp16_bytes",
    "half_bytes",
    "fp16_from_bytes",
    "first_absmax",
    "first_min_max",
    "safe_inverse",
    "pack_nibbles",
    "unpack_nibbles",
    "pack_high_bits",
    "unpack_high_bits",
    "const",
]

F32 = np.float32
#: Values per super-block of the K-quants (``QK_K`` of ggml-common.h).
QK_K = 256
#: ``GROUP_MAX_EPS`` of ggml-quants.c: groups whose max |x| is below it are all-zero.
GROUP_MAX_EPS = F32(1e-15)

# ------------------------------------------------------------------------------ rounding
_MAGIC = F32(12582912.0)  # 1.5 * 2**23

#: |v| below this keeps ``v + 1.5*2**23`` inside [2**23, 2**24), where the magic-number
#: rounding of :func:`nearest_int` equals ``np.rint`` (below 2**22, with a margin for the
#: rounding of the bounds the callers compute).
SAFE_ABS = F32(4194000.0)

#: Take ``np.rint`` for :func:`nearest_int` where :data:`SAFE_ABS` proves it exact.  Every
#: such shortcut in the ports checks this switch (read as ``ggml.FAST_ROUNDING``); tests turn
#: it off to check that the exact integer path writes the same bytes.
FAST_ROUNDING = True


def nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: ``float32`` -> ``int32``, reproduced bit for bit.

    Adds ``1.5 * 2**23`` in float32 and reads the low mantissa bits, which rounds half to
    even for ``|x| < 2**22``.  Outside that range (an ``assert`` in ggml, compiled out in
    release builds) the C function returns garbage; this port returns the same garbage.
    """
    v = np.add(np.asarray(x, dtype=F32), _MAGIC, dtype=F32)
    bits = np.asarray(v).view(np.int32)
    return (bits & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def rint_is_exact(lo_end: np.ndarray, hi_end: np.ndarray, ignore: np.ndarray) -> bool:
    """True if :data:`FAST_ROUNDING` is on and, for every column not in ``ignore``, both
    extreme values ``lo_end``/``hi_end`` of what is rounded are below :data:`SAFE_ABS` (then
    ``np.rint`` is exactly :func:`nearest_int` on the whole column; NaN fails)."""
    if not FAST_ROUNDING:
        return False
    ok = (np.abs(lo_end) < SAFE_ABS) & (np.abs(hi_end) < SAFE_ABS)
    return bool((ok | ignore).all())


# ------------------------------------------------------------------------- in-order sums
def _check_sequential_reduce() -> bool:
    """True if ``np.add.reduce(a, axis=0)`` adds the rows of a C-contiguous 2-D float32
    array strictly in order (NumPy only sums pairwise along the contiguous axis)."""
    rng = np.random.default_rng(1234)
    a = (rng.standard_normal((33, 4099)) * rng.random((33, 4099)) ** 12).astype(F32)
    a[0] = F32(1e8)
    acc = a[0] + F32(0)
    for j in range(1, a.shape[0]):
        acc += a[j]
    return bool(np.array_equal(np.add.reduce(a, axis=0), acc))


_REDUCE_IS_SEQUENTIAL = _check_sequential_reduce()


def seqsum(a: np.ndarray, *, from_zero: bool = True, axis: int = 0) -> np.ndarray:
    """Float32 sum along ``axis`` in C loop order: ``((0 + a0) + a1) + ...``.

    This is the C loop ``float s = 0; for (i...) s += a[i];`` applied to every column (for
    ``axis=0``), vectorised over the other axes.  With ``from_zero=False`` the sum starts at
    ``a[0]`` (C: ``float s = a[0];``); the two differ only in the sign of an all-zero sum
    (``0 + -0 == +0``), hence the ``+ 0``.
    """
    if axis != 0:
        a = np.moveaxis(np.asarray(a, dtype=F32), axis, 0)
    # C order: a Fortran-ordered input would make axis 0 the fast (pairwise-summed) axis
    a = np.ascontiguousarray(a, dtype=F32)
    if _REDUCE_IS_SEQUENTIAL:
        acc = np.add.reduce(a, axis=0)
    else:  # pragma: no cover - only on a NumPy that reorders outer-axis reductions
        acc = a[0].copy()
        for j in range(1, a.shape[0]):
            acc += a[j]
    if from_zero:
        acc += F32(0)
    return acc


# -------------------------------------------------------------------------------- fp16
# fp16 conversion by integer arithmetic, valid for |x| in [2**-14, 65520) (normal halves):
# rebase the exponent, add 0xfff plus the lowest kept bit (round half to even), shift.
_F16_MIN_NORMAL = np.uint32(0x38800000)  # 2**-14
_F16_OVERFLOW = np.uint32(0x477FF000)  # 65520: rounds to infinity
_F16_REBASE = np.uint32((0xFFF - 0x38000000) & 0xFFFFFFFF)
_SMALL = 8192  # below this many values NumPy's own cast is as fast


def fp16_bits(x: np.ndarray) -> np.ndarray:
    """float32 array -> uint16 IEEE half bit patterns, exactly ``x.astype(np.float16)``.

    That cast is ggml's ``GGML_FP32_TO_FP16`` (round to nearest even, subnormals, overflow
    to infinity); large arrays take an integer path that is several times faster.
    """
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


def fp16_round(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``GGML_FP32_TO_FP16`` then ``GGML_FP16_TO_FP32``: returns (fp16 array, float32 array)."""
    h = np.asarray(x, dtype=F32).astype(np.float16)
    return h, h.astype(F32)


def fp16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 (n,) -> uint8 (n, 2): ``GGML_FP32_TO_FP16`` (round-to-nearest-even)."""
    bits = fp16_bits(np.asarray(v, dtype=F32).reshape(-1))
    return bits.astype("<u2").view(np.uint8).reshape(-1, 2)


def half_bytes(h: np.ndarray) -> np.ndarray:
    """Halves already rounded (float16 values or uint16 bits, ``(n,)``) -> uint8 ``(n, 2)``."""
    h = np.asarray(h)
    h = h.astype("<f2" if h.dtype.kind == "f" else "<u2", copy=False)
    return np.ascontiguousarray(h).view(np.uint8).reshape(-1, 2)


def fp16_from_bytes(b: np.ndarray) -> np.ndarray:
    """uint8 (n, 2) -> float32 (n,)."""
    return np.ascontiguousarray(b, dtype=np.uint8).view("<f2").reshape(-1).astype(F32)


# ------------------------------------------------------------------- C's scans and guards
def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: ``(amax, max)`` = largest ``|x|`` and the signed value of its first occurrence.

    Matches ggml's ``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`` scan.
    """
    ax = np.abs(x)
    idx = np.argmax(ax, axis=1)
    rows = np.arange(x.shape[0])
    amax = ax[rows, idx]
    # ggml starts from max = 0.0f and only replaces it on a strictly larger |v|, so an
    # all-zero block keeps +0.0 even when its zeros are -0.0
    return amax, np.where(amax > 0, x[rows, idx], F32(0)).astype(F32)


def first_min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row ``(min, max)`` as ggml's scans find them: the value of the first occurrence,
    which only matters for the sign of a zero."""
    mn = x.min(axis=1)
    mx = x.max(axis=1)
    for v, arg in ((mn, np.argmin), (mx, np.argmax)):
        z = np.flatnonzero(v == 0)
        if z.size:
            sub = x[z]
            v[z] = sub[np.arange(z.size), arg(sub, axis=1)]
    return mn, mx


def safe_inverse(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f`` elementwise in float32."""
    d = np.asarray(d, dtype=F32)
    out = np.zeros_like(d)
    np.divide(F32(1), d, out=out, where=d != 0)
    return out


# ------------------------------------------------------------ 32-value block bit packing
def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 (n, 32) codes -> (n, 16): low nibble value j, high nibble value j + 16."""
    q = q.astype(np.uint8)
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) codes (inverse of :func:`pack_nibbles`)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def pack_high_bits(q: np.ndarray) -> np.ndarray:
    """Fifth bit of each of 32 codes -> (n, 4) bytes of the little-endian uint32 ``qh``."""
    bits = ((q.astype(np.uint8) >> 4) & 1).astype(np.uint8)
    return np.packbits(bits, axis=1, bitorder="little")


def unpack_high_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) ``qh`` bytes -> (n, 32) values 0 or 16."""
    return np.unpackbits(qh, axis=1, bitorder="little").astype(np.uint8) << 4


# ------------------------------------------------------------------ constant operands
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
