#!/usr/bin/env python3
"""Does the proxy error rank tensors the way the measured KLD does?

Quantizes ONE tensor at a time to a lossy format (by default Q3_K where its rows fit, else
Q4_0), measures the real KLD against the reference with the Evaluator on a few short
held-out windows (default 4 x 256 tokens from the end of the text, disjoint from the
calibration windows at its start), and prints the Spearman correlation over all tensors
between the measured KLD and several proxy variants computed from one calibration pass:

``fisher``        1/2 sum_j F_j (dW H dW^T)_jj, the library's default (a KLD estimate)
``fisher_diag``   the same with diag(H) only (no input correlations)
``plain``         tr(dW H dW^T), unweighted (absolute output error)
``relative``      tr(dW H dW^T) / tr(W H W^T) (output noise-to-signal ratio)
``weight_mse``    ||dW||^2 (no calibration at all)

The measured KLDs are kept in a resumable JSON cache (``--kld-cache``) so variants can be
re-scored without re-measuring; the KLD of the whole run takes 211 forward passes.

    .venv/bin/python -m bench.proxy_validation --json out.json
    .venv/bin/python -m bench.proxy_validation --limit 20            # a quick subset
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from autobits.allocation import Allocation
from autobits.io import write_json_atomic
from autobits.calibrate import Calibration, calibrate
from autobits.app.options import format_table
from autobits.evaluate import Evaluator, WeightCache
from autobits.features import TensorProxy, embedding_proxy_error, row_errors
from autobits.formats import get_format
from autobits.model import load_model
from autobits.registry import cache_dir
from autobits.text import load_text, make_windows

VARIANTS = ("fisher", "fisher_diag", "plain", "relative", "weight_mse")


def pick_format(spec, formats: list[str]) -> str:
    for f in formats:
        if get_format(f).fits(spec.row_length):
            return get_format(f).name
    raise SystemExit(f"none of {formats} fits {spec.name} (row length {spec.row_length})")


def proxies(calib: Calibration, name: str, w, wq) -> dict[str, float]:
    """Every proxy variant of replacing ``w`` by ``wq``."""
    import torch

    out = {"fisher": TensorProxy(calib, name, w)(wq),
           "plain": TensorProxy(calib, name, w, weighting="none")(wq)}
    dw = (wq - w).double()
    out["weight_mse"] = float(dw.square().sum())
    if name == "token_embd.weight":
        w32 = w.float()
        # the head's signal energy plus the lookup rows' (frequency-weighted)
        sig = float(row_errors(w32, calib.head_hessian()).sum()) if calib.tied else 0.0
        freq = torch.from_numpy(calib.token_frequency())
        sig += float((w32.double().square().sum(1) * freq).sum())
        out["relative"] = out["plain"] / sig
        diag = TensorProxy(calib, name, w)  # no off-diagonal form for the embedding rows
        out["fisher_diag"] = diag(wq) if not calib.tied else _embd_diag(calib, w, wq)
    else:
        h = calib.hessian(name)
        out["relative"] = out["plain"] / float(row_errors(w.float(), h).sum())
        r = row_errors(dw.float(), np.ascontiguousarray(np.diag(h)))
        out["fisher_diag"] = 0.5 * float((torch.from_numpy(calib.gain(name).copy()) * r).sum())
    return out


def _embd_diag(calib: Calibration, w, wq) -> float:
    import torch

    hd = np.ascontiguousarray(np.diag(calib.head_hessian()))
    return embedding_proxy_error(
        w, wq, calib.token_frequency(), gain=calib.gain("token_embd.weight"), head_h=hd,
        head_gain=torch.from_numpy(calib.head_gain.copy()), embed_scale=calib.embed_scale,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-float")
    ap.add_argument("--text", default="stdlib")
    ap.add_argument("--formats", default="Q3_K,Q4_0",
                    help="lossy format per tensor: the first of these that fits (default Q3_K,Q4_0)")
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--eval-ctx", type=int, default=256)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--calib-ctx", type=int, default=512)
    ap.add_argument("--fisher-windows", type=int, default=4)
    ap.add_argument("--calibration", help="load (if it exists) / save the calibration here")
    ap.add_argument("--kld-cache", help="resumable measured-KLD cache (default: in the autobits "
                    "cache folder)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N tensors")
    ap.add_argument("--json", help="write per-tensor results and correlations here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from scipy.stats import pearsonr, spearmanr

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    lm = load_model(args.model)
    corpus = load_text(args.text)
    specs = list(lm.quantizable)[: args.limit or None]

    t0 = time.perf_counter()
    if args.calibration and Path(args.calibration).is_file():
        calib = Calibration.load(args.calibration, lm=lm)
    else:
        split = make_windows(corpus, lm.tokenizer, ctx=args.calib_ctx).split(
            calib=args.calib_windows, eval=0)
        calib = calibrate(lm, split.calib, fisher_windows=args.fisher_windows)
        if args.calibration:
            calib.save(args.calibration)
    t_calib = time.perf_counter() - t0

    ev_split = make_windows(corpus, lm.tokenizer, ctx=args.eval_ctx).split(
        calib=0, eval=args.eval_windows)
    key = f"{lm.name}|{corpus.sha256[:16]}|{args.eval_ctx}x{args.eval_windows}"
    cache_path = Path(args.kld_cache or cache_dir() / "proxy_validation_kld.json")
    store = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    kld = store.setdefault(key, {})
    wcache = WeightCache(lm)
    ev = None  # built only when a KLD is not in the cache yet (re-scoring needs no forward)
    rows, records = [], []
    t0 = time.perf_counter()
    for i, s in enumerate(specs):
        fmt = pick_format(s, formats)
        k = f"{s.name}|{fmt}"
        if k not in kld:
            if ev is None:
                ev = Evaluator(lm, ev_split.eval, batch_size=args.eval_windows, cache=wcache)
            alloc = Allocation(model=lm.name, tensors={s.name: fmt}, bytes=1, params=1)
            kld[k] = ev.evaluate(alloc).kld
            store[key] = kld
            write_json_atomic(cache_path, store)
            print(f"[{i + 1}/{len(specs)}] {s.name} {fmt}: KLD {kld[k]:.3e}", flush=True)
        w = lm.reference_weight(s.name)
        p = proxies(calib, s.name, w, wcache.get(s.name, fmt))
        records.append({"name": s.name, "role": s.role, "format": fmt, "kld": kld[k], **p})
    t_kld = time.perf_counter() - t0

    y = np.array([r["kld"] for r in records])
    corr = {}
    for v in VARIANTS:
        x = np.array([r[v] for r in records])
        rho = float(spearmanr(x, y).statistic)
        pear = float(pearsonr(np.log(np.maximum(x, 1e-30)), np.log(np.maximum(y, 1e-30))).statistic)
        corr[v] = {"spearman": rho, "pearson_log": pear}
        rows.append([v, f"{rho:.3f}", f"{pear:.3f}"])
    print(format_table(rows, ["proxy", "Spearman", "Pearson (log-log)"]))
    # per-role breakdown of the library's proxy, and the worst rank disagreements
    by_role = {}
    for role in dict.fromkeys(r["role"] for r in records):
        sub = [r for r in records if r["role"] == role]
        if len(sub) > 2:
            by_role[role] = float(spearmanr([r["fisher"] for r in sub], [r["kld"] for r in sub]).statistic)
    print("\nSpearman (fisher) within a role: " +
          ", ".join(f"{r} {v:.2f}" for r, v in by_role.items()))
    ratio = np.array([r["fisher"] / max(r["kld"], 1e-30) for r in records])
    print(f"fisher proxy / measured KLD: median {np.median(ratio):.2f}, "
          f"10-90% range {np.percentile(ratio, 10):.2f}..{np.percentile(ratio, 90):.2f}")
    print(f"\n{lm.name}: {len(records)} tensors, format {'/'.join(formats)} (first that fits); "
          f"KLD on {args.eval_windows} held-out windows x {args.eval_ctx} tokens; calibration "
          f"{calib.n_windows} x {calib.ctx} tokens ({calib.fisher_tokens} with Fisher), "
          f"{t_calib:.0f}s; KLD pass {t_kld:.0f}s")
    if args.json:
        write_json_atomic(args.json, {
            "model": lm.name, "formats": formats, "correlation": corr, "by_role": by_role,
            "eval": {"windows": args.eval_windows, "ctx": args.eval_ctx},
            "calibration": {"windows": calib.n_windows, "ctx": calib.ctx,
                            "fisher_tokens": calib.fisher_tokens},
            "tensors": records,
        })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
