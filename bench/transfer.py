"""Zero-shot transfer: a policy trained on one model allocates for another, versus solvers.

    python bench/transfer.py                       # train on smollm2-135m, allocate gemma3-270m
    python bench/transfer.py --policy policy.zip   # reuse a trained policy
    python bench/transfer.py --budgets 4.75,5.5 --steps 60000 --kld-episodes 40
    python bench/transfer.py --policy policy.zip --optuna-evals 300   # + target-specific optuna

Trains (unless ``--policy``) across ``--bpw-range`` on the training model, then measures the
target model and, at each budget, compares the policy's zero-shot allocation (no evaluation
inside the loop) with the uniform, llama.cpp and greedy solvers on held-out windows; the
``allocate`` column is the time of the policy step alone (feature extraction is in the
target's preparation timings, printed below the table).  ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("bench.transfer")


def _config(model: str, args, *, formats=None):
    from autobits.pipeline import PrepareConfig

    kw = {} if formats is None else {"formats": tuple(formats)}
    return PrepareConfig(model=model, text=args.text, ctx=args.ctx, calib_windows=args.calib_windows,
                         eval_windows=args.windows, reward_windows=args.reward_windows,
                         reward_ctx=args.reward_ctx, select_windows=args.select_windows,
                         cache_bytes=None if args.cache_gb is None else int(args.cache_gb * 2**30),
                         **kw)


def _pin_threads(n: int) -> None:
    """Keep torch at ``n`` threads (load_model would set the CPU count)."""
    import torch

    import autobits.model

    torch.set_num_threads(n)
    autobits.model._configure_torch = lambda: torch.set_num_threads(n)


def _optuna(prep, limit: int, greedy, args):
    """The target-specific search the zero-shot policy is compared with: ``optuna`` with
    ``--optuna-evals`` evaluations warm-started from greedy, then the selection step."""
    from autobits.agents import AGENTS, SearchProblem
    from autobits.agents.selection import select

    t = time.perf_counter()
    problem = SearchProblem(table=prep.table, features=prep.features, limit_bytes=limit,
                            evaluate=prep.reward, warm_start=greedy)
    result = AGENTS["optuna"]().search(problem, evals=args.optuna_evals, seed=args.seed)
    if args.select_windows > 0:
        result = select(result, measure=prep.select, warm_start=greedy)
    seconds = time.perf_counter() - t
    log.info("optuna at %d bytes: %d evaluations, %.0fs, chose %s", limit, len(result.history),
             seconds, result.meta.get("selection", {}).get("chosen", "reward best"))
    return result.best, seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", default="smollm2-135m", help="comma-separated training models")
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--bpw-range", default="4.5:6.5")
    ap.add_argument("--budgets", default="4.75,5.5", help="target budgets in bpw")
    ap.add_argument("--steps", type=int, default=60_000)
    ap.add_argument("--kld-episodes", type=int, default=0)
    ap.add_argument("--env", default='{"action": "sensitivity"}',
                    help="env options as JSON (default sensitivity actions)")
    ap.add_argument("--sac", default="{}", help="SAC options as JSON")
    ap.add_argument("--policy", default=None,
                    help="use these policies (comma-separated files) instead of training one")
    ap.add_argument("--save-policy", default=None, help="write the trained policy here")
    ap.add_argument("--formats", default=None, help="candidate formats of the target (comma list)")
    ap.add_argument("--optuna-evals", type=int, default=0,
                    help="also run a target-specific optuna search of N evaluations per budget")
    ap.add_argument("--optuna-budgets", default=None,
                    help="the budgets (comma list) at which to run optuna (default: all)")
    ap.add_argument("--select-windows", type=int, default=4,
                    help="selection windows for the optuna search (0: trust its reward)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", default="stdlib")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--reward-windows", type=int, default=2)
    ap.add_argument("--reward-ctx", type=int, default=256)
    ap.add_argument("--cache-gb", type=float, default=None,
                    help="dequantized weights kept between evaluations (GiB, least recently used "
                         "out; default: the pipeline's)")
    ap.add_argument("--out", default=None, help="folder for the allocations")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: autobits' choice, the CPU count; 1 helps on a "
                         "busy machine)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        _pin_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    from autobits.agents.policy import load_policy, train_policy
    from autobits.allocation import Budget, write_json_atomic
    from autobits.cli import format_table
    from autobits.commands.agents import parse_bpw_range
    from autobits.envs import AllocTask
    from autobits.errors import AutobitsError
    from autobits.pipeline import prepare
    from autobits.solvers import solve

    payload: dict = {"train": args.train, "target": args.target, "results": {}}
    if args.policy:
        policies = {Path(p).stem: load_policy(p) for p in args.policy.split(",") if p}
    else:
        tasks, t0 = [], time.perf_counter()
        for name in [m for m in args.train.split(",") if m]:
            prep = prepare(_config(name, args))
            ev = prep.reward if args.kld_episodes else None
            tasks.append(AllocTask(prep.table, prep.features, evaluate=ev, name=name))
            if not args.kld_episodes:
                del prep
                gc.collect()
        policy = train_policy(tasks, bpw_range=parse_bpw_range(args.bpw_range), steps=args.steps,
                              seed=args.seed, kld_episodes=args.kld_episodes,
                              env_options=json.loads(args.env), sac_options=json.loads(args.sac))
        payload["train_seconds"] = round(time.perf_counter() - t0, 1)
        if args.save_policy:
            policy.save(args.save_policy)
        policies = {"policy": policy}
        del tasks
        gc.collect()
    payload["policy_meta"] = {k: p.meta for k, p in policies.items()}

    t0 = time.perf_counter()
    formats = args.formats.split(",") if args.formats else None
    prep = prepare(_config(args.target, args, formats=formats))
    payload["target_prepare_seconds"] = round(time.perf_counter() - t0, 1)
    payload["target_timings"] = prep.timings
    rows = []
    for bpw in [float(b) for b in args.budgets.split(",")]:
        limit = Budget(target_bpw=bpw).check_feasible(prep.lm.specs, prep.config.formats)
        allocs, seconds = {}, {}
        for label, policy in policies.items():
            t = time.perf_counter()
            allocs[label] = policy.allocate(prep.table, prep.features, limit_bytes=limit)
            seconds[label] = time.perf_counter() - t
        for method in ("uniform", "llamacpp", "greedy"):
            try:
                t = time.perf_counter()
                allocs[method] = solve(method, prep.table, limit_bytes=limit)
                seconds[method] = time.perf_counter() - t
            except AutobitsError as e:
                log.info("%s at %g bpw skipped: %s", method, bpw, e)
        if args.optuna_evals > 0 and (args.optuna_budgets is None or
                                      bpw in [float(b) for b in args.optuna_budgets.split(",")]):
            allocs["optuna"], seconds["optuna"] = _optuna(prep, limit, allocs["greedy"], args)
        res = {}
        for name, a in allocs.items():
            m = prep.heldout(a)
            res[name] = {**m.to_json(), "allocate_seconds": round(seconds[name], 3)}
            rows.append([f"{bpw:g}", name, f"{m.kld:.5f}", f"{m.ppl:.4f}", f"{m.top1:.4f}",
                         f"{a.bytes:,}", f"{a.bpw:.4f}", f"{seconds[name]:.2f}"])
            if args.out:
                a.save(Path(args.out) / f"{bpw:g}_{name}.json")
        payload["results"][f"{bpw:g}"] = res
    print(format_table(rows, ["bpw", "allocation", "held-out KLD", "PPL", "top-1", "bytes",
                              "file bpw", "allocate s"]))
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in prep.timings.items())
    for label, policy in policies.items():
        print(f"\n{label}: trained on {policy.meta.get('trained_on')} "
              f"({policy.meta.get('steps')} steps, {policy.meta.get('kld_episodes')} KLD episodes, "
              f"budget {policy.meta.get('bpw_range') or policy.meta.get('limit_bytes')})")
        for b, res in payload["results"].items():
            ratios = ", ".join(f"/{k} {res[label]['kld'] / res[k]['kld']:.4f}"
                               for k in ("greedy", "optuna", "uniform", "llamacpp") if k in res)
            print(f"  {b} bpw: held-out KLD ratio {ratios}")
    print(f"target {args.target} prepared in {payload['target_prepare_seconds']:.0f}s ({timings})")
    if args.json:
        write_json_atomic(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
