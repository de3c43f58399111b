"""Zero-shot transfer: a policy trained on one model allocates for another, versus solvers.

    python -m bench.transfer                       # train on smollm2-135m-float, allocate gemma3-270m-float
    python -m bench.transfer --policy policy.safetensors   # reuse a trained policy
    python -m bench.transfer --budgets 4.75,5.5 --steps 60000 --kld-episodes 40
    python -m bench.transfer --policy policy.safetensors --optuna-evals 300   # + target-specific optuna

Trains (unless ``--policy``) across ``--bpw-range`` on the training model, then measures the
target model and, at each budget, compares the policy's zero-shot allocation (no evaluation
inside the loop) with the uniform, llama.cpp and greedy solvers on held-out windows; the
``allocate`` column is the time of the policy step alone (feature extraction is in the
target's preparation timings, printed below the table).  ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import sys
import time
from pathlib import Path

from autobits.app.options import add_prepare_args, format_table, prepare_config_from_args
from bench.sac_vs_greedy import pin_threads

log = logging.getLogger("bench.transfer")


def _optuna(prep, budget, args):
    """The target-specific search the zero-shot policy is compared with: the search job
    (:func:`autobits.app.search`) with ``optuna`` for ``--optuna-evals`` evaluations,
    warm-started from greedy, then selection; no baselines, nothing written."""
    from autobits.agents import OptunaConfig
    from autobits.app import SearchConfig, search

    config = SearchConfig(prepare=prep.config, budget=budget, allocator="optuna",
                          agent=OptunaConfig(), evals=args.optuna_evals, seed=args.seed,
                          baselines=())
    outcome = search(config, prepared=prep)
    seconds = outcome.timings["allocate"]
    chosen = outcome.search.meta.get("selection", {}).get("chosen", "reward best")
    log.info("optuna at %d bytes: %d evaluations, %.0fs, chose %s", outcome.limit_bytes,
             len(outcome.search.history), seconds, chosen)
    return outcome.allocation, outcome.heldout, seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", default="smollm2-135m-float", help="comma-separated training models")
    ap.add_argument("--target", default="gemma3-270m-float")
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
    ap.add_argument("--seed", type=int, default=0)
    add_prepare_args(ap, model=False)
    ap.add_argument("--out", default=None, help="folder for the allocations")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: autobits' choice, the CPU count; 1 helps on a "
                         "busy machine)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        pin_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    from autobits.agents.policy import load_policy, train_policy
    from autobits.allocation import Budget
    from autobits.app.commands.agents import parse_bpw_range
    from autobits.envs import AllocTask
    from autobits.errors import AutobitsError
    from autobits.io import write_json_atomic
    from autobits.pipeline import prepare
    from autobits.solvers import solve

    payload: dict = {"train": args.train, "target": args.target, "results": {}}
    if args.policy:
        policies = {Path(p).stem: load_policy(p) for p in args.policy.split(",") if p}
    else:
        tasks, t0 = [], time.perf_counter()
        for name in [m for m in args.train.split(",") if m]:
            prep = prepare(prepare_config_from_args(args, model=name))
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
    config = prepare_config_from_args(args, model=args.target)
    if args.formats:
        config = dataclasses.replace(config, formats=tuple(args.formats.split(",")))
    prep = prepare(config)
    payload["target_prepare_seconds"] = round(time.perf_counter() - t0, 1)
    payload["target_timings"] = prep.timings
    rows = []
    for bpw in [float(b) for b in args.budgets.split(",")]:
        budget = Budget(target_bpw=bpw)
        limit = budget.check_feasible(prep.lm.specs, prep.config.formats)
        allocs, seconds, metrics = {}, {}, {}
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
            allocs["optuna"], metrics["optuna"], seconds["optuna"] = _optuna(prep, budget, args)
        res = {}
        for name, a in allocs.items():
            m = metrics.get(name) or prep.heldout(a)
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
