"""The cost model on paper (bench/cost_model.py): shape tables, FLOP and memory terms, the
rate fit and the extrapolation arithmetic, on hand-made measurements (no model is loaded)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not installed

from bench import cost_model as cm  # noqa: E402

TINY = cm.ModelShape("tiny", layers=2, hidden=256, ffn=512, heads=4, kv_heads=2, head_dim=64,
                     vocab=1000, tied=True)
SMALL = cm.ModelShape("small", layers=4, hidden=512, ffn=1024, heads=8, kv_heads=2,
                      head_dim=64, vocab=2000, tied=False)

#: Rates the hand-made measurements are generated from (seconds per unit, one core).
TRUE = dict(fwd=1e-10, fisher=2.5, evalf=2e-10, held=3e-10, h=5e-11, proxy=4e-11, chol=2e-10,
            deq=1e-8, quant={"Q8_0": 4e-8, "Q4_K": 5e-7, "F16": 2e-8})


def _entry(sh: cm.ModelShape) -> dict:
    """Measurements of ``sh`` as they would read if every cost followed :data:`TRUE`."""
    r = TRUE
    quantizable = sum(math.prod(s) for s in sh.tensor_shapes().values() if len(s) == 2)
    deq_all = r["deq"] * quantizable
    reward = cm.REWARD_WINDOWS * (sh.body_flops(cm.REWARD_CTX)
                                  + sh.head_flops(cm.scored_tokens(cm.REWARD_CTX)))
    window = sh.body_flops(cm.CTX) + sh.head_flops(cm.scored_tokens(cm.CTX))
    rows_d = sorted(set(sh.block_shapes().values()))
    return {
        "shape": vars(sh) | {}, "params": sh.params,
        "forward": {"tokens": cm.CTX, "threads1_s": r["fwd"] * sh.body_flops(cm.CTX),
                    "threads2_s": 0.6 * r["fwd"] * sh.body_flops(cm.CTX)},
        "fisher": {"tokens": cm.CTX, "seconds": r["fisher"] * r["fwd"]
                   * (sh.body_flops(cm.CTX) + sh.head_flops(cm.CTX))},
        "h_accumulate": {str(d): r["h"] * cm.CTX * cm.h_macs_per_token(d)
                         for d in set(sh.site_widths())},
        "quantize": {f: {"quantize_s": (q - r["deq"]) * 1e6, "dequantize_s": r["deq"] * 1e6,
                         "elements": 10**6} for f, q in r["quant"].items()},
        "proxy": [{"rows": rr, "d": d, "proxy_s": r["proxy"] * cm.proxy_macs(rr, d),
                   "factor_s": r["chol"] * cm.cholesky_flops(d)} for rr, d in rows_d],
        "evaluate": {"quantizable_elems": quantizable, "dequantize_all_s": deq_all,
                     "reward_s": deq_all + r["evalf"] * reward,
                     "heldout_window_s": deq_all + r["held"] * window},
    }


def _models() -> dict:
    return {"tiny": _entry(TINY), "small": _entry(SMALL)}


# ------------------------------------------------------------------ shapes
def test_llama_shape_tables_give_the_published_parameter_counts():
    assert cm.LLAMA_8B.params == 8_030_261_248
    assert cm.LLAMA_70B.params == 70_553_706_496
    shapes = cm.LLAMA_8B.tensor_shapes()
    assert shapes["blk.0.attn_k.weight"] == (1024, 4096)
    assert shapes["blk.31.ffn_down.weight"] == (4096, 14336)
    assert shapes["output.weight"] == (128256, 4096)
    assert "output.weight" not in TINY.tensor_shapes()  # tied: the head is the embedding


def test_site_widths_follow_the_calibration_sites():
    # per block attn_in, attn_output_in (heads x head_dim), ffn_in, ffn_down_in; then the head
    assert TINY.site_widths() == [256, 256, 256, 512] * 2 + [256]
    g = cm.ModelShape("g", layers=1, hidden=640, ffn=2048, heads=4, kv_heads=1, head_dim=256,
                      vocab=10, tied=True)
    assert g.site_widths() == [640, 1024, 640, 2048, 640]


def test_flops_terms():
    bp = 256 * 256 * 2 + 128 * 256 * 2 + 512 * 256 * 3
    assert TINY.block_params == bp
    attention = 4 * 2 * 4 * 64 * 100**2 * cm.ATTENTION_CAUSAL_FRACTION
    assert TINY.body_flops(100) == pytest.approx(2 * 2 * bp * 100 + attention)
    assert TINY.head_flops(10) == 2 * 1000 * 256 * 10
    assert cm.scored_tokens(512) == 255 and cm.scored_tokens(256) == 127


def test_kernel_counts():
    # one 128-row strip of 128 columns; then strips of 128x256 and 128x128
    assert cm.h_macs_per_token(128) == 128 * 128
    assert cm.h_macs_per_token(256) == 128 * 256 + 128 * 128
    k = __import__("autobits.proxy", fromlist=["FACTOR_BLOCKS"]).FACTOR_BLOCKS
    assert cm.proxy_macs(10, 600) == pytest.approx(10 * 600**2 * (k + 1) / (2 * k))
    assert cm.cholesky_flops(30) == pytest.approx(9000)


def test_shape_of_loaded_checks_the_table_against_the_model():
    specs = [SimpleNamespace(name=n, shape=s, role=n.split(".")[-2])
             for n, s in TINY.tensor_shapes().items() if len(s) == 2]
    cfg = SimpleNamespace(num_attention_heads=4, num_hidden_layers=2, hidden_size=256,
                          intermediate_size=512, num_key_value_heads=2, head_dim=64)
    emb = SimpleNamespace(weight=SimpleNamespace(shape=(1000, 256)))
    lm = SimpleNamespace(name="tiny", quantizable=specs, model=SimpleNamespace(
        config=cfg, get_input_embeddings=lambda: emb))
    assert cm.shape_of_loaded(lm) == TINY
    cfg.intermediate_size = 500  # the table no longer matches the tensors
    with pytest.raises(RuntimeError, match="differs"):
        cm.shape_of_loaded(lm)


# ------------------------------------------------------------------ schedule
def test_makespan_longest_first_largest_item_and_gate():
    assert cm.makespan([5, 4, 3], 2) == 7
    assert cm.makespan([10, 1, 1], 100) == 10  # never faster than the largest item
    assert cm.makespan([1] * 300, 128) == 3
    items, gated = [3] * 4 + [1] * 4, [True] * 4 + [False] * 4
    assert cm.makespan(items, 8) == 3
    assert cm.makespan(items, 8, gate=1, gated=gated) == 12  # Fisher windows one at a time
    assert cm.makespan(items, 8, gate=2, gated=gated) == 6
    with pytest.raises(ValueError):
        cm.makespan([1], 0)


# ------------------------------------------------------------------ rates
def test_fit_rates_recovers_the_rates_the_measurements_were_made_from():
    r = cm.fit_rates(_models())
    assert r.forward_s_per_flop == pytest.approx(TRUE["fwd"])
    assert r.fisher_factor == pytest.approx(TRUE["fisher"])
    assert r.eval_s_per_flop == pytest.approx(TRUE["evalf"])
    assert r.heldout_s_per_flop == pytest.approx(TRUE["held"])
    assert r.h_s_per_mac == pytest.approx(TRUE["h"])
    assert r.proxy_s_per_mac == pytest.approx(TRUE["proxy"])
    assert r.cholesky_s_per_flop == pytest.approx(TRUE["chol"])
    assert r.dequantize_s_per_elem == pytest.approx(TRUE["deq"])
    assert r.quantize_s_per_elem == pytest.approx(TRUE["quant"])
    assert r.sources["forward"].startswith("small")  # the largest measured model


def test_fit_rates_takes_forward_from_the_largest_model():
    models = _models()
    models["small"]["forward"]["threads1_s"] *= 2
    assert cm.fit_rates(models).forward_s_per_flop == pytest.approx(2 * TRUE["fwd"])
    with pytest.raises(ValueError):
        cm.fit_rates({})


def test_predicted_units_of_a_measured_model_equal_its_measurements():
    models = _models()
    rates = cm.fit_rates(models)
    rows = cm.unit_check_rows(models, rates)
    assert len(rows) == 8 and all(row[-1] == "1.00" for row in rows), rows


# ------------------------------------------------------------------ extrapolation
def _rates(**over) -> cm.Rates:
    base = dict(forward_s_per_flop=1e-10, fisher_factor=3.0, eval_s_per_flop=1e-10,
                heldout_s_per_flop=1e-10, h_s_per_mac=1e-10, proxy_s_per_mac=1e-10,
                cholesky_s_per_flop=1e-10, quantize_s_per_elem={"Q8_0": 1e-7, "Q4_K": 1e-6},
                dequantize_s_per_elem=1e-8, sources={})
    return cm.Rates(**(base | over))


def test_stage_times_arithmetic():
    r = _rates()
    w = cm.window_costs(SMALL, r)
    h = sum(cm.CTX * cm.h_macs_per_token(d) for d in SMALL.site_widths()) * 1e-10
    assert w["h"] == pytest.approx(h)
    assert w["plain"] == pytest.approx(SMALL.body_flops(cm.CTX) * 1e-10 + h)
    assert w["fisher"] == pytest.approx(
        3 * (SMALL.body_flops(cm.CTX) + SMALL.head_flops(cm.CTX)) * 1e-10 + h)
    t1 = cm.predict_times(SMALL, r, cores=8, fisher_parallel=1, formats=("Q8_0", "Q4_K"))
    t16 = cm.predict_times(SMALL, r, cores=128, fisher_parallel=16, formats=("Q8_0", "Q4_K"))
    assert t1.search == pytest.approx(math.ceil(cm.SEARCH_EVALS / 8) * w["evaluation"])
    assert t16.search == pytest.approx(math.ceil(cm.SEARCH_EVALS / 128) * w["evaluation"])
    # one Fisher window at a time on one node; on 16 nodes the largest item bounds it
    assert t1.calibration == pytest.approx(cm.FISHER_WINDOWS * w["fisher"])
    assert t16.calibration == pytest.approx(w["fisher"])
    costs = cm.candidate_items(SMALL, r, ("Q8_0", "Q4_K"))
    assert t16.candidates == pytest.approx(max(costs))
    assert t1.candidates >= sum(costs) / 8
    assert t1.total > t16.total


def test_tensor_costs_count_formats_that_fit():
    r = _rates(proxy_s_per_mac=0.0, cholesky_s_per_flop=0.0, dequantize_s_per_elem=0.0)
    odd = cm.ModelShape("odd", layers=1, hidden=576, ffn=1536, heads=9, kv_heads=3,
                        head_dim=64, vocab=100, tied=True)
    costs = cm.tensor_costs(odd, r, ("Q8_0", "Q4_K"))
    # rows of 576 take Q8_0 only (576 is not a multiple of 256); ffn_down's 1536 both
    assert costs["blk.0.attn_q.weight"] == pytest.approx(576 * 576 * 1e-7)
    assert costs["blk.0.ffn_down.weight"] == pytest.approx(576 * 1536 * (1e-7 + 1e-6))
    # items: one per input site (q/k/v together, gate/up together) and the embedding
    items = cm.candidate_items(odd, r, ("Q8_0", "Q4_K"))
    assert len(items) == 5 and sum(items) == pytest.approx(sum(costs.values()))
    ffn_in = costs["blk.0.ffn_gate.weight"] + costs["blk.0.ffn_up.weight"]
    assert any(x == pytest.approx(ffn_in) for x in items), (items, ffn_in)
    chol = cm.candidate_items(odd, _rates(quantize_s_per_elem={"Q8_0": 0.0}, proxy_s_per_mac=0.0,
                                          dequantize_s_per_elem=0.0), ("Q8_0",))
    assert sorted(chol) == pytest.approx(sorted(
        [1e-10 * cm.cholesky_flops(d) for d in (576, 576, 576, 1536, 576)]))


def test_memory_per_node_shards_but_never_below_the_largest_item():
    from autobits.calibrate import accumulator_bytes

    m1, m4 = cm.predict_memory(cm.LLAMA_8B, 1), cm.predict_memory(cm.LLAMA_8B, 4)
    total = sum(accumulator_bytes(d) for d in cm.LLAMA_8B.site_widths())
    assert m1.accumulators == total
    assert m4.accumulators == math.ceil(total / 4)
    huge = cm.predict_memory(cm.LLAMA_8B, 10**6)
    assert huge.accumulators == accumulator_bytes(14336)  # one ffn_down site
    assert huge.statistics == 4 * 14336**2
    assert m1.weights == 4 * cm.LLAMA_8B.params
    est = cm.single_process_estimate(cm.LLAMA_8B)
    assert m1.candidates == est.candidates
    assert m1.search == est.model * (1 + cm.CORES_PER_NODE) + est.candidates + est.references


def test_calibration_workers_follow_calibrate_rule():
    acc = lambda d: d * d  # noqa: E731
    one = sum(acc(d) for d in TINY.site_widths())
    assert cm.calibration_workers(TINY, 8, 100 * one, acc) == 8
    assert cm.calibration_workers(TINY, 8, 3 * one, acc) == 3
    assert cm.calibration_workers(TINY, 8, one // 2, acc) == 1
    assert cm.calibration_workers(TINY, 64, 100 * one, acc) == cm.CALIB_WINDOWS


def test_one_process_verdict_and_dominant_part():
    from autobits.memory import MemoryEstimate

    est = MemoryEstimate(runtime=1, model=10, statistics=5, accumulators=20, activations=1,
                         candidates=30, references=1, cache=1)
    assert cm.dominant_part(est) == "candidates"
    est = MemoryEstimate(runtime=1, model=10, statistics=5, accumulators=40, activations=1,
                         candidates=30, references=1, cache=1)
    assert cm.dominant_part(est) == "accumulators"
    rows = {r[0]: r for r in cm.memory_rows([TINY, cm.LLAMA_70B])}
    assert rows["tiny"][-2] == "yes" and rows["llama-3.1-70b"][-2] == "no"


# ------------------------------------------------------------------ printing
def test_formatting():
    assert cm.fmt_seconds(5.25) == "5.2 s" or cm.fmt_seconds(5.25) == "5.3 s"
    assert cm.fmt_seconds(42) == "42 s"
    assert cm.fmt_seconds(600) == "10.0 min"
    assert cm.fmt_seconds(3 * 3600) == "3.0 h"
    assert cm.fmt_seconds(3 * 86400) == "3.0 d"
    assert cm.fmt_gb(3.6e9) == "3.6" and cm.fmt_gb(5e8) == "0.50" and cm.fmt_gb(3.04e12) == "3040"


def test_report_prints_targets_measured_models_rates_and_checks():
    models = _models()
    models["small"]["whole"] = {"cores": 2, "calibrate_s": 1.0, "candidates_s": 1.0,
                                "peak_rss_bytes": 1e9}
    text = cm.report({"models": models})
    for want in ("llama-3.1-8b", "llama-3.1-70b", "tiny", "small", "GFLOP/s", "Caveats",
                 "Whole stages predicted vs measured", f"{cm.SEARCH_EVALS}-eval search"):
        assert want in text, want
    time_lines = [ln for ln in text.splitlines() if ln.startswith("llama-3.1-70b")]
    assert len(time_lines) == len(cm.NODE_COUNTS) + 1  # N rows + the memory row


def test_calibrate_overhead_is_fitted_and_scales_the_windows():
    models = _models()
    e = models["tiny"]
    h = sum(e["h_accumulate"][str(d)] for d in TINY.site_widths())
    e["calibrate_window"] = {"plain_s": 2 * (e["forward"]["threads1_s"] + h),
                             "fisher_s": 2 * (e["fisher"]["seconds"] + h)}
    assert cm.calibrate_overhead(e) == pytest.approx(2.0)
    r = cm.fit_rates(models)
    assert r.calibrate_overhead == pytest.approx(2.0)
    base = cm.window_costs(SMALL, _rates())
    doubled = cm.window_costs(SMALL, _rates(calibrate_overhead=2.0))
    assert doubled["plain"] == pytest.approx(2 * base["plain"])
    assert doubled["fisher"] == pytest.approx(2 * base["fisher"])
    assert doubled["evaluation"] == pytest.approx(base["evaluation"])
