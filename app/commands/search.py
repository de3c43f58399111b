"""``autobits search``: options -> :class:`~autobits.app.workflow.SearchConfig` ->
:func:`~autobits.app.workflow.search` -> the printed table.

Writes ``DIR/allocation.json`` (the allocation), ``DIR/metrics.json`` (its held-out metrics,
the same keys as ``autobits eval``, plus the baselines), ``DIR/report.md`` with plots, and with
``--gguf`` the GGUF file.
"""

from __future__ import annotations

import argparse
import logging

from autobits.app.options import (
    add_agent_args,
    add_budget_args,
    add_prepare_args,
    add_ray_args,
    add_requantize_arg,
    format_table,
    search_config_from_args,
)
from autobits.app.workflow import allocator_names, search
from autobits.pipeline import NUMERICS

__all__ = ["register", "cmd_search"]

log = logging.getLogger(__name__)


def _row(name: str, m) -> list[str]:
    return [name, f"{m.kld:.5f}", f"{m.ppl:.4f}", f"{m.top1:.4f}", f"{m.bytes:,}", f"{m.bpw:.4f}"]


def cmd_search(args: argparse.Namespace) -> int:
    config = search_config_from_args(args)
    outcome = search(config)
    m = outcome.heldout
    rows = [_row(config.allocator, m)] + [_row(n, bm) for n, (_, bm) in outcome.baselines.items()]
    print(format_table(rows, ["allocation", "KLD", "PPL", "top-1", "bytes", "bpw"]))
    budget = (f"{config.budget.describe()} = " if config.budget.target_bpw is not None else "")
    print(f"\nbudget {budget}{outcome.limit_bytes:,} bytes; held-out: "
          f"{m.windows} windows x {config.prepare.ctx} tokens (reference PPL {m.ref_ppl:.4f}); "
          f"numerics: {NUMERICS[config.prepare.numerics]}")
    paths = outcome.paths
    print(f"run directory: {config.out}\n  allocation: {paths['allocation']}\n"
          f"  metrics:    {paths['metrics']}\n  report:     {paths['report']}")
    if "gguf" in paths:
        print(f"  GGUF:       {paths['gguf']} ({paths['gguf'].stat().st_size:,} bytes; "
              f"llama.cpp loads it as is)")
    return 0


def register(sub) -> dict:
    p = sub.add_parser("search", help="allocate formats under a budget with a solver or agent")
    add_prepare_args(p)
    add_requantize_arg(p)
    add_budget_args(p)
    p.add_argument("--agent", default="greedy", choices=allocator_names(),
                   help="solver or agent (default greedy)")
    add_agent_args(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in --out")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out, replacing an earlier run's files (and "
                   "starting an agent's journal afresh)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--gguf", nargs="?", const="", default=None, metavar="PATH",
                   help="also export the allocation as a GGUF file (default path: "
                   "OUT/<model>-<bpw>bpw.gguf)")
    add_ray_args(p)
    return {"search": cmd_search}
