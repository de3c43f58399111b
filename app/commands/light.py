"""``autobits light``: an allocation from a GGUF file's weights and an imatrix alone.

    autobits light --model M --target-bpw B | --max-bytes N --recipe RECIPE [--imatrix FILE]
                   [--gguf OUT.gguf] [--json ALLOCATION.json] [--agent greedy|ilp]
                   [--allow-requantize] [--rows N] [--max-values N] [--workers N]

No torch model and no forward pass: the candidate table comes from sampled rows of every
tensor, weighted by the imatrix file (:func:`autobits.light.light_candidates`), the solver
allocates on it, and the allocation is written as a ``llama-quantize`` recipe
(:mod:`autobits.exports.recipe`); ``--gguf`` has llama.cpp's own quantizer write the file
from the source with that recipe and the same imatrix (the ``judge`` extra), ``--json``
writes the allocation for ``autobits eval`` / ``autobits export``.

Its own command, not a flag of ``search``: ``search`` measures on text (windows, Fisher
pass, folding, agents on Ray, held-out metrics, a run folder with a report) and almost every
one of its options would be meaningless here; ``--imatrix`` without a file (autobits' own
calibration) is impossible without a forward pass.  The options it shares (model, budget,
``--imatrix FILE``, ``--allow-requantize``) are the same helpers as everywhere.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from pathlib import Path

from autobits.app.options import (
    add_budget_args,
    add_model_args,
    add_requantize_arg,
    budget_from_args,
    format_table,
)
from autobits.errors import AutobitsError
from autobits.io import check_output_folder

__all__ = ["register", "cmd_light"]

log = logging.getLogger(__name__)

#: Solvers the light path offers (those that use the candidate errors).
LIGHT_AGENTS = ("greedy", "ilp")


def _check_inputs(args: argparse.Namespace):
    """Everything that can be refused before the slow part: outputs, the model file, the
    requantize rule, the imatrix file against the model, the sampling, the budget."""
    from autobits.light import LightConfig, open_gguf
    from autobits.requantize import check_requantize

    for out in (args.recipe, args.gguf, args.json):
        if out is not None:
            check_output_folder(Path(out).parent)
    if args.gguf is not None:
        from autobits.exports.judge import judge_available

        if not judge_available():
            raise AutobitsError("--gguf has llama.cpp's quantizer write the file: it needs "
                                "llama-cpp-python (pip install -e '.[judge]')")
    if args.workers is not None and args.workers < 1:
        raise AutobitsError(f"--workers must be at least 1, got {args.workers}")
    config = LightConfig(rows=args.rows, max_values=args.max_values,
                         min_rows=min(LightConfig.min_rows, args.rows))
    weights = open_gguf(args.model)
    check_requantize(weights.specs, model=weights.name, allow=args.allow_requantize)
    imx = None
    if args.imatrix is not None:
        from autobits.imatrix import read_imatrix

        imx = read_imatrix(args.imatrix)
        imx.importance_for(weights.specs, model=weights.name)  # a mismatch fails here
    limit = budget_from_args(args).check_feasible(weights.specs, config.formats)
    return config, weights, imx, limit


def cmd_light(args: argparse.Namespace) -> int:
    from autobits.exports.recipe import BASE_TYPE, apply_recipe, write_recipe
    from autobits.light import light_candidates
    from autobits.solvers import solve

    t0 = time.perf_counter()
    config, weights, imx, limit = _check_inputs(args)
    table = light_candidates(model=weights, imatrix=imx, config=config, workers=args.workers,
                             progress=True)
    t_table = time.perf_counter() - t0
    alloc = solve(args.agent, table, limit_bytes=limit)
    alloc.meta.update(light={k: table.meta[k] for k in (
        "weighting", "imatrix", "gains", "rows_read", "values_read", "values_total")},
        seconds={"candidates": round(t_table, 2), "solve": alloc.meta["seconds"]})
    recipe, flags = write_recipe(alloc, weights.specs, args.recipe)
    if args.json is not None:
        alloc.save(args.json)
    by_name = {s.name: s for s in weights.specs}
    nbytes: Counter = Counter()
    for name, fmt in alloc.tensors.items():
        nbytes[fmt] += by_name[name].nbytes(fmt)
    counts = Counter(alloc.tensors.values())
    rows = [[fmt, n, f"{nbytes[fmt]:,}"] for fmt, n in counts.most_common()]
    print(format_table(rows, ["format", "tensors", "bytes"], right=True))
    share = table.meta["values_read"] / max(1, table.meta["values_total"])
    imatrix = f"imatrix {args.imatrix}" if args.imatrix else "no imatrix (unweighted)"
    print(f"\n{weights.name}: {len(alloc.tensors)} tensors, {alloc.bytes:,} bytes "
          f"({alloc.bpw:.4f} bpw) for a budget of {limit:,}; {args.agent} on the light table "
          f"({imatrix}; {share:.1%} of the weights sampled) in {t_table:.1f}s")
    imx_flag = f" --imatrix {args.imatrix}" if args.imatrix else ""
    print(f"recipe: {recipe} (flags in {flags}):\n  llama-quantize $(cat {flags}){imx_flag} "
          f"{weights.path} OUT.gguf {BASE_TYPE}")
    if args.json is not None:
        print(f"allocation: {args.json}")
    if args.gguf is not None:
        t = time.perf_counter()
        importance = None if imx is None else {n: imx.vector(n) for n in imx.names}
        path = apply_recipe(weights.path, args.gguf, recipe, allocation=alloc,
                            importance=importance)
        print(f"GGUF written by llama.cpp's quantizer: {path} ({path.stat().st_size:,} bytes, "
              f"{time.perf_counter() - t:.1f}s)")
    return 0


def register(sub) -> dict:
    from autobits.light import LightConfig

    p = sub.add_parser("light", help="allocate from a GGUF file's weights and an imatrix alone "
                       "(no forward pass; any model size) and write a llama-quantize recipe")
    add_model_args(p)
    add_budget_args(p, required=True)
    p.add_argument("--imatrix", metavar="FILE",
                   help="llama.cpp imatrix file (GGUF or legacy .dat; llama-imatrix or "
                   "`autobits imatrix`): errors weighted by it and formats rounded with it; "
                   "without it, unweighted")
    p.add_argument("--recipe", required=True, metavar="FILE",
                   help="write the allocation as a llama-quantize --tensor-type-file here "
                   "(its flags in FILE.args)")
    p.add_argument("--gguf", metavar="PATH",
                   help="also write the GGUF file with llama.cpp's quantizer and the recipe "
                   "(needs the judge extra)")
    p.add_argument("--json", metavar="FILE",
                   help="also write the allocation JSON (for autobits eval / export --allocation)")
    p.add_argument("--agent", choices=LIGHT_AGENTS, default="greedy",
                   help="solver on the light candidate table (default greedy)")
    add_requantize_arg(p)
    p.add_argument("--rows", type=int, default=LightConfig.rows,
                   help=f"most rows sampled per tensor (default {LightConfig.rows})")
    p.add_argument("--max-values", type=int, default=LightConfig.max_values,
                   help="about this many values sampled per tensor: fewer rows for long rows "
                   f"(default {LightConfig.max_values})")
    p.add_argument("--workers", type=int, default=None,
                   help="threads measuring tensors (default: the CPU count)")
    return {"light": cmd_light}
