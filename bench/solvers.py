#!/usr/bin/env python3
"""The non-learned allocators side by side at several budgets (issue 4), held-out.

Prepares the model once (calibration, candidate table with its weight cache, features), then
for every budget solves with ``uniform``, ``llamacpp``, ``greedy`` and ``ilp`` and measures
each allocation on the held-out windows (the last ``--windows`` windows of the text, never
seen by calibration): KLD against the reference model, perplexity, top-1 agreement, exact
bytes and file-level bpw.  A solver with no answer at a budget (e.g. no llama.cpp preset
fits) is listed as such.

    .venv/bin/python -m bench.solvers                                   # 4.5,5.25,6,7 bpw
    .venv/bin/python -m bench.solvers --budgets 5.25 --windows 16 --json runs/solvers.json
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from autobits.allocation import Budget
from autobits.io import write_json_atomic
from autobits.app.options import add_prepare_args, format_table, prepare_config_from_args
from autobits.errors import AutobitsError
from autobits.pipeline import prepare
from autobits.solvers import solve

SOLVERS = ("uniform", "llamacpp", "greedy", "ilp")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_prepare_args(ap)
    ap.add_argument("--budgets", default="4.5,5.25,6,7", help="file-level bpw, comma separated")
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    cfg = prepare_config_from_args(args)
    t0 = time.perf_counter()
    prepared = prepare(cfg)
    t_prep = time.perf_counter() - t0
    lm = prepared.lm
    rows, records = [], []
    for bpw in (float(b) for b in args.budgets.split(",")):
        limit = Budget(target_bpw=bpw).check_feasible(lm.specs, cfg.formats)
        for method in SOLVERS:
            try:
                alloc = solve(method, prepared.table, limit_bytes=limit)
            except AutobitsError as e:
                rows.append([f"{bpw:g}", method, "-", "-", "-", "-", "-", f"no answer: {e}"[:60]])
                records.append({"budget_bpw": bpw, "solver": method, "error": str(e)})
                continue
            m = prepared.heldout(alloc)
            used = sorted(set(alloc.tensors.values()))
            rows.append([f"{bpw:g}", method, f"{m.bytes:,}", f"{m.bpw:.4f}", f"{m.kld:.5f}",
                         f"{m.ppl:.4f}", f"{m.top1:.4f}", ",".join(used)[:60]])
            records.append({"budget_bpw": bpw, "limit_bytes": limit, "solver": method,
                            **m.to_json(), "formats": used})
    print(format_table(rows, ["bpw budget", "solver", "bytes", "bpw", "KLD", "PPL", "top-1",
                              "formats used"]))
    ref = prepared.heldout_evaluator.ref_ppl
    print(f"\n{lm.name}: held-out {args.windows} windows x {cfg.ctx} tokens of {args.text} "
          f"(reference PPL {ref:.4f}); preparation {t_prep:.0f}s, "
          f"load avg {os.getloadavg()[0]:.2f}; imatrix={args.imatrix} fold={args.fold}")
    if args.json:
        write_json_atomic(args.json, {"model": lm.name, "rows": records, "ref_ppl": ref,
                                      "prepare_seconds": t_prep,
                                      "text": prepared.split.to_json()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
