"""The two checks of a float stand-in (autobits.standin) against its packaged model.

    python -m bench.standin [--model smollm2-135m-float] [--windows 16] [--json OUT]
                            [--standin FILE] [--offset 0.2] [--no-feedback] [--no-judge]
                            [--build-only]

1. **No free format.**  For every quantized tensor of the packaged file, the stand-in's
   tensor re-quantized to the packaged tensor's own format (autobits' byte-exact
   quantizer, no imatrix) has relative RMS error ``|Q(w) - w| / |w|``; the same format on
   Gaussian data of the same shape (seeded) gives the yardstick.  The table shows, per
   role and format, the ratio (min and median over tensors; the check: min >= 0.5).
   A tensor of more than ``--max-rows`` rows (Gemma's 262k-row embedding) is measured on
   its first ``--max-rows`` rows, both sides.
2. **Close to the real model.**  KL(packaged || stand-in) on held-out windows (the last
   ``--windows`` windows of ``ctx`` tokens of the calibration text; the stand-in was
   calibrated on the first ``calib_windows``): first by autobits' Evaluator (float
   numerics; the packaged model is the reference, the stand-in's weights are swapped in),
   then by llama.cpp through the judge extra (``judge(standin, reference=packaged)``, F16
   KV cache, no flash attention: llama-perplexity's ``--kl-divergence``).  The check:
   KLD <= 0.05.

By default the stand-in is the built-in one (made once into the cache); ``--standin FILE``
(built there with ``--offset`` / ``--no-feedback`` when missing) measures another
construction.  ``--build-only`` just makes the file (for ``/usr/bin/time -v``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np  # noqa: E402

from autobits.allocation import Allocation  # noqa: E402
from autobits.app.options import format_table  # noqa: E402
from autobits.io import write_json_atomic  # noqa: E402

log = logging.getLogger("bench.standin")


def requant_rows(source: Path, standin: Path, max_rows: int, seed: int) -> list[dict]:
    """Check 1, one row per quantized tensor of ``source``."""
    import gguf

    from autobits.formats import get_format
    from autobits.specs import role_of

    src = gguf.GGUFReader(source, "r")
    new = {t.name: t for t in gguf.GGUFReader(standin, "r").tensors}
    rows = []
    for i, t in enumerate(src.tensors):
        ttype = t.tensor_type.name
        if ttype in ("F32", "F16", "BF16"):
            continue
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        w = np.asarray(new[t.name].data, dtype=np.float32).reshape(-1, shape[-1])[:max_rows]
        fmt = get_format(ttype)

        def rel(x: np.ndarray) -> float:
            q = fmt.dequantize(fmt.quantize(x, None, tensor=t.name), x.shape)
            return float(np.sqrt(np.square(q.astype(np.float64) - x).sum() / np.square(x.astype(np.float64)).sum()))

        g = np.random.default_rng([seed, i]).standard_normal(w.shape).astype(np.float32)
        e_s, e_g = rel(w), rel(g)
        rows.append({"tensor": t.name, "role": role_of(t.name), "format": ttype,
                     "rows": int(w.shape[0]), "standin_err": e_s, "gaussian_err": e_g,
                     "ratio": e_s / e_g})
    return rows


def role_table(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["role"], r["format"]) for r in rows})
    for role, fmt in keys:
        sel = [r for r in rows if r["role"] == role and r["format"] == fmt]
        ratios = np.array([r["ratio"] for r in sel])
        worst = sel[int(ratios.argmin())]
        out.append({"role": role, "format": fmt, "tensors": len(sel),
                    "min_ratio": float(ratios.min()), "median_ratio": float(np.median(ratios)),
                    "worst": worst["tensor"], "standin_err": worst["standin_err"],
                    "gaussian_err": worst["gaussian_err"]})
    return out


def evaluator_kld(source_lm, standin: Path, windows: np.ndarray) -> dict:
    """Check 2 by autobits' Evaluator: reference = packaged model, stand-in swapped in."""
    from autobits.evaluate import Evaluator, WeightCache
    from autobits.model import load_model

    sd = load_model(standin)

    class StandinWeights(WeightCache):
        def get(self, name: str, fmt: str):
            return sd.reference_weight(name)

    ev = Evaluator(source_lm, windows, cache=StandinWeights(source_lm))
    alloc = Allocation.uniform(source_lm.name, source_lm.specs, "F32")
    m = ev.evaluate(alloc)
    return {"kld": m.kld, "ppl_standin": m.ppl, "ppl_packaged": m.ref_ppl, "top1": m.top1,
            "windows": m.windows, "tokens_scored": ev.n_scored, "seconds": m.seconds}


def judge_kld(source: Path, standin: Path, text: str, ctx: int, n: int) -> dict:
    from autobits.exports.judge import judge, llama_windows, open_llama

    llm = open_llama(standin, ctx=ctx)
    split = llama_windows(llm, text, ctx=ctx, n=n)
    res = judge(standin, windows=split.eval, reference=source, llm=llm)
    return {"kld": res.kld, "ppl_standin": res.ppl, "ppl_packaged": res.ref_ppl,
            "top1": res.top1, "windows": res.windows, "window_ids": list(split.eval_ids),
            "tokens_scored": res.tokens_scored, "kv_type": res.kv_type,
            "flash_attn": res.flash_attn, "seconds": res.seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-float", help="a stand-in built-in name")
    ap.add_argument("--standin", help="a stand-in file to measure (built here when missing)")
    ap.add_argument("--offset", type=float, default=None)
    ap.add_argument("--damp", type=float, default=None)
    ap.add_argument("--no-feedback", action="store_true")
    ap.add_argument("--windows", type=int, default=16, help="held-out windows (from the end)")
    ap.add_argument("--judge-windows", type=int, default=None, help="default: --windows")
    ap.add_argument("--max-rows", type=int, default=16384)
    ap.add_argument("--no-judge", action="store_true")
    ap.add_argument("--no-requant", action="store_true")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("gguf").setLevel(logging.WARNING)

    from dataclasses import replace

    from autobits.registry import STANDINS, cache_dir, resolve_model_path, standin_path
    from autobits.standin import StandinConfig, build_standin

    if args.model not in STANDINS:
        raise SystemExit(f"--model must be one of {', '.join(STANDINS)}")
    cfg = StandinConfig()
    over = {k: v for k, v in (("offset", args.offset), ("damp", args.damp)) if v is not None}
    if args.no_feedback:
        over["feedback"] = False
    cfg = replace(cfg, **over)
    source = resolve_model_path(STANDINS[args.model])
    t0 = time.perf_counter()
    if args.standin:
        path = Path(args.standin)
        if not path.is_file():
            build_standin(source, path, config=cfg, calibration_dir=cache_dir() / "standin")
    else:
        if over:
            raise SystemExit("--offset/--damp/--no-feedback need --standin FILE")
        path = standin_path(args.model)
    build_s = time.perf_counter() - t0
    print(f"stand-in: {path} ({build_s:.1f}s to resolve/build)")
    if args.build_only:
        return 0
    result: dict = {"model": args.model, "source": str(source), "standin": str(path),
                    "config": cfg.__dict__, "build_or_resolve_seconds": build_s}
    if not args.no_requant:
        rows = requant_rows(source, path, args.max_rows, cfg.seed)
        table = role_table(rows)
        print("\nno free format: re-quantized to the source format, relative RMS error / "
              "the format's on Gaussian data (check: min >= 0.5)")
        print(format_table(
            [[r["role"], r["format"], r["tensors"], f"{r['min_ratio']:.3f}",
              f"{r['median_ratio']:.3f}", r["worst"], f"{r['standin_err']:.4f}",
              f"{r['gaussian_err']:.4f}"] for r in table],
            ["role", "format", "tensors", "min ratio", "median", "worst tensor", "its err",
             "gaussian"]), flush=True)
        result["requant"] = {"roles": table, "tensors": rows,
                             "min_ratio": min(r["min_ratio"] for r in table)}
    from autobits.model import load_model
    from autobits.text import load_text, make_windows

    lm = load_model(source)
    split = make_windows(load_text(cfg.text), lm.tokenizer, ctx=cfg.ctx).split(
        calib=cfg.calib_windows, eval=args.windows)
    ev = evaluator_kld(lm, path, split.eval)
    ev["window_ids"] = list(split.eval_ids)
    del lm
    result["evaluator"] = ev
    print(f"autobits Evaluator: KLD {ev['kld']:.4f} on {ev['windows']} windows", flush=True)
    kl_rows = [["autobits Evaluator (float)", ev["windows"], f"{ev['kld']:.4f}",
                f"{ev['ppl_packaged']:.3f}", f"{ev['ppl_standin']:.3f}", f"{ev['top1']:.3f}"]]
    if args.json:  # what is measured so far (the judge runs llama.cpp in this process)
        write_json_atomic(args.json, result)
    if not args.no_judge:
        jd = judge_kld(source, path, cfg.text, cfg.ctx, args.judge_windows or args.windows)
        result["llama_cpp"] = jd
        kl_rows.append(["llama.cpp (judge, KV f16)", jd["windows"], f"{jd['kld']:.4f}",
                        f"{jd['ppl_packaged']:.3f}", f"{jd['ppl_standin']:.3f}",
                        f"{jd['top1']:.3f}"])
    print(f"\nclose to the real model: KL(packaged || stand-in) on held-out windows "
          f"{split.eval_ids[0]}..{split.eval_ids[-1]} of {cfg.ctx} tokens (check: <= 0.05)")
    print(format_table(kl_rows, ["measured by", "windows", "KLD", "ppl packaged",
                                 "ppl stand-in", "top-1"]))
    if args.json:
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
