"""``autobits train-policy`` and ``autobits allocate``: zero-shot transfer of a SAC policy.

    autobits train-policy --models smollm2-135m --bpw-range 4.5:6.5 --out policy.safetensors
    autobits allocate --policy policy.safetensors --model gemma3-270m --target-bpw 5.25 --out DIR

``train-policy`` measures each model (calibration, candidates, features), then trains one
policy across the models with a budget drawn per episode from the bpw range, on the proxy
reward (``--kld-episodes N`` adds N episodes on measured KLD).  ``allocate`` measures the
model, runs the policy deterministically (no evaluation inside the loop), projects onto the
budget and writes ``DIR/allocation.json`` and, unless ``--no-eval``, ``DIR/metrics.json``
with held-out metrics as ``autobits eval`` computes them.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Callable

from autobits.app.options import (
    add_budget_args,
    add_prepare_args,
    budget_from_args,
    format_table,
    prepare_config_from_args,
)
from autobits.errors import AutobitsError, BudgetError
from autobits.io import write_json_atomic
from autobits.pipeline import prepare

__all__ = ["register", "cmd_train_policy", "cmd_allocate", "parse_bpw_range"]

log = logging.getLogger(__name__)


def parse_bpw_range(text: str) -> tuple[float, float]:
    """``"4.5:6.5"`` -> (4.5, 6.5); a single number is a one-point range."""
    parts = str(text).split(":")
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise BudgetError(f"--bpw-range must be LO:HI in bits per weight, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or not 0 < vals[0] <= vals[1]:
        raise BudgetError(f"--bpw-range must be LO:HI with 0 < LO <= HI, got {text!r}")
    return vals[0], vals[1]


def _measure(model: str, args: argparse.Namespace, *, eval_windows: int):
    """Load and measure ``model`` with the shared pipeline (windows, calibration, features)."""
    return prepare(prepare_config_from_args(args, model=model, eval_windows=max(1, eval_windows)))


def cmd_train_policy(args: argparse.Namespace) -> int:
    from autobits.agents.policy import train_policy
    from autobits.envs import AllocTask

    models = [m.strip() for m in str(args.models).split(",") if m.strip()]
    if not models:
        raise AutobitsError(f"--models needs at least one model name, got {args.models!r}")
    if args.steps < 1:
        raise AutobitsError(f"--steps must be positive, got {args.steps}")
    if args.kld_episodes < 0:
        raise AutobitsError(f"--kld-episodes must be >= 0, got {args.kld_episodes}")
    bpw_range = parse_bpw_range(args.bpw_range)
    tasks, timings = [], {}
    for name in models:
        t0 = time.perf_counter()
        prep = _measure(name, args, eval_windows=1)
        evaluate = prep.reward if args.kld_episodes else None
        tasks.append(AllocTask(prep.table, prep.features, evaluate=evaluate, name=name))
        timings[name] = round(time.perf_counter() - t0, 1)
        log.info("measured %s in %.1fs: %d tensors", name, timings[name], tasks[-1].n)
    env_options = {"order": args.order, "action": args.action}
    sac_options = {"gradient_steps": args.gradient_steps, "use_sde": args.sde}
    policy = train_policy(tasks, bpw_range=bpw_range, steps=args.steps, seed=args.seed,
                          kld_episodes=args.kld_episodes, env_options=env_options,
                          sac_options=sac_options, meta={"measure_seconds": timings})
    path = policy.save(args.out)
    m = policy.meta
    print(f"policy written to {path}: trained on {', '.join(models)} at {bpw_range[0]:g}:"
          f"{bpw_range[1]:g} bpw, {m['steps']} proxy steps + {m['kld_episodes']} KLD episodes, "
          f"{m['episodes']} episodes in {m['seconds']:.0f}s; feature spec "
          f"{policy.feature_spec['version']!r}")
    return 0


def cmd_allocate(args: argparse.Namespace) -> int:
    from autobits.agents.policy import load_policy

    t_start = time.perf_counter()
    # refuse a bad file before the slow measurement; a pickled (format-1) policy only when
    # the user vouches for its source
    policy = load_policy(args.policy, trust_pickle=args.trust_pickle)
    budget = budget_from_args(args)
    prep = _measure(args.model, args, eval_windows=0 if args.no_eval else args.windows)
    task_t = time.perf_counter()
    limit = budget.check_feasible(prep.lm.specs, prep.config.formats)
    alloc = policy.allocate(prep.table, prep.features, limit_bytes=limit)
    alloc_s = time.perf_counter() - task_t
    out = Path(args.out)
    alloc.save(out / "allocation.json")
    rows = [["policy", f"{alloc.bytes:,}", f"{alloc.bpw:.4f}"]]
    header = ["allocation", "bytes", "bpw"]
    if not args.no_eval:
        m = prep.heldout(alloc)
        split = prep.split
        write_json_atomic(out / "metrics.json", {
            **m.to_json(), "model": prep.lm.name, "allocation": str(out / "allocation.json"),
            "policy": str(args.policy), "text": split.to_json(),
            "timings": {**{k: round(v, 2) for k, v in prep.timings.items()},
                        "allocate": round(alloc_s, 3)},
        })
        rows = [["policy", f"{m.kld:.6f}", f"{m.ppl:.4f}", f"{m.ref_ppl:.4f}", f"{m.top1:.4f}",
                 f"{alloc.bytes:,}", f"{alloc.bpw:.4f}"]]
        header = ["allocation", "KLD", "PPL", "ref PPL", "top-1", "bytes", "bpw"]
    print(format_table(rows, header))
    print(f"\n{prep.lm.name} at {budget.describe()} ({limit:,} bytes) with {args.policy}: "
          f"allocation in {alloc_s:.2f}s, total {time.perf_counter() - t_start:.1f}s; "
          f"written to {out}")
    return 0


def register(sub) -> dict[str, Callable[[argparse.Namespace], int]]:

    p = sub.add_parser("train-policy",
                       help="train a SAC allocation policy across models and budgets")
    p.add_argument("--models", required=True, help="comma-separated model names or paths")
    p.add_argument("--bpw-range", required=True, help="budget range LO:HI in file-level bpw")
    p.add_argument("--out", required=True, help="policy file to write (zip)")
    p.add_argument("--steps", type=int, default=60_000,
                   help="environment steps on the proxy reward (default 60000)")
    p.add_argument("--kld-episodes", type=int, default=0,
                   help="episodes on measured KLD after the proxy training (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order", choices=("model", "sensitivity"), default="model",
                   help="tensor order of an episode (default model)")
    p.add_argument("--action", choices=("absolute", "residual", "sensitivity"),
                   default="sensitivity",
                   help="action mapping of the env (default sensitivity: proxy-error gains "
                        "solved by the equal-slope allocation; absolute is RAMP's)")
    p.add_argument("--sde", action="store_true", help="explore with gSDE noise")
    p.add_argument("--gradient-steps", type=int, default=64,
                   help="SAC updates per episode (default 64)")
    add_prepare_args(p, model=False, eval_windows=False)

    p = sub.add_parser("allocate",
                       help="allocate a model's formats with a trained policy (no search)")
    p.add_argument("--policy", required=True, help="policy file from train-policy")
    p.add_argument("--trust-pickle", action="store_true",
                   help="accept an old zip policy (format 1, pickled: loading it can run code "
                   "from the file; only for files from a source you trust)")
    add_prepare_args(p)
    add_budget_args(p, required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out metrics")
    return {"train-policy": cmd_train_policy, "allocate": cmd_allocate}
