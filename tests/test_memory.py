"""Memory that scales with the model: the weight cache keeps quantized bytes, the calibration
accumulators keep half a matrix, and the preflight refuses a run that would not fit."""

import numpy as np
import pytest

from autobits.allocation import Allocation
from autobits.errors import AutobitsError, MemoryBudgetError
from autobits.evaluate import Evaluator, WeightCache
from autobits.formats import get_format
from autobits.memory import (
    MemoryEstimate, available_bytes, check_memory, estimate_peak_bytes, peak_rss_bytes,
    rss_bytes,
)  # fmt: skip
from autobits.text import load_text, make_windows


# ------------------------------------------------------------------ weight cache
def test_cache_keeps_quantized_bytes_and_dequantizes_bit_for_bit(tiny_lm):
    name = "blk.0.ffn_down.weight"
    cache = WeightCache(tiny_lm, budget_bytes=0)
    ref = tiny_lm.reference_weight(name).numpy()
    for fmt in ("Q4_K", "Q8_0", "F16", "Q2_K"):
        f = get_format(fmt)
        want = f.dequantize(f.quantize(ref), ref.shape)
        got = cache.get(name, fmt)
        np.testing.assert_array_equal(got.numpy(), want)
        # a second get misses the (empty) dequantized cache and dequantizes the kept bytes
        np.testing.assert_array_equal(cache.get(name, fmt).numpy(), want)
        assert cache.has(name, fmt) == (fmt != "F16")  # a float format is a cast: not kept
    assert cache.dequantized_bytes == 0
    # F16 is cast again from the reference on each miss, the others are dequantized
    assert len(cache) == 3 and cache.quantized == 5 and cache.misses == 8
    # bytes kept: exactly the formats' sizes, far below three float32 copies
    sizes = sum(tiny_lm.spec(name).nbytes(f) for f in ("Q4_K", "Q8_0", "Q2_K"))
    assert cache.packed_bytes == sizes < 3 * ref.nbytes


def test_cache_budget_bounds_the_dequantized_copies(tiny_lm):
    specs = [s for s in tiny_lm.quantizable if s.role != "token_embd"]
    one = max(s.numel for s in specs) * 4
    cache = WeightCache(tiny_lm, budget_bytes=3 * one)
    for s in specs:
        cache.get(s.name, "Q4_0")
    assert 0 < cache.dequantized_bytes <= 3 * one
    last = cache.get(specs[-1].name, "Q4_0")
    assert cache.get(specs[-1].name, "Q4_0") is last  # most recent: a hit
    misses = cache.misses
    cache.get(specs[0].name, "Q4_0")  # least recent: evicted long ago, dequantized again
    assert cache.misses == misses + 1
    with pytest.raises(ValueError, match="budget_bytes"):
        WeightCache(tiny_lm, budget_bytes=-1)


def test_cache_keeps_part_of_a_repeated_pass(tiny_lm):
    """A budget below the model still serves part of each repeated evaluation (a plain LRU
    would evict every entry just before the pass asks for it again)."""
    specs = [s for s in tiny_lm.quantizable if s.role != "token_embd"]
    total = sum(s.numel * 4 for s in specs)
    cache = WeightCache(tiny_lm, budget_bytes=total // 2)
    for _ in range(3):
        cache.new_pass()
        before = cache.misses
        for s in specs:
            cache.get(s.name, "Q4_0")
        misses = cache.misses - before
    assert 0 < misses < len(specs)  # the third pass: some hits, some misses
    assert cache.dequantized_bytes <= total // 2
    # a new allocation: the entries of the old passes make room for it
    cache.new_pass()
    for s in specs:
        cache.get(s.name, "Q8_0")
    assert all(k[1] == "Q8_0" for k in cache._deq)


def test_metrics_do_not_depend_on_the_cache_budget(tiny_lm, smol_tokenizer):
    windows = make_windows(load_text("stdlib"), smol_tokenizer, ctx=64).split(calib=0, eval=2).eval
    a = Allocation.uniform(tiny_lm.name, tiny_lm.specs, "Q4_0")
    b = Allocation.uniform(tiny_lm.name, tiny_lm.specs, "Q8_0")
    big = Evaluator(tiny_lm, windows, cache=WeightCache(tiny_lm))
    none = Evaluator(tiny_lm, windows, cache=WeightCache(tiny_lm, budget_bytes=0))
    for alloc in (a, b, a):
        m1, m2 = big.evaluate(alloc), none.evaluate(alloc)
        assert (m1.kld, m1.ppl, m1.top1) == (m2.kld, m2.ppl, m2.top1)
    assert none.cache.dequantized_bytes == 0 and big.cache.dequantized_bytes > 0


def test_prefilled_cache_uses_the_given_bytes(tiny_lm):
    name = "blk.1.attn_q.weight"
    src = WeightCache(tiny_lm)
    data = src.quantize(name, "Q5_0")
    data.setflags(write=False)  # as the object store hands them out
    dst = WeightCache(tiny_lm, packed={(name, "q5_0"): data}, budget_bytes=0)
    assert dst.has(name, "Q5_0") and dst.quantized == 0
    np.testing.assert_array_equal(dst.get(name, "Q5_0").numpy(), src.get(name, "Q5_0").numpy())
    assert dst.quantized == 0


# ------------------------------------------------------------------ calibration
def test_strip_accumulator_matches_the_full_matrix_bit_for_bit():
    """The upper-triangle strips give the H the full (d x d) float64 sum gave, bit for bit."""
    import torch

    from autobits.calibrate import _H_STRIP, _SiteAcc

    gen = torch.Generator().manual_seed(0)
    d = 2 * _H_STRIP + 37
    xs = [torch.randn(50, d, generator=gen) * (1 + torch.arange(d) / d) for _ in range(3)]
    a, b = _SiteAcc(d), _SiteAcc(d)
    a.add(xs[0])
    a.add(xs[1])
    b.add(xs[2])
    a.merge(b)
    got = a.finish().h
    # the former layout: one full float64 matrix, upper strips summed, then mirrored
    full = torch.zeros(d, d, dtype=torch.float64)
    for x in xs[:2]:
        for i in range(0, d, _H_STRIP):
            full[i : i + _H_STRIP, i:] += x[:, i : i + _H_STRIP].T @ x[:, i:]
    other = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, d, _H_STRIP):
        other[i : i + _H_STRIP, i:] += xs[2][:, i : i + _H_STRIP].T @ xs[2][:, i:]
    full += other
    h = full / 150
    for i in range(0, d, _H_STRIP):
        blk = h[i : i + _H_STRIP, i : i + _H_STRIP]
        blk.copy_((blk + blk.T) * 0.5)
        h[i + _H_STRIP :, i : i + _H_STRIP] = h[i : i + _H_STRIP, i + _H_STRIP :].T
    np.testing.assert_array_equal(got, h.float().numpy())
    assert _SiteAcc.nbytes(d) < 0.6 * 8 * d * d + 8 * 4 * d + 8 * _H_STRIP * d


# ------------------------------------------------------------------ measuring
def test_peak_rss_follows_an_allocation():
    before = peak_rss_bytes()
    assert 0 < rss_bytes() <= before
    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched
    assert peak_rss_bytes() >= before
    assert peak_rss_bytes() >= rss_bytes() >= 64 << 20
    del block
    avail = available_bytes()
    assert avail is None or avail > 0


def test_peak_rss_without_proc(monkeypatch):
    import autobits.memory as memory

    monkeypatch.setattr(memory, "_status_kb", lambda key: None)
    assert memory.peak_rss_bytes() > 10 << 20  # getrusage's maxrss, in bytes
    assert memory.rss_bytes() == memory.peak_rss_bytes()


# ------------------------------------------------------------------ preflight
SHAPES = {  # numpy order (rows, row length), a 2-block llama-like model
    "token_embd.weight": (1000, 256), "output_norm.weight": (256,),
    **{f"blk.{b}.{r}.weight": s for b in range(2) for r, s in (
        ("attn_q", (256, 256)), ("attn_k", (64, 256)), ("attn_v", (64, 256)),
        ("attn_output", (256, 256)), ("ffn_gate", (512, 256)), ("ffn_up", (512, 256)),
        ("ffn_down", (256, 512)), ("attn_norm", (256,)), ("ffn_norm", (256,)))},
}  # fmt: skip


def test_estimate_counts_the_parts():
    numel = sum(int(np.prod(s)) for s in SHAPES.values())
    e = estimate_peak_bytes(shapes=SHAPES, formats=("Q8_0", "Q4_K"), cache_bytes=0, ctx=64)
    assert e.model == 4 * numel
    # Q8_0 fits every matrix, Q4_K only rows of 256 or 512 (all of them here)
    q = sum(get_format(f).nbytes(s) for s in SHAPES.values() if len(s) == 2
            for f in ("Q8_0", "Q4_K"))
    assert e.candidates == q
    # a float format is not kept by the weight cache: no candidate bytes for it
    f16 = estimate_peak_bytes(shapes=SHAPES, formats=("Q8_0", "Q4_K", "F16"), cache_bytes=0, ctx=64)
    assert f16.candidates == e.candidates
    assert e.references == 4 * 8 * (64 - 32 - 1) * 1000
    more = estimate_peak_bytes(shapes=SHAPES, formats=("Q8_0", "Q4_K", "Q2_K"),
                               cache_bytes=1 << 30, ctx=64)
    assert more.candidates > e.candidates and more.total > e.total
    assert more.cache - e.cache == 1 << 30
    assert isinstance(e, MemoryEstimate) and e.total == (
        e.runtime + e.model + e.statistics
        + max(e.accumulators + e.activations, e.candidates + e.references + e.cache))
    two = estimate_peak_bytes(shapes=SHAPES, formats=("Q8_0", "Q4_K"), cache_bytes=0, ctx=64,
                              calib_workers=2)
    gated = estimate_peak_bytes(shapes=SHAPES, formats=("Q8_0", "Q4_K"), cache_bytes=0, ctx=64,
                                calib_workers=2, fisher_threads=1)
    assert two.accumulators == 2 * e.accumulators == gated.accumulators
    assert two.activations == 2 * e.activations == 2 * gated.activations


def test_preflight_refuses_with_estimate_available_and_option():
    e = estimate_peak_bytes(shapes=SHAPES, formats=("Q8_0",), cache_bytes=0)
    with pytest.raises(MemoryBudgetError) as err:
        check_memory(e, available=10 << 20, what="search smollm2-135m",
                     lower_by="--cache-gb 0 or fewer formats")
    msg = str(err.value)
    assert isinstance(err.value, AutobitsError) and "\n" not in msg
    assert "search smollm2-135m" in msg and "10.49 MB available" in msg
    assert "--cache-gb 0 or fewer formats" in msg
    assert f"{e.total / 1e9:.2f} GB" in msg or f"{e.total / 1e6:.2f} MB" in msg
    check_memory(e, available=e.total)  # fits exactly: no error
    check_memory(123, available=None if available_bytes() is None else 1 << 50)


def test_estimate_of_a_loaded_model(tiny_lm):
    shapes = {s.name: s.shape for s in tiny_lm.specs}
    e = estimate_peak_bytes(shapes=shapes, formats=("Q4_0", "Q8_0"), cache_bytes=0)
    cache = WeightCache(tiny_lm, budget_bytes=0)
    for s in tiny_lm.quantizable:
        for f in s.valid_formats(("Q4_0", "Q8_0")):
            cache.quantize(s.name, f)
    assert e.candidates == cache.packed_bytes
    assert e.model == 4 * tiny_lm.n_params


def test_one_fisher_window_at_a_time_same_statistics(tiny_lm, smol_tokenizer):
    from autobits.calibrate import CalibrationError, calibrate

    w = make_windows(load_text("stdlib"), smol_tokenizer, ctx=64).split(calib=4, eval=0).calib
    free = calibrate(tiny_lm, w, fisher_windows=2, workers=2, progress=False, fisher_threads=2)
    gated = calibrate(tiny_lm, w, fisher_windows=2, workers=2, progress=False, fisher_threads=1)
    for site, st in free.sites.items():
        np.testing.assert_array_equal(gated.sites[site].h, st.h)
        np.testing.assert_array_equal(gated.sites[site].sq_mean, st.sq_mean)
    np.testing.assert_array_equal(gated.head_gain, free.head_gain)
    for k, g in free.gains.items():
        np.testing.assert_array_equal(gated.gains[k], g)
    with pytest.raises(CalibrationError, match="fisher_threads"):
        calibrate(tiny_lm, w, fisher_windows=2, progress=False, fisher_threads=0)


def test_fisher_windows_run_side_by_side_within_the_budget():
    """Calibration runs as many Fisher windows at once as FISHER_PARALLEL_BYTES holds beyond
    the first: two of SmolLM2's on two workers, one of Gemma-3-270M's (its vocabulary's
    buffers), never more than the workers; the peak estimate counts the same number."""
    from autobits.memory import (FISHER_PARALLEL_BYTES, fisher_concurrency,
                                 fisher_window_bytes)

    smol = fisher_window_bytes(vocab=49152, hidden=576, n_blocks=30, ctx=512)
    gemma = fisher_window_bytes(vocab=262144, hidden=640, n_blocks=18, ctx=512)
    assert smol < FISHER_PARALLEL_BYTES < gemma
    assert fisher_concurrency(smol, 2) == 2 and fisher_concurrency(smol, 1) == 1
    assert fisher_concurrency(gemma, 2) == 1
    assert fisher_concurrency(FISHER_PARALLEL_BYTES // 3, 8) == 4
    shapes = {"token_embd.weight": (49152, 576), "blk.0.attn_q.weight": (576, 576)}
    one = estimate_peak_bytes(shapes=shapes, formats=["Q8_0"], cache_bytes=0, calib_workers=2,
                              fisher_threads=1)
    default = estimate_peak_bytes(shapes=shapes, formats=["Q8_0"], cache_bytes=0,
                                  calib_workers=2)
    assert default.activations == 2 * one.activations


def test_allocator_settings_are_harmless():
    from autobits.memory import configure_allocator, release_free_memory

    first = configure_allocator()
    assert configure_allocator() == first  # idempotent
    block = np.ones(32 << 20, dtype=np.uint8)
    del block
    release_free_memory()
    assert rss_bytes() > 0
