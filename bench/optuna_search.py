#!/usr/bin/env python3
"""Optuna search versus the greedy solver on one model at one budget (issue 5).

Prepares the model once (calibration, candidate table with its weight cache, features),
measures the cost of one reward evaluation (the short calibration slice), runs the
``optuna`` agent for ``--evals`` evaluations, and compares the held-out KLD of its best
allocation with the greedy solver's (and, with ``--baselines``, uniform and llama.cpp) at
equal or smaller size.  Writes ``DIR/bench.json``, the agent's journal (``--resume``
continues an interrupted run), the report (``DIR/report.md`` with plots) and the candidate
table (``DIR/candidates.json``), which a later run in the same ``DIR`` reloads instead of
calibrating again (delete it to measure again).

Wall time depends on the machine's load (it is shared); the CPU time of the process is
printed too, as is the load average.

    .venv/bin/python bench/optuna_search.py                       # smollm2-135m, 5.25 bpw, 300
    .venv/bin/python bench/optuna_search.py --evals 100 --space offsets --out runs/offsets
    .venv/bin/python bench/optuna_search.py --resume --out runs/optuna-bench
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from autobits.agents import AGENTS, SearchProblem  # noqa: E402
from autobits.agents.optuna_agent import JOURNAL  # noqa: E402
from autobits.allocation import Budget  # noqa: E402
from autobits.io import write_json_atomic  # noqa: E402
from autobits.errors import AutobitsError  # noqa: E402
from autobits.pipeline import PrepareConfig, prepare  # noqa: E402
from autobits.solvers import solve  # noqa: E402

log = logging.getLogger("bench.optuna_search")


def _table(rows, header) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class _Reloaded:
    """What the bench uses of :class:`autobits.pipeline.Prepared`, from a saved candidate table.

    The same windows and evaluators as :func:`prepare` builds; dequantized weights are
    quantized lazily by the evaluators' shared cache (only the pairs a search visits).
    """

    def __init__(self, cfg: PrepareConfig, table_path: Path):
        from autobits.candidates import CandidateTable
        from autobits.evaluate import WeightCache
        from autobits.model import load_model
        from autobits.text import load_text, make_windows

        self.lm = load_model(cfg.model)
        self.table = CandidateTable.from_json(json.loads(table_path.read_text()), self.lm.specs)
        if self.table.meta.get("imatrix"):
            raise AutobitsError("a saved imatrix table needs the calibration; delete it to rebuild")
        windows = make_windows(load_text(cfg.text), self.lm.tokenizer, ctx=cfg.ctx)
        self.split = windows.split(calib=cfg.calib_windows, eval=cfg.eval_windows)
        self.features, self.timings = None, {"reloaded": 1.0}
        self._cfg, self._cache = cfg, WeightCache(self.lm)
        self._reward = self._heldout = self._select = None

    def reward(self, allocation):
        from autobits.evaluate import Evaluator

        if self._reward is None:
            self._reward = Evaluator(self.lm, self._cfg.reward_slice(self.split.calib),
                                     cache=self._cache)
        return self._reward.evaluate(allocation)

    def select(self, allocation):
        from autobits.evaluate import Evaluator

        if self._select is None:
            self._select = Evaluator(self.lm, self._cfg.select_slice(self.split.calib),
                                     cache=self._cache)
        return self._select.evaluate(allocation)

    def heldout(self, allocation):
        from autobits.evaluate import Evaluator

        if self._heldout is None:
            self._heldout = Evaluator(self.lm, self.split.eval, cache=self._cache)
        return self._heldout.evaluate(allocation)


def _prepare(cfg: PrepareConfig, table_path: Path):
    """Prepare the model, or reload its candidate table saved by an earlier run in ``--out``."""
    if table_path.is_file():
        log.info("reloading the candidate table %s (delete it to measure again)", table_path)
        return _Reloaded(cfg, table_path)
    prepared = prepare(cfg)
    write_json_atomic(table_path, {**prepared.table.to_json(), "config": {
        "model": cfg.model, "text": cfg.text, "ctx": cfg.ctx, "calib_windows": cfg.calib_windows}})
    return prepared


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="stdlib")
    ap.add_argument("--target-bpw", type=float, default=5.25)
    ap.add_argument("--evals", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sampler", default="tpe")
    ap.add_argument("--space", default="groups")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out windows")
    ap.add_argument("--reward-windows", type=int, default=2)
    ap.add_argument("--reward-ctx", type=int, default=256)
    ap.add_argument("--select-windows", type=int, default=4,
                    help="re-measure the search's best allocations on this many further "
                         "calibration windows and keep the best there (0: trust the reward)")
    ap.add_argument("--baselines", action="store_true", help="also uniform, llamacpp and ilp")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--timeout-minutes", type=float, default=None,
                    help="stop the search after this long (resume later with --resume)")
    ap.add_argument("--out", default="runs/optuna-bench")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all, cpu_all = time.perf_counter(), time.process_time()
    load0 = os.getloadavg()

    cfg = PrepareConfig(model=args.model, text=args.text, ctx=args.ctx,
                        calib_windows=args.calib_windows, eval_windows=args.eval_windows,
                        reward_windows=args.reward_windows, reward_ctx=args.reward_ctx,
                        select_windows=args.select_windows)
    t = time.perf_counter()
    prepared = _prepare(cfg, out / "candidates.json")
    t_prepare = time.perf_counter() - t
    lm, table = prepared.lm, prepared.table
    limit = Budget(target_bpw=args.target_bpw).check_feasible(lm.specs, cfg.formats)
    log.info("prepared in %.0fs; limit %d bytes (%.4f bpw)", t_prepare, limit, limit * 8 / table.params)

    greedy = solve("greedy", table, limit_bytes=limit)
    reward_greedy = t_eval = c_eval = None
    if not (args.resume and (out / JOURNAL).is_file()):
        # one reward evaluation: the first fills the weight cache of the greedy's formats
        t = time.perf_counter()
        prepared.reward(greedy)
        t_first = time.perf_counter() - t
        t, c = time.perf_counter(), time.process_time()
        reward_greedy = prepared.reward(greedy).kld
        t_eval, c_eval = time.perf_counter() - t, time.process_time() - c
        log.info("one reward evaluation: %.2fs wall, %.2fs CPU (first %.2fs); greedy calib KLD "
                 "%.5f", t_eval, c_eval, t_first, reward_greedy)

    problem = SearchProblem(table=table, features=prepared.features, limit_bytes=limit,
                            evaluate=prepared.reward, warm_start=greedy)
    agent = AGENTS["optuna"](sampler=args.sampler, space=args.space,
                             timeout=None if args.timeout_minutes is None else 60 * args.timeout_minutes)
    t, c = time.perf_counter(), time.process_time()
    result = agent.search(problem, evals=args.evals, seed=args.seed, out_dir=out, resume=args.resume)
    t_search, c_search = time.perf_counter() - t, time.process_time() - c
    log.info("search: %d evaluations in %.0fs wall, %.0fs CPU", len(result.history), t_search, c_search)
    eval_total = sum(e.seconds for e in result.history)  # over every run of a resumed search
    if reward_greedy is None:  # resumed: the warm start (trial 0) is the greedy
        reward_greedy = result.meta["warm_kld"]
        t_eval = float(np.median([e.seconds for e in result.history]))

    reward_best = result
    t_select = 0.0
    if args.select_windows > 0:
        from autobits.agents.selection import select

        t = time.perf_counter()
        result = select(result, measure=prepared.select, warm_start=greedy)
        t_select = time.perf_counter() - t
    t = time.perf_counter()
    held = {"optuna": (result.best, prepared.heldout(result.best)),
            "greedy": (greedy, prepared.heldout(greedy))}
    if args.select_windows > 0:
        held["optuna (reward best)"] = (reward_best.best, prepared.heldout(reward_best.best))
    if args.baselines:
        for method in ("uniform", "llamacpp", "ilp"):
            try:
                a = solve(method, table, limit_bytes=limit)
            except AutobitsError as e:
                log.info("baseline %s skipped: %s", method, e)
                continue
            held[method] = (a, prepared.heldout(a))
    t_heldout = time.perf_counter() - t
    result.best.save(out / "allocation.json")

    rows = []
    for name, (a, m) in held.items():
        calib = result.best_metrics.kld if name == "optuna" else reward_best.best_metrics.kld if (
            name == "optuna (reward best)") else (
            reward_greedy if name == "greedy" else float("nan"))
        rows.append([name, f"{calib:.5f}", f"{m.kld:.5f}", f"{m.ppl:.4f}", f"{m.top1:.4f}",
                     f"{m.bytes:,}", f"{m.bpw:.4f}"])
    o, g = held["optuna"][1], held["greedy"][1]
    summary = {
        "model": lm.name, "target_bpw": args.target_bpw, "limit_bytes": limit,
        "evals": len(result.history), "trials": result.meta["trials"], "space": args.space,
        "sampler": args.sampler, "seed": args.seed,
        "reward": {"windows": args.reward_windows, "ctx": args.reward_ctx,
                   "eval_seconds": t_eval, "eval_cpu_seconds": c_eval},
        "heldout": {k: {"kld": m.kld, "ppl": m.ppl, "top1": m.top1, "bytes": m.bytes, "bpw": m.bpw}
                    for k, (a, m) in held.items()},
        "calib_kld": {"optuna": result.best_metrics.kld, "greedy": reward_greedy},
        "optuna_beats_greedy": bool(o.kld <= g.kld and o.bytes <= g.bytes),
        "kld_change_vs_greedy": o.kld / g.kld - 1 if g.kld > 0 else None,
        "seconds": {"prepare": t_prepare, "search": t_search, "search_cpu": c_search,
                    "evaluations_total": eval_total,
                    "selection": t_select, "heldout": t_heldout, "total": time.perf_counter() - t_all,
                    "total_cpu": time.process_time() - cpu_all},
        "loadavg": {"start": load0, "end": os.getloadavg()},
        "timings": prepared.timings, "search_meta": {k: v for k, v in result.meta.items()
                                                     if k not in ("raw_over",)},
    }
    write_json_atomic(out / "bench.json", summary)
    try:
        from autobits.app.report import write_report

        write_report(result, out, heldout=o,
                     baselines={k: v for k, v in held.items() if k != "optuna"}, specs=lm.specs)
    except Exception:  # the numbers above are the bench; the report is a convenience
        log.exception("report failed")
    print(_table(rows, ["allocation", "calib KLD", "held-out KLD", "PPL", "top-1", "bytes", "bpw"]))
    print(f"\n{lm.name} at {args.target_bpw} bpw = {limit:,} bytes; {len(result.history)} "
          f"evaluations ({args.space}/{args.sampler}): {eval_total / 60:.1f} min evaluating "
          f"(this run: {t_search / 60:.1f} min wall, {c_search / 60:.1f} min CPU); one reward "
          f"evaluation {t_eval:.2f}s "
          f"({args.reward_windows}x{args.reward_ctx} tokens); load average {load0[0]:.1f}")
    print(f"optuna vs greedy held-out KLD: {o.kld:.5f} vs {g.kld:.5f} "
          f"({(o.kld / g.kld - 1) * 100:+.1f}%), bytes {o.bytes:,} vs {g.bytes:,}")
    sel = result.meta.get("selection")
    if sel:
        print(f"selection ({args.select_windows} calibration windows x {args.ctx} tokens, "
              f"{t_select:.0f}s): chose {sel['chosen']} of {len(sel['rows'])}; whole run "
              f"{summary['seconds']['total'] / 60:.1f} min")
    print(json.dumps({"out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
