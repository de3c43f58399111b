"""Triton kernels: fused dequantize + matmul for ``INT{2,3,4,5,6,8}_G{32,64,128}`` weights.

``y = x @ W.T (+ bias)`` where ``W`` (``N x K``) is stored in the split layout of
:mod:`autobits.packed_layout` (packed ``codes``, fp16 ``scales`` and ``zeros`` per group)
and is never materialised in float: each program dequantizes the tile of ``W`` it needs
into registers.

Two paths, chosen by the number of activation rows ``M`` (tokens):

* **GEMV** (decoding, ``M == 1``): a program owns ``BLOCK_N`` output features and one of
  ``SPLIT_K`` interleaved slices of the reduction axis.  It walks its ``BLOCK_K`` tiles,
  dequantizes a ``[BLOCK_N, BLOCK_K]`` tile, multiplies by the activation slice and reduces
  along ``K`` in float32.  With ``SPLIT_K > 1`` the partial sums meet in a zeroed float32
  output through atomic adds (more programs in flight for the skinny shapes of decoding).
  Its speed is bounded by reading the packed bytes once.
* **GEMM** (prefill, ``M > 1``): the tutorial matmul, tiled over ``M``, ``N`` and ``K`` with
  grouped program ordering for L2 reuse; each ``[BLOCK_K, BLOCK_N]`` tile of ``W.T`` is
  dequantized in registers and fed to ``tl.dot`` with a float32 accumulator.

Dequantizing a tile (:func:`_dequant_tile`): codes of 2, 4 and 8 bits never straddle a
byte, so the tile's bytes are loaded once and split into codes with shifts and
``tl.join``/``tl.reshape`` (two nibbles, four crumbs).  Codes of 3, 5 and 6 bits straddle byte
boundaries: each code reads the byte it starts in and the next one as a little-endian
16-bit word, then shifts and masks.  Scales and zeros are loaded once per group (not per
element) and broadcast over the group.

Autotuning configs come from :func:`gemv_configs` and :func:`gemm_configs`, pruned to the
problem size.  In interpreter mode (``TRITON_INTERPRET=1``, CPU tensors) they list large
tiles and the pruner keeps the single one an interpreter cost model ranks first, so nothing
is benchmarked.  ``quant_matmul(..., config={...})`` bypasses the autotuner with explicit
meta-parameters (tests, benchmarks).

Import this module after deciding on interpreter mode: ``@triton.jit`` reads
``TRITON_INTERPRET`` when the kernels are defined (see :func:`autobits.kernels.use_interpreter`).
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
import triton
import triton.language as tl

from autobits.packed_layout import BITS, GROUPS, KernelError

__all__ = [
    "INTERPRET",
    "GEMV_MAX_M",
    "gemv_configs",
    "gemm_configs",
    "quant_matmul",
]

log = logging.getLogger(__name__)

#: True when the kernels below were defined for Triton's interpreter (CPU tensors allowed).
INTERPRET: bool = bool(triton.knobs.runtime.interpret)
#: Largest number of activation rows sent to the GEMV kernel by ``path="auto"``.
GEMV_MAX_M = 1
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------- autotune configs
#: Interpreter cost model (seconds, measured on 2 shared CPU cores): per loop step of a
#: program, per tile element, per multiply-add of tl.dot (numpy matmul).
_COST_STEP, _COST_ELEMENT, _COST_MAC = 2e-2, 1.5e-7, 1e-9
_MAX_TILE = 1 << 20  # Triton's largest tensor


def gemv_configs(*, interpret: bool | None = None) -> list[triton.Config]:
    """Autotuning space of the GEMV kernel: tile of output features, tile of K, split-K.

    ``BLOCK_N`` in {8, 16, 32, 64}, ``BLOCK_K`` in {128, 256, 512}, ``SPLIT_K`` in {1, 2, 4};
    8 warps for the large tiles.  For the interpreter: large tiles, ``SPLIT_K = 1``; the
    pruner keeps the one its cost model ranks first, so nothing is benchmarked.
    """
    if INTERPRET if interpret is None else interpret:
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1})
                for bn in (16, 64, 256, 1024) for bk in (128, 256, 512, 1024)]
    configs = []
    for block_n in (8, 16, 32, 64):
        for block_k in (128, 256, 512):
            for split_k in (1, 2, 4):
                warps = 8 if block_n * block_k >= 16384 else 4
                configs.append(triton.Config(
                    {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k},
                    num_warps=warps, num_stages=2,
                ))
    return configs


def gemm_configs(*, interpret: bool | None = None) -> list[triton.Config]:
    """Autotuning space of the GEMM kernel: ``(BLOCK_M, BLOCK_N, BLOCK_K)`` tiles, warps, stages.

    Tiles from the Triton matmul tutorial's space, restricted to ``BLOCK_K <= 128`` (a
    dequantized K-tile lives in registers); ``GROUP_M = 8`` program grouping.  For the
    interpreter: large tiles, one chosen by the pruner's cost model.
    """
    if INTERPRET if interpret is None else interpret:
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8})
                for bm in (16, 64) for bn in (64, 256, 1024) for bk in (128, 256, 1024)]
    configs = []
    for bm, bn, bk, warps, stages in (
        (16, 64, 128, 4, 3), (32, 64, 64, 4, 4), (32, 128, 64, 4, 4), (64, 64, 64, 4, 4),
        (64, 128, 64, 4, 3), (64, 128, 128, 8, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 256, 32, 4, 4), (128, 128, 32, 4, 4),
    ):
        configs.append(triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            num_warps=warps, num_stages=stages,
        ))
    return configs


def _interpreter_cost(kw: dict, m: int, n: int, k: int) -> float:
    """Estimated interpreter seconds of one launch with meta-parameters ``kw``."""
    bm = kw.get("BLOCK_M")
    bn, bk = kw["BLOCK_N"], kw["BLOCK_K"]
    rows = m if bm is None else triton.cdiv(m, bm)  # GEMV: one program column per row
    steps = rows * triton.cdiv(n, bn) * triton.cdiv(k, bk)
    cost = steps * (_COST_STEP + _COST_ELEMENT * bn * bk)
    if bm is not None:
        cost += steps * _COST_MAC * bm * bn * bk
    return cost


def _prune(configs, named_args, **kwargs):
    """Drop configs whose tiles are far larger than the problem (keep at least one).

    In interpreter mode keep only the config with the lowest estimated cost.
    """
    n = named_args["N"]
    k = named_args["K"]
    m = named_args.get("M", 1)
    if INTERPRET:
        fit = [c for c in configs if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= _MAX_TILE]
        return [min(fit, key=lambda c: _interpreter_cost(c.kwargs, m, n, k))]
    cap_n = max(triton.next_power_of_2(n), 16)
    cap_k = max(triton.next_power_of_2(k), 16)
    cap_m = max(triton.next_power_of_2(m), 16)
    kept = []
    for c in configs:
        kw = c.kwargs
        if kw["BLOCK_N"] > cap_n or kw["BLOCK_K"] > cap_k or kw.get("BLOCK_M", 16) > cap_m:
            continue
        if kw.get("SPLIT_K", 1) > triton.cdiv(k, kw["BLOCK_K"]):
            continue
        kept.append(c)
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


# ----------------------------------------------------------------------- kernels
@triton.jit
def _codes_tile(
    codes_ptr,  # *uint8: packed codes, (N, row_bytes) row-major
    offs_n,  # int32 [BLOCK_N]: output-feature (row) indices of the tile
    mask_n,  # bool [BLOCK_N]: rows inside the weight
    k0,  # int: first reduction index of the tile (a multiple of BLOCK_K)
    K,  # int: input features
    row_bytes,  # int: bytes of packed codes per row = K * BITS / 8
    BITS: tl.constexpr,  # code width in bits, one of 2, 3, 4, 5, 6, 8
    BLOCK_N: tl.constexpr,  # rows of the tile
    BLOCK_K: tl.constexpr,  # columns of the tile
):
    """int32 ``[BLOCK_N, BLOCK_K]`` codes of columns ``k0 .. k0+BLOCK_K`` (0 outside the weight)."""
    rows = codes_ptr + offs_n[:, None] * row_bytes
    if BITS == 8:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :], other=0)
        q = q.to(tl.int32)
    elif BITS == 4:
        # each byte holds two codes: load the bytes once, interleave low and high nibbles
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(rows + offs_b[None, :], mask=mask_n[:, None] & (offs_b < row_bytes)[None, :],
                    other=0).to(tl.int32)
        q = tl.reshape(tl.join(b & 0xF, b >> 4), (BLOCK_N, BLOCK_K))
    elif BITS == 2:
        # four codes per byte; join(join(c0, c2), join(c1, c3)) flattens to c0 c1 c2 c3
        offs_b = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        b = tl.load(rows + offs_b[None, :], mask=mask_n[:, None] & (offs_b < row_bytes)[None, :],
                    other=0).to(tl.int32)
        q = tl.join(tl.join(b & 3, (b >> 4) & 3), tl.join((b >> 2) & 3, b >> 6))
        q = tl.reshape(q, (BLOCK_N, BLOCK_K))
    else:
        # 3/5/6 bits: a code may straddle two bytes; load the byte it starts in and the next
        # one (0 past the row's end), read them as a little-endian 16-bit word, shift, mask
        offs_k = k0 + tl.arange(0, BLOCK_K)
        bit = offs_k * BITS
        byte = bit >> 3
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        ptr = rows + byte[None, :]
        word = tl.load(ptr, mask=mask, other=0).to(tl.int32)
        nxt = tl.load(ptr + 1, mask=mask & (byte + 1 < row_bytes)[None, :], other=0).to(tl.int32)
        q = ((word | (nxt << 8)) >> (bit & 7)[None, :]) & ((1 << BITS) - 1)
    return q


@triton.jit
def _dequant_tile(
    codes_ptr,  # *uint8: packed codes, (N, K*BITS/8) row-major
    scales_ptr,  # *fp16: per-group scales, (N, K/GROUP) row-major
    zeros_ptr,  # *fp16: per-group zeros, (N, K/GROUP) row-major
    offs_n,  # int32 [BLOCK_N]: output-feature (row) indices of the tile
    mask_n,  # bool [BLOCK_N]: rows inside the weight
    k0,  # int: first reduction index of the tile (a multiple of BLOCK_K)
    K,  # int: input features (a multiple of GROUP)
    BITS: tl.constexpr,  # code width in bits
    GROUP: tl.constexpr,  # values per scale/zero group, one of 32, 64, 128
    BLOCK_N: tl.constexpr,  # rows of the tile
    BLOCK_K: tl.constexpr,  # columns of the tile (a power of two)
):
    """Float32 ``[BLOCK_N, BLOCK_K]`` tile of ``W``: ``q * scale + zero`` (0 outside the weight)."""
    row_bytes = K * BITS // 8
    n_groups = K // GROUP
    q = _codes_tile(codes_ptr, offs_n, mask_n, k0, K, row_bytes, BITS, BLOCK_N, BLOCK_K)
    q = q.to(tl.float32)
    if BLOCK_K >= GROUP:
        # BLOCK_K // GROUP whole groups per row: one scale and zero each, broadcast over the group
        g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        idx = offs_n[:, None] * n_groups + g[None, :]
        m = mask_n[:, None] & (g < n_groups)[None, :]
        scale = tl.load(scales_ptr + idx, mask=m, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + idx, mask=m, other=0.0).to(tl.float32)
        w = tl.reshape(q, (BLOCK_N, BLOCK_K // GROUP, GROUP))
        w = w * scale[:, :, None] + zero[:, :, None]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
    else:
        # the tile lies inside one group of each row
        idx = offs_n * n_groups + k0 // GROUP
        scale = tl.load(scales_ptr + idx, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + idx, mask=mask_n, other=0.0).to(tl.float32)
        w = q * scale[:, None] + zero[:, None]
    return w


@triton.jit
def _gemv_kernel(
    x_ptr,  # *fp16/bf16/fp32: activations (M, K), unit stride along K
    codes_ptr,  # *uint8: packed codes (N, K*BITS/8)
    scales_ptr,  # *fp16: scales (N, K/GROUP)
    zeros_ptr,  # *fp16: zeros (N, K/GROUP)
    bias_ptr,  # *float: bias (N,); unused when HAS_BIAS is False
    out_ptr,  # *fp32: output (M, N), zero-initialised (split-K programs add into it)
    M,  # int: activation rows (one program column per row)
    N,  # int: output features
    K,  # int: input features (a multiple of GROUP)
    stride_xm,  # int: elements between activation rows
    stride_om,  # int: elements between output rows
    BITS: tl.constexpr,  # code width in bits
    GROUP: tl.constexpr,  # group size
    HAS_BIAS: tl.constexpr,  # add bias_ptr[n] (by the split-K slice 0 only)
    BLOCK_N: tl.constexpr,  # output features per program
    BLOCK_K: tl.constexpr,  # reduction elements per loop step
    SPLIT_K: tl.constexpr,  # programs sharing one row block's reduction
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # slice pid_k takes K-tiles pid_k, pid_k + SPLIT_K, ...
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w = _dequant_tile(codes_ptr, scales_ptr, zeros_ptr, offs_n, mask_n, k0, K,
                          BITS, GROUP, BLOCK_N, BLOCK_K)
        acc += tl.sum(w * x[None, :], axis=1)
    if HAS_BIAS:
        if pid_k == 0:  # one slice adds the bias
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    out = out_ptr + m * stride_om + offs_n
    if SPLIT_K == 1:
        tl.store(out, acc, mask=mask_n)
    else:
        tl.atomic_add(out, acc, mask=mask_n)


@triton.jit
def _gemm_kernel(
    x_ptr,  # *fp16/bf16/fp32: activations (M, K), unit stride along K
    codes_ptr,  # *uint8: packed codes (N, K*BITS/8)
    scales_ptr,  # *fp16: scales (N, K/GROUP)
    zeros_ptr,  # *fp16: zeros (N, K/GROUP)
    bias_ptr,  # *float: bias (N,); unused when HAS_BIAS is False
    out_ptr,  # *same dtype as x: output (M, N)
    M,  # int: activation rows (tokens)
    N,  # int: output features
    K,  # int: input features (a multiple of GROUP)
    stride_xm,  # int: elements between activation rows
    stride_om,  # int: elements between output rows
    BITS: tl.constexpr,  # code width in bits
    GROUP: tl.constexpr,  # group size
    HAS_BIAS: tl.constexpr,  # add bias_ptr[n] in the epilogue
    IEEE: tl.constexpr,  # float32 activations: full-precision dot (no TF32)
    BLOCK_M: tl.constexpr,  # activation rows per program
    BLOCK_N: tl.constexpr,  # output features per program
    BLOCK_K: tl.constexpr,  # reduction elements per loop step
    GROUP_M: tl.constexpr,  # row blocks per group of programs (L2 reuse of W tiles)
):
    # grouped ordering (Triton matmul tutorial): consecutive programs share W column tiles
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        # the K-tile of W dequantized in registers, transposed to [BLOCK_K, BLOCK_N]
        b = tl.trans(_dequant_tile(codes_ptr, scales_ptr, zeros_ptr, offs_n, mask_n, k0, K,
                                   BITS, GROUP, BLOCK_N, BLOCK_K))
        if IEEE:
            acc = tl.dot(a.to(tl.float32), b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(x_ptr.dtype.element_ty), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@lru_cache(maxsize=None)
def _tuned(kind: str):
    """The autotuned launcher of ``kind`` ("gemv" or "gemm"), built once from the config functions."""
    if kind == "gemv":
        return triton.autotune(
            configs=gemv_configs(), key=["N", "K", "BITS", "GROUP"], reset_to_zero=["out_ptr"],
            prune_configs_by={"early_config_prune": _prune},
        )(_gemv_kernel)
    return triton.autotune(
        configs=gemm_configs(), key=["M", "N", "K", "BITS", "GROUP"],
        prune_configs_by={"early_config_prune": _prune},
    )(_gemm_kernel)


# ----------------------------------------------------------------------- wrapper
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check(x, codes, scales, zeros, bias, bits: int, group: int) -> tuple[int, int]:
    """Validate the operands; return ``(N, K)``."""
    if bits not in BITS or group not in GROUPS:
        raise KernelError(f"bits must be one of {BITS} and group one of {GROUPS}, got {bits}, {group}")
    if x.dtype not in _FLOATS:
        raise KernelError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise KernelError(f"codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    n = codes.shape[0]
    if (codes.shape[1] * 8) % bits:
        raise KernelError(f"codes have {codes.shape[1]} bytes per row, not a whole number of "
                          f"{bits}-bit codes")
    k = codes.shape[1] * 8 // bits
    if k % group or k == 0:
        raise KernelError(f"packed rows hold {k} codes, not a positive multiple of group {group}")
    for part, t in (("scales", scales), ("zeros", zeros)):
        if t.dtype != torch.float16 or tuple(t.shape) != (n, k // group):
            raise KernelError(f"{part} must be float16 {(n, k // group)} for {n} rows of {k} "
                              f"{bits}-bit codes, got {t.dtype} {tuple(t.shape)}")
    if x.shape[-1] != k:
        raise KernelError(f"activations have {x.shape[-1]} features (shape {tuple(x.shape)}), "
                          f"the packed weight expects {k}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype not in _FLOATS):
        raise KernelError(f"bias must be a float ({n},) tensor, got {bias.dtype} {tuple(bias.shape)}")
    tensors = [x, codes, scales, zeros] + ([bias] if bias is not None else [])
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise KernelError(f"all operands must be on one device, got {sorted(map(str, devices))}")
    dev = x.device
    if dev.type != "cuda" and not INTERPRET:
        raise KernelError(
            f"Triton kernels need CUDA tensors, got {dev}; on a machine without a GPU set "
            f"TRITON_INTERPRET=1 before importing triton (interpreter mode) or use the torch backend"
        )
    if dev.type == "cuda" and INTERPRET:
        raise KernelError("the kernels were defined for the interpreter (TRITON_INTERPRET=1); "
                          "they take CPU tensors, got CUDA ones")
    big = max(codes.numel(), x.numel() // max(k, 1) * max(n, k))
    if big > _INT32_MAX:
        raise KernelError(f"operands too large for 32-bit offsets ({big} > {_INT32_MAX} elements)")
    for part, t in (("codes", codes), ("scales", scales), ("zeros", zeros)):
        if not t.is_contiguous():
            raise KernelError(f"{part} must be contiguous")
    return n, k


def quant_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    bits: int,
    group: int,
    bias: torch.Tensor | None = None,
    path: str = "auto",
    config: dict | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for a packed ``INT{bits}_G{group}`` weight ``W`` of shape ``(N, K)``.

    ``x`` is ``(..., K)`` float16/bfloat16/float32; the result is ``(..., N)`` in ``x.dtype``,
    accumulated in float32.  ``path`` is ``"auto"`` (GEMV for ``M <= GEMV_MAX_M`` rows, else
    GEMM), ``"gemv"`` or ``"gemm"``.  ``config`` gives the meta-parameters instead of
    autotuning (GEMV: ``BLOCK_N, BLOCK_K, SPLIT_K``; GEMM: ``BLOCK_M, BLOCK_N, BLOCK_K,
    GROUP_M``; optional ``num_warps``, ``num_stages``).
    """
    if path not in ("auto", "gemv", "gemm"):
        raise KernelError(f"path must be 'auto', 'gemv' or 'gemm', got {path!r}")
    n, k = _check(x, codes, scales, zeros, bias, bits, group)
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(lead + (n,))
    has_bias = bias is not None
    bias_arg = bias if has_bias else x2  # placeholder pointer, never read
    gemv = path == "gemv" or (path == "auto" and m <= GEMV_MAX_M)
    if gemv:
        # float32 accumulator, zeroed: split-K slices add their partial sums into it
        out = torch.zeros((m, n), dtype=torch.float32, device=x.device)
        kernel = _gemv_kernel if config is not None else _tuned("gemv")
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], m)  # noqa: E731
        kernel[grid](
            x2, codes, scales, zeros, bias_arg, out, m, n, k, x2.stride(0), out.stride(0),
            BITS=bits, GROUP=group, HAS_BIAS=has_bias, **(config or {}),
        )
        out = out.to(x.dtype)
    else:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        kernel = _gemm_kernel if config is not None else _tuned("gemm")
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
        )
        kernel[grid](
            x2, codes, scales, zeros, bias_arg, out, m, n, k, x2.stride(0), out.stride(0),
            BITS=bits, GROUP=group, HAS_BIAS=has_bias, IEEE=x.dtype == torch.float32,
            **(config or {}),
        )
    return out.reshape(lead + (n,))
