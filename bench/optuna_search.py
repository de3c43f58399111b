#!/usr/bin/env python3
"""Optuna search versus the greedy solver on one model at one budget (issue 5).

Prepares the model once (:func:`autobits.pipeline.prepare`: calibration, candidate table
with its weight cache, features), measures the cost of one reward evaluation (the short
calibration slice), then runs the search job (:func:`autobits.app.search`: the ``optuna``
agent for ``--evals`` evaluations warm-started from greedy, selection, held-out metrics) and
compares the held-out KLD of its answer with the greedy solver's (and, with ``--baselines``,
uniform, llama.cpp and ILP) at equal or smaller size.  Writes ``DIR/bench.json``, what the
search job writes (``allocation.json``, ``metrics.json``, ``report.md`` with plots), the
agent's journal (``--resume`` continues an interrupted run) and the calibration
(``DIR/calibration.npz``), which a later run in the same ``DIR`` (``--resume`` or
``--force``) reuses instead of calibrating again (delete it to measure again; not with
``--fold``).

Wall time depends on the machine's load (it is shared); the CPU time of the process is
printed too, as is the load average.  ``search_cpu`` in ``bench.json`` is the CPU time of the
whole search job (search, selection, held-out measurements, report).

    python -m bench.optuna_search                       # smollm2-135m-float, 5.25 bpw, 300
    python -m bench.optuna_search --evals 100 --space offsets --out runs/offsets
    python -m bench.optuna_search --resume --out runs/optuna-bench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from autobits.agents.optuna_agent import JOURNAL
from autobits.app import search
from autobits.app.workflow import check_out_dir
from autobits.app.options import (
    add_agent_args,
    add_budget_args,
    add_prepare_args,
    format_table,
    search_config_from_args,
)
from autobits.calibrate import Calibration
from autobits.io import write_json_atomic
from autobits.model import load_model
from autobits.pipeline import prepare
from autobits.solvers import solve

log = logging.getLogger("bench.optuna_search")


def _calibration(cfg, lm, path: Path) -> Calibration | None:
    """The calibration saved by an earlier run in ``--out``, if it measured these windows."""
    if cfg.fold or not path.is_file():
        return None
    calib = Calibration.load(path, lm=lm)
    if (calib.ctx, calib.n_windows) != (cfg.ctx, cfg.calib_windows):
        log.info("%s measured %d x %d tokens, not %d x %d: calibrating again", path,
                 calib.n_windows, calib.ctx, cfg.calib_windows, cfg.ctx)
        return None
    log.info("reusing the calibration %s (delete it to measure again)", path)
    return calib


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_prepare_args(ap)
    add_budget_args(ap, default_bpw=5.25)
    add_agent_args(ap)
    ap.add_argument("--baselines", action="store_true", help="also uniform, llamacpp and ilp")
    ap.add_argument("--resume", action="store_true", help="continue the search in --out")
    ap.add_argument("--force", action="store_true",
                    help="start afresh in a non-empty --out (its calibration is still reused)")
    ap.add_argument("--timeout-minutes", type=float, default=None,
                    help="stop the search after this long (resume later with --resume)")
    ap.add_argument("--out", default="runs/optuna-bench")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = search_config_from_args(args, allocator="optuna")
    timeout = None if args.timeout_minutes is None else 60 * args.timeout_minutes
    config = dataclasses.replace(
        config, agent=dataclasses.replace(config.agent, timeout=timeout),
        baselines=("greedy", "uniform", "llamacpp", "ilp") if args.baselines else ("greedy",))
    cfg, out = config.prepare, config.out
    check_out_dir(out, resume=config.resume, force=config.force)  # before the slow work
    out.mkdir(parents=True, exist_ok=True)
    t_all, cpu_all = time.perf_counter(), time.process_time()
    load0 = os.getloadavg()

    t = time.perf_counter()
    lm = load_model(cfg.model)
    calib_path = out / "calibration.npz"
    calibration = _calibration(cfg, lm, calib_path)
    prepared = prepare(cfg, lm=lm, calibration=calibration)
    t_prepare = time.perf_counter() - t
    table = prepared.table
    limit = config.budget.check_feasible(lm.specs, cfg.formats)
    log.info("prepared in %.0fs; limit %d bytes (%.4f bpw)", t_prepare, limit, limit * 8 / table.params)

    reward_greedy = t_eval = c_eval = None
    if not (args.resume and (out / JOURNAL).is_file()):
        # one reward evaluation: the first fills the weight cache of the greedy's formats
        greedy = solve("greedy", table, limit_bytes=limit)
        t = time.perf_counter()
        prepared.reward(greedy)
        t_first = time.perf_counter() - t
        t, c = time.perf_counter(), time.process_time()
        reward_greedy = prepared.reward(greedy).kld
        t_eval, c_eval = time.perf_counter() - t, time.process_time() - c
        log.info("one reward evaluation: %.2fs wall, %.2fs CPU (first %.2fs); greedy calib KLD "
                 "%.5f", t_eval, c_eval, t_first, reward_greedy)

    c = time.process_time()
    outcome = search(config, prepared=prepared)
    c_search = time.process_time() - c
    if calibration is None and not cfg.fold:  # a folded calibration cannot be reused
        prepared.calib.save(calib_path)  # after search(), which refuses a non-empty new --out
    result = outcome.search
    sel = result.meta.get("selection")
    t_select = sel["seconds"] if sel else 0.0
    t_search = outcome.timings["allocate"] - t_select
    log.info("search: %d evaluations in %.0fs wall", len(result.history), t_search)
    eval_total = sum(e.seconds for e in result.history)  # over every run of a resumed search
    if reward_greedy is None:  # resumed: the warm start (trial 0) is the greedy
        reward_greedy = result.meta["warm_kld"]
        t_eval = float(np.median([e.seconds for e in result.history]))

    reward_best, reward_best_m = outcome.reward_best
    held = {"optuna": (outcome.allocation, outcome.heldout), "greedy": outcome.baselines["greedy"]}
    t = time.perf_counter()
    if cfg.select_windows > 0:
        held["optuna (reward best)"] = (reward_best, prepared.heldout(reward_best))
    t_heldout = outcome.timings["heldout"] + time.perf_counter() - t
    held.update((k, v) for k, v in outcome.baselines.items() if k != "greedy")
    calib_kld = {"optuna": outcome.reward.kld, "optuna (reward best)": reward_best_m.kld,
                 "greedy": reward_greedy}

    rows = []
    for name, (a, m) in held.items():
        rows.append([name, f"{calib_kld.get(name, float('nan')):.5f}", f"{m.kld:.5f}",
                     f"{m.ppl:.4f}", f"{m.top1:.4f}", f"{m.bytes:,}", f"{m.bpw:.4f}"])
    o, g = held["optuna"][1], held["greedy"][1]
    summary = {
        "model": lm.name, "target_bpw": config.budget.target_bpw, "limit_bytes": limit,
        "evals": len(result.history), "trials": result.meta["trials"], "space": args.space,
        "sampler": args.sampler, "seed": args.seed,
        "reward": {"windows": cfg.reward_windows, "ctx": cfg.reward_ctx,
                   "eval_seconds": t_eval, "eval_cpu_seconds": c_eval},
        "heldout": {k: {"kld": m.kld, "ppl": m.ppl, "top1": m.top1, "bytes": m.bytes, "bpw": m.bpw}
                    for k, (a, m) in held.items()},
        "calib_kld": {"optuna": outcome.reward.kld, "greedy": reward_greedy},
        "optuna_beats_greedy": bool(o.kld <= g.kld and o.bytes <= g.bytes),
        "kld_change_vs_greedy": o.kld / g.kld - 1 if g.kld > 0 else None,
        "seconds": {"prepare": t_prepare, "search": t_search, "search_cpu": c_search,
                    "evaluations_total": eval_total,
                    "selection": t_select, "heldout": t_heldout, "total": time.perf_counter() - t_all,
                    "total_cpu": time.process_time() - cpu_all},
        "loadavg": {"start": load0, "end": os.getloadavg()},
        "timings": prepared.timings, "search_meta": {k: v for k, v in result.meta.items()
                                                     if k not in ("raw_over",)},
        "paths": {k: str(v) for k, v in outcome.paths.items()},
    }
    write_json_atomic(out / "bench.json", summary)
    print(format_table(rows, ["allocation", "calib KLD", "held-out KLD", "PPL", "top-1", "bytes", "bpw"]))
    print(f"\n{lm.name} at {config.budget.describe()} = {limit:,} bytes; {len(result.history)} "
          f"evaluations ({args.space}/{args.sampler}): {eval_total / 60:.1f} min evaluating "
          f"(this run: {t_search / 60:.1f} min wall, search job {c_search / 60:.1f} min CPU); "
          f"one reward evaluation {t_eval:.2f}s "
          f"({cfg.reward_windows}x{cfg.reward_ctx} tokens); load average {load0[0]:.1f}")
    print(f"optuna vs greedy held-out KLD: {o.kld:.5f} vs {g.kld:.5f} "
          f"({(o.kld / g.kld - 1) * 100:+.1f}%), bytes {o.bytes:,} vs {g.bytes:,}")
    if sel:
        print(f"selection ({cfg.select_windows} calibration windows x {cfg.ctx} tokens, "
              f"{t_select:.0f}s): chose {sel['chosen']} of {len(sel['rows'])}; whole run "
              f"{summary['seconds']['total'] / 60:.1f} min")
    print(json.dumps({"out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
