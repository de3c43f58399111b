"""Evaluation speed: autobits' Evaluator next to llama.cpp's perplexity computation.

    python -m bench.eval_speed [--model smollm2-135m-float] [--windows 4] [--ctx 512]
                               [--repeats 3] [--f32] [--json OUT]

Both sides score the same windows (llama.cpp's own token ids of the last ``--windows``
windows of ``--text``), one window of ``--ctx`` tokens at a time, on all CPU threads:

* autobits: :meth:`Evaluator.evaluate` of the model's source allocation (forward pass of the
  dequantized float32 model, then KLD / perplexity / top-1 against the cached reference);
* llama.cpp through llama-cpp-python: :func:`autobits.exports.judge.judge` on the model's
  GGUF file (``n_ctx = n_batch = ctx``, logits for every position, perplexity over each
  window's second half, as ``llama-perplexity``), and with ``--f32`` on an F32 export too
  (llama.cpp computing in float32 like our evaluator).  ``llama-perplexity`` itself does not
  ship in the wheel; it is timed too when a binary is on ``PATH``.

The runs are interleaved (ours, llama.cpp, ours, ...) so that load from other processes hits
both alike; each side's tokens/second is the median over ``--repeats``, and the ratio is
taken from those medians.  Model loading and the reference pass are not timed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from autobits.allocation import Allocation
from autobits.io import write_json_atomic
from autobits.app.options import format_table

log = logging.getLogger("bench.eval_speed")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-float")
    ap.add_argument("--text", default="stdlib")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--f32", action="store_true", help="also time llama.cpp on an F32 export")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("gguf").setLevel(logging.WARNING)

    import torch

    from autobits.evaluate import Evaluator
    from autobits.exports.gguf import export_gguf
    from autobits.exports.judge import judge, llama_windows, open_llama
    from autobits.model import load_model

    lm = load_model(args.model)
    if lm.gguf is None:
        raise SystemExit("eval_speed needs a GGUF model (llama.cpp runs the file itself)")
    alloc = Allocation.build(lm.name, lm.specs, {s.name: lm.gguf.tensors[s.name][1] for s in lm.quantizable})
    files = {f"llama.cpp {lm.gguf.path.name}": lm.gguf.path}
    tmpdir = None
    if args.f32:
        tmpdir = tempfile.TemporaryDirectory(prefix="autobits-speed-")
        files["llama.cpp F32 export"] = export_gguf(
            lm, Allocation.uniform(lm.name, lm.specs, "F32"), Path(tmpdir.name) / "f32.gguf")
    llms = {k: open_llama(p, ctx=args.ctx) for k, p in files.items()}
    first = next(iter(llms.values()))
    split = llama_windows(first, args.text, ctx=args.ctx, n=args.windows)
    ev = Evaluator(lm, split.eval)
    ev.evaluate(alloc)  # warm the weight cache: evaluation, not quantization, is timed
    n_tokens = args.windows * args.ctx
    times: dict[str, list[float]] = {"autobits Evaluator": []} | {k: [] for k in files}
    ppl: dict[str, float] = {}
    for r in range(args.repeats):
        m = ev.evaluate(alloc)
        times["autobits Evaluator"].append(m.seconds)
        ppl["autobits Evaluator"] = m.ppl
        for k, llm in llms.items():
            res = judge(files[k], windows=split.eval, llm=llm)
            times[k].append(res.seconds)
            ppl[k] = res.ppl
        log.info("repeat %d: %s", r + 1, {k: round(v[-1], 2) for k, v in times.items()})
    binary = shutil.which("llama-perplexity")
    ours = n_tokens / statistics.median(times["autobits Evaluator"])
    rows, payload = [], []
    for k, ts in times.items():
        tps = n_tokens / statistics.median(ts)
        rows.append([k, f"{statistics.median(ts):.2f}", f"{tps:.1f}", f"{tps / ours:.2f}x",
                     f"{ppl[k]:.4f}"])
        payload.append({"name": k, "seconds": ts, "tokens_per_second": tps,
                        "ratio_to_autobits": tps / ours, "ppl": ppl[k]})
    print(format_table(rows, ["engine", "median s", "tokens/s", "vs autobits", "PPL"]))
    print(f"\n{lm.name}: {args.windows} windows x {args.ctx} tokens, median of {args.repeats} "
          f"interleaved repeats, torch threads {torch.get_num_threads()}, llama.cpp threads "
          f"{os.cpu_count()}; llama-perplexity binary: {binary or 'not found (not in the wheel)'}")
    if args.json:
        write_json_atomic(args.json, {"model": lm.name, "windows": args.windows, "ctx": args.ctx,
                                      "repeats": args.repeats, "rows": payload,
                                      "text": split.to_json(), "llama_perplexity": binary})
    if tmpdir is not None:
        tmpdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
