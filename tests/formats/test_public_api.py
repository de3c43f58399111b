"""autobits.quantize / dequantize across every registered format, errors users see, and the
error order on real SmolLM2 tensors (more bits -> lower relative RMS error)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from smol_data import smol_weights

import autobits
from autobits.errors import AutobitsError, FormatError
from autobits.formats import FORMAT_TABLE, format_names, get_format
from autobits.formats.oracle import OracleUnavailableError

ALL = format_names()


def _nominal_bits(name: str) -> int:
    """Bits per code: the first number in the name (Q4_K -> 4, INT3_G64 -> 3, BF16 -> 16)."""
    return int(re.search(r"\d+", name).group())


def _rel_rms(fmt, x: np.ndarray) -> float:
    y = fmt.dequantize(fmt.quantize(x), x.shape).astype(np.float64)
    return float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x.astype(np.float64) ** 2)))


# ------------------------------------------------------------------ public entry points
def test_every_table_entry_has_a_consistent_registration():
    assert {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"} <= set(ALL)
    import gguf
    for name in ALL:
        fmt = get_format(name)
        assert fmt.name == name and name in FORMAT_TABLE
        if fmt.ggml_type is not None:
            qtype = gguf.GGMLQuantizationType(fmt.ggml_type)
            assert qtype.name == name
            assert gguf.GGML_QUANT_SIZES[qtype] == (fmt.block_size, fmt.type_size)


@pytest.mark.parametrize("name", ALL)
def test_quantize_dequantize_roundtrip(name):
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32) * 0.05
    data = autobits.quantize(x, name)
    assert data.dtype == np.uint8 and data.shape == (3, 256 // get_format(name).block_size * get_format(name).type_size)
    assert data.size == get_format(name).nbytes(x.shape)
    y = autobits.dequantize(data, name, x.shape)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert _rel_rms(get_format(name), x) < 0.6
    # importance is accepted by every format (ignored where it does not matter)
    imp = np.linspace(0.0, 2.0, 256, dtype=np.float32)
    assert autobits.quantize(x, name, imp).shape == data.shape
    # case-insensitive names, N-D input
    assert np.array_equal(autobits.quantize(x.reshape(3, 1, 256), name.lower()).reshape(data.shape), data)


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(FormatError, match=r"unknown format 'Q9_9'.*Q4_0"):
        autobits.quantize(np.zeros((1, 32), np.float32), "Q9_9")
    with pytest.raises(AutobitsError):
        autobits.dequantize(np.zeros(18, np.uint8), "nope", (1, 32))
    assert issubclass(FormatError, ValueError)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_names_the_tensor(bad):
    x = np.ones((2, 64), np.float32)
    x[1, 7] = bad
    with pytest.raises(FormatError, match=r"blk\.0\.attn_q\.weight.*NaN or Inf.*Q4_0"):
        get_format("Q4_0").quantize(x, tensor="blk.0.attn_q.weight")
    with pytest.raises(FormatError, match="NaN or Inf"):
        autobits.quantize(x, "IQ4_NL")


def test_misfit_names_both_numbers():
    with pytest.raises(FormatError, match=r"'blk\.1\.ffn_down\.weight'.*100.*Q4_0.*32"):
        get_format("Q4_0").quantize(np.zeros((4, 100), np.float32), tensor="blk.1.ffn_down.weight")
    with pytest.raises(FormatError, match=r"576.*INT4_G128.*128"):
        autobits.quantize(np.zeros((2, 576), np.float32), "INT4_G128")
    with pytest.raises(FormatError, match=r"must be 36 bytes, got 35"):
        autobits.dequantize(np.zeros(35, np.uint8), "Q4_0", (2, 32))
    with pytest.raises(FormatError, match=r"\(48,\).*\(64,\)"):
        autobits.quantize(np.zeros((2, 64), np.float32), "Q4_0", np.ones(48, np.float32))


def test_oracle_error_is_an_autobits_and_import_error():
    err = OracleUnavailableError("x")
    assert isinstance(err, AutobitsError) and isinstance(err, ImportError)


# ------------------------------------------------------------------ error order, real tensors
@pytest.mark.parametrize("tensor,rows", [("token_embd.weight", 48), ("blk.5.ffn_down.weight", 16)])
def test_more_bits_lower_error_on_smollm2(tensor, rows):
    """Every registered format that fits the tensor, grouped by bits per code (Q4_K, IQ4_NL,
    INT4_G64 ... are 4-bit): each group's worst error is below the best of the group with
    fewer bits; within a family, more bits per weight (smaller groups, a stored minimum)
    means lower error.  The GGUF stores the tensors quantized, so they are dithered off
    that grid first (see smol_data.smol_weights)."""
    x = smol_weights(tensor, rows, dither=True)
    errs = {n: _rel_rms(get_format(n), x) for n in ALL if get_format(n).fits(x.shape[1])}
    assert len(errs) >= 15
    tiers: dict[int, list[float]] = {}
    for n, e in errs.items():
        tiers.setdefault(_nominal_bits(n), []).append(e)
    bits = sorted(tiers)
    for lo, hi in zip(bits, bits[1:]):
        assert max(tiers[hi]) < min(tiers[lo]), (lo, hi, errs)
    assert errs["F32"] == 0.0

    def ordered(*names):
        present = [n for n in names if n in errs]
        vals = [errs[n] for n in present]
        assert vals == sorted(vals, reverse=True), dict(zip(present, vals))

    for b in (2, 3, 4, 5, 6, 8):
        ordered(f"INT{b}_G128", f"INT{b}_G64", f"INT{b}_G32")
    ordered("Q4_0", "Q4_1")
    ordered("Q5_0", "Q5_1")
    ordered("Q4_0", "IQ4_NL")
    ordered("BF16", "F16", "F32")
    ordered("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")


def test_oracle_unavailable_says_how_to_install(monkeypatch):
    from autobits.formats import oracle

    monkeypatch.setattr(oracle, "_loaded", True)
    monkeypatch.setattr(oracle, "_lib", None)
    monkeypatch.setattr(oracle, "_error", None)
    monkeypatch.setattr(oracle, "_candidate_paths", lambda: [])
    assert not oracle.oracle_available()
    with pytest.raises(OracleUnavailableError, match=r"pip install -e '\.\[judge\]'"):
        oracle.ggml_quantize(np.zeros((1, 32), np.float32), 2)
    with pytest.raises(ImportError):
        oracle.ggml_row_size(2, 32)


@pytest.mark.needs("oracle")
def test_oracle_rejects_bad_shapes():
    from autobits.formats import oracle

    with pytest.raises(AutobitsError, match=r"row length 33.*block size 32"):
        oracle.ggml_quantize(np.zeros((2, 33), np.float32), 2)
    with pytest.raises(AutobitsError, match=r"type id 4"):
        oracle.ggml_quantize(np.zeros((2, 32), np.float32), 4)  # removed Q4_2
    with pytest.raises(AutobitsError, match=r"importance has 16 values, expected 32"):
        oracle.ggml_quantize(np.zeros((2, 32), np.float32), 2, np.ones(16, np.float32))
    assert oracle.ggml_row_size(12, 512) == 288 and oracle.ggml_block_size(12) == 256
    q = oracle.ggml_quantize(np.ones(64, np.float32), 8)  # 1-D input is one row
    assert q.shape == (1, 68)
