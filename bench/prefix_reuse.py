#!/usr/bin/env python3
"""Reward-evaluation speed with and without the incumbent's block outputs (issue 15, item 2).

A search step changes some tensors of an incumbent allocation; with
:meth:`autobits.evaluate.Evaluator.set_incumbent` the evaluation starts at the first block
that changed.  This script draws search-like steps around an incumbent (each step moves
``--groups`` random groups, role x depth bucket as the Optuna agent's, to another valid
format) and evaluates every step twice on the same windows: a full pass and a pass that reuses
the incumbent's outputs, interleaved (alternating which runs first, every new weight quantized before either is
timed) so that load from other processes and the weight cache favour neither.  It
prints tokens per second of each (median over steps), their ratio, the share of blocks
reused, and checks that both give the same per-window KLD.

    .venv/bin/python -m bench.prefix_reuse --model smollm2-135m-float --steps 12
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys

import numpy as np

from autobits.allocation import Allocation
from autobits.app.options import format_table
from autobits.evaluate import Evaluator
from autobits.model import load_model
from autobits.text import load_text, make_windows

log = logging.getLogger("bench.prefix_reuse")

#: The incumbent: every tensor in the first of these formats it fits (a mid-size mix).
BASE_FORMATS = ("Q4_K", "Q5_1", "Q8_0")
#: Depth buckets per role, as the Optuna agent's default groups.
DEPTH_BUCKETS = 4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-float")
    ap.add_argument("--text", default="stdlib")
    ap.add_argument("--windows", type=int, default=2, help="windows per evaluation (reward: 2)")
    ap.add_argument("--ctx", type=int, default=256, help="tokens per window (reward: 256)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--groups", type=int, default=2, help="groups moved per step")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    lm = load_model(args.model)
    windows = make_windows(load_text(args.text), lm.tokenizer, ctx=args.ctx).split(
        calib=args.windows, eval=0).calib
    full = Evaluator(lm, windows)
    reuse = Evaluator(lm, windows, cache=full.cache)
    specs = [s for s in lm.specs if s.quantizable]
    fits = {s.name: s.valid_formats() for s in specs}
    base = {n: next(f for f in BASE_FORMATS if f in fits[n]) for n in fits}
    n_blocks = 1 + max(s.block for s in specs if s.block is not None)
    group = {s.name: (s.role, None if s.block is None else s.block * DEPTH_BUCKETS // n_blocks)
             for s in specs}
    keys = sorted(set(group.values()), key=str)
    reuse.set_incumbent(Allocation.build(lm.name, lm.specs, base))
    rng = np.random.default_rng(args.seed)
    rows, t_full, t_reuse, worst = [], [], [], 0.0
    for step in range(args.steps):
        moved = [keys[i] for i in rng.choice(len(keys), size=args.groups, replace=False)]
        tensors = dict(base)
        for n, g in group.items():
            if g in moved:
                others = [f for f in fits[n] if f != base[n]]
                tensors[n] = others[int(rng.integers(len(others)))]
        alloc = Allocation.build(lm.name, lm.specs, tensors)
        for n, f in tensors.items():  # quantize outside the timed passes
            full.cache.get(n, f)
        if step % 2:  # alternate the order, so neither pass always runs first
            b = reuse.evaluate(alloc)
            a = full.evaluate(alloc)
        else:
            a = full.evaluate(alloc)
            b = reuse.evaluate(alloc)
        first = reuse.first_changed_block(tensors)
        worst = max(worst, max(abs(x - y) for x, y in zip(a.window_kld, b.window_kld)))
        t_full.append(a.tokens / a.seconds)
        t_reuse.append(b.tokens / b.seconds)
        rows.append([step, "; ".join(f"{r}@{d}" for r, d in moved), first,
                     f"{t_full[-1]:,.0f}", f"{t_reuse[-1]:,.0f}", f"{a.kld:.5f}"])
    print(format_table(rows, ["step", "groups moved (role@depth bucket)", "first block",
                              "full tok/s", "reuse tok/s", "KLD"]))
    med_f, med_r = statistics.median(t_full), statistics.median(t_reuse)
    share = reuse.blocks_reused / max(1, reuse.blocks_reused + reuse.blocks_run)
    print(f"\n{args.model}, {args.windows} windows x {args.ctx} tokens, {args.groups} groups per "
          f"step: median {med_f:,.0f} tok/s full, {med_r:,.0f} tok/s reusing "
          f"({med_r / med_f:.2f}x); {share:.0%} of the blocks reused; largest per-window KLD "
          f"difference between the two {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
