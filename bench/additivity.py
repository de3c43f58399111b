#!/usr/bin/env python3
"""Is KLD additive over tensor groups, and how far is the proxy from it? (issue 15, item 3)

Whether a learned or black-box search can beat the closed-form solver depends on two
things this script measures around the greedy allocation at one budget:

1. **Proxy fidelity per group.**  For every group (role x depth bucket, the groups the Optuna
   agent searches), move each of its tensors one step down its lower hull (the next cheaper
   candidate the solver would consider) and measure the KLD increase on calibration windows
   (paired, window by window, against the greedy allocation).  The ratio measured / proxy
   says how wrong the proxy's price of that group is; if the ratios spread widely, the
   solver is pricing some groups wrongly and a corrected proxy can do better.
2. **Additivity.**  For random pairs of groups, move both at once: if
   ``dKLD(g+h) = dKLD(g) + dKLD(h)`` to within a few percent, the objective is separable and
   an exact solver on *corrected* per-group prices is already (near) optimal, so a search
   that only picks the best of noisy evaluations has nothing left to find.
3. **A corrected solve.**  Scale each group's proxy errors by its measured ratio (shrunk
   toward 1 by the ratio's own uncertainty, clipped), solve greedy again at the same budget,
   and compare with greedy on the held-out windows (paired interval).  Corrections come from
   calibration windows only; the held-out windows judge.

    .venv/bin/python -m bench.additivity --model smollm2-135m-float --max-bytes 91724544 \\
        --imatrix --calib-windows 16 --pairs 16 --json runs/additivity.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

import numpy as np

from autobits.agents.optuna_agent import tensor_groups
from autobits.allocation import Allocation
from autobits.app.options import add_prepare_args, format_table, prepare_config_from_args
from autobits.evaluate import Evaluator
from autobits.io import write_json_atomic
from autobits.paired import paired_interval
from autobits.pipeline import prepare
from autobits.solvers.lagrange import greedy_index, lower_hull
from autobits.solvers.problem import check_limit, pack

log = logging.getLogger("bench.additivity")

#: Corrections are clipped to [1/CLIP, CLIP] times the proxy.
CLIP = 8.0


def _down_steps(p, index: np.ndarray) -> np.ndarray:
    """For each tensor, the next cheaper candidate on its lower hull (itself at the bottom)."""
    out = index.copy()
    for i in range(len(p.names)):
        n = int(p.count[i])
        hull = lower_hull(p.bytes[i, :n], p.error[i, :n])  # most to fewest bytes
        cur = int(p.bytes[i, index[i]])
        cheaper = [k for k in hull if int(p.bytes[i, k]) < cur]
        if cheaper:
            out[i] = cheaper[0]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_prepare_args(ap)
    ap.add_argument("--max-bytes", type=int, required=True, help="the budget (file bytes)")
    ap.add_argument("--depth-buckets", type=int, default=4, help="groups per role by depth")
    ap.add_argument("--pairs", type=int, default=16, help="random pairs of groups moved together")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    cfg = prepare_config_from_args(args)
    t0 = time.perf_counter()
    prepared = prepare(cfg)
    lm, table = prepared.lm, prepared.table
    p = pack(table)
    limit = check_limit(table, args.max_bytes)
    base_idx = greedy_index(p, limit)
    windows = prepared.split.calib[cfg.reward_windows:]
    ev = Evaluator(lm, windows, cache=prepared.cache)
    log.info("prepared in %.0fs; measuring on %d calibration windows of %d tokens",
             time.perf_counter() - t0, len(windows), windows.shape[1])

    def alloc(index: np.ndarray) -> Allocation:
        return Allocation.build(lm.name, lm.specs, p.choice(index))

    base = ev.set_incumbent(alloc(base_idx))  # moves of deep groups skip the blocks before
    names, group = tensor_groups(table, depth_buckets=args.depth_buckets)
    down = _down_steps(p, base_idx)
    rows_i = np.arange(len(p.names))

    def moved(groups) -> np.ndarray:
        idx = base_idx.copy()
        mask = np.isin(group, list(groups))
        idx[mask] = down[mask]
        return idx

    def proxy_delta(idx) -> float:
        return float((p.error[rows_i, idx] - p.error[rows_i, base_idx]).sum())

    singles = {}
    for g, gname in enumerate(names):
        idx = moved([g])
        if (idx == base_idx).all():
            continue
        m = ev.evaluate(alloc(idx))
        d = paired_interval(a=base.window_kld, b=m.window_kld)
        singles[g] = {"group": gname, "saved_bytes": int(p.total_bytes(base_idx) - p.total_bytes(idx)),
                      "proxy": proxy_delta(idx), "kld": d.diff, "lo": d.lo, "hi": d.hi,
                      "window_delta": [b - a for a, b in zip(base.window_kld, m.window_kld)]}
        log.info("%-22s saves %9d B: proxy %+.3e, KLD %+.5f [%+.5f, %+.5f]", gname,
                 singles[g]["saved_bytes"], singles[g]["proxy"], d.diff, d.lo, d.hi)

    rng = np.random.default_rng(args.seed)
    keys = sorted(singles)
    pairs = []
    seen = set()
    while len(pairs) < min(args.pairs, len(keys) * (len(keys) - 1) // 2):
        g, h = sorted(rng.choice(keys, size=2, replace=False).tolist())
        if (g, h) in seen:
            continue
        seen.add((g, h))
        m = ev.evaluate(alloc(moved([g, h])))
        joint = float(np.mean(m.window_kld) - np.mean(base.window_kld))
        summed = singles[g]["kld"] + singles[h]["kld"]
        # the interaction per window, paired: joint - (single g + single h)
        inter = [b - a - dg - dh for a, b, dg, dh in zip(
            base.window_kld, m.window_kld, singles[g]["window_delta"], singles[h]["window_delta"])]
        d = paired_interval(a=[0.0] * len(inter), b=inter)
        pairs.append({"groups": [names[g], names[h]], "joint": joint, "sum": summed,
                      "interaction": d.diff, "lo": d.lo, "hi": d.hi,
                      "rel": (joint - summed) / summed if summed else None})
        log.info("%s + %s: joint %+.5f, sum %+.5f (interaction %+.5f [%+.5f, %+.5f])",
                 names[g], names[h], joint, summed, d.diff, d.lo, d.hi)

    # corrected solve: per-group ratio measured / proxy, shrunk toward 1 by its noise
    scale = np.ones(len(p.names))
    for g, s in singles.items():
        if s["proxy"] <= 0 or s["kld"] <= 0:
            continue
        ratio = s["kld"] / s["proxy"]
        half = (s["hi"] - s["lo"]) / 2
        trust = s["kld"] ** 2 / (s["kld"] ** 2 + half ** 2)  # 1: sharp, 0: pure noise
        # proxy units -> KLD units: the median ratio is the common scale
        s["ratio"], s["trust"] = ratio, trust
    ratios = [s["ratio"] for s in singles.values() if "ratio" in s]
    common = float(np.median(ratios)) if ratios else 1.0
    for g, s in singles.items():
        if "ratio" in s:
            rel = np.clip(s["ratio"] / common, 1 / CLIP, CLIP)
            s["correction"] = float(rel ** s["trust"])
            scale[group == g] = s["correction"]
    corrected = dataclasses.replace(p, error=p.error * scale[:, None])
    corr_idx = greedy_index(corrected, limit)
    a_base, a_corr = alloc(base_idx), alloc(corr_idx)
    h_base, h_corr = prepared.heldout(a_base), prepared.heldout(a_corr)
    held = paired_interval(a=h_base.window_kld, b=h_corr.window_kld)
    sel = paired_interval(a=base.window_kld, b=ev.evaluate(a_corr).window_kld)
    reused = ev.blocks_reused / max(1, ev.blocks_reused + ev.blocks_run)

    proxy = np.array([s["proxy"] for s in singles.values()])
    kld = np.array([s["kld"] for s in singles.values()])
    from scipy.stats import spearmanr

    rho = float(spearmanr(proxy, kld).statistic) if len(kld) > 2 else float("nan")
    rel = np.array([q["rel"] for q in pairs if q["rel"] is not None])
    print(format_table(
        [[s["group"], f"{s['saved_bytes']:,}", f"{s['proxy']:.3e}", f"{s['kld']:+.5f}",
          f"[{s['lo']:+.5f}, {s['hi']:+.5f}]",
          f"{s['ratio'] / common:.2f}" if "ratio" in s else "-",
          f"{s.get('correction', 1.0):.2f}"] for s in singles.values()],
        ["group", "saved bytes", "proxy d", "KLD d", "95% interval", "ratio/median", "correction"]))
    print(f"\nproxy vs measured KLD increase over {len(kld)} groups: Spearman {rho:.3f}; "
          f"measured/proxy ratio (÷ median) spans {np.min(kld / proxy) / common:.2f}.."
          f"{np.max(kld / proxy) / common:.2f}" if len(kld) else "")
    print(format_table([[" + ".join(q["groups"]), f"{q['joint']:+.5f}", f"{q['sum']:+.5f}",
                         f"{q['interaction']:+.5f}", f"[{q['lo']:+.5f}, {q['hi']:+.5f}]",
                         f"{q['rel']:+.1%}" if q["rel"] is not None else "-"] for q in pairs],
                       ["pair", "joint", "sum of singles", "interaction", "95% interval", "rel"]))
    if len(rel):
        print(f"\nadditivity over {len(rel)} pairs: |joint - sum| / sum median {np.median(np.abs(rel)):.1%},"
              f" max {np.max(np.abs(rel)):.1%}; interactions significant at 95%: "
              f"{sum(1 for q in pairs if q['lo'] > 0 or q['hi'] < 0)} of {len(pairs)}")
    changed = int((corr_idx != base_idx).sum())
    print(f"\ncorrected greedy ({changed} tensors differ, {a_corr.bytes:,} vs {a_base.bytes:,} "
          f"bytes): held-out KLD {h_corr.kld:.5f} vs greedy {h_base.kld:.5f}; paired "
          f"{held.describe()}; on the calibration windows {sel.describe()}")
    print(f"evaluations took {reused:.0%} of the blocks from greedy's outputs instead of running "
          f"them ({time.perf_counter() - t0:.0f}s in all)")
    if args.json:
        write_json_atomic(args.json, {
            "model": lm.name, "limit_bytes": limit, "base_calib_kld": base.kld,
            "windows": int(len(windows)), "groups": list(singles.values()), "pairs": pairs,
            "spearman": rho, "common_ratio": common, "blocks_reused": reused,
            "corrected": {"changed": changed, "bytes": a_corr.bytes, "heldout_kld": h_corr.kld,
                          "greedy_heldout_kld": h_base.kld, "greedy_bytes": a_base.bytes,
                          "heldout_paired": held.to_json(), "calib_paired": sel.to_json(),
                          "tensors": a_corr.tensors},
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
