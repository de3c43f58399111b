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
``gguf.quants.quantize``).  With an importance vector they are identical to llama.cpp's
imatrix path (``quantize_q4_0`` -> ``quantize_row_q4_0_impl`` ...): every value gets the
weight ``importance_j * sqrt(sigma2 + x_j**2)`` where ``sigma2`` is the mean square of the
value's *whole row*, then Q4_0/Q5_0 use ``make_qx_quants(rmse_type=1)`` and Q4_1/Q5_1 use
``make_qkx3_quants(rmin=-0.9, rdelta=0.05, nstep=36)``.  Q8_0 ignores importance, as ggml does.

All arithmetic is float32 in the C code's order (sums run over the within-block or within-row
axis one element at a time, vectorised over blocks or rows), so results are bit-exact.
"""

from __future__ import annotations

import contextvars

import numpy as np

from autobits.formats import _khelpers
from autobits.formats import _lanes as lanes
from autobits.formats._asym import quantize_plain_asym
from autobits.formats.base import Format

__all__ = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "fp16_bytes", "fp16_from_bytes", "seq_sum"]

F32 = np.float32
QK = 32

# Row length of the tensor being quantized: the imatrix path needs each block's whole row
# (sigma2 is a per-row statistic), but ``_quantize_blocks`` only sees blocks.
_ROW_LENGTH: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "autobits_row_length", default=None
)


# ------------------------------------------------------------------ shared helpers
def fp16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 (n,) -> uint8 (n, 2): ``GGML_FP32_TO_FP16`` (round-to-nearest-even)."""
    return lanes.fp16_bits(np.asarray(v, dtype=F32).reshape(-1)).astype("<u2").view(np.uint8).reshape(-1, 2)


def fp16_from_bytes(b: np.ndarray) -> np.ndarray:
    """uint8 (n, 2) -> float32 (n,)."""
    return np.ascontiguousarray(b, dtype=np.uint8).view("<f2").reshape(-1).astype(F32)


def seq_sum(terms: np.ndarray, axis: int = 1) -> np.ndarray:
    """Float32 sum along ``axis`` in C loop order: ``((0 + t0) + t1) + ...``.

    Vectorised over the other axis; numpy's own (pairwise) summation would round differently.
    (``_khelpers.seqsum``: a sequential ``np.add.reduce`` over the leading axis, checked at import.)
    """
    t = np.moveaxis(np.asarray(terms, dtype=F32), axis, 0)
    return _khelpers.seqsum(t)


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


def row_sigma2(blocks: np.ndarray) -> np.ndarray:
    """Per block: ``sigma2`` = (sum of x**2 over the block's row, in order) / row length.

    The row length comes from :meth:`_RowAware.quantize`; when ``_quantize_blocks`` is called
    directly each block is taken as its own row.
    """
    n, bs = blocks.shape
    row = _ROW_LENGTH.get() or bs
    if (n * bs) % row:
        row = bs
    rows = blocks.reshape(-1, row)
    sq = rows * rows
    sigma2 = seq_sum(sq, axis=1) / F32(row)
    return np.repeat(sigma2, row // bs)


def imatrix_weights(blocks: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """``qw[j] * sqrtf(sigma2 + x[j]*x[j])`` as in ``quantize_row_q4_0_impl`` and friends."""
    sigma2 = row_sigma2(blocks)
    return importance * np.sqrt(sigma2[:, None] + blocks * blocks)


def _kmath():
    from autobits.formats import _kmath  # written alongside the K-quants

    return _kmath


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


class _RowAware(Format):
    """Remembers the row length of the tensor being quantized (for per-row statistics)."""

    checks_finite = True  # the plain path's block max/min reductions see every NaN and Inf

    def quantize(self, array, importance=None, *, tensor=None):  # noqa: D102 - see Format
        if importance is None:  # the row length is only needed with importance
            return super().quantize(array, None, tensor=tensor)
        shape = np.shape(array)
        token = _ROW_LENGTH.set(int(shape[-1]) if len(shape) else None)
        try:
            return super().quantize(array, importance, tensor=tensor)
        finally:
            _ROW_LENGTH.reset(token)


# Plain (no importance) quantization of the symmetric legacy formats, in the lanes layout:
# (symmetric, nmax, cap of the truncated code, block fields (name, dtype, offset)).  The
# asymmetric ones (Q4_1, Q5_1) have their own path in :mod:`autobits.formats._asym`.
_PLAIN = {
    "Q4_0": (True, 8, 15, [("d", "<u2", 0), ("qs", "(4,)<u4", 2)]),
    "Q5_0": (True, 16, 31, [("d", "<u2", 0), ("qh", "<u4", 2), ("qs", "(4,)<u4", 6)]),
}


def _plain_codes(x: np.ndarray, nmax: int, cap: int):
    """``(d, codes uint8 lanes (8, n, 4))`` of ``quantize_row_q{4,5}_0_ref`` for blocks ``x``."""
    n = x.shape[0]
    y = lanes.to_lanes(x)  # our own copy: the arithmetic below runs in place on it
    hi, lo = lanes.lanes_max(y), lanes.lanes_min(y)
    yf = y.reshape(8, 4 * n)
    # ggml keeps the first value of largest |x|: hi if hi >= -lo else lo (the sign of
    # hi + lo is exact); hi == -lo (+a and -a both present, or an all-zero block, whose
    # max stays +0.0) needs a look at the block
    neg = -lo
    amax = np.maximum(hi, neg)
    lanes.require_finite(amax)
    mx = np.copysign(amax, hi + lo)
    rare = np.flatnonzero(hi == neg)
    if rare.size:
        mx[rare] = first_absmax(x[rare])[1]
    d = mx / F32(-nmax)
    # a zero or subnormal d (|d| < 2**-126) takes the careful path below
    tiny = bool(amax.min() < F32(2 * nmax) * _F32_TINY)
    np.multiply(yf, lanes.repeat4(safe_inverse(d) if tiny else F32(1) / d), out=yf)
    yf += F32(nmax + 0.5)  # x*id + 8.5f (16.5f)
    if tiny:
        # MIN(cap, (int)v) == (int)MIN(v, cap) for v >= 0 (only non-finite or >= 256
        # values, undefined behaviour in C, could tell them apart)
        np.minimum(yf, lanes.const(cap, yf.shape), out=yf)
    # C truncates to an integer: values are >= 0 (up to rounding of -0.5 ulp + 0.5)
    q = yf.astype(np.uint8).reshape(8, n, 4)
    if not tiny:
        # with a normal d, |x*id| <= nmax*(1 + 3 ulp): codes are at most 2*nmax, and reach
        # it (x close to -max) often
        lanes.cap_codes(q, cap.bit_length())
    return d, q


_F32_TINY = np.finfo(F32).tiny  # smallest normal float32


def _quantize_plain(x: np.ndarray, name: str) -> np.ndarray:
    _, nmax, cap, layout = _PLAIN[name]
    n = x.shape[0]
    out = lanes.block_output(n, layout)
    for s in range(0, n, lanes.LANES_CHUNK):
        d, q = _plain_codes(x[s : s + lanes.LANES_CHUNK], nmax, cap)
        o = out[s : s + lanes.LANES_CHUNK]
        o["d"] = lanes.fp16_bits(d)
        if "qh" in out.dtype.names:
            o["qh"] = lanes.high_bits_lanes(q)
        lanes.put_lanes_u32(o["qs"], lanes.pack_nibbles_lanes(q))
    return out.view(np.uint8).reshape(n, -1)


# ------------------------------------------------------------------ formats
class Q4_0(_RowAware):
    """4-bit symmetric: 32 values, fp16 scale ``d``; value = (q - 8) * d."""

    name = "Q4_0"
    uses_importance = True

    def _quantize_blocks(self, blocks, importance):
        x = np.asarray(blocks, dtype=F32)
        if importance is None:
            return _quantize_plain(x, self.name)
        w = imatrix_weights(x, importance)
        d, q = _kmath().make_qx_quants(x, 8, 1, w)
        d = np.asarray(d, dtype=F32)
        return np.concatenate([fp16_bytes(d), pack_nibbles(q)], axis=1)

    def _dequantize_blocks(self, data):
        d = fp16_from_bytes(data[:, 0:2])
        q = unpack_nibbles(data[:, 2:18]).astype(np.int8) - np.int8(8)
        return q.astype(F32) * d[:, None]


class Q4_1(_RowAware):
    """4-bit asymmetric: fp16 scale ``d`` and minimum ``m``; value = q * d + m."""

    name = "Q4_1"
    uses_importance = True

    def _quantize_blocks(self, blocks, importance):
        x = np.asarray(blocks, dtype=F32)
        if importance is None:
            return quantize_plain_asym(x, 15)
        w = imatrix_weights(x, importance)
        d, the_min, q = _kmath().make_qkx3_quants(x, w, 15, -0.9, 0.05, 36, False)
        d = np.asarray(d, dtype=F32)
        m = _qkx3_min(x, d, the_min, 15)
        return np.concatenate([fp16_bytes(d), fp16_bytes(m), pack_nibbles(q)], axis=1)

    def _dequantize_blocks(self, data):
        d = fp16_from_bytes(data[:, 0:2])
        m = fp16_from_bytes(data[:, 2:4])
        q = unpack_nibbles(data[:, 4:20]).astype(F32)
        return q * d[:, None] + m[:, None]


class Q5_0(_RowAware):
    """5-bit symmetric: fp16 scale ``d``; value = (q - 16) * d."""

    name = "Q5_0"
    uses_importance = True

    def _quantize_blocks(self, blocks, importance):
        x = np.asarray(blocks, dtype=F32)
        if importance is None:
            return _quantize_plain(x, self.name)
        w = imatrix_weights(x, importance)
        d, q = _kmath().make_qx_quants(x, 16, 1, w)
        d = np.asarray(d, dtype=F32)
        return np.concatenate([fp16_bytes(d), pack_high_bits(q), pack_nibbles(q)], axis=1)

    def _dequantize_blocks(self, data):
        d = fp16_from_bytes(data[:, 0:2])
        q = unpack_nibbles(data[:, 6:22]) | unpack_high_bits(data[:, 2:6])
        return (q.astype(np.int8) - np.int8(16)).astype(F32) * d[:, None]


class Q5_1(_RowAware):
    """5-bit asymmetric: fp16 scale ``d`` and minimum ``m``; value = q * d + m."""

    name = "Q5_1"
    uses_importance = True

    def _quantize_blocks(self, blocks, importance):
        x = np.asarray(blocks, dtype=F32)
        if importance is None:
            return quantize_plain_asym(x, 31)
        w = imatrix_weights(x, importance)
        d, the_min, q = _kmath().make_qkx3_quants(x, w, 31, -0.9, 0.05, 36, False)
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

    def _quantize_blocks(self, blocks, importance):
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
