"""The 2- and 3-bit k-quants, Q2_K and Q3_K, byte-identical to llama.cpp.

Both store super-blocks of 256 values cut into 16 sub-blocks of 16 values.

Q2_K (84 bytes, 2.625 bits per weight)::

    uint8 scales[16]   low nibble: sub-block scale, high nibble: sub-block min
    uint8 qs[64]       2-bit codes, four per byte (see :func:`_pack_2bit`)
    fp16  d, dmin      super-block multipliers of the 4-bit scales and mins

    value = d * (scales[j] & 15) * q - dmin * (scales[j] >> 4)

Q3_K (110 bytes, 3.4375 bits per weight)::

    uint8 hmask[32]    third (high) bit of every code
    uint8 qs[64]       low 2 bits of every code
    uint8 scales[12]   sixteen 6-bit signed sub-block scales (offset by 32)
    fp16  d            super-block multiplier of the scales

    value = d * (scale[j] - 32) * (q - 4)      with q = low | high << 2 in 0..7

This is a port of ``ggml/src/ggml-quants.c``: without an importance vector the bytes equal
``quantize_row_q2_K_ref`` / ``quantize_row_q3_K_ref``; with one they equal what
``quantize_q2_K`` / ``quantize_q3_K`` write for that ``quant_weights``
(``quantize_row_q{2,3}_K_impl``).  To be bit-exact every step is float32 as in C (constants
are wrapped in ``np.float32``), ``nearest_int`` rounds half to even, and every sum is
accumulated in C's order by looping over the small within-block axis in Python while each
step is vectorised over all blocks of the tensor.  The helpers shared with the other
k-quants (``make_qx_quants``, ``make_qkx2_quants``, ...) live in :mod:`autobits.formats._kmath`;
``make_q3_quants``, used only by Q3_K, lives in :mod:`autobits.formats._q3`.
"""

from __future__ import annotations

import numpy as np

from autobits.errors import FormatError
from autobits.formats._kmath import (
    make_qkx2_quants_t,
    make_qkx3_quants_t,
    make_qp_quants,
    make_qx_quants,
    make_qx_quants_t,
    nearest_int,
)
from autobits.formats._q3 import _clamp, _q3_search, _signed_absmax, make_q3_quants, make_q3_quants_t
from autobits.formats.base import Format

__all__ = ["Q2_K", "Q3_K", "make_q3_quants", "make_q3_quants_t"]

QK_K = 256
_SUB = 16  # values per sub-block
_NSUB = QK_K // _SUB  # sub-blocks per super-block
_GROUP_MAX_EPS = np.float32(1e-15)
_F0 = np.float32(0.0)
_HALF = np.float32(0.5)
_SHIFT2 = np.array([0, 2, 4, 6], dtype=np.uint8)
#: super-blocks quantized at a time (bounds the memory of big tensors)
_BLOCK_CHUNK = 8192
#: super-blocks per chunk of the final requantization (temporaries stay in cache)
_REQ_CHUNK = 512
_SAFE_ABS = np.float32(4194000.0)  # below 2**22 with margin: rint == nearest_int


# --------------------------------------------------------------------------- helpers
# Work layout: a tensor's sub-blocks are the columns of ``xt (16, S)`` (S = 16 * blocks),
# ``xt[i, s]`` = value ``i`` of sub-block ``s``.  Each row is contiguous, so the loops over
# the 16 positions that keep C's summation order are 16 fast vector operations over all
# sub-blocks, and the temporaries stay one row long (in cache, no fresh memory to fault in).


def _to_columns(a: np.ndarray) -> np.ndarray:
    """``(nb, 256)`` super-blocks -> ``(16, 16 * nb)`` sub-block columns (contiguous copy)."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32).reshape(-1, _SUB).T)


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in C's order (``s = 0; s += a[0]; s += a[1]; ...``), in float32.

    ``a`` is ``(k, n)``; the loop is over the short axis ``k`` and each step adds a whole
    contiguous row, so it is both exact and fast (numpy's own ``sum`` is pairwise).
    """
    acc = np.zeros(a.shape[1:], dtype=np.float32)
    for row in a:
        acc += row
    return acc


def _block_sumsq(xt: np.ndarray) -> np.ndarray:
    """C's ``for (j = 0; j < 256; ++j) sumx2 += x[j]*x[j];`` per super-block, from columns."""
    v = xt.reshape(_SUB, -1, _NSUB)  # [position, block, sub-block]
    acc = np.zeros(v.shape[1], dtype=np.float32)
    for j in range(_NSUB):
        for i in range(_SUB):
            col = v[i, :, j]
            acc += col * col
    return acc


def _sigma_weights(
    xt: np.ndarray, qwt: np.ndarray, sigma_mul: int
) -> tuple[np.ndarray, np.ndarray]:
    """imatrix weights ``qw * sqrtf(sigma2 + x*x)`` (columns) and their per-sub-block sums.

    ``sigma2 = sigma_mul * sumx2 / 256`` per super-block (Q2_K: 1, Q3_K: 2).  Returns
    ``(wt (16, S), sw (S,))`` with ``sw`` summed in C's order.
    """
    sumx2 = _block_sumsq(xt)
    if sigma_mul != 1:
        sumx2 = np.float32(sigma_mul) * sumx2
    sigma2 = np.repeat(sumx2 / np.float32(QK_K), _NSUB)  # per sub-block column
    wt = np.empty_like(xt)
    for i in range(_SUB):
        np.sqrt(sigma2 + xt[i] * xt[i], out=wt[i])
        wt[i] *= qwt[i]
    return wt, _seq_sum(wt)


def _to_fp16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``GGML_FP32_TO_FP16`` (round to nearest even) -> (raw uint16 bits, value as float32)."""
    h = np.asarray(v, dtype=np.float32).astype(np.float16)
    return h.view(np.uint16), h.astype(np.float32)


def _fp16_bytes(bits: np.ndarray) -> np.ndarray:
    """uint16 (n,) -> little-endian uint8 (n, 2)."""
    return np.ascontiguousarray(bits, dtype="<u2").view(np.uint8).reshape(-1, 2)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """Pack 2-bit codes ``(n, 256)`` as ggml: ``qs[32h + l] = sum_s L[128h + 32s + l] << 2s``.

    Eight codes per uint64 word (NumPy's uint8 shifts are not vectorised); masked codes
    shifted by at most 6 stay inside their byte."""
    q = np.ascontiguousarray(L, dtype=np.uint8).reshape(-1, 2, 4, 32).view(np.uint64)
    m = np.uint64(0x0303030303030303)
    out = q[:, :, 0] & m
    for s in (1, 2, 3):
        out |= (q[:, :, s] & m) << np.uint64(2 * s)
    return out.view(np.uint8).reshape(-1, 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_2bit`: uint8 ``(n, 64)`` -> codes uint8 ``(n, 256)`` in 0..3."""
    q = (qs.reshape(-1, 2, 1, 32) >> _SHIFT2.reshape(1, 1, 4, 1)) & np.uint8(3)
    return q.reshape(-1, QK_K)


def _pack_q3_scales(ls: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit codes ``(n, 16)`` in 0..63 -> Q3_K's 12 scale bytes ``(n, 12)``.

    Bytes 0..7 hold the low nibbles (sub-block j in byte j % 8, high nibble for j >= 8);
    bytes 8..11 hold the top two bits, sub-block j at bits ``2 * (j // 4)`` of byte ``8 + j % 4``.
    """
    ls = np.asarray(ls).astype(np.uint8)
    low = ls & np.uint8(0xF)
    high = (ls >> np.uint8(4)).reshape(-1, 4, 4)  # [j // 4, j % 4]
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, :8] = low[:, :8] | (low[:, 8:] << np.uint8(4))
    out[:, 8:] = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    return out


def _unpack_q3_scales(sc: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_q3_scales`: ``(n, 12)`` -> 6-bit codes uint8 ``(n, 16)``."""
    low = np.concatenate([sc[:, :8] & np.uint8(0xF), sc[:, :8] >> np.uint8(4)], axis=1)
    high = (sc[:, None, 8:12] >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)) & np.uint8(3)
    return low | (high.reshape(-1, 16) << np.uint8(4))


def _pack_q3_codes(L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3-bit codes ``(n, 256)`` in 0..7 -> (hmask ``(n, 32)``, qs ``(n, 64)``).

    The high bit of value ``j`` goes to bit ``j // 32`` of ``hmask[j % 32]``.
    """
    q = np.ascontiguousarray(L, dtype=np.uint8).reshape(-1, 8, 32).view(np.uint64)
    hi = (q >> np.uint64(2)) & np.uint64(0x0101010101010101)  # (as _pack_2bit, per word)
    hmask = hi[:, 0].copy()
    for b in range(1, 8):
        hmask |= hi[:, b] << np.uint64(b)
    hmask = hmask.view(np.uint8).reshape(-1, 32)
    return hmask, _pack_2bit(L)


def _requantize(blocks, xt, d, m, lo, hi, offset, search_codes) -> np.ndarray:
    """Final codes ``clamp(nearest_int((x + m) / d), lo, hi) + offset`` of every value.

    ``blocks (nb, 256)`` values (``xt`` the same as columns), ``d``, ``m`` ``(nb, 16)`` the
    effective (fp16-rounded) scale and min of each sub-block (``m`` None: no min).
    Sub-blocks with ``d == 0`` keep the search's codes, ``search_codes(columns) -> (16, n)``
    (C's ``if (!d) continue;``).  When ``|(x + m) / d|`` is provably below ``2**22`` everywhere
    (the usual case) ``rint`` gives exactly ggml's rounding; otherwise the bit-exact
    ``nearest_int`` is used.  Returns uint8 ``(nb, 256)``.
    """
    nb = blocks.shape[0]
    out = np.empty((nb, QK_K), dtype=np.uint8)
    live = d != _F0
    amax = np.maximum(xt.max(axis=0), -xt.min(axis=0)).reshape(nb, _NSUB)
    # |fl(fl(x + m) / d)| <= bound * (1 + 4 ulp) < 2**22 when bound < _SAFE_ABS
    bound = (amax if m is None else amax + np.abs(m)) / np.abs(d)
    fast = bool(np.all(bound[live] < _SAFE_ABS))  # NaN fails
    flo, fhi = np.float32(lo), np.float32(hi)
    for a in range(0, nb, _REQ_CHUNK):
        b = min(nb, a + _REQ_CHUNK)
        v = blocks[a:b].reshape(-1, _NSUB, _SUB)
        if m is not None:
            v = v + m[a:b, :, None]
        v = v / d[a:b, :, None]
        if fast:
            np.rint(v, out=v)
            np.clip(v, flo, fhi, out=v)  # (np.maximum with a scalar is not vectorised)
            if offset:
                v += np.float32(offset)
            out[a:b] = v.reshape(-1, QK_K)
        else:
            li = _clamp(nearest_int(v), np.int32(lo), np.int32(hi))
            li += offset
            out[a:b] = li.reshape(-1, QK_K)
    if not live.all():
        bi, sj = np.nonzero(~live)
        out.reshape(nb, _NSUB, _SUB)[bi, sj, :] = search_codes(bi * _NSUB + sj).T
    return out


# ----------------------------------------------------------------------------- Q2_K
def _finish_q2(blocks, xt, scale_bytes, dm, mm, search_codes) -> np.ndarray:
    """Q2_K bytes from the 4-bit scale/min bytes ``(nb, 16)``, the super-block multipliers
    ``dm``, ``mm`` (before fp16 rounding) and the search's codes ``(16, S)``."""
    nb = scale_bytes.shape[0]
    dbits, d16 = _to_fp16(dm)
    mbits, m16 = _to_fp16(mm)
    d = d16[:, None] * (scale_bytes & np.uint8(0xF)).astype(np.float32)
    m = m16[:, None] * (scale_bytes >> np.uint8(4)).astype(np.float32)
    codes = _requantize(blocks, xt, d, m, 0, 3, 0, search_codes)
    out = np.empty((nb, 84), dtype=np.uint8)
    out[:, :16] = scale_bytes
    out[:, 16:80] = _pack_2bit(codes)
    out[:, 80:82] = _fp16_bytes(dbits)
    out[:, 82:84] = _fp16_bytes(mbits)
    return out


def _quantize_q2_ref(blocks: np.ndarray) -> np.ndarray:
    """``quantize_row_q2_K_ref`` over ``(nb, 256)`` blocks."""
    nb = blocks.shape[0]
    xt = _to_columns(blocks)
    scales, mins, L = make_qkx2_quants_t(
        xt, np.abs(xt), 3, np.float32(-0.5), np.float32(0.1), 15, True
    )
    scales = np.asarray(scales, dtype=np.float32).reshape(nb, _NSUB)
    mins = np.asarray(mins, dtype=np.float32).reshape(nb, _NSUB)
    q4 = np.float32(15)
    max_scale = np.maximum(scales.max(axis=1), _F0)
    max_min = np.maximum(mins.max(axis=1), _F0)
    has_s, has_m = max_scale > _F0, max_min > _F0
    with np.errstate(all="ignore"):
        ls = nearest_int((q4 / max_scale)[:, None] * scales)
        lm = nearest_int((q4 / max_min)[:, None] * mins)
    # C stores the int into uint8 (wraps), then ORs the min code shifted by 4
    ls = np.where(has_s[:, None], ls, 0) & 0xFF
    lm = np.where(has_m[:, None], lm, 0)
    scale_bytes = ((ls | (lm << 4)) & 0xFF).astype(np.uint8)
    dm = np.where(has_s, max_scale / q4, _F0)
    mm = np.where(has_m, max_min / q4, _F0)
    return _finish_q2(blocks, xt, scale_bytes, dm, mm, lambda c: L[:, c])


def _quantize_q2_imatrix(blocks: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """``quantize_row_q2_K_impl`` (llama.cpp's ``quantize_q2_K`` with quant_weights)."""
    nb = blocks.shape[0]
    xt = _to_columns(blocks)
    wt, sw = _sigma_weights(xt, _to_columns(importance), 1)
    scales, mins, L = make_qkx3_quants_t(
        xt, wt, 3, np.float32(-0.9), np.float32(0.05), 36, False
    )
    sw = sw.reshape(nb, _NSUB)
    dm, Ls = make_qp_quants(np.asarray(scales, dtype=np.float32).reshape(nb, _NSUB), 15, sw)
    mm, Lm = make_qp_quants(np.asarray(mins, dtype=np.float32).reshape(nb, _NSUB), 15, sw)
    # uint8 Ls[j] | (Lm[j] << 4), stored into a uint8
    Ls = np.asarray(Ls).astype(np.int32) & 0xFF
    Lm = np.asarray(Lm).astype(np.int32) & 0xFF
    scale_bytes = ((Ls | (Lm << 4)) & 0xFF).astype(np.uint8)
    return _finish_q2(blocks, xt, scale_bytes, dm, mm, lambda c: L[:, c])


# ----------------------------------------------------------------------------- Q3_K
def _finish_q3(blocks, xt, ls, d_value, search_codes) -> np.ndarray:
    """Q3_K bytes from 6-bit scale codes ``ls (nb, 16)`` (offset by 32; all 0 when the block
    scale is 0), the super-block scale before fp16 rounding and the search's codes
    ``(16, S)`` (offset by +4)."""
    nb = ls.shape[0]
    dbits, d16 = _to_fp16(d_value)
    d = d16[:, None] * (ls.astype(np.float32) - np.float32(32))  # fp16 d * (int8) sc
    codes = _requantize(blocks, xt, d, None, -4, 3, 4, search_codes)
    hmask, qs = _pack_q3_codes(codes)
    out = np.empty((nb, 110), dtype=np.uint8)
    out[:, :32] = hmask
    out[:, 32:96] = qs
    out[:, 96:108] = _pack_q3_scales(ls)
    out[:, 108:110] = _fp16_bytes(dbits)
    return out


def _quantize_q3_ref(blocks: np.ndarray) -> np.ndarray:
    """``quantize_row_q3_K_ref`` over ``(nb, 256)`` blocks."""
    nb = blocks.shape[0]
    xt = _to_columns(blocks)
    scales, levels = _q3_search(xt, 4, True)
    scales = scales.reshape(nb, _NSUB)
    # first sub-block scale of largest magnitude (C: `if (fabsf(s) > amax)`), signed
    max_scale = _signed_absmax(np.ascontiguousarray(scales.T))[1]
    has = max_scale != _F0
    with np.errstate(all="ignore"):
        iscale = np.float32(-32) / max_scale
        ls = nearest_int(iscale[:, None] * scales)
        d_value = np.where(has, np.float32(1) / iscale, _F0)
    np.clip(ls, -32, 31, out=ls)
    ls += 32
    ls[~has] = 0  # C leaves the scale bytes zeroed
    return _finish_q3(blocks, xt, ls, d_value, levels.codes)


def _quantize_q3_imatrix(blocks: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """``quantize_row_q3_K_impl`` (llama.cpp's ``quantize_q3_K`` with quant_weights)."""
    nb = blocks.shape[0]
    xt = _to_columns(blocks)
    wt, sw = _sigma_weights(xt, _to_columns(importance), 2)
    scales, L = make_qx_quants_t(xt, 4, 1, wt)
    scales = np.asarray(scales, dtype=np.float32).reshape(nb, _NSUB)
    d_block, Ls = make_qx_quants(scales, 32, 1, sw.reshape(nb, _NSUB))
    # C keeps Ls (0..63, offset by 32) as int8 and packs (l & 0xF) and (l >> 4)
    d_block = np.asarray(d_block, np.float32)
    return _finish_q3(blocks, xt, np.asarray(Ls).astype(np.int32), d_block, lambda c: L[:, c])


# -------------------------------------------------------------------------- formats
def _check_blocks(fmt: Format, blocks: np.ndarray, importance: np.ndarray | None) -> None:
    if blocks.ndim != 2 or blocks.shape[1] != fmt.block_size:
        raise FormatError(
            f"{fmt.name} quantizes blocks of {fmt.block_size} values, got block shape "
            f"{tuple(blocks.shape)} (last axis {blocks.shape[-1] if blocks.ndim else 0})"
        )
    if importance is not None and importance.shape != blocks.shape:
        raise FormatError(
            f"{fmt.name} importance has shape {tuple(importance.shape)}, expected "
            f"{tuple(blocks.shape)}"
        )


def _check_data(fmt: Format, data: np.ndarray) -> np.ndarray:
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != fmt.type_size:
        raise FormatError(
            f"{fmt.name} blocks are {fmt.type_size} bytes, got data of shape {tuple(data.shape)} "
            f"({data.shape[-1] if data.ndim else 0} bytes per block)"
        )
    return data


def _quantize_chunked(fmt: Format, blocks, importance, ref, imatrix) -> np.ndarray:
    """Run ``ref(x)`` or ``imatrix(x, importance)`` over chunks of super-blocks.

    Chunks bound the working memory of big tensors (every chunk is independent, as C
    quantizes super-block by super-block); a (576, 1536) tensor is a single chunk.
    """
    _check_blocks(fmt, blocks, importance)
    x = np.ascontiguousarray(blocks, dtype=np.float32)
    imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    out = np.empty((x.shape[0], fmt.type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):  # inf/NaN intermediates are masked exactly as in C
        for a in range(0, x.shape[0], _BLOCK_CHUNK):
            b = min(x.shape[0], a + _BLOCK_CHUNK)
            out[a:b] = ref(x[a:b]) if imp is None else imatrix(x[a:b], imp[a:b])
    return out


class Q2_K(Format):
    """2-bit k-quant: 16 sub-blocks of 16 with 4-bit scale and min, 2.625 bits per weight."""

    name = "Q2_K"
    uses_importance = True

    def _quantize_blocks(self, blocks: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        return _quantize_chunked(self, blocks, importance, _quantize_q2_ref, _quantize_q2_imatrix)

    def _dequantize_blocks(self, data: np.ndarray) -> np.ndarray:
        data = _check_data(self, data)
        nb = data.shape[0]
        sc = data[:, :16]
        q = _unpack_2bit(data[:, 16:80]).reshape(nb, _NSUB, _SUB).astype(np.float32)
        d = data[:, 80:82].copy().view("<f2").astype(np.float32)
        dmin = data[:, 82:84].copy().view("<f2").astype(np.float32)
        dl = (d * (sc & np.uint8(0xF)).astype(np.float32))[..., None]
        ml = (dmin * (sc >> np.uint8(4)).astype(np.float32))[..., None]
        return (dl * q - ml).reshape(nb, QK_K)


class Q3_K(Format):
    """3-bit k-quant: 16 sub-blocks of 16 with signed 6-bit scales, 3.4375 bits per weight."""

    name = "Q3_K"
    uses_importance = True

    def _quantize_blocks(self, blocks: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        return _quantize_chunked(self, blocks, importance, _quantize_q3_ref, _quantize_q3_imatrix)

    def _dequantize_blocks(self, data: np.ndarray) -> np.ndarray:
        data = _check_data(self, data)
        nb = data.shape[0]
        low = _unpack_2bit(data[:, 32:96]).reshape(nb, 8, 32).astype(np.int8)
        hbit = (data[:, None, :32] >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
        q = (low - np.int8(4) * (np.int8(1) - hbit.astype(np.int8))).reshape(nb, _NSUB, _SUB)
        sc = _unpack_q3_scales(data[:, 96:108]).astype(np.int32) - 32
        d = data[:, 108:110].copy().view("<f2").astype(np.float32)
        dl = (d * sc.astype(np.float32))[..., None]
        return (dl * q.astype(np.float32)).reshape(nb, QK_K)
