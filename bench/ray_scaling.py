#!/usr/bin/env python3
"""Evaluations per second on Ray evaluator actors, 1 and 2 workers, and where the time goes.

One run: prepare the model once (calibration, candidates, the dequantized weight cache),
measure the in-process evaluation (the driver's ``prepared.reward``, 1 thread and all
threads), then for each worker count start an embedded Ray, build an
:class:`~autobits.cluster.actors.EvaluatorPool` (1 torch thread per actor), and time

* the object-store put of the reference and candidate weights (serialisation + copy, once),
* the actors' start (process, model shell pointed at the shared weights, zero-copy cache
  views, the reference forward pass),
* Ray's per-call overhead (a no-op round trip) and the pickled sizes of an allocation and
  its metrics (what crosses per evaluation),
* ``evaluate_many`` over ``--evals`` distinct allocations (greedy solutions at evenly spaced
  budgets): evaluations per second, and per evaluation the actor's forward time vs. the
  wall time the driver sees.

The closing note gives the 2-vs-1 ratio and extrapolates, from the measured per-evaluation
costs, the throughput of a 16-node cluster.

    .venv/bin/python -m bench.ray_scaling                       # smollm2-135m-float, 8 evals per config
    .venv/bin/python -m bench.ray_scaling --evals 16 --json out.json
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import statistics
import sys
import time

import numpy as np

import autobits.cluster  # noqa: F401  (Ray environment before Ray is imported)
from autobits.app.options import format_table
from autobits.io import write_json_atomic

log = logging.getLogger("bench.ray_scaling")


def allocations(table, n: int) -> list:
    """``n`` distinct feasible allocations: greedy solutions at evenly spaced budgets."""
    from autobits.solvers import solve

    lo, hi = table.min_bytes(), table.max_bytes()
    out, seen = [], set()
    for frac in np.linspace(0.05, 0.95, 4 * n):
        a = solve("greedy", table, limit_bytes=int(lo + frac * (hi - lo)))
        key = tuple(sorted(a.tensors.items()))
        if key not in seen:
            seen.add(key)
            out.append(a)
        if len(out) == n:
            break
    return out


def in_process(prepared, allocs, threads: int) -> tuple[float, float]:
    """Mean wall and CPU seconds of one in-process evaluation with ``threads`` torch threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        prepared.reward(allocs[0])  # warm-up
        ts, cs = [], []
        for a in allocs:
            t0, c0 = time.perf_counter(), time.process_time()
            prepared.reward(a)
            ts.append(time.perf_counter() - t0)
            cs.append(time.process_time() - c0)
    finally:
        torch.set_num_threads(before)
    return statistics.mean(ts), statistics.mean(cs)


def run_pool(prepared, allocs, workers: int) -> dict:
    """Start Ray + a pool of ``workers`` actors, time everything, stop it."""
    import ray

    from autobits.cluster.actors import EvaluatorPool, store_bytes
    from autobits.cluster.runtime import ray_session

    store = int(1.1 * store_bytes(prepared.lm, EvaluatorPool.candidates_of(prepared))) + (512 << 20)
    t0 = time.perf_counter()
    with ray_session(num_cpus=2, object_store_memory=store) as session:
        t_ray = time.perf_counter() - t0
        pool = EvaluatorPool.from_prepared(prepared, workers=workers, threads=1)
        try:
            # Ray's own per-call cost: a no-op round trip to one actor
            actor = pool.actors[0]
            ray.get(actor.ping.remote())
            pings = []
            for _ in range(20):
                t = time.perf_counter()
                ray.get(actor.ping.remote())
                pings.append(time.perf_counter() - t)
            # the driver's dispatch rate: many no-op calls in flight at once
            t = time.perf_counter()
            ray.get([a.ping.remote() for _ in range(100) for a in pool.actors])
            dispatch = 100 * workers / (time.perf_counter() - t)
            pool.evaluate_many(allocs[:workers])  # warm-up: one evaluation per actor
            pool.stats.wall.clear()
            pool.stats.actor.clear()
            before = [pool.actor_info(i) for i in range(workers)]
            t = time.perf_counter()
            metrics = pool.evaluate_many(allocs)
            wall = time.perf_counter() - t
            after = [pool.actor_info(i) for i in range(workers)]
            cpu = sum(a["eval_cpu_seconds"] - b["eval_cpu_seconds"] for a, b in zip(after, before))
            stats = pool.stats
            out = {
                "workers": workers, "ray_start": t_ray, "ray_cpus": session.cpus,
                "put_seconds": stats.put_seconds, "put_gb": stats.put_bytes / 1e9,
                "actors_start": stats.start_seconds,
                "actor_init": statistics.mean(i["init_seconds"] for i in pool.info),
                "actor_phases": {k: statistics.mean(i["phases"][k] for i in pool.info)
                                 for k in pool.info[0]["phases"]},
                "ping": statistics.median(pings), "dispatch_per_s": dispatch,
                "evals": len(allocs), "wall": wall, "evals_per_s": len(allocs) / wall,
                "eval_actor": statistics.mean(stats.actor), "eval_cpu": cpu / len(allocs),
                "eval_wall": statistics.mean(stats.wall),
                "kld": [m.kld for m in metrics],
            }
        finally:
            pool.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-float")
    ap.add_argument("--evals", type=int, default=8, help="timed evaluations per worker count")
    ap.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    ap.add_argument("--reward-windows", type=int, default=2)
    ap.add_argument("--reward-ctx", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=256, help="calibration window length (default 256)")
    ap.add_argument("--formats", default="F16,Q4_0",
                    help="candidate formats (default F16,Q4_0: the evaluation cost does "
                    "not depend on them, the cache size does; the note extrapolates the put to "
                    "the default set; 'default' = every default candidate)")
    ap.add_argument("--calib-windows", type=int, default=2,
                    help="calibration windows (default 2: only the candidate table's proxy "
                    "errors depend on them, not the evaluation cost)")
    ap.add_argument("--nodes", type=int, default=16, help="cluster size of the estimate")
    ap.add_argument("--cores-per-node", type=int, default=8,
                    help="physical cores per node of the estimate (default 8: a 16-vCPU node)")
    ap.add_argument("--network-gbps", type=float, default=10.0,
                    help="node bandwidth assumed for the cache copy of the estimate")
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    from autobits.pipeline import PrepareConfig, prepare

    t0 = time.perf_counter()
    from autobits.specs import DEFAULT_CANDIDATES

    formats = DEFAULT_CANDIDATES if args.formats == "default" else tuple(args.formats.split(","))
    cfg = PrepareConfig(model=args.model, reward_windows=args.reward_windows,
                        reward_ctx=args.reward_ctx, ctx=args.ctx, formats=formats,
                        calib_windows=max(args.calib_windows, args.reward_windows))
    prepared = prepare(cfg)
    t_prepare = time.perf_counter() - t0
    allocs = allocations(prepared.table, args.evals)
    if len(allocs) < args.evals:
        log.warning("only %d distinct allocations; timing those", len(allocs))
    a_bytes = len(pickle.dumps(allocs[0], protocol=5))
    m_bytes = len(pickle.dumps(prepared.reward(allocs[0]), protocol=5))
    local1, local1_cpu = in_process(prepared, allocs[: min(4, len(allocs))], threads=1)
    local_all, local_all_cpu = in_process(prepared, allocs[: min(4, len(allocs))],
                                          threads=os.cpu_count() or 1)

    runs = [run_pool(prepared, allocs, int(w)) for w in args.workers.split(",")]
    for r in runs[1:]:
        np.testing.assert_allclose(r["kld"], runs[0]["kld"], rtol=1e-5)

    rows = [["in-process, 1 thread", "-", "-", "-", "-", f"{local1_cpu:.2f}", f"{local1:.2f}",
             f"{local1:.2f}", f"{1 / local1:.3f}"],
            [f"in-process, {os.cpu_count()} threads", "-", "-", "-", "-", f"{local_all_cpu:.2f}",
             f"{local_all:.2f}", f"{local_all:.2f}", f"{1 / local_all:.3f}"]]
    for r in runs:
        rows.append([f"Ray, {r['workers']} worker(s) x 1 thread", f"{r['ray_start']:.1f}",
                     f"{r['put_seconds']:.1f}", f"{r['actors_start']:.1f}",
                     f"{r['ping'] * 1e3:.1f}", f"{r['eval_cpu']:.2f}", f"{r['eval_actor']:.2f}",
                     f"{r['eval_wall']:.2f}", f"{r['evals_per_s']:.3f}"])
    print()
    print(format_table(rows, ["evaluation", "ray start s", "put s", "actors start s",
                              "call ms", "CPU s/eval", "actor s/eval", "wall s/eval",
                              "evals/s"]))
    r1, r2 = runs[0], runs[-1]
    from autobits.cluster.actors import store_bytes

    full_gb = store_bytes(prepared.lm, {s.name: list(s.valid_formats(DEFAULT_CANDIDATES))
                                        for s in prepared.lm.quantizable}) / 1e9
    rate = r1["put_gb"] / max(r1["put_seconds"], 1e-9)
    ratio = r2["evals_per_s"] / r1["evals_per_s"]
    ph = r1["actor_phases"]
    per_eval_overhead = max(r1["eval_wall"] - r1["eval_actor"], 0.0)
    # 16-node estimate: every core an actor with 1 thread; an evaluation costs what it costs
    # here in CPU seconds on one core (a dedicated core: wall = CPU); the driver sends one call
    # per evaluation (its measured dispatch rate) and each node copies the cache once
    actors = args.nodes * args.cores_per_node
    per_eval = r1["eval_cpu"]
    compute_cap = actors / per_eval
    driver_cap = max(r["dispatch_per_s"] for r in runs)
    est = min(compute_cap, driver_cap)
    bound = "the actors' compute" if compute_cap <= driver_cap else "the driver's dispatch rate"
    copy_s = r1["put_gb"] * 8 / args.network_gbps
    share = [r["eval_cpu"] / max(r["eval_actor"], 1e-9) for r in runs]
    load = os.getloadavg()[0]
    print(f"""
{args.model}: reward = {cfg.reward_windows} windows x {cfg.reward_ctx} tokens; prepare {t_prepare:.0f}s.
Machine: {os.cpu_count()} cores, load average {load:.1f} during the run (other processes compete).

Where the time goes
* evaluation: the forward pass on an actor costs {r1['eval_cpu']:.2f} CPU seconds (1 thread); it took
  {r1['eval_actor']:.2f}s of wall time with 1 worker, {r2['eval_actor']:.2f}s with {r2['workers']}: each actor got
  {" / ".join(f"{x:.0%}" for x in share)} of a core;
* serialisation per evaluation: an allocation pickles to {a_bytes:,} bytes, its metrics to
  {m_bytes:,}; a Ray call round trip is {r1['ping'] * 1e3:.1f} ms; the driver sees {per_eval_overhead * 1e3:.0f} ms more
  than the actor's own time per evaluation ({per_eval_overhead / max(r1['eval_wall'], 1e-9):.1%});
* cache transfer: none per evaluation.  Once per pool: {r1['put_gb']:.2f} GB of float32 weights
  (reference + every tensor x candidate format: {", ".join(formats)}) put in the object
  store in {r1['put_seconds']:.1f}s ({rate:.2f} GB/s, serialisation + copy; the default candidates
  would be {full_gb:.2f} GB, ~{full_gb / rate:.0f}s), read zero-copy by every actor on the node; the
  actors' start took {r1['actors_start']:.1f}s (model shell {ph['model']:.1f}s, cache views {ph['cache']:.2f}s,
  reference pass {ph['reference']:.1f}s, the rest process start and imports).

{r2['workers']} vs {r1['workers']} workers: {r2['evals_per_s']:.3f} vs {r1['evals_per_s']:.3f} evaluations/s = {ratio:.2f}x.  2x is the limit on
2 cores; the ratio follows the CPU the actors could get ({share[-1] * r2['workers']:.2f} cores for
{r2['workers']} actors vs {share[0]:.2f} for 1): Ray's own cost is {per_eval_overhead * 1e3:.0f} ms per evaluation.

16-node estimate ({args.nodes} nodes x {args.cores_per_node} cores, 1 actor per core at the measured
{per_eval:.2f} CPU s per evaluation): {actors} / {per_eval:.2f} = {compute_cap:.0f} evaluations/s of compute; the
driver dispatched {driver_cap:.0f} no-op calls/s here, so ~{est:.0f} evaluations/s, bound by {bound}
(the agent must propose that fast: batch ask/tell, several environments).  Start-up adds
one cache copy per node, ~{copy_s:.0f}s at {args.network_gbps:g} Gbit/s ({full_gb * 8 / args.network_gbps:.0f}s with the default
candidates), and the actors' start.""")
    if args.json:
        write_json_atomic(args.json, {
            "model": args.model, "prepare_seconds": t_prepare, "in_process_1": local1,
            "in_process_all": local_all, "allocation_bytes": a_bytes, "metrics_bytes": m_bytes,
            "runs": runs, "ratio": ratio, "estimate_16_nodes": est, "compute_cap": compute_cap,
            "driver_cap": driver_cap, "cpu_share": share, "load_average": load,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
