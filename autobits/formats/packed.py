"""Packed asymmetric integer formats ``INT{2,3,4,5,6,8}_G{32,64,128}`` (autobits-only).

These are not ggml types (no GGUF type id); they exist for the search and for custom kernels.

Byte layout of one group of ``G`` consecutive values along a row (``type_size = 4 + G*B/8``)::

    offset 0   fp16 scale   (little-endian IEEE half)
    offset 2   fp16 zero    (little-endian IEEE half)
    offset 4   G*B/8 bytes  codes q_0 .. q_{G-1}, each an unsigned B-bit integer

Codes are packed densely in little-endian bit order: code ``i`` occupies bits
``i*B .. i*B + B - 1`` of the code bytes read as one little-endian bit stream, i.e. bit ``k``
of the stream is bit ``k % 8`` of code byte ``k // 8``, and bit ``b`` of code ``i`` is stream bit
``i*B + b`` (least significant bit first).  For ``B = 4`` that is value ``2j`` in the low nibble
of byte ``j`` and value ``2j + 1`` in its high nibble; for ``B = 8`` one byte per code.

Decoding (float32)::

    x_i ≈ q_i * scale + zero          (scale, zero = the stored fp16 values widened to float32)

Encoding without importance: ``lo = min(group)``, ``hi = max(group)``;
``zero = fp16(lo)``, ``scale = fp16((hi - lo) / (2**B - 1))``, then
``q_i = clip(rint((x_i - zero) * (1 / scale)), 0, 2**B - 1)`` in float32 with the *stored*
(fp16-rounded) scale and zero (round half to even; ``q = 0`` when the stored scale is 0).

Encoding with an importance vector: the same, but the range ``[lo, hi]`` is chosen among a few
clipped candidates ``[lo + a*(hi - lo), hi - b*(hi - lo)]`` for ``a, b`` in
:data:`CLIP_FRACTIONS` (including the unclipped range), keeping the one with the smallest
importance-weighted squared error ``sum_i importance_i * (x_i - decoded_i)**2`` (the unclipped
range wins ties).

Values must fit fp16: a group whose minimum or range exceeds 65504 raises
:class:`~autobits.errors.FormatError`.
"""

from __future__ import annotations

import numpy as np

from autobits.errors import FormatError
from autobits.formats.base import FORMAT_TABLE, Format

__all__ = ["PackedIntFormat", "pack_codes", "unpack_codes", "CLIP_FRACTIONS"]

F32 = np.float32
FP16_MAX = 65504.0

#: Fractions of the range that may be clipped off each end when an importance vector is given.
CLIP_FRACTIONS: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 ``(n, G)`` codes < ``2**bits`` -> uint8 ``(n, G*bits/8)``, little-endian bit order."""
    c = np.ascontiguousarray(codes, dtype=np.uint8)
    n, g = c.shape
    if bits == 8:
        return c.copy()
    if bits == 4:
        return c[:, 0::2] | (c[:, 1::2] << 4)
    if bits == 2:
        return c[:, 0::4] | (c[:, 1::4] << 2) | (c[:, 2::4] << 4) | (c[:, 3::4] << 6)
    shifts = np.arange(bits, dtype=np.uint8)
    stream = ((c[:, :, None] >> shifts) & 1).reshape(n, g * bits)
    return np.packbits(stream, axis=1, bitorder="little")


def unpack_codes(data: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 ``(n, G*bits/8)`` -> uint8 ``(n, G)``."""
    d = np.ascontiguousarray(data, dtype=np.uint8)
    n = d.shape[0]
    if bits == 8:
        return d.copy()
    if bits == 4:
        out = np.empty((n, group), dtype=np.uint8)
        out[:, 0::2] = d & 0x0F
        out[:, 1::2] = d >> 4
        return out
    if bits == 2:
        out = np.empty((n, group), dtype=np.uint8)
        for k in range(4):
            out[:, k::4] = (d >> (2 * k)) & 3
        return out
    stream = np.unpackbits(d, axis=1, bitorder="little").reshape(n, group, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (stream.astype(np.uint16) @ weights).astype(np.uint8)


def _to_fp16(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=F32).astype(np.float16).astype(F32)


class PackedIntFormat(Format):
    """Base of the ``INT{B}_G{G}`` formats: asymmetric B-bit codes, fp16 scale and zero per group."""

    bits: int

    def _encode(self, x: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        """Codes and stored (fp16) ``scale``/``zero`` for ranges ``[lo, hi]`` per group."""
        qmax = (1 << self.bits) - 1
        zero = _to_fp16(lo)
        scale = _to_fp16((hi - lo) / F32(qmax))
        inv = np.zeros_like(scale)
        nz = scale > 0
        inv[nz] = F32(1) / scale[nz]
        q = np.rint((x - zero[:, None]) * inv[:, None])
        np.clip(q, 0, qmax, out=q)
        return q.astype(np.uint8), scale, zero

    def _quantize_blocks(self, blocks, importance, *, row_length):
        x = np.asarray(blocks, dtype=F32)
        lo = x.min(axis=1)
        hi = x.max(axis=1)
        span = hi - lo
        worst = float(max(np.abs(lo).max(initial=0.0), span.max(initial=0.0)))
        if not np.isfinite(span).all() or worst > FP16_MAX:
            raise FormatError(
                f"{self.name} stores an fp16 scale and zero: values up to {FP16_MAX:g} in "
                f"magnitude fit, got a group needing {worst:g}"
            )
        q, scale, zero = self._encode(x, lo, hi)
        if importance is not None:
            w = np.asarray(importance, dtype=F32)
            best = self._weighted_error(x, w, q, scale, zero)
            for a in CLIP_FRACTIONS:
                for b in CLIP_FRACTIONS:
                    if a == 0.0 and b == 0.0:
                        continue
                    cq, cs, cz = self._encode(x, lo + F32(a) * span, hi - F32(b) * span)
                    err = self._weighted_error(x, w, cq, cs, cz)
                    better = err < best
                    if better.any():
                        q[better], scale[better], zero[better] = cq[better], cs[better], cz[better]
                        best[better] = err[better]
        header = np.concatenate(
            [scale.astype("<f2").view(np.uint8).reshape(-1, 2),
             zero.astype("<f2").view(np.uint8).reshape(-1, 2)],
            axis=1,
        )
        return np.concatenate([header, pack_codes(q, self.bits)], axis=1)

    @staticmethod
    def _weighted_error(x, w, q, scale, zero) -> np.ndarray:
        r = q.astype(F32)
        r *= scale[:, None]
        r += zero[:, None]
        r -= x
        r *= r
        r *= w
        return r.sum(axis=1)

    def _dequantize_blocks(self, data):
        d = np.ascontiguousarray(data, dtype=np.uint8)
        scale = d[:, 0:2].copy().view("<f2").astype(F32)
        zero = d[:, 2:4].copy().view("<f2").astype(F32)
        q = unpack_codes(d[:, 4:], self.bits, self.block_size).astype(F32)
        return q * scale + zero


def _register() -> None:
    """Create one class per ``INT{B}_G{G}`` entry of FORMAT_TABLE (subclassing registers it)."""
    for name in FORMAT_TABLE:
        if not name.startswith("INT"):
            continue
        bits = int(name[3:].split("_")[0])
        cls = type(name, (PackedIntFormat,), {
            "name": name,
            "bits": bits,
            "uses_importance": True,
            "__doc__": f"{bits}-bit asymmetric codes, fp16 scale and zero per group of "
                       f"{FORMAT_TABLE[name].block_size} values.",
            "__module__": __name__,
        })
        globals()[name] = cls
        __all__.append(name)


_register()
