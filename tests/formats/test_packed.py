"""INT{B}_G{G}: documented byte layout, bit packing, error bounds and importance-aware clipping."""

from __future__ import annotations

import numpy as np
import pytest
from smol_data import smol_importance, smol_weights, synthetic_rows

from autobits.errors import FormatError
from autobits.formats import FORMAT_TABLE, format_names, get_format
from autobits.formats.packed import pack_codes, unpack_codes

PACKED = [n for n in FORMAT_TABLE if n.startswith("INT")]
BITS = (2, 3, 4, 5, 6, 8)


def _bits_of(name: str) -> int:
    return int(name[3:].split("_")[0])


def _reference_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Literal little-endian bit stream: bit b of code i is stream bit i*bits + b."""
    n, g = codes.shape
    out = np.zeros((n, g * bits // 8), dtype=np.uint8)
    for r in range(n):
        for i in range(g):
            for b in range(bits):
                if (int(codes[r, i]) >> b) & 1:
                    k = i * bits + b
                    out[r, k // 8] |= 1 << (k % 8)
    return out


def test_all_packed_formats_registered():
    assert set(PACKED) <= set(format_names())
    for name in PACKED:
        fmt = get_format(name)
        g = int(name.split("_G")[1])
        assert (fmt.block_size, fmt.type_size, fmt.ggml_type) == (g, 4 + g * _bits_of(name) // 8, None)
        assert fmt.uses_importance


@pytest.mark.parametrize("bits", BITS)
def test_pack_codes_bit_order(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, (3, 32), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert np.array_equal(packed, _reference_pack(codes, bits))
    assert np.array_equal(unpack_codes(packed, bits, 32), codes)
    big = rng.integers(0, 1 << bits, (50, 128), dtype=np.uint8)
    assert np.array_equal(unpack_codes(pack_codes(big, bits), bits, 128), big)


def test_documented_layout_int4_g32():
    """One group, checked byte by byte against the module docstring."""
    fmt = get_format("INT4_G32")
    x = np.linspace(-1.0, 2.0, 32, dtype=np.float32)[None, :]
    data = fmt.quantize(x)[0]
    scale = data[0:2].view("<f2")[0]
    zero = data[2:4].view("<f2")[0]
    assert zero == np.float16(-1.0)
    assert scale == np.float16(np.float32(3.0) / np.float32(15))
    q = np.clip(np.rint((x[0] - np.float32(zero)) / np.float32(scale)), 0, 15).astype(np.uint8)
    assert data[4] == q[0] | (q[1] << 4)  # value 2j low nibble, 2j+1 high nibble
    assert np.array_equal(data[4:], q[0::2] | (q[1::2] << 4))
    decoded = q.astype(np.float32) * np.float32(scale) + np.float32(zero)
    assert np.array_equal(fmt.dequantize(data[None], (1, 32))[0], decoded)


def test_documented_layout_int3_g32():
    fmt = get_format("INT3_G32")
    codes = np.arange(32, dtype=np.uint8) % 8
    x = codes.astype(np.float32)[None, :] * np.float32(0.5) - np.float32(1.0)  # exactly on the grid
    data = fmt.quantize(x)[0]
    assert data.size == 4 + 12
    assert data[0:2].view("<f2")[0] == np.float16(0.5) and data[2:4].view("<f2")[0] == np.float16(-1.0)
    assert np.array_equal(data[4:], _reference_pack(codes[None], 3)[0])
    assert np.array_equal(fmt.dequantize(data[None], (1, 32)), x)


@pytest.mark.parametrize("name", PACKED)
def test_roundtrip_error_bound(name):
    fmt = get_format(name)
    x = smol_weights("blk.5.ffn_down.weight", 4)  # rows of 1536 fit every group size
    q = fmt.quantize(x)
    assert q.shape == (4, 1536 // fmt.block_size * fmt.type_size) and q.dtype == np.uint8
    y = fmt.dequantize(q, x.shape)
    g = x.reshape(-1, fmt.block_size)
    step = (g.max(1) - g.min(1)) / ((1 << _bits_of(name)) - 1)
    err = np.abs(y - x).reshape(-1, fmt.block_size).max(1)
    # half a step, plus fp16 rounding of scale and zero
    assert (err <= step * 0.5 + np.abs(g).max(1) * 2e-3 + 1e-7).all()


def test_constant_and_zero_groups():
    fmt = get_format("INT4_G32")
    x = np.zeros((2, 64), dtype=np.float32)
    x[0, 32:] = 0.75
    x[1, :32] = -3.0
    y = fmt.dequantize(fmt.quantize(x), x.shape)
    assert np.array_equal(y, x)


@pytest.mark.parametrize("name", ["INT2_G64", "INT3_G32", "INT4_G128", "INT8_G32"])
def test_importance_lowers_weighted_error(name):
    fmt = get_format(name)
    x = synthetic_rows(1, 12, 256)[[0, 1, 2, 10, 11]]  # gaussian, heavy tails, outliers
    imp = smol_importance(256, seed=1)
    plain, aware = fmt.quantize(x), fmt.quantize(x, imp)

    def werr(q):
        return float(np.sum(imp * (fmt.dequantize(q, x.shape).astype(np.float64) - x) ** 2))

    assert werr(aware) <= werr(plain)
    if _bits_of(name) <= 3:
        assert werr(aware) < werr(plain)


def test_fp16_range_error_names_both_numbers():
    fmt = get_format("INT4_G32")
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, 0] = 1e6
    with pytest.raises(FormatError, match=r"65504.*1e\+06"):
        fmt.quantize(x)


def test_more_bits_lower_error_same_group():
    x = smol_weights("blk.5.ffn_down.weight", 8)
    for g in (32, 64, 128):
        errs = []
        for b in BITS:
            fmt = get_format(f"INT{b}_G{g}")
            errs.append(float(np.mean((fmt.dequantize(fmt.quantize(x), x.shape) - x) ** 2)))
        assert errs == sorted(errs, reverse=True), (g, errs)
