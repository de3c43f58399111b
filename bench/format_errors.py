#!/usr/bin/env python3
"""Relative RMS error of every registered format on real SmolLM2-135M tensors, by bits per weight.

For each format and tensor: ``||W - deq(q(W))|| / ||W||`` (float64 norms), averaged over
tensors, and printed sorted by bits per weight with a check of the expected order (more
bits, less error).  Three reference sets:

* ``smollm2``: the model's reference weights (``autobits.model.load_model``), i.e. the
  dequantized tensors of the SmolLM2 GGUF.  That file stores them as Q4_1 (token_embd as
  Q8_0), so every Q4_1 block of the source is already on a Q4_1 grid: re-quantizing to Q4_1
  is nearly lossless and formats whose grid contains (or nearly contains) Q4_1's look
  better than they would on float weights;
* ``dithered``: the same tensors moved off that grid (uniform noise of +-0.45 grid step per
  block, as ``bench/formats.py``), which removes the Q4_1 advantage;
* ``gaussian``: random normal tensors of the same shapes (no grid at all).

Two tables per set: over the tensors every format fits (row length 1536: the 30
``ffn_down`` weights, the only ones the 256-value K-quant super-blocks and the G128 groups
divide), so the formats are compared on the same data; and over all 2-D weights each
format fits (``n`` says how many).  ``--rows`` caps the rows taken per tensor (evenly
spaced; the error is a mean over rows, so this is an estimate; 0 = all rows).

    .venv/bin/python -m bench.format_errors --json errors.json
    .venv/bin/python -m bench.format_errors --sets smollm2 --rows 0      # every row
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench.formats import dither_blocks

from autobits.formats import format_names, get_format
from autobits.io import write_json_atomic

SETS = ("smollm2", "dithered", "gaussian")
#: format families for the within-family order check
FAMILIES = {
    "ggml K": ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"),
    "ggml legacy": ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL"),
    "float": ("F32", "F16", "BF16"),
}


def load_weights(rows: int) -> list[tuple[str, str, np.ndarray]]:
    """(name, role, float32 array) of every quantizable 2-D weight of the SmolLM2 float stand-in (the packaged Q4_1 file would make its own format free), ``rows`` rows
    each (evenly spaced; 0 = all)."""
    from autobits.model import load_model

    m = load_model("smollm2-135m-float")
    out = []
    for s in m.quantizable:
        w = m.reference_weight(s.name).detach().cpu().numpy().astype(np.float32)
        if w.ndim != 2:
            continue
        if rows and w.shape[0] > rows:
            w = w[np.linspace(0, w.shape[0] - 1, rows).round().astype(int)]
        out.append((s.name, s.role, np.ascontiguousarray(w)))
    return out


def reference_set(kind: str, weights, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    if kind == "smollm2":
        return [(n, x) for n, _, x in weights]
    if kind == "dithered":
        return [(n, dither_blocks(x, rng)) for n, _, x in weights]
    if kind == "gaussian":
        return [(n, rng.standard_normal(x.shape).astype(np.float32)) for n, _, x in weights]
    raise ValueError(kind)


def rel_rms(fmt, x: np.ndarray) -> float:
    y = fmt.dequantize(fmt.quantize(x), x.shape).astype(np.float64)
    x64 = x.astype(np.float64)
    return float(np.linalg.norm(y - x64) / np.linalg.norm(x64))


def measure(names: list[str], tensors) -> dict:
    """Per format: the relative error of every tensor it fits, and the bpw."""
    res = {}
    for name in names:
        fmt = get_format(name)
        t0 = time.perf_counter()
        errs = {n: rel_rms(fmt, x) for n, x in tensors if fmt.fits(x.shape[-1])}
        res[name] = {"bpw": fmt.bits_per_weight, "errors": errs, "seconds": time.perf_counter() - t0}
        print(f"  {name}: {len(errs)} tensors, {res[name]['seconds']:.1f}s", file=sys.stderr)
    return res


def order_violations(rows: list[tuple[str, float, float]]) -> list[str]:
    """Pairs (a, b) with bpw(a) > bpw(b) but err(a) > err(b): more bits, more error."""
    out = []
    for na, ba, ea in rows:
        for nb, bb, eb in rows:
            if ba > bb and ea > eb:
                out.append(f"{na} ({ba:.3f} bpw, err {ea:.5f}) vs {nb} ({bb:.3f} bpw, err {eb:.5f})")
    return out


def summarise(res: dict, common: set[str]) -> dict:
    """Table rows sorted by bpw (descending) and the order checks."""
    rows = []
    for name, r in res.items():
        errs = r["errors"]
        com = [e for n, e in errs.items() if n in common]
        rows.append({
            "format": name, "bpw": r["bpw"],
            "common_mean": float(np.mean(com)) if len(com) == len(common) and com else None,
            "all_mean": float(np.mean(list(errs.values()))) if errs else None,
            "all_n": len(errs),
        })
    rows.sort(key=lambda r: (-r["bpw"], r["format"]))
    ranked = [(r["format"], r["bpw"], r["common_mean"]) for r in rows if r["common_mean"] is not None]
    checks = {"all formats": order_violations(ranked)}
    fams = dict(FAMILIES)
    for g in (32, 64, 128):
        fams[f"INT*_G{g}"] = tuple(f"INT{b}_G{g}" for b in (8, 6, 5, 4, 3, 2))
    for fam, members in fams.items():
        checks[fam] = order_violations([t for t in ranked if t[0] in members])
    return {"rows": rows, "violations": checks}


def print_table(kind: str, summary: dict, common: list[str], n_all: int) -> None:
    print(f"\n== {kind}: relative RMS error ||W - deq(q(W))|| / ||W||, mean over tensors ==")
    print(f"common = the {len(common)} tensors every format fits; all = every 2-D weight the "
          f"format fits (of {n_all})")
    print(f"{'format':<10} {'bpw':>6} {'common':>10} {'all':>10} {'n':>4}")
    for r in summary["rows"]:
        c = "-" if r["common_mean"] is None else f"{r['common_mean']:.5f}"
        a = "-" if r["all_mean"] is None else f"{r['all_mean']:.5f}"
        print(f"{r['format']:<10} {r['bpw']:>6.3f} {c:>10} {a:>10} {r['all_n']:>4}")
    for fam, v in summary["violations"].items():
        state = "monotone" if not v else f"NOT monotone ({len(v)} pairs)"
        print(f"order (more bits, less error), {fam}: {state}")
        for line in v[:8]:
            print(f"    {line}")
        if len(v) > 8:
            print(f"    ... {len(v) - 8} more")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", help="comma-separated format names (default: all registered)")
    ap.add_argument("--sets", default=",".join(SETS), help=f"reference sets, from {','.join(SETS)}")
    ap.add_argument("--rows", type=int, default=256, help="rows per tensor (evenly spaced; 0 = all)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    args = ap.parse_args(argv)

    names = [n.strip().upper() for n in args.formats.split(",")] if args.formats else format_names()
    for n in names:
        get_format(n)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    for s in sets:
        if s not in SETS:
            ap.error(f"unknown set {s!r}; expected some of {', '.join(SETS)}")
    weights = load_weights(args.rows)
    fits_all = [n for n, _, x in weights if all(get_format(f).fits(x.shape[-1]) for f in names)]
    print(f"SmolLM2-135M: {len(weights)} 2-D weights, "
          f"{'all rows' if not args.rows else f'at most {args.rows} rows each (evenly spaced)'}; "
          f"fitting every format: {len(fits_all)} ({', '.join(sorted({n.split('.')[-2] for n in fits_all}))})")
    print("source weights: dequantized from the GGUF's Q4_1 (token_embd Q8_0): 'smollm2' flatters "
          "Q4_1 and grids close to it; 'dithered' and 'gaussian' do not")
    out = {"meta": {"rows": args.rows, "tensors": [[n, r, list(x.shape)] for n, r, x in weights],
                    "common": fits_all}, "sets": {}}
    for kind in sets:
        print(f"[{kind}]", file=sys.stderr)
        tensors = reference_set(kind, weights)
        res = measure(names, tensors)
        summary = summarise(res, set(fits_all))
        print_table(kind, summary, fits_all, len(weights))
        out["sets"][kind] = {"summary": summary, "per_tensor": {k: v["errors"] for k, v in res.items()}}
    if args.json:
        write_json_atomic(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
