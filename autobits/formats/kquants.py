"""The 256-value super-block "K" formats Q4_K, Q5_K and Q6_K, byte-identical to llama.cpp.

Ported from llama.cpp ``ggml/src/ggml-quants.c`` (block layouts from ``ggml-common.h``):

* without an importance vector the bytes equal ``quantize_row_q{4,5,6}_K_ref``;
* with one they equal ``quantize_q{4,5,6}_K(..., quant_weights)``, i.e. the imatrix path
  ``quantize_row_q{4,5,6}_K_impl``.

Everything is vectorised over all blocks of a tensor (the only Python loops run over the
positions inside a sub-block and over the search steps); the scale searches are those of
:mod:`autobits.formats.kscales`, the rounding and sums those of :mod:`autobits.formats.ggml`.  Internally sub-blocks are held transposed, ``(k, R)``
with ``R = n_blocks * sub_blocks_per_block`` and column ``r = block * nsub + j``.

Block layouts (bytes)::

    Q4_K (144): d f16 | dmin f16 | scales[12] | qs[128]
    Q5_K (176): d f16 | dmin f16 | scales[12] | qh[32] | qs[128]
    Q6_K (210): ql[128] | qh[64] | scales[16] int8 | d f16
"""

from __future__ import annotations

import numpy as np

from autobits.formats.base import Format
from autobits.formats.ggml import (
    F32,
    GROUP_MAX_EPS,
    QK_K,
    fp16_round,
    half_bytes,
    nearest_int,
    rint_is_exact,
    seqsum,
)
from autobits.formats.kscales import (
    make_qkx2_quants_t,
    make_qkx3_quants_t,
    make_qp_quants_t,
    make_qx_quants_t,
)

__all__ = ["Q4_K", "Q5_K", "Q6_K", "pack_scale_min_k4", "get_scale_min_k4"]


def _transpose_sub(a: np.ndarray, size: int) -> np.ndarray:
    """``(n, 256)`` -> ``(size, n * 256 // size)`` contiguous (sub-blocks as columns)."""
    return np.ascontiguousarray(a.reshape(-1, size).T)


def _untranspose(lt: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`_transpose_sub` for uint8 level arrays -> ``(n, 256)`` uint8."""
    return np.ascontiguousarray(lt.T).reshape(n, QK_K)


def _requantize(
    xt: np.ndarray,
    offset: np.ndarray | None,
    d: np.ndarray,
    lo: int,
    hi: int,
    shift: int,
    levels: np.ndarray,
) -> np.ndarray:
    """The final pass of every K quantizer: ``L = clip(nearest_int((x + offset)/d), lo, hi)
    + shift`` for each sub-block (column) with ``d != 0``; columns with ``d == 0`` keep the
    ``levels`` of the search (C: ``if (!d) continue;``).  Returns uint8 ``(k, R)``."""
    v = xt + offset if offset is not None else xt.copy()
    v /= d
    valid = d != 0
    # v is monotonic in x within a column, so its extremes sit at the column's min / max;
    # when they are in range nearest_int is exactly rint
    ends_lo = (xt.min(axis=0) + offset if offset is not None else xt.min(axis=0)) / d
    ends_hi = (xt.max(axis=0) + offset if offset is not None else xt.max(axis=0)) / d
    if rint_is_exact(ends_lo, ends_hi, ~valid):
        np.rint(v, out=v)
        np.clip(v, F32(lo), F32(hi), out=v)
        r = v
    else:
        r = np.clip(nearest_int(v), lo, hi)
    if shift:
        r += shift
    out = levels.astype(np.uint8)
    np.copyto(out, r, where=valid, casting="unsafe")
    return out


# ------------------------------------------------------ 6-bit scales of Q4_K / Q5_K
def pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Pack 8 scales and 8 mins (6-bit, ``(n, 8)``) into the 12-byte ``scales`` field of
    ``block_q4_K`` / ``block_q5_K``; inverse of :func:`get_scale_min_k4`.

    Reproduces the C byte arithmetic exactly, also for values above 63.
    """
    ls = np.asarray(ls).astype(np.int32)
    lm = np.asarray(lm).astype(np.int32)
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (ls[:, 0:4] | (((ls[:, 4:8] >> 4) << 6) & 0xFF)) & 0xFF
    out[:, 4:8] = (lm[:, 0:4] | (((lm[:, 4:8] >> 4) << 6) & 0xFF)) & 0xFF
    out[:, 8:12] = ((ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)) & 0xFF
    return out


def get_scale_min_k4(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte K ``scales`` field ``(n, 12)`` into (scales, mins), ``(n, 8)`` uint8."""
    q = np.asarray(q, dtype=np.uint8)
    sc = np.empty((q.shape[0], 8), dtype=np.uint8)
    mn = np.empty((q.shape[0], 8), dtype=np.uint8)
    sc[:, 0:4] = q[:, 0:4] & 63
    mn[:, 0:4] = q[:, 4:8] & 63
    sc[:, 4:8] = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    mn[:, 4:8] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return sc, mn


# --------------------------------------------------------------------------- Q4_K / Q5_K
def _scale_min_quantize(
    blocks: np.ndarray, importance: np.ndarray | None, nmax: int, ref: tuple[float, float, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shared scale/min search of Q4_K (``nmax=15``) and Q5_K (``nmax=31``).

    Returns ``(d f16 (n,), dmin f16 (n,), scales uint8 (n, 12), L uint8 (n, 256))``.
    ``ref`` holds the ``(rmin, rdelta, nstep)`` of the reference (no importance) search.
    """
    n = blocks.shape[0]
    xt = _transpose_sub(blocks, 32)  # (32, 8n)
    with np.errstate(all="ignore"):
        if importance is None:
            # quantize_row_qX_K_ref: weights = rms(sub-block) + |x|, make_qkx2_quants
            av_x = np.sqrt(seqsum(xt * xt) / F32(32))
            wt = av_x + np.abs(xt)
            rmin, rdelta, nstep = ref
            scales, mins, lt = make_qkx2_quants_t(xt, wt, nmax, rmin, rdelta, nstep, False)
            scales = scales.reshape(n, 8)
            mins = mins.reshape(n, 8)
            max_scale = np.maximum(scales.max(axis=1), F32(0))
            max_min = np.maximum(mins.max(axis=1), F32(0))
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
            # uint8 ls = nearest_int(...); ls = MIN(63, ls)
            ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
            lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
            d16, _ = fp16_round(max_scale / F32(63))
            dmin16, _ = fp16_round(max_min / F32(63))
        else:
            # quantize_row_qX_K_impl: weights = qw * sqrt(sigma2 + x^2), make_qkx3_quants,
            # then the 8 scales and 8 mins are themselves quantized with make_qp_quants
            bt = np.ascontiguousarray(blocks.T)  # (256, n)
            sigma2 = F32(2) * seqsum(bt * bt) / F32(QK_K)
            qwt = _transpose_sub(importance, 32)
            wt = qwt * np.sqrt(np.repeat(sigma2, 8) + xt * xt)
            sw = seqsum(wt)
            scales, mins, lt = make_qkx3_quants_t(xt, wt, nmax, -0.9, 0.05, 36, False)
            swt = np.ascontiguousarray(sw.reshape(n, 8).T)
            st = np.ascontiguousarray(scales.reshape(n, 8).T)
            mt = np.ascontiguousarray(mins.reshape(n, 8).T)
            d_block, ls_t = make_qp_quants_t(st, 63, swt)
            m_block, lm_t = make_qp_quants_t(mt, 63, swt)
            ls = ls_t.T.astype(np.int32)
            lm = lm_t.T.astype(np.int32)
            if nmax == 31:  # quantize_row_q5_K_impl clamps, q4_K_impl does not
                ls = np.minimum(ls, 63)
                lm = np.minimum(lm, 63)
            d16, _ = fp16_round(d_block)
            dmin16, _ = fp16_round(m_block)

        packed = pack_scale_min_k4(ls, lm)
        sc, m = get_scale_min_k4(packed)
        # requantize every sub-block with its final (fp16 x 6-bit) scale and min
        d = (d16.astype(F32)[:, None] * sc.astype(F32)).reshape(-1)
        dm = (dmin16.astype(F32)[:, None] * m.astype(F32)).reshape(-1)
        lt = _requantize(xt, dm, d, 0, nmax, 0, lt)
    return d16, dmin16, packed, _untranspose(lt, n)


def _dequant_scale_min(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(d * sc, dmin * m)`` of a Q4_K/Q5_K block array, each ``(n, 8, 1)`` float32."""
    n = data.shape[0]
    d = data[:, 0:2].copy().view(np.float16).astype(F32)
    dmin = data[:, 2:4].copy().view(np.float16).astype(F32)
    sc, m = get_scale_min_k4(data[:, 4:16])
    return (d * sc.astype(F32)).reshape(n, 8, 1), (dmin * m.astype(F32)).reshape(n, 8, 1)


class Q4_K(Format):
    """4.5 bpw: 8 sub-blocks of 32 with 6-bit scales and mins, 4-bit levels."""

    name = "Q4_K"
    uses_importance = True

    def _quantize_blocks(
        self, blocks: np.ndarray, importance: np.ndarray | None, *, row_length: int
    ) -> np.ndarray:
        n = blocks.shape[0]
        d16, dmin16, scales, L = _scale_min_quantize(blocks, importance, 15, (-1.0, 0.1, 20))
        L = L.reshape(n, 4, 2, 32)
        out = np.empty((n, self.type_size), dtype=np.uint8)
        out[:, 0:2] = half_bytes(d16)
        out[:, 2:4] = half_bytes(dmin16)
        out[:, 4:16] = scales
        out[:, 16:144] = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).reshape(n, 128)
        return out

    def _dequantize_blocks(self, data: np.ndarray) -> np.ndarray:
        n = data.shape[0]
        d, dm = _dequant_scale_min(data)
        qs = data[:, 16:144].reshape(n, 4, 1, 32)
        q = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
        q = q.reshape(n, 8, 32).astype(F32)
        return (d * q - dm).reshape(n, QK_K)


class Q5_K(Format):
    """5.5 bpw: as Q4_K with a fifth bit per level in ``qh``."""

    name = "Q5_K"
    uses_importance = True

    def _quantize_blocks(
        self, blocks: np.ndarray, importance: np.ndarray | None, *, row_length: int
    ) -> np.ndarray:
        n = blocks.shape[0]
        d16, dmin16, scales, L = _scale_min_quantize(blocks, importance, 31, (-0.5, 0.1, 15))
        L = L.reshape(n, 8, 32)  # sub-block 2c+h is chunk c, half h
        low = (L & 0x0F).reshape(n, 4, 2, 32)
        high = L >> 4  # 0 or 1
        out = np.empty((n, self.type_size), dtype=np.uint8)
        out[:, 0:2] = half_bytes(d16)
        out[:, 2:4] = half_bytes(dmin16)
        out[:, 4:16] = scales
        qh = np.zeros((n, 32), dtype=np.uint8)
        for s in range(8):  # bit s of qh[l] is the high bit of sub-block s
            qh |= high[:, s, :] << np.uint8(s)
        out[:, 16:48] = qh
        out[:, 48:176] = (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).reshape(n, 128)
        return out

    def _dequantize_blocks(self, data: np.ndarray) -> np.ndarray:
        n = data.shape[0]
        d, dm = _dequant_scale_min(data)
        qh = data[:, 16:48].reshape(n, 1, 32)
        qs = data[:, 48:176].reshape(n, 4, 1, 32)
        ql = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
        hb = (qh >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
        q = (ql.reshape(n, 8, 32) | (hb << np.uint8(4))).astype(F32)
        return (d * q - dm).reshape(n, QK_K)


class Q6_K(Format):
    """6.5625 bpw: 16 sub-blocks of 16 with 8-bit scales, symmetric 6-bit levels."""

    name = "Q6_K"
    uses_importance = True

    def _quantize_blocks(
        self, blocks: np.ndarray, importance: np.ndarray | None, *, row_length: int
    ) -> np.ndarray:
        n = blocks.shape[0]
        xt = _transpose_sub(blocks, 16)  # (16, 16n)
        qwt = None if importance is None else _transpose_sub(importance, 16)
        with np.errstate(all="ignore"):
            # ref and impl share this: make_qx_quants(16, 32, x, L, 1, qw or NULL)
            scales, lt = make_qx_quants_t(xt, 32, 1, qwt)
            S = scales.reshape(n, 16)
            imax = np.argmax(np.abs(S), axis=1)  # first largest |scale|
            max_scale = S[np.arange(n), imax]
            zero = np.abs(max_scale) < GROUP_MAX_EPS
            iscale = F32(-128) / max_scale
            d16, d32 = fp16_round(F32(1) / iscale)
            q = np.minimum(nearest_int(iscale[:, None] * S), 127)
            q8 = (((q + 128) & 0xFF) - 128).astype(np.int8)  # int8 storage
            d = (d32[:, None] * q8.astype(F32)).reshape(-1)
            lt = _requantize(xt, None, d, -32, 31, 32, lt)
        L = _untranspose(lt, n).reshape(n, 2, 4, 32)
        lo = L & 0x0F
        hi = L >> 4
        out = np.empty((n, self.type_size), dtype=np.uint8)
        ql = lo[:, :, 0:2, :] | (lo[:, :, 2:4, :] << 4)  # (n, 2, 2, 32)
        out[:, 0:128] = ql.reshape(n, 128)
        qh = hi[:, :, 0, :] | (hi[:, :, 1, :] << 2) | (hi[:, :, 2, :] << 4) | (hi[:, :, 3, :] << 6)
        out[:, 128:192] = qh.reshape(n, 64)
        out[:, 192:208] = q8.view(np.uint8)
        out[:, 208:210] = half_bytes(d16)
        out[zero] = 0  # all-zero super-block: memset + d = 0
        return out

    def _dequantize_blocks(self, data: np.ndarray) -> np.ndarray:
        n = data.shape[0]
        ql = data[:, 0:128].reshape(n, 2, 1, 64)
        qh = data[:, 128:192].reshape(n, 2, 1, 32)
        scales = data[:, 192:208].copy().view(np.int8).astype(F32)
        d = data[:, 208:210].copy().view(np.float16).astype(F32)
        dsc = (d * scales).reshape(n, 16, 1)
        lo = (ql >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
        lo = lo.reshape(n, 2, 4, 32)
        hi = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
        q = (lo | (hi << np.uint8(4))).astype(np.int8) - np.int8(32)
        return (dsc * q.reshape(n, 16, 16).astype(F32)).reshape(n, QK_K)
