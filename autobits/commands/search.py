"""``autobits search``: solvers and agents over one model at one budget.

Writes ``DIR/allocation.json`` (the allocation), ``DIR/metrics.json`` (its held-out metrics,
the same keys as ``autobits eval``), and for the learning agents ``DIR/report.md`` with plots.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from autobits.errors import AutobitsError

__all__ = ["register", "cmd_search", "add_prepare_args", "prepare_config_from_args"]

log = logging.getLogger(__name__)

SOLVER_NAMES = ("uniform", "llamacpp", "greedy", "ilp")
AGENT_NAMES = ("sac", "optuna")


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    from autobits.cli import add_model_args, add_text_args

    add_model_args(p)
    add_text_args(p)
    p.add_argument("--calib-windows", type=int, default=8,
                   help="calibration windows (from the start of the text; default 8)")
    p.add_argument("--reward-windows", type=int, default=2,
                   help="calibration windows the search reward is measured on (default 2)")
    p.add_argument("--reward-ctx", type=int, default=256,
                   help="tokens of each reward window (default 256)")
    p.add_argument("--select-windows", type=int, default=4,
                   help="calibration windows (after the reward ones, full --ctx) on which an "
                        "agent's best allocations are re-measured before one is chosen; 0 "
                        "trusts the reward slice alone (default 4)")
    p.add_argument("--fold", action="store_true", help="apply Scale Folding before quantizing")
    p.add_argument("--imatrix", action="store_true",
                   help="quantize with calibration importance vectors (llama.cpp's imatrix)")


def prepare_config_from_args(args: argparse.Namespace):
    from autobits.pipeline import PrepareConfig

    return PrepareConfig(
        model=args.model, text=args.text, ctx=args.ctx, calib_windows=args.calib_windows,
        eval_windows=args.windows, reward_windows=args.reward_windows,
        reward_ctx=min(args.reward_ctx, args.ctx), fold=args.fold, imatrix=args.imatrix,
        select_windows=getattr(args, "select_windows", 4),
    )


def _baselines(prepared, limit: int, skip: str) -> dict:
    """Held-out metrics of the non-learned solvers at the same budget (for the report)."""
    from autobits.solvers import solve

    out = {}
    for method in SOLVER_NAMES:
        if method == skip:
            continue
        try:
            alloc = solve(method, prepared.table, limit_bytes=limit)
        except AutobitsError as e:  # e.g. no llama.cpp preset fits this budget
            log.info("baseline %s skipped: %s", method, e)
            continue
        out[method] = (alloc, prepared.heldout(alloc))
    return out


def cmd_search(args: argparse.Namespace) -> int:
    from autobits.allocation import write_json_atomic
    from autobits.cli import budget_from_args, format_table
    from autobits.pipeline import prepare

    budget = budget_from_args(args)
    if budget is None:
        raise AutobitsError("search needs a budget: --target-bpw B or --max-bytes N")
    if args.evals < 1:
        raise AutobitsError(f"--evals must be at least 1, got {args.evals}")
    cfg = prepare_config_from_args(args)
    out = Path(args.out)
    if args.gguf and not Path(args.gguf).parent.is_dir():  # before the slow part
        raise AutobitsError(f"--gguf: output folder {str(Path(args.gguf).parent)!r} does not exist")
    from autobits.model import load_model

    lm = load_model(cfg.model)
    limit = budget.check_feasible(lm.specs, cfg.formats)
    prepared = prepare(cfg, lm=lm)

    from autobits.solvers import solve

    if args.agent in SOLVER_NAMES:
        from autobits.agents import Evaluation, SearchResult

        best = solve(args.agent, prepared.table, limit_bytes=limit)
        # one measurement of the solver's answer, for the report
        rm = prepared.reward(best)
        result = SearchResult(agent=args.agent, best=best, best_metrics=rm, history=[
            Evaluation(index=0, kld=rm.kld, bytes=best.bytes, bpw=best.bpw,
                       feasible=best.bytes <= limit, seconds=rm.seconds)],
            meta={"solver": args.agent, "evals": 1})
    else:
        from autobits.agents import AGENTS, SearchProblem
        from autobits.cluster import cluster_evaluate_factory

        if args.agent not in AGENTS:
            raise AutobitsError(f"agent {args.agent!r} is not available; built: {sorted(AGENTS)}")
        warm = solve("greedy", prepared.table, limit_bytes=limit)
        many, close = cluster_evaluate_factory(prepared, args)
        try:
            problem = SearchProblem(table=prepared.table, features=prepared.features,
                                    limit_bytes=limit, evaluate=prepared.reward, warm_start=warm,
                                    evaluate_many=many)
            options = {"sampler": args.sampler} if args.agent == "optuna" else {}
            agent = AGENTS[args.agent](**options)
            result = agent.search(problem, evals=args.evals, seed=args.seed, out_dir=out,
                                  resume=args.resume)
        finally:
            close()
        if cfg.select_windows > 0:
            from autobits.agents.selection import select

            result = select(result, measure=prepared.select, warm_start=warm)
        best = result.best

    m = prepared.heldout(best)
    best.save(out / "allocation.json")
    payload = {**m.to_json(), "model": lm.name, "agent": args.agent, "budget": budget.describe(),
               "limit_bytes": limit, "text": prepared.split.to_json(),
               "timings": prepared.timings}
    gguf_path = None
    if args.gguf is not None:
        from autobits.exports.gguf import export_gguf

        gguf_path = export_gguf(prepared.lm, best, Path(args.gguf) if args.gguf else
                                out / f"{Path(lm.name).name}-{best.bpw:.2f}bpw.gguf",
                                importance=prepared.importance())
        payload["gguf"] = str(gguf_path)
    write_json_atomic(out / "metrics.json", payload)
    rows = [[args.agent, f"{m.kld:.5f}", f"{m.ppl:.4f}", f"{m.top1:.4f}", f"{m.bytes:,}",
             f"{m.bpw:.4f}"]]
    from autobits.agents.report import write_report

    baselines = _baselines(prepared, limit, skip=args.agent)
    for name, (a, bm) in baselines.items():
        rows.append([name, f"{bm.kld:.5f}", f"{bm.ppl:.4f}", f"{bm.top1:.4f}",
                     f"{bm.bytes:,}", f"{bm.bpw:.4f}"])
    write_report(result, out, heldout=m, baselines=baselines, specs=lm.specs)
    print(format_table(rows, ["allocation", "KLD", "PPL", "top-1", "bytes", "bpw"]))
    print(f"\nbudget {budget.describe()} = {limit:,} bytes; held-out: {m.windows} windows x "
          f"{cfg.ctx} tokens (reference PPL {m.ref_ppl:.4f})")
    print(f"run directory: {out}\n  allocation: {out / 'allocation.json'}\n"
          f"  metrics:    {out / 'metrics.json'}")
    print(f"  report:     {out / 'report.md'}")
    if gguf_path is not None:
        print(f"  GGUF:       {gguf_path} ({gguf_path.stat().st_size:,} bytes; "
              f"llama.cpp loads it as is)")
    return 0


def register(sub) -> dict:
    from autobits.cli import add_budget_args

    p = sub.add_parser("search", help="allocate formats under a budget with a solver or agent")
    add_prepare_args(p)
    add_budget_args(p)
    p.add_argument("--agent", default="greedy", choices=SOLVER_NAMES + AGENT_NAMES,
                   help="solver or agent (default greedy)")
    p.add_argument("--evals", type=int, default=300,
                   help="evaluations for the learning agents (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="tpe", choices=("tpe", "cmaes", "gp"),
                   help="Optuna sampler (default tpe)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in --out")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--gguf", nargs="?", const="", default=None, metavar="PATH",
                   help="also export the allocation as a GGUF file (default path: "
                   "OUT/<model>-<bpw>bpw.gguf)")
    from autobits.cluster import add_cluster_args

    add_cluster_args(p)
    return {"search": cmd_search}
