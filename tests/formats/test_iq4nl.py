"""IQ4_NL: grid search, layout against gguf-py, bytes against llama.cpp with and without imatrix."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from smol_data import SMOL_TENSORS, golden_input, smol_importance, smol_weights, synthetic_rows

from autobits.formats import get_format
from autobits.formats.iq4nl import KVALUES_IQ4NL, best_index_iq4nl
from autobits.formats.oracle import ggml_quantize

GOLDEN = {
    "none": "8eb67353f99db643fa096351c682f8c76ff9f668d63bc7fe305d652e91e48fc2",
    "imp": "f4b1f953508404da6f954f3c0db80c2c3e93618ebc852f6f781c31bbc3473b66",
}

needs_oracle = pytest.mark.needs("oracle")


def _best_index_reference(v: float) -> int:
    """ggml's best_index_int8 (binary search version) transcribed literally."""
    val = [np.float32(k) for k in KVALUES_IQ4NL]
    x = np.float32(v)
    if x <= val[0]:
        return 0
    if x >= val[15]:
        return 15
    ml, mu = 0, 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < val[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if np.float32(x - val[mu - 1]) < np.float32(val[mu] - x) else mu


def test_best_index_matches_ggml_search():
    rng = np.random.default_rng(0)
    mids = (KVALUES_IQ4NL[:-1].astype(np.float32) + KVALUES_IQ4NL[1:]) / 2
    v = np.concatenate([
        rng.uniform(-140, 130, 3000).astype(np.float32),
        KVALUES_IQ4NL.astype(np.float32),
        mids,
        np.nextafter(mids, np.float32(-200)),
        np.nextafter(mids, np.float32(200)),
        np.array([-1e30, 1e30, 0.0, -0.0, -127.0, 113.0, 113.5, -127.5], dtype=np.float32),
    ]).astype(np.float32)
    ours = best_index_iq4nl(v)
    assert ours.dtype == np.uint8
    assert ours.tolist() == [_best_index_reference(float(a)) for a in v]


def _best_index_search(v: np.ndarray) -> np.ndarray:
    """:func:`_best_index_reference` vectorised: ``mu`` from a search of the grid, then the
    float32 comparison of the distances to its two neighbours."""
    val = KVALUES_IQ4NL.astype(np.float32)
    mu = np.clip(np.searchsorted(val, v, side="right"), 1, 15)
    lower = (v - val[mu - 1]) < (val[mu] - v)
    return (mu - lower).astype(np.uint8)


def test_best_index_lookup_equals_search_near_every_decision():
    """The lookup by ``floor(2 v)`` against the search on every float32 value close to each
    decision point (the neighbours' midpoints and the grid values), and a wide sweep."""
    val = KVALUES_IQ4NL.astype(np.float32)
    points = np.concatenate([(val[:-1] + val[1:]) / np.float32(2), val])
    span = 1 << 14  # float32 values on each side of every point, all of them
    near = [(np.asarray(p, np.float32).view(np.int32) + np.arange(-span, span + 1, dtype=np.int32))
            .view(np.float32) for p in points]
    tiny = np.arange(span, dtype=np.int32).view(np.float32)  # zero and the smallest values
    near += [tiny, -tiny]
    rng = np.random.default_rng(4)
    v = np.concatenate(near + [
        rng.uniform(-300, 300, 200_000).astype(np.float32),
        np.array([-np.inf, np.inf, -3e38, 3e38, 1e-45, -1e-45, -0.0], dtype=np.float32),
    ])
    assert np.array_equal(best_index_iq4nl(v), _best_index_search(v))


def test_dequantize_equals_gguf():
    import gguf
    from gguf.quants import dequantize

    fmt = get_format("IQ4_NL")
    x = synthetic_rows(1, 13, 128)
    data = fmt.quantize(x)
    ours = fmt.dequantize(data, x.shape)
    assert np.array_equal(ours, dequantize(data, gguf.GGMLQuantizationType.IQ4_NL).reshape(x.shape))
    raw = np.random.default_rng(2).integers(0, 256, (20, 18), dtype=np.uint8)
    raw[:, :2] = (np.random.default_rng(3).standard_normal((20, 1)) * 0.01).astype("<f2").view(np.uint8)
    theirs = dequantize(raw, gguf.GGMLQuantizationType.IQ4_NL).reshape(20, 32)
    assert np.array_equal(fmt.dequantize(raw, (20, 32)), theirs)


def test_layout_and_error():
    fmt = get_format("IQ4_NL")
    assert (fmt.block_size, fmt.type_size, fmt.ggml_type, fmt.uses_importance) == (32, 18, 20, True)
    x = smol_weights("blk.0.attn_q.weight", 16)
    q = fmt.quantize(x)
    assert q.shape == (16, 576 // 32 * 18)
    err = np.mean((fmt.dequantize(q, x.shape) - x) ** 2) / np.mean(x**2)
    q40 = get_format("Q4_0")
    err_q40 = np.mean((q40.dequantize(q40.quantize(x), x.shape) - x) ** 2) / np.mean(x**2)
    assert err < err_q40  # same 4.5 bits per weight, better grid and search


def test_importance_changes_bytes_and_lowers_weighted_error():
    fmt = get_format("IQ4_NL")
    x = smol_weights("blk.3.attn_k.weight", 32)
    imp = smol_importance(x.shape[1], seed=3)
    plain, aware = fmt.quantize(x), fmt.quantize(x, imp)
    assert not np.array_equal(plain, aware)

    def werr(q):
        return float(np.sum(imp * (fmt.dequantize(q, x.shape) - x) ** 2))

    assert werr(aware) < werr(plain)


def test_golden_bytes():
    x, imp = golden_input()
    fmt = get_format("IQ4_NL")
    assert hashlib.sha256(fmt.quantize(x).tobytes()).hexdigest() == GOLDEN["none"]
    assert hashlib.sha256(fmt.quantize(x, imp).tobytes()).hexdigest() == GOLDEN["imp"]


@pytest.mark.judge
@needs_oracle
@pytest.mark.parametrize("with_importance", [False, True])
def test_equals_llama_cpp_random(with_importance):
    fmt = get_format("IQ4_NL")
    for seed in (0, 1):
        x = synthetic_rows(seed, nrows=26, row=256)
        x[6, :32] = -0.0
        imp = smol_importance(256, seed) if with_importance else None
        assert np.array_equal(fmt.quantize(x, imp), ggml_quantize(x, fmt.ggml_type, imp)), seed


@pytest.mark.judge
@needs_oracle
@pytest.mark.parametrize("tensor,rows", SMOL_TENSORS)
def test_equals_llama_cpp_smollm2(tensor, rows):
    fmt = get_format("IQ4_NL")
    x = smol_weights(tensor, rows, dither=True)
    imp = smol_importance(x.shape[1], seed=5)
    assert np.array_equal(fmt.quantize(x), ggml_quantize(x, fmt.ggml_type))
    assert np.array_equal(fmt.quantize(x, imp), ggml_quantize(x, fmt.ggml_type, imp))
