"""Test data for the format tests: real SmolLM2-135M tensors and assorted synthetic rows.

Imported by the test modules next to it (pytest puts this folder on ``sys.path``).

The stored SmolLM2 GGUF is itself quantized (linear weights Q4_1, ``token_embd`` Q8_0), so a
dequantized tensor lies on that format's grid.  :func:`smol_weights` can add a dither smaller
than half a grid step to turn it back into continuous weights with the same statistics, which
error comparisons need (re-quantizing to the stored format would otherwise be exact).
"""

from __future__ import annotations

import functools
import struct

import numpy as np
import pytest

#: (tensor name, rows taken): row lengths 576 (fits 32/64-blocks) and 1536 (also 256-blocks).
SMOL_TENSORS = (
    ("token_embd.weight", 48),
    ("blk.0.attn_q.weight", 32),
    ("blk.3.attn_k.weight", 32),
    ("blk.5.ffn_down.weight", 16),
    ("blk.10.ffn_gate.weight", 32),
)


class RawTensor:
    """One tensor of the GGUF file: ``name``, ``tensor_type``, ``shape`` (ggml order) and
    ``data`` (uint8 ``(rows, row_bytes)`` view of the file), like gguf's ReaderTensor."""

    def __init__(self, name, tensor_type, shape, data):
        self.name, self.tensor_type, self.shape, self.data = name, tensor_type, shape, data


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}


@functools.lru_cache(maxsize=1)
def _tensors() -> dict[str, RawTensor]:
    """Tensor table of the SmolLM2 GGUF, parsed directly (gguf.GGUFReader takes seconds to
    build views of the 49k-token vocabulary, which these tests never read)."""
    import gguf
    from autobits.errors import ModelLoadError
    from autobits.registry import resolve_model_path

    try:
        path = resolve_model_path("smollm2-135m")
    except ModelLoadError as e:  # pragma: no cover - the package is a core dependency
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    mv = memoryview(buf)
    pos = 0

    def take(fmt):
        nonlocal pos
        (v,) = struct.unpack_from(fmt, mv, pos)
        pos += struct.calcsize(fmt)
        return v

    def string():
        nonlocal pos
        n = take("<Q")
        v = bytes(mv[pos : pos + n]).decode("utf-8", "replace")
        pos += n
        return v

    def value(vtype):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            itype, n = take("<I"), take("<Q")
            if itype in _SCALAR:
                pos += n * struct.calcsize(_SCALAR[itype])
                return None
            return [value(itype) for _ in range(n)]
        return take(_SCALAR[vtype])

    assert bytes(mv[:4]) == b"GGUF"
    pos = 4
    take("<I")  # version
    n_tensors, n_kv = take("<Q"), take("<Q")
    alignment = 32
    for _ in range(n_kv):
        key = string()
        v = value(take("<I"))
        if key == "general.alignment":
            alignment = int(v)
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        infos.append((name, dims, take("<I"), take("<Q")))
    start = (pos + alignment - 1) // alignment * alignment
    out = {}
    for name, dims, ttype, offset in infos:
        qtype = gguf.GGMLQuantizationType(ttype)
        block, tsize = gguf.GGML_QUANT_SIZES[qtype]
        row_bytes = dims[0] // block * tsize
        rows = int(np.prod(dims[1:], dtype=np.int64))
        data = buf[start + offset : start + offset + rows * row_bytes].reshape(rows, row_bytes)
        out[name] = RawTensor(name, qtype, dims, data)
    return out


def smol_raw(name: str) -> RawTensor:
    """The tensor ``name`` of the SmolLM2 file (raw bytes in ``.data``, type in ``.tensor_type``)."""
    return _tensors()[name]


@functools.lru_cache(maxsize=None)
def _dequantized(name: str, rows: int) -> np.ndarray:
    from gguf.quants import dequantize

    t = smol_raw(name)
    data = np.asarray(t.data)[:rows]
    out = dequantize(data, t.tensor_type).astype(np.float32)
    out.setflags(write=False)
    return out


def smol_tensor(name: str, rows: int) -> np.ndarray:
    """First ``rows`` rows of a real SmolLM2 tensor as float32 ``(rows, row_len)`` (on its grid)."""
    return _dequantized(name, rows).copy()


def smol_weights(name: str, rows: int, dither: bool = True) -> np.ndarray:
    """Like :func:`smol_tensor`, optionally dithered off the stored format's grid.

    The dither is uniform in +-0.45 of the block's grid step (estimated as the smallest
    positive gap between sorted values of each 32-block), fixed seed.
    """
    x = smol_tensor(name, rows)
    if not dither:
        return x
    blocks = x.reshape(-1, 32).astype(np.float64)
    s = np.sort(blocks, axis=1)
    gaps = np.diff(s, axis=1)
    gaps[gaps <= 0] = np.inf
    step = gaps.min(axis=1)
    step[~np.isfinite(step)] = 0.0
    rng = np.random.default_rng(1234)
    noise = rng.uniform(-0.45, 0.45, blocks.shape) * step[:, None]
    return (blocks + noise).astype(np.float32).reshape(x.shape)


def all_smol(dither: bool = False) -> list[tuple[str, np.ndarray]]:
    """Every tensor of :data:`SMOL_TENSORS` as ``(name, array)``."""
    return [(n, smol_weights(n, r, dither)) for n, r in SMOL_TENSORS]


def smol_importance(row_len: int, seed: int = 0) -> np.ndarray:
    """An imatrix-like importance vector: positive, heavy-tailed, a few dead channels."""
    rng = np.random.default_rng(seed)
    imp = rng.gamma(0.7, 1.5, row_len).astype(np.float32)
    imp[rng.random(row_len) < 0.03] = 0.0
    return imp


def synthetic_rows(seed: int, nrows: int = 24, row: int = 256) -> np.ndarray:
    """Rows of assorted kinds: gaussian, heavy-tailed, zero, tiny, offset, sparse, constant..."""
    rng = np.random.default_rng(seed)
    kinds = [
        lambda: rng.standard_normal(row),
        lambda: rng.standard_t(2, row),
        lambda: rng.standard_cauchy(row) * 1e-2,
        lambda: np.zeros(row),
        lambda: rng.standard_normal(row) * 1e-9,
        lambda: rng.standard_normal(row) * 1e-30,
        lambda: rng.standard_normal(row) * 0.02 + 0.05,
        lambda: -np.abs(rng.standard_normal(row)),
        lambda: rng.standard_normal(row) * (rng.random(row) < 0.05),
        lambda: np.full(row, 0.7),
        lambda: rng.laplace(size=row) * 30.0,
        lambda: np.round(rng.standard_normal(row) * 8) / 4,  # many exact ties
        lambda: rng.integers(-8, 8, row).astype(np.float64),
    ]
    out = np.stack([kinds[i % len(kinds)]() for i in range(nrows)]).astype(np.float32)
    out[1, ::64] = 50.0  # outliers
    out[2, 16:48] = 0.0  # a zero block
    out[4, :32] = 1.5  # a constant block
    return out


def golden_input(nrows: int = 2, row: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic input and importance from integer arithmetic only (platform-independent)."""
    i = np.arange(nrows * row, dtype=np.int64)
    x = (((i * 7919 + 13) % 1009) - 504).astype(np.float32) / np.float32(256)
    x[5] = np.float32(3.0)  # a tie-ish value and an outlier
    x[40] = np.float32(-7.25)
    j = np.arange(row, dtype=np.int64)
    imp = (((j * 104729) % 97) / 16).astype(np.float32)
    imp[3] = 0.0
    return x.reshape(nrows, row), imp
