#!/usr/bin/env python3
"""Time the measurement of a model: calibration pass, candidate table, feature table.

Prints the time split (calibration pass, quantization per format, proxy error, features)
for one model, as a search would run it: dequantized candidates go into a WeightCache.
Quantization times per format are summed over the worker threads; ``wall`` is the elapsed
time.  CPU time of the process and the load average are printed too, since the machine may
be shared (wall time then exceeds what 2 free cores would take).

    .venv/bin/python -m bench.features                      # smollm2-135m-float, table on stdout
    .venv/bin/python -m bench.features --calib-windows 16 --workers 1 --json out.json
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from autobits.calibrate import calibrate
from autobits.app.options import format_table
from autobits.evaluate import WeightCache
from autobits.features import build_candidates, extract_features
from autobits.io import write_json_atomic
from autobits.model import load_model
from autobits.text import load_text, make_windows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-float")
    ap.add_argument("--text", default="stdlib")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--fisher-windows", type=int, default=4)
    ap.add_argument("--workers", type=int, default=None,
                    help="threads of each step (default: CPUs)")
    ap.add_argument("--imatrix", action="store_true", help="quantize with importance vectors")
    ap.add_argument("--no-cache", action="store_true", help="do not keep dequantized weights")
    ap.add_argument("--json", help="write the timings here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    t = time.perf_counter()
    lm = load_model(args.model)
    t_load = time.perf_counter() - t
    windows = make_windows(load_text(args.text), lm.tokenizer, ctx=args.ctx)
    split = windows.split(calib=args.calib_windows, eval=0)

    cpu0, t0 = time.process_time(), time.perf_counter()
    calib = calibrate(lm, split.calib, fisher_windows=args.fisher_windows, progress=False,
                      workers=args.workers)
    t_calib, c_calib = time.perf_counter() - t0, time.process_time() - cpu0
    cache = None if args.no_cache else WeightCache(lm)
    t, c = time.perf_counter(), time.process_time()
    table = build_candidates(lm, calib, imatrix=args.imatrix, cache=cache,
                             workers=args.workers, progress=False)
    t_cand, c_cand = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    feats = extract_features(lm, calib, table, workers=args.workers)
    t_feat, c_feat = time.perf_counter() - t, time.process_time() - c
    total, cpu = time.perf_counter() - t0, time.process_time() - cpu0

    timing = table.meta["timing"]
    rows = [["calibration pass", f"{t_calib:.1f}",
             f"{args.calib_windows} x {args.ctx} tokens, {calib.fisher_tokens} with Fisher; "
             f"CPU {c_calib:.1f}s"]]
    for fmt, s in timing["quantize"].items():
        rows.append([f"  quantize {fmt}", f"{s:.1f}",
                     f"thread-seconds, CPU {timing['quantize_cpu'][fmt]:.1f}s"])
    rows.append(["  proxy error", f"{timing['proxy']:.1f}",
                 f"thread-seconds, CPU {timing['proxy_cpu']:.1f}s"])
    rows.append(["candidate table", f"{t_cand:.1f}",
                 f"{len(table.tensors)} tensors, {sum(map(len, table.options.values()))} "
                 f"candidates, {table.meta['workers']} threads; CPU {c_cand:.1f}s"])
    rows.append(["feature table", f"{t_feat:.1f}",
                 f"{len(feats)} x {len(feats.feature_names)}; CPU {c_feat:.1f}s"])
    rows.append(["total", f"{total:.1f}", f"CPU {cpu:.1f}s, cores {os.cpu_count()}, "
                                          f"load avg {os.getloadavg()[0]:.2f}"])
    print(format_table(rows, ["step", "seconds", "notes"]))
    print(f"\n{lm.name}: model load {t_load:.1f}s (not counted); weight cache "
          f"{(cache.nbytes if cache else 0) / 2**30:.2f} GiB; imatrix={args.imatrix}")
    if args.json:
        payload = {"model": lm.name, "calibration": t_calib, "candidates": t_cand,
                   "features": t_feat, "total": total, "cpu": total and cpu,
                   "cpu_split": {"calibration": c_calib, "candidates": c_cand,
                                 "features": c_feat},
                   "candidate_timing": timing, "calib_windows": args.calib_windows,
                   "fisher_windows": args.fisher_windows, "ctx": args.ctx,
                   "imatrix": args.imatrix, "load_avg": os.getloadavg()[0]}
        write_json_atomic(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
