"""The C scale searches (``_kscales_native.c``) against the NumPy ports they replace.

Both are ports of ggml's ``make_qkx2/qkx3_quants`` and ``make_qx_quants``; the NumPy ones
are tested byte for byte against llama.cpp's quantizer elsewhere (and, since the C searches
are the default once built, the oracle tests of the formats run through the C code).  Here
the two implementations must agree bit for bit on awkward sub-blocks, in both layouts, and
every format that uses them must write the same bytes with the C searches on and off.
"""

from __future__ import annotations

import numpy as np
import pytest

from autobits.formats import get_format, kscales

from test_kquants import _awkward, _importance

pytestmark = pytest.mark.needs("native")


def _subblocks(k: int, seed: int) -> np.ndarray:
    """Awkward rows cut into sub-blocks of ``k``, plus all-zero sub-blocks whose zeros
    carry both signs (where only the sign of a zero result can differ, see below)."""
    x = _awkward(64, 512, seed).reshape(-1, k)
    x[:3] = 0.0
    x[1, ::2] = -0.0
    x[2, 0] = -0.0
    return np.ascontiguousarray(x)


def _weights(x: np.ndarray, seed: int) -> np.ndarray:
    w = np.resize(_importance(512, seed), x.size).reshape(x.shape)
    return np.ascontiguousarray(w * np.sqrt(np.float32(0.3) + x * x)).astype(np.float32)


def _both(monkeypatch, fn, *args):
    assert kscales.native_available()
    native = fn(*args)
    monkeypatch.setenv("AUTOBITS_NATIVE_QUANT", "0")
    assert not kscales.native_available()
    numpy = fn(*args)
    monkeypatch.delenv("AUTOBITS_NATIVE_QUANT")
    return native, numpy


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32) if a.dtype == np.float32 else a


@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("search", [
    ("qkx2", 15, -1.0, 0.1, 20, False), ("qkx2", 3, -0.5, 0.1, 15, True),
    ("qkx3", 15, -0.9, 0.05, 36, False), ("qkx3-default", 31, -0.9, 0.05, 36, False),
    ("qkx2", 15, -1.0, 0.1, 0, False),
])
def test_qkx_native_equals_numpy(monkeypatch, layout, search):
    name, nmax, rmin, rdelta, nstep, mad = search
    k = 16 if nmax == 3 else 32
    x = _subblocks(k, 1)
    w = None if name == "qkx3-default" else _weights(x, 2)
    if layout == "rows":
        fn = kscales.make_qkx2_quants if name == "qkx2" else kscales.make_qkx3_quants
        args = (x, w, nmax, rmin, rdelta, nstep, mad)
    else:
        fn = kscales.make_qkx2_quants_t if name == "qkx2" else kscales.make_qkx3_quants_t
        args = (x.T.copy(), None if w is None else w.T.copy(), nmax, rmin, rdelta, nstep, mad)
    (s1, m1, l1), (s2, m2, l2) = _both(monkeypatch, fn, *args)
    np.testing.assert_array_equal(_bits(s1), _bits(s2))
    np.testing.assert_array_equal(l1, l2)
    # the returned -min: equal values; only the sign of a zero may differ, and only for
    # an all-zero sub-block, where C (ggml's arithmetic, min = x[0]) keeps x[0]'s sign
    np.testing.assert_array_equal(m1, m2)
    differ = np.nonzero(_bits(m1) != _bits(m2))[0]
    flat = ~(x.reshape(-1, k) != 0).any(axis=1) if layout == "rows" else ~(x != 0).any(axis=1)
    assert flat[differ].all()


@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("nmax,rmse_type,weighted,k", [
    (8, 1, False, 32), (16, 1, True, 32), (32, 1, True, 16), (4, 1, False, 16),
    (32, 0, False, 16), (4, -1, False, 16), (32, 2, False, 16), (32, 3, False, 16),
    (32, 4, False, 16),
])
def test_qx_native_equals_numpy(monkeypatch, layout, nmax, rmse_type, weighted, k):
    x = _subblocks(k, 3)
    w = _weights(x, 4) if weighted else None
    if layout == "rows":
        args = (kscales.make_qx_quants, x, nmax, rmse_type, w)
    else:
        args = (kscales.make_qx_quants_t, x.T.copy(), nmax, rmse_type,
                None if w is None else w.T.copy())
    (s1, l1), (s2, l2) = _both(monkeypatch, *args)
    np.testing.assert_array_equal(_bits(s1), _bits(s2))
    np.testing.assert_array_equal(l1, l2)


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1",
                                  "Q5_0", "Q5_1", "IQ4_NL"])
@pytest.mark.parametrize("with_importance", [False, True])
def test_format_bytes_do_not_depend_on_the_native_searches(monkeypatch, name, with_importance):
    x = _awkward(24, 512, 5)
    imp = _importance(512, 6) if with_importance else None
    fmt = get_format(name)
    native, numpy = _both(monkeypatch, lambda: fmt.quantize(x, importance=imp))
    np.testing.assert_array_equal(np.asarray(native), np.asarray(numpy))


@pytest.mark.parametrize("with_importance", [False, True])
def test_iq4nl_native_equals_numpy(monkeypatch, with_importance):
    """IQ4_NL's search in C against the NumPy port: scales and codes bit for bit on awkward
    blocks, all-zero ones (both signs), blocks with zero importance (where ggml divides
    0 by 0 and both ports start from d = 0) and a block count that is no multiple of 16."""
    from autobits.formats.iq4nl import quantize_iq4_nl_blocks

    x = _subblocks(32, 7)[:-5]
    imp = None
    if with_importance:
        imp = np.resize(_importance(512, 8), x.size).reshape(x.shape).astype(np.float32)
        imp[3:6] = 0.0
    native = np.empty(x.shape[0], np.float32), np.empty(x.shape, np.int32)
    from autobits.formats import _kscales_native as ext

    ext.iq4nl(x, imp, native[0], native[1], 0)
    d, codes = quantize_iq4_nl_blocks(x, imp)
    np.testing.assert_array_equal(_bits(native[0]), _bits(d))
    np.testing.assert_array_equal(native[1], codes)


def test_bad_buffers_are_refused_with_both_sizes():
    from autobits.formats import _kscales_native as native

    x = np.zeros((4, 32), dtype=np.float32)
    scale, the_min = np.empty(4, np.float32), np.empty(4, np.float32)
    with pytest.raises(ValueError, match=r"levels holds 256 bytes, expected 512"):
        native.qkx(x, None, scale, the_min, np.empty((4, 16), np.int32), 32, 0, 15,
                   -0.9, 0.05, 36, False)
    with pytest.raises(ValueError, match=r"k=0"):
        native.qx(x, None, scale, np.empty((4, 32), np.int32), 0, 0, 8, 1)
    with pytest.raises(ValueError, match=r"weights holds 64 bytes, expected 512"):
        native.qx(x, np.zeros(16, np.float32), scale, np.empty((4, 32), np.int32), 32, 0, 8, 1)
    with pytest.raises(ValueError, match=r"scale holds 8 bytes, expected 16"):
        native.iq4nl(x, None, np.empty(2, np.float32), np.empty((4, 32), np.int32), 0)
