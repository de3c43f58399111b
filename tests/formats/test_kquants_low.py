"""Q2_K and Q3_K: layouts against gguf-py, sanity of the round trip, and (judge) bytes
against llama.cpp's own C quantizer with and without an importance vector."""

from __future__ import annotations

import numpy as np
import pytest

from autobits.errors import FormatError
from autobits.formats import get_format

FORMATS = ["Q2_K", "Q3_K"]
GGML_TYPE = {"Q2_K": 10, "Q3_K": 11}


# ------------------------------------------------------------------------ test data
def _rows(seed: int, nrows: int = 24, row: int = 512) -> np.ndarray:
    """Rows of assorted kinds: gaussian, heavy-tailed, zero, tiny, offset, sparse, constant."""
    rng = np.random.default_rng(seed)
    kinds = [
        lambda: rng.standard_normal(row),
        lambda: rng.standard_t(2, row),  # heavy tails
        lambda: rng.standard_cauchy(row) * 1e-2,
        lambda: np.zeros(row),
        lambda: rng.standard_normal(row) * 1e-9,  # tiny values, fp16 scales underflow
        lambda: rng.standard_normal(row) * 1e-30,  # below GROUP_MAX_EPS
        lambda: rng.standard_normal(row) * 0.02 + 0.05,  # all positive
        lambda: -np.abs(rng.standard_normal(row)),  # all negative
        lambda: rng.standard_normal(row) * (rng.random(row) < 0.05),  # sparse
        lambda: np.full(row, 0.7),  # constant
        lambda: rng.laplace(size=row) * 30.0,  # large
        lambda: np.where(rng.random(row) < 0.5, 0.0, rng.standard_normal(row) * 1e-6),
        lambda: np.round(rng.standard_normal(row) * 8) / 4,  # many exact ties, +-a pairs
        lambda: rng.integers(-8, 8, row).astype(np.float64),
    ]
    out = np.stack([kinds[i % len(kinds)]() for i in range(nrows)]).astype(np.float32)
    # one row with a single outlier per super-block, one with a zero sub-block
    out[1, ::256] = 50.0
    out[2, 16:32] = 0.0
    return out


def _importance(seed: int, row: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    imp = rng.gamma(0.5, 2.0, row).astype(np.float32)
    imp[rng.random(row) < 0.05] = 0.0  # some dead channels
    return imp


# --------------------------------------------------------------------- gguf-py layout
@pytest.mark.parametrize("name", FORMATS)
def test_dequantize_equals_gguf(name):
    import gguf.quants as gq
    import gguf

    fmt = get_format(name)
    qtype = getattr(gguf.GGMLQuantizationType, name)
    x = _rows(1)
    for imp in (None, _importance(2, x.shape[1])):
        data = fmt.quantize(x, imp)
        assert data.shape == (x.shape[0], x.shape[1] // 256 * fmt.type_size)
        ours = fmt.dequantize(data, x.shape)
        theirs = gq.dequantize(data, qtype).reshape(x.shape)
        np.testing.assert_array_equal(ours, theirs)
    # arbitrary bytes (finite fp16 multipliers) decode the same way too
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (40, fmt.type_size), dtype=np.uint8)
    n_half = 2 if name == "Q2_K" else 1  # d, dmin / d at the end of the block
    raw[:, -2 * n_half :] = rng.standard_normal((40, n_half)).astype(np.float16).view(np.uint8)
    ours = fmt.dequantize(raw, (40, 256))
    theirs = gq.dequantize(raw, qtype).reshape(40, 256)
    np.testing.assert_array_equal(ours, theirs)


# ------------------------------------------------------------------------ round trip
def test_round_trip_error_is_sane():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((32, 1024)).astype(np.float32)
    err = {}
    for name in FORMATS:
        fmt = get_format(name)
        y = fmt.dequantize(fmt.quantize(x), x.shape)
        assert y.dtype == np.float32 and y.shape == x.shape
        err[name] = float(np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x**2)))
    assert err["Q3_K"] < 0.25, err
    assert err["Q2_K"] < 0.45, err
    assert err["Q3_K"] < 0.8 * err["Q2_K"], err


@pytest.mark.parametrize("name", FORMATS)
def test_special_rows(name):
    fmt = get_format(name)
    x = np.zeros((3, 256), dtype=np.float32)
    x[1] = 1e-9
    x[2, 7] = -3.0
    y = fmt.dequantize(fmt.quantize(x), x.shape)
    np.testing.assert_array_equal(y[0], 0.0)
    assert np.all(np.isfinite(y))
    assert abs(y[2, 7] + 3.0) < 0.05 and np.all(np.delete(y[2], 7) == 0.0)


@pytest.mark.parametrize("name", FORMATS)
def test_tensor_without_a_live_sub_block(name):
    """Every sub-block all-zero or below GROUP_MAX_EPS: nothing to search, all codes zero
    (Q3_K's descent once ran on zero columns and raised)."""
    fmt = get_format(name)
    for x in (np.zeros((2, 256), np.float32), np.full((3, 512), -1e-20, np.float32)):
        for imp in (None, np.ones(x.shape[1], np.float32)):
            y = fmt.dequantize(fmt.quantize(x, imp), x.shape)
            np.testing.assert_array_equal(y, 0.0)


@pytest.mark.parametrize("name", FORMATS)
def test_importance_changes_bytes(name):
    fmt = get_format(name)
    assert fmt.uses_importance
    x = _rows(5, nrows=8, row=256)
    imp = _importance(6, 256)
    plain = fmt.quantize(x)
    weighted = fmt.quantize(x, imp)
    assert plain.shape == weighted.shape
    assert not np.array_equal(plain, weighted)
    # emphasising channels lowers their error
    rng = np.random.default_rng(7)
    g = rng.standard_normal((64, 256)).astype(np.float32)
    imp = np.ones(256, dtype=np.float32)
    imp[:32] = 100.0
    e_plain = fmt.dequantize(fmt.quantize(g), g.shape) - g
    e_w = fmt.dequantize(fmt.quantize(g, imp), g.shape) - g
    assert np.mean(e_w[:, :32] ** 2) < np.mean(e_plain[:, :32] ** 2)


@pytest.mark.parametrize("name", FORMATS)
def test_misfit_shape_is_an_error(name):
    fmt = get_format(name)
    with pytest.raises(FormatError, match=r"(?s)(100.*256|256.*100)"):
        fmt.quantize(np.zeros((4, 100), dtype=np.float32))
    with pytest.raises(FormatError, match=r"(?s)(100.*256|256.*100)"):
        fmt.nbytes((4, 100))
    with pytest.raises(FormatError, match=str(fmt.type_size)):
        fmt.dequantize(np.zeros(fmt.type_size - 1, dtype=np.uint8), (1, 256))
    with pytest.raises(FormatError, match=r"(?s)\(100,\).*256"):
        fmt.quantize(np.zeros((2, 256), dtype=np.float32), np.ones(100, dtype=np.float32))


def test_sizes():
    assert get_format("Q2_K").type_size == 84
    assert get_format("Q3_K").type_size == 110
    assert get_format("Q2_K").nbytes((576, 1536)) == 576 * 6 * 84


# ------------------------------------------------- make_q3_quants vs a scalar C port
def _nearest_int(v) -> int:
    """ggml's nearest_int (magic-number rounding), on one float32."""
    bits = (np.array([v], np.float32) + np.float32(12582912.0)).view(np.int32)[0]
    return int(bits & 0x007FFFFF) - 0x00400000


def _scalar_make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.float32, list[int]]:
    """Line-by-line float32 port of ggml's make_q3_quants(n, nmax, x, L, do_rmse=true)."""
    f = np.float32
    amax, mx = f(0), f(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < f(1e-15):
        return f(0), [0] * len(x)
    iscale = f(-nmax) / mx
    L, sumlx, suml2 = [], f(0), f(0)
    for v in x:
        lv = max(-nmax, min(nmax - 1, _nearest_int(iscale * v)))
        L.append(lv)
        w = v * v
        sumlx = sumlx + w * v * f(lv)
        suml2 = suml2 + w * f(lv) * f(lv)
    for _ in range(5):
        n_changed = 0
        for i, v in enumerate(x):
            w = v * v
            slx = sumlx - w * v * f(L[i])
            if slx > 0:
                sl2 = suml2 - w * f(L[i]) * f(L[i])
                new = max(-nmax, min(nmax - 1, _nearest_int(v * sl2 / slx)))
                if new != L[i]:
                    slx = slx + w * v * f(new)
                    sl2 = sl2 + w * f(new) * f(new)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i], sumlx, suml2 = new, slx, sl2
                        n_changed += 1
        if not n_changed:
            break
    return (sumlx / suml2 if suml2 > 0 else f(0)), [lv + nmax for lv in L]


def test_make_q3_quants_matches_scalar_port():
    from autobits.formats.kquants_low import make_q3_quants

    x = _rows(8, nrows=14, row=64).reshape(-1, 16)
    with np.errstate(all="ignore"):
        scale, L = make_q3_quants(x, 4)
        for r in range(x.shape[0]):
            s_ref, L_ref = _scalar_make_q3_quants(x[r], 4)
            assert scale[r].tobytes() == np.float32(s_ref).tobytes(), r
            assert L[r].tolist() == L_ref, r


@pytest.mark.parametrize("name", FORMATS)
def test_fast_paths_and_chunking_do_not_change_bytes(name, monkeypatch):
    from autobits.formats import ggml, kquants_low

    fmt = get_format(name)
    x = _rows(9, nrows=24, row=512)
    imp = _importance(10, 512)
    want = [fmt.quantize(x), fmt.quantize(x, imp)]
    monkeypatch.setattr(ggml, "FAST_ROUNDING", False)  # always the exact rounding
    monkeypatch.setattr(kquants_low, "_BLOCK_CHUNK", 5)
    monkeypatch.setattr(kquants_low, "_REQ_CHUNK", 3)
    got = [fmt.quantize(x), fmt.quantize(x, imp)]
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)
    # rows are independent and N-D tensors quantize row by row
    np.testing.assert_array_equal(fmt.quantize(x.reshape(4, 6, 512))[1, 2], want[0][8])


# -------------------------------------------------------------------- C oracle (judge)
def _oracle():
    from autobits.formats import oracle

    return oracle.ggml_quantize


def _real_ffn_down() -> list[tuple[str, np.ndarray]]:
    """Real SmolLM2 ffn_down matrices (rows of 1536 = 6 super-blocks): one whole, one slice."""
    import smol_data

    return [
        ("blk.0.ffn_down", smol_data.smol_tensor("blk.0.ffn_down.weight", 576)),
        ("blk.29.ffn_down", smol_data.smol_tensor("blk.29.ffn_down.weight", 192)),
    ]


def _mismatching_blocks(a: np.ndarray, b: np.ndarray, type_size: int) -> int:
    return int(np.any(a.reshape(-1, type_size) != b.reshape(-1, type_size), axis=1).sum())


@pytest.mark.judge
@pytest.mark.needs("oracle")
@pytest.mark.parametrize("with_importance", [False, True])
@pytest.mark.parametrize("name", FORMATS)
def test_bytes_identical_to_llama_cpp(name, with_importance):
    ggml_quantize = _oracle()
    fmt = get_format(name)
    cases = [(f"random-{s}", _rows(s, nrows=48, row=768)) for s in (10, 11)]
    big = _rows(12, nrows=24, row=512)
    big[::3] *= np.float32(1e4)  # large values: fp16 scales near overflow
    big[1::3] *= np.float32(1e-12)  # tiny values: subnormal / zero fp16 scales
    cases.append(("rescaled", big))
    cases.append(("all-zero", np.zeros((4, 512), np.float32)))
    cases.append(("below-eps", np.full((2, 256), 1e-20, np.float32)))
    cases += _real_ffn_down()
    report = []
    for i, (label, x) in enumerate(cases):
        imp = _importance(20 + i, x.shape[1]) if with_importance else None
        ours = fmt.quantize(x, imp)
        ref = np.asarray(ggml_quantize(x, GGML_TYPE[name], imp)).reshape(ours.shape)
        bad = _mismatching_blocks(ours, ref, fmt.type_size)
        if bad:
            report.append(f"{label}: {bad} of {ours.size // fmt.type_size} blocks")
    what = f"{name} (importance={with_importance}) differs from llama.cpp"
    assert not report, what + ": " + "; ".join(report)
