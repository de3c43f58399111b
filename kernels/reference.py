"""Torch reference of the packed-weight matmul: dequantize (vectorised), then ``F.linear``.

This is the computation the Triton kernels fuse, written with whole-tensor torch ops.  It
runs on any device, is the CPU path when Triton cannot run natively, and is the oracle of the
kernel tests.  Its dequantized weight is bit-for-bit
``autobits.formats.get_format(fmt).dequantize(...)``: the same float32 ``q * scale + zero``
(a multiply, then an add, each rounded to float32), so ``quant_matmul_ref(x, ...)`` equals
``F.linear(x, dequantized_weight)`` exactly for float32 ``x``.

Code extraction mirrors the kernels: code ``k`` of a row starts at stream bit ``k*B``; the
two bytes at ``k*B // 8`` and the next are read as a little-endian 16-bit word, shifted right
by ``k*B % 8`` and masked to ``B`` bits (the second byte only matters for ``B`` in {3, 5, 6}).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from autobits.packed_layout import KernelError, PackedWeight, packed_format_name

__all__ = ["unpack_codes", "dequantize", "dequantize_weight", "quant_matmul_ref"]


@lru_cache(maxsize=64)
def _code_index(k: int, bits: int, device: str):
    """(first byte, shift) of each of the ``k`` codes of a row; cached per (k, bits, device)."""
    bit = torch.arange(k, dtype=torch.int64, device=device) * bits
    return bit >> 3, (bit & 7).to(torch.int32)


def unpack_codes(codes: torch.Tensor, *, bits: int, k: int) -> torch.Tensor:
    """uint8 ``(N, k*bits/8)`` packed codes -> int32 ``(N, k)`` codes in ``[0, 2**bits)``."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise KernelError(f"codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    if codes.shape[1] * 8 != k * bits:
        raise KernelError(
            f"codes have {codes.shape[1]} bytes per row; {k} codes of {bits} bits need "
            f"{k * bits // 8}"
        )
    mask = (1 << bits) - 1
    if bits == 8:
        return codes.to(torch.int32)
    byte, shift = _code_index(k, bits, str(codes.device))
    c = codes.to(torch.int32)
    word = c[:, byte]
    if 8 % bits:  # 3, 5, 6 bits: a code may run into the next byte
        nxt = torch.nn.functional.pad(c, (0, 1))[:, byte + 1]
        word = word | (nxt << 8)
    return (word >> shift) & mask


def dequantize(codes, scales, zeros, *, bits: int, group: int) -> torch.Tensor:
    """Packed ``codes`` / fp16 ``scales`` / fp16 ``zeros`` -> float32 ``(N, K)`` weight."""
    packed_format_name(bits, group)
    n, n_groups = scales.shape
    k = n_groups * group
    if tuple(zeros.shape) != (n, n_groups) or tuple(codes.shape) != (n, k * bits // 8):
        raise KernelError(
            f"INT{bits}_G{group}: codes {tuple(codes.shape)}, scales {tuple(scales.shape)} and "
            f"zeros {tuple(zeros.shape)} disagree; for {n} rows of {k} values expected codes "
            f"{(n, k * bits // 8)} and scales/zeros {(n, n_groups)}"
        )
    q = unpack_codes(codes, bits=bits, k=k).to(torch.float32).view(n, n_groups, group)
    # two roundings (multiply, then add), exactly as numpy does in formats/packed.py
    w = q * scales.to(torch.float32).unsqueeze(-1)
    w = w + zeros.to(torch.float32).unsqueeze(-1)
    return w.view(n, k)


def dequantize_weight(weight: PackedWeight) -> torch.Tensor:
    """:func:`dequantize` of a :class:`~autobits.packed_layout.PackedWeight`."""
    return dequantize(weight.codes, weight.scales, weight.zeros, bits=weight.bits, group=weight.group)


def quant_matmul_ref(
    x: torch.Tensor, codes, scales, zeros, *, bits: int, group: int, bias=None
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with ``W`` dequantized from the packed arrays.

    ``x`` is ``(..., K)``; the product is computed in float32 and returned in ``x.dtype``.
    """
    w = dequantize(codes, scales, zeros, bits=bits, group=group)
    if x.shape[-1] != w.shape[1]:
        raise KernelError(
            f"activations have {x.shape[-1]} features, the packed weight expects {w.shape[1]}"
        )
    b = None if bias is None else bias.to(torch.float32)
    out = F.linear(x.to(torch.float32), w, b)
    return out.to(x.dtype)
