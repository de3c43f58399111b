"""SAC versus the greedy solver on one model at one budget, with the same held-out windows.

    python -m bench.sac_vs_greedy                      # smollm2-135m-float, 5.25 bpw, 300 evaluations
    python -m bench.sac_vs_greedy --evals 100 --sac '{"action": "sensitivity", "use_sde": true}'

Runs the search job (:func:`autobits.app.search` with the ``sac`` agent, warm-started from
greedy, then selection) and prints calibration-slice KLD (what the search optimised) and
held-out KLD / PPL / top-1 / bytes / bpw of greedy, SAC's answer (and its reward-slice best
before selection) and, for context, uniform and llama.cpp presets; ``--json`` writes the same
numbers plus SAC's history.  Long: run it in the background.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
from pathlib import Path

log = logging.getLogger("bench.sac_vs_greedy")


def pin_threads(n: int) -> None:
    """Keep torch at ``n`` threads (load_model would set the CPU count)."""
    import torch

    import autobits.model

    torch.set_num_threads(n)
    autobits.model._configure_torch = lambda: torch.set_num_threads(n)


def main(argv=None) -> int:
    from autobits.app.options import (
        add_agent_args,
        add_budget_args,
        add_prepare_args,
        search_config_from_args,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_prepare_args(ap)
    add_budget_args(ap, default_bpw=5.25)
    add_agent_args(ap)
    ap.add_argument("--sac", default="{}",
                    help="SACConfig fields as JSON (over --sac-action and --pretrain-episodes)")
    ap.add_argument("--out", default=None,
                    help="folder for the SAC checkpoints, the allocations and the search's report")
    ap.add_argument("--force", action="store_true", help="write into a non-empty --out")
    ap.add_argument("--train-policy", default=None,
                    help="also train a proxy-only policy across --bpw-range on the same prepared "
                         "model (no evaluation) and save it here, for bench.transfer")
    ap.add_argument("--bpw-range", default="4.5:6.5")
    ap.add_argument("--policy-steps", type=int, default=40_000)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: autobits' choice, the CPU count; 1 helps on a "
                         "busy machine)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        pin_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    from autobits.app import search
    from autobits.app.options import format_table
    from autobits.io import write_json_atomic

    options = json.loads(args.sac)
    config = search_config_from_args(args, allocator="sac")
    config = dataclasses.replace(config, agent=dataclasses.replace(config.agent, **options),
                                 baselines=("uniform", "llamacpp", "greedy"))
    outcome = search(config)
    prep, limit, res = outcome.prepared, outcome.limit_bytes, outcome.search
    sel = res.meta.get("selection")
    sac_s = outcome.timings["allocate"] - (sel["seconds"] if sel else 0.0)
    log.info("prepared %s: %s", args.model, prep.timings)

    # name -> (allocation, reward-slice metrics or None: measured below, held-out metrics)
    allocs = {name: (a, None, m) for name, (a, m) in outcome.baselines.items()}
    if prep.config.select_windows > 0:
        best, best_m = outcome.reward_best
        allocs["sac (reward best)"] = (best, best_m, prep.heldout(best))
    allocs["sac"] = (outcome.allocation, outcome.reward, outcome.heldout)
    if config.out is not None:
        for name, (a, _, _) in allocs.items():
            a.save(config.out / (re.sub(r"\W+", "_", name).strip("_") + ".json"))

    rows, payload = [], {"model": args.model, "target_bpw": config.budget.target_bpw,
                         "limit_bytes": limit, "evals": args.evals, "seed": args.seed,
                         "sac_options": options, "sac_seconds": round(sac_s, 1),
                         "timings": prep.timings, "results": {}}
    for name, (a, reward, m) in allocs.items():
        calib = (reward or prep.reward(a)).kld
        payload["results"][name] = {"calib_kld": calib, **m.to_json()}
        rows.append([name, f"{calib:.5f}", f"{m.kld:.5f}", f"{m.ppl:.4f}", f"{m.top1:.4f}",
                     f"{a.bytes:,}", f"{a.bpw:.4f}"])
    if args.train_policy:
        from autobits.agents.policy import train_policy
        from autobits.app.commands.agents import parse_bpw_range
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
    payload["history"] = [dataclasses.asdict(e) for e in res.history]
    print(format_table(rows, ["allocation", "calib KLD", "held-out KLD", "PPL", "top-1", "bytes", "bpw"]))
    print(f"\n{args.model} at {config.budget.describe()} ({limit:,} bytes), {args.evals} "
          f"evaluations, SAC {sac_s:.0f}s: held-out KLD sac/greedy = {s['kld'] / g['kld']:.4f}, "
          f"bytes sac-greedy = {s['bytes'] - g['bytes']:+,}; calibration KLD sac/greedy = "
          f"{s['calib_kld'] / g['calib_kld']:.4f}")
    if args.json:
        write_json_atomic(Path(args.json), payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
