#!/usr/bin/env python3
"""Scale Folding on a real model: held-out KLD of a uniform format with and without folding.

Steps, on one loaded model:

1. held-out windows (the last ``--windows`` of ``--text``) and calibration windows (the
   first ``--calib``) from :mod:`autobits.text`;
2. an :class:`~autobits.evaluate.Evaluator` built on the ORIGINAL model, so every KLD below
   is against the original float model's distributions; the original logits of the first
   held-out window are kept;
3. uniform ``--fmt`` (llama.cpp's fallback where a row does not fit) on the unfolded model;
4. :func:`autobits.folding.fold` for ``--fmt`` on the calibration windows;
5. the folded float model (F32 everywhere: KLD and max relative logit difference against
   the original, both ~0 up to rounding) and uniform ``--fmt`` on the folded model.

With ``--imatrix`` every quantization (search and measurements) uses llama.cpp's importance,
``E[x^2]`` of each input on the calibration windows (of the folded input, ``/ s^2``, after
folding); ``token_embd`` gets none either way.

    .venv/bin/python -m bench.folding                       # smollm2-135m-float, Q4_0
    .venv/bin/python -m bench.folding --fmt Q4_K --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np

from autobits.allocation import Allocation
from autobits.app.options import format_table
from autobits.io import write_json_atomic
from autobits.evaluate import Evaluator, WeightCache
from autobits.folding import (
    DEFAULT_ALPHAS, DEFAULT_BETAS, collect_site_stats, fold, max_relative_logit_diff, site_plan,
)
from autobits.model import load_model
from autobits.text import load_text, make_windows

log = logging.getLogger("bench.folding")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def _logits(lm, ids: np.ndarray):
    import torch

    lm.restore()
    with torch.inference_mode():
        return lm.model(input_ids=torch.as_tensor(np.array(ids)), use_cache=False).logits


def _importance(plan, stats, scales=None) -> dict[str, np.ndarray]:
    """Per-tensor imatrix from the site statistics; with ``scales``, of the folded inputs."""
    out = {}
    for site in plan:
        imp = np.diag(stats[site.id].hessian).astype(np.float64)
        if scales and site.id in scales:
            imp = imp / site.expand(scales[site.id]) ** 2
        for n in site.consumers:
            out[n] = imp.astype(np.float32)
    return out


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    lm = load_model(args.model)
    windows = make_windows(load_text(args.text), lm.tokenizer, ctx=args.ctx)
    split = windows.split(calib=args.calib, eval=args.windows)
    ev = Evaluator(lm, split.eval)  # reference distributions of the ORIGINAL model
    orig_logits = _logits(lm, split.eval[:1])
    f32 = Allocation.uniform(lm.name, lm.specs, "F32")
    quant = Allocation.uniform(lm.name, lm.specs, args.fmt, fallback=True)

    rows, results = [], {}

    def measure(label: str, alloc: Allocation) -> None:
        m = ev.evaluate(alloc)
        results[label] = m.to_json()
        rows.append([label, f"{m.kld:.6f}", f"{m.ppl:.4f}", f"{m.top1:.4f}", f"{m.bpw:.4f}",
                     f"{m.seconds:.1f}"])
        log.info("%s: KLD %.6f, PPL %.4f", label, m.kld, m.ppl)

    stats = collect_site_stats(lm, split.calib)
    plan = site_plan(lm)
    if args.imatrix:  # llama.cpp's imatrix: E[x^2] of each tensor's input, diag(H)
        ev.cache = WeightCache(lm, _importance(plan, stats))
    measure(f"{quant.meta['rule']}", quant)
    report = fold(lm, stats, fmt=args.fmt, alphas=args.alphas, betas=args.betas,
                  imatrix=args.imatrix)
    # quantize the folded weights from now on (with the folded inputs' E[x^2] / s^2)
    ev.cache = WeightCache(lm, _importance(plan, stats, report.scales()) if args.imatrix else None)
    diff = max_relative_logit_diff(orig_logits, _logits(lm, split.eval[:1]))
    measure("folded float (F32)", f32)
    measure(f"folded + {quant.meta['rule']}", quant)

    by_kind: dict[str, list] = {}
    for g in report.groups:
        by_kind.setdefault(g.kind, []).append(g)
    kind_rows = []
    for kind, gs in by_kind.items():
        before = sum(g.error_before for g in gs)
        after = sum(g.error_after for g in gs)
        alphas = [g.alpha for g in gs]
        kind_rows.append([kind, f"{sum(g.alpha > 0 for g in gs)}/{len(gs)}",
                          f"{np.mean(alphas):.2f}", f"{sum(g.beta for g in gs if g.alpha > 0):.0f}",
                          f"{before / sum(g.energy for g in gs):.3e}",
                          f"{after / sum(g.energy for g in gs):.3e}",
                          f"{100 * (1 - after / before):.1f}%"])
    ref_kld = results[quant.meta["rule"]]["kld"]
    fold_kld = results[f"folded + {quant.meta['rule']}"]["kld"]
    summary = {
        "model": lm.name, "fmt": args.fmt, "imatrix": args.imatrix, "text": split.to_json(),
        "calib_tokens": int(split.calib.size), "eval_tokens": int(split.eval.size),
        "max_rel_logit_diff": diff, "kld_unfolded": ref_kld, "kld_folded": fold_kld,
        "kld_change": fold_kld / ref_kld - 1 if ref_kld > 0 else 0.0,
        "fold_seconds": report.seconds, "seconds": time.perf_counter() - t0,
        "metrics": results, "fold": report.to_json(),
    }  # fmt: skip
    print(format_table(rows, ["allocation", "KLD", "PPL", "top-1", "bpw", "s"], right=True))
    print()
    print(format_table(kind_rows, ["site", "folded", "mean alpha", "beta=1", "rel err before",
                                   "rel err after", "gain"], right=True))
    print(f"\n{lm.name}: {args.windows} held-out x {args.ctx} tokens, calibration "
          f"{args.calib} x {args.ctx}; reference = the original float model.\n"
          f"folded float: max relative logit difference {diff:.2e} (first held-out window); "
          f"KLD {args.fmt} {ref_kld:.6f} -> {fold_kld:.6f} "
          f"({100 * summary['kld_change']:+.1f}%); fold {report.seconds:.1f}s, "
          f"total {summary['seconds']:.1f}s")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-float")
    p.add_argument("--fmt", default="Q4_0", help="uniform format searched and measured")
    p.add_argument("--text", default="stdlib")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--windows", type=int, default=4, help="held-out windows (default 4)")
    p.add_argument("--calib", type=int, default=8, help="calibration windows (default 8)")
    p.add_argument("--alphas", type=_floats, default=DEFAULT_ALPHAS)
    p.add_argument("--betas", type=_floats, default=DEFAULT_BETAS)
    p.add_argument("--imatrix", action="store_true",
                   help="quantize with llama.cpp's imatrix (E[x^2] of each input, of the folded "
                   "input after folding), in the search and in the measurements")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    summary = run(args)
    if args.json:
        write_json_atomic(args.json, json.loads(json.dumps(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
