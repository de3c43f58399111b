"""Reward-evaluation time and memory by weight-cache budget (same metrics whatever the budget).

    python bench/cache_budget.py [--model smollm2-135m-float] [--uniform Q4_0 | --allocation FILE]
                                 [--budgets-mb 0,512,1000000] [--repeats 3] [--json OUT]

The weight cache (:class:`autobits.evaluate.WeightCache`) keeps the quantized bytes of every
candidate and, within a budget, dequantized float32 copies.  This measures what the budget
costs in time: one allocation (by default llama.cpp's uniform fallback of ``--uniform``, or an
``allocation.json``) is evaluated on the search's reward slice (2 windows x 256 tokens)
``--repeats`` times after one warm-up, for each budget; a huge budget is what the cache
held before (every candidate as float32).  It prints the median evaluation seconds, the
dequantizations per evaluation, the KLD (identical across budgets, bit for bit), the bytes
kept (quantized and dequantized), and the time to dequantize the whole allocation once.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

log = logging.getLogger("bench.cache_budget")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-float")
    ap.add_argument("--uniform", default="Q4_0", help="format of a uniform allocation (with "
                    "llama.cpp's fallbacks) when no --allocation is given")
    ap.add_argument("--allocation", default=None, help="an allocation.json of this model")
    ap.add_argument("--budgets-mb", default="0,512,1000000",
                    help="dequantized-weight budgets in MiB, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    from autobits.allocation import Allocation, write_json_atomic
    from autobits.app.options import format_table
    from autobits.evaluate import Evaluator, WeightCache
    from autobits.memory import peak_rss_bytes
    from autobits.model import load_model
    from autobits.pipeline import PrepareConfig
    from autobits.text import load_text, make_windows

    cfg = PrepareConfig(model=args.model)
    lm = load_model(cfg.model)
    split = make_windows(load_text(cfg.text), lm.tokenizer, ctx=cfg.ctx).split(
        calib=cfg.calib_windows, eval=cfg.eval_windows)
    if args.allocation:
        alloc = Allocation.load(args.allocation, lm.specs, lm.name)
    else:
        alloc = Allocation.uniform(lm.name, lm.specs, args.uniform, fallback=True)
    src = WeightCache(lm, budget_bytes=0)
    for n, f in alloc.tensors.items():
        src.quantize(n, f)  # as after build_candidates: the bytes are kept
    t = time.perf_counter()
    for n, f in alloc.tensors.items():
        src.get(n, f)
    deq_s = time.perf_counter() - t
    ev = Evaluator(lm, cfg.reward_slice(split.calib), cache=src)
    rows, payload = [], {"model": lm.name, "bpw": alloc.bpw, "dequantize_all_seconds": deq_s,
                         "runs": []}
    for mb in [float(x) for x in args.budgets_mb.split(",") if x]:
        cache = WeightCache(lm, packed=src.packed_items(), budget_bytes=int(mb * 2**20))
        ev.cache = cache
        ev.evaluate(alloc)  # warm-up
        misses, seconds, kld = cache.misses, [], None
        for _ in range(args.repeats):
            m = ev.evaluate(alloc)
            seconds.append(m.seconds)
            kld = m.kld
        per_eval = (cache.misses - misses) / args.repeats
        run = {"budget_mb": mb, "median_seconds": statistics.median(seconds), "seconds": seconds,
               "dequantized_per_eval": per_eval, "kld": kld, "quantized_bytes": cache.packed_bytes,
               "dequantized_bytes": cache.dequantized_bytes}
        payload["runs"].append(run)
        rows.append([f"{mb:g}", f"{run['median_seconds']:.2f}", f"{per_eval:.0f}", repr(kld),
                     f"{cache.packed_bytes / 1e9:.3f}", f"{cache.dequantized_bytes / 1e9:.3f}"])
    payload["peak_rss_bytes"] = peak_rss_bytes()
    print(format_table(rows, ["budget MiB", "eval s (median)", "dequantized/eval", "KLD",
                              "quantized GB", "dequantized GB"]))
    print(f"\n{lm.name}, {alloc.bpw:.3f} bpw, {len(alloc.tensors)} tensors: dequantizing all of "
          f"them takes {deq_s:.2f}s; peak RSS {payload['peak_rss_bytes'] / 1e9:.2f} GB")
    if args.json:
        write_json_atomic(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
