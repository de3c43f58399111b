"""SAC versus the greedy solver on one model at one budget, with the same held-out windows.

    python bench/sac_vs_greedy.py                      # smollm2-135m, 5.25 bpw, 300 evaluations
    python bench/sac_vs_greedy.py --evals 100 --sac '{"action": "sensitivity", "use_sde": true}'

Prints calibration-slice KLD (what the search optimised) and held-out KLD / PPL / top-1 /
bytes / bpw of greedy, SAC's best allocation and, for context, uniform and llama.cpp presets;
``--json`` writes the same numbers plus SAC's history.  Long: run it in the background.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

log = logging.getLogger("bench.sac_vs_greedy")


def _pin_threads(n: int) -> None:
    """Keep torch at ``n`` threads (load_model would set the CPU count)."""
    import torch

    import autobits.model

    torch.set_num_threads(n)
    autobits.model._configure_torch = lambda: torch.set_num_threads(n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--target-bpw", type=float, default=5.25)
    ap.add_argument("--evals", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sac", default="{}", help="SACAgent options as JSON")
    ap.add_argument("--text", default="stdlib")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--windows", type=int, default=8, help="held-out windows")
    ap.add_argument("--reward-windows", type=int, default=2)
    ap.add_argument("--reward-ctx", type=int, default=256)
    ap.add_argument("--select-windows", type=int, default=4,
                    help="re-measure SAC's best allocations on this many further calibration "
                         "windows and keep the best there (0: trust the reward)")
    ap.add_argument("--cache-gb", type=float, default=None,
                    help="dequantized weights kept between evaluations, in GiB (least recently "
                         "used out; the quantized bytes are kept regardless; default: the "
                         "pipeline's, autobits.evaluate.DEFAULT_CACHE_BYTES)")
    ap.add_argument("--out", default=None, help="folder for the SAC policy and allocations")
    ap.add_argument("--train-policy", default=None,
                    help="also train a proxy-only policy across --bpw-range on the same prepared "
                         "model (no evaluation) and save it here, for bench/transfer.py")
    ap.add_argument("--bpw-range", default="4.5:6.5")
    ap.add_argument("--policy-steps", type=int, default=40_000)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: autobits' choice, the CPU count; 1 helps on a "
                         "busy machine)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        _pin_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    from autobits.agents import AGENTS, SearchProblem
    from autobits.allocation import Budget, write_json_atomic
    from autobits.cli import format_table
    from autobits.errors import AutobitsError
    from autobits.pipeline import PrepareConfig, prepare
    from autobits.solvers import solve

    t0 = time.perf_counter()
    cfg = PrepareConfig(model=args.model, text=args.text, ctx=args.ctx,
                        calib_windows=args.calib_windows, eval_windows=args.windows,
                        reward_windows=args.reward_windows, reward_ctx=args.reward_ctx,
                        select_windows=args.select_windows, 
                        cache_bytes=None if args.cache_gb is None else int(args.cache_gb * 2**30))
    prep = prepare(cfg)
    limit = Budget(target_bpw=args.target_bpw).check_feasible(prep.lm.specs, cfg.formats)
    log.info("prepared %s in %.0fs: %s", args.model, time.perf_counter() - t0, prep.timings)

    allocs = {}
    for method in ("uniform", "llamacpp", "greedy"):
        try:
            allocs[method] = solve(method, prep.table, limit_bytes=limit)
        except AutobitsError as e:
            log.info("%s skipped: %s", method, e)
    options = json.loads(args.sac)
    out = Path(args.out) if args.out else None
    problem = SearchProblem(table=prep.table, features=prep.features, limit_bytes=limit,
                            evaluate=prep.reward, warm_start=allocs["greedy"])
    t1 = time.perf_counter()
    res = AGENTS["sac"](**options).search(problem, evals=args.evals, seed=args.seed, out_dir=out)
    sac_s = time.perf_counter() - t1
    if args.select_windows > 0:
        from autobits.agents.selection import select

        allocs["sac (reward best)"] = res.best
        res = select(res, measure=prep.select, warm_start=allocs["greedy"])
    allocs["sac"] = res.best
    if out is not None:
        for name, a in allocs.items():
            a.save(out / (re.sub(r"\W+", "_", name).strip("_") + ".json"))

    rows, payload = [], {"model": args.model, "target_bpw": args.target_bpw, "limit_bytes": limit,
                         "evals": args.evals, "seed": args.seed, "sac_options": options,
                         "sac_seconds": round(sac_s, 1), "timings": prep.timings, "results": {}}
    for name, a in allocs.items():
        calib = prep.reward(a).kld
        m = prep.heldout(a)
        payload["results"][name] = {"calib_kld": calib, **m.to_json()}
        rows.append([name, f"{calib:.5f}", f"{m.kld:.5f}", f"{m.ppl:.4f}", f"{m.top1:.4f}",
                     f"{a.bytes:,}", f"{a.bpw:.4f}"])
    if args.train_policy:
        from autobits.agents.policy import train_policy
        from autobits.commands.agents import parse_bpw_range
        from autobits.envs import AllocTask

        t2 = time.perf_counter()
        policy = train_policy([AllocTask(prep.table, prep.features, name=args.model)],
                              bpw_range=parse_bpw_range(args.bpw_range), steps=args.policy_steps,
                              seed=args.seed, env_options={"action": "sensitivity"})
        policy.save(args.train_policy)
        a = policy.allocate(prep.table, prep.features, limit_bytes=limit)
        m = prep.heldout(a)
        payload["results"]["policy"] = {"calib_kld": None, **m.to_json(),
                                        "train_seconds": round(time.perf_counter() - t2, 1)}
        rows.append(["policy (proxy)", "-", f"{m.kld:.5f}", f"{m.ppl:.4f}", f"{m.top1:.4f}",
                     f"{a.bytes:,}", f"{a.bpw:.4f}"])
    g, s = payload["results"]["greedy"], payload["results"]["sac"]
    payload["sac_meta"] = {k: v for k, v in res.meta.items() if k != "options"}
    payload["history"] = [e.__dict__ for e in res.history]
    print(format_table(rows, ["allocation", "calib KLD", "held-out KLD", "PPL", "top-1", "bytes", "bpw"]))
    print(f"\n{args.model} at {args.target_bpw} bpw ({limit:,} bytes), {args.evals} evaluations, "
          f"SAC {sac_s:.0f}s: held-out KLD sac/greedy = {s['kld'] / g['kld']:.4f}, "
          f"bytes sac-greedy = {s['bytes'] - g['bytes']:+,}; calibration KLD sac/greedy = "
          f"{s['calib_kld'] / g['calib_kld']:.4f}")
    if args.json:
        write_json_atomic(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
