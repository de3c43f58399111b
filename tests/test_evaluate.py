"""Evaluator: KLD/perplexity/top-1 against the reference, caching, restore."""

import math

import numpy as np
import pytest

from autobits.allocation import Allocation
from autobits.evaluate import Evaluator, Metrics
from autobits.text import load_text, make_windows


@pytest.fixture(scope="module")
def stdlib_windows(smol_tokenizer):
    return make_windows(load_text("stdlib"), smol_tokenizer, ctx=64)


@pytest.fixture(scope="module")
def tiny_eval(tiny_lm, stdlib_windows):
    split = stdlib_windows.split(calib=0, eval=3)
    return Evaluator(tiny_lm, split.eval)


def test_reference_against_itself(tiny_lm, tiny_eval):
    m = tiny_eval.evaluate(Allocation.uniform(tiny_lm.name, tiny_lm.specs, "F32"))
    assert m.kld == pytest.approx(0.0, abs=1e-6)
    assert m.top1 == 1.0
    assert m.ppl == pytest.approx(m.ref_ppl, rel=1e-5)
    assert math.isfinite(m.ppl) and m.windows == 3 and m.tokens == 3 * 64


def test_more_bits_less_kld(tiny_lm, tiny_eval):
    klds = {}
    for fmt in ("F16", "Q8_0", "Q4_0", "Q2_K"):
        a = Allocation.uniform(tiny_lm.name, tiny_lm.specs, fmt, fallback=True)
        klds[fmt] = tiny_eval.evaluate(a).kld
    assert klds["F16"] < 1e-4
    assert klds["F16"] < klds["Q8_0"] < klds["Q4_0"]
    # Q2_K falls back to Q4_0 on 64-wide rows; only ffn_down gets Q2_K, so KLD grows further
    assert klds["Q2_K"] > klds["Q4_0"]


def test_cache_reused_and_model_restored(tiny_lm, tiny_eval):
    a = Allocation.uniform(tiny_lm.name, tiny_lm.specs, "Q4_0")
    first = tiny_eval.evaluate(a)
    n = len(tiny_eval.cache)
    again = tiny_eval.evaluate(a)
    assert len(tiny_eval.cache) == n  # nothing re-quantized
    assert again.kld == first.kld and again.ppl == first.ppl
    for s in tiny_lm.specs:
        assert tiny_lm.parameter(s.name).data_ptr() == tiny_lm.reference_weight(s.name).data_ptr()


def test_parallel_windows_match_serial(tiny_lm, stdlib_windows):
    """Windows measured on 2 threads give the metrics of one thread, summed in window order."""
    windows = stdlib_windows.split(calib=0, eval=4).eval
    a = Allocation.uniform(tiny_lm.name, tiny_lm.specs, "Q4_0")
    serial = Evaluator(tiny_lm, windows, workers=1)
    parallel = Evaluator(tiny_lm, windows, workers=2)
    assert parallel.ref_ppl == pytest.approx(serial.ref_ppl, rel=1e-6)
    s, p = serial.evaluate(a), parallel.evaluate(a)
    assert s.kld > 1e-4
    assert p.kld == pytest.approx(s.kld, rel=1e-5) and p.top1 == s.top1
    assert p.ppl == pytest.approx(s.ppl, rel=1e-6)
    # per-window KLDs, in window order whatever the thread count; their mean is the KLD
    assert len(s.window_kld) == 4 and p.window_kld == pytest.approx(s.window_kld, rel=1e-5)
    assert np.mean(s.window_kld) == pytest.approx(s.kld, rel=1e-6)
    assert len(set(s.window_kld)) == 4  # windows differ
    batched = Evaluator(tiny_lm, windows, workers=1, batch_size=3).evaluate(a)
    assert batched.window_kld == pytest.approx(s.window_kld, rel=1e-4)
    with pytest.raises(ValueError, match="workers"):
        Evaluator(tiny_lm, windows, workers=0)


def test_bad_windows(tiny_lm):
    with pytest.raises(ValueError, match="windows"):
        Evaluator(tiny_lm, np.zeros((0, 64), dtype=np.int64))
    with pytest.raises(ValueError, match="score_from"):
        Evaluator(tiny_lm, np.zeros((1, 8), dtype=np.int64), score_from=8)


@pytest.mark.slow
def test_smollm2_f16_vs_lossy(smollm2):
    w = make_windows(load_text("stdlib"), smollm2.tokenizer, ctx=256).split(calib=0, eval=2)
    ev = Evaluator(smollm2, w.eval)
    f16 = ev.evaluate(Allocation.uniform(smollm2.name, smollm2.specs, "F16"))
    q4 = ev.evaluate(Allocation.uniform(smollm2.name, smollm2.specs, "Q4_0"))
    assert f16.kld < 1e-3 and f16.top1 > 0.99
    assert q4.kld > 10 * f16.kld and q4.ppl > f16.ppl
    assert 1 < f16.ref_ppl < 100


def test_metrics_json_round_trip():
    import json

    from autobits.agents.base import metrics_from_json

    m = Metrics(kld=0.02, ppl=10.0, top1=0.9, bytes=100, bpw=4.5, seconds=1.0, tokens=128,
                windows=2, ref_ppl=9.5, window_kld=(0.01, 0.03))
    d = json.loads(json.dumps(m.to_json()))
    assert d["window_kld"] == [0.01, 0.03]
    assert metrics_from_json(d) == m and hash(metrics_from_json(d)) == hash(m)
    old = {k: v for k, v in d.items() if k != "window_kld"}  # written before they were kept
    assert metrics_from_json(old).window_kld == ()


def test_incumbent_prefix_reuse_gives_the_full_pass_metrics(tiny_lm):
    """After set_incumbent, an allocation that differs from block 1 on skips block 0 (its
    output is the incumbent's) and measures exactly what a full pass measures."""
    w = make_windows(load_text("stdlib"), tiny_lm.tokenizer, ctx=48).split(calib=0, eval=3)
    full = Evaluator(tiny_lm, w.eval, workers=2)
    reuse = Evaluator(tiny_lm, w.eval, workers=2, cache=full.cache)
    base = Allocation.uniform(tiny_lm.name, tiny_lm.specs, "Q8_0")
    deep = dict(base.tensors)
    for name in deep:
        if name.startswith("blk.1."):
            deep[name] = "Q4_0"
    embd = dict(base.tensors, **{"token_embd.weight": "Q4_0"})
    inc = reuse.set_incumbent(base)
    assert inc.window_kld == full.evaluate(base).window_kld
    for tensors, first in ((deep, 1), (embd, 0), (dict(base.tensors), 2)):
        alloc = Allocation.build(tiny_lm.name, tiny_lm.specs, tensors)
        assert reuse.first_changed_block(alloc.tensors) == first
        a, b = full.evaluate(alloc), reuse.evaluate(alloc)
        assert b.window_kld == pytest.approx(a.window_kld, rel=1e-6, abs=1e-9)
        assert (b.ppl, b.top1) == pytest.approx((a.ppl, a.top1), rel=1e-6)
    assert reuse.blocks_reused == 3 * (1 + 0 + 2)
    assert not any("forward" in vars(b) for b in tiny_lm.model.model.layers)  # nothing stays
    reuse.set_incumbent(None)
    assert reuse.first_changed_block(deep) == 0
