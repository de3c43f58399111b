#!/usr/bin/env python3
"""Calibration and the candidate table on Ray actors: 1 vs 2 workers, and the local threads.

One run on the main job's settings (8 calibration windows of 512 tokens, 4 with the Fisher
pass, the default candidate formats, the calibration's imatrix): the two heavy stages of
``prepare`` with the same calibration shards (``--shards``, default 2) are run

* locally, one thread per shard (what ``autobits search`` does without ``--workers``),
* on an embedded Ray with 1 stage actor, then with 2 (1 torch thread each),

in the order given by ``--order`` (interleaving cancels a drifting load).  Every run's
statistics, table and quantized candidate bytes must equal the local ones bit for bit (the
script fails otherwise); it prints each stage's wall time, the actors' start-up (once per
session: processes, imports, the model shell pointed at the shared weights), the 2-vs-1
ratio of the stages, and the load average around every run.

    .venv/bin/python -m bench.ray_stages                         # smollm2-135m-float
    .venv/bin/python -m bench.ray_stages --json runs/ray_stages.json
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np

import autobits.cluster  # noqa: F401  (Ray environment before Ray is imported)
from autobits.app.options import format_table
from autobits.io import write_json_atomic

log = logging.getLogger("bench.ray_stages")


def stages(lm, windows, *, shards: int, fisher: int, formats, runner=None) -> dict:
    """Calibration and candidates (imatrix on) with ``runner`` (None: local threads)."""
    from autobits.calibrate import calibrate
    from autobits.evaluate import WeightCache
    from autobits.features import build_candidates

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    calib = calibrate(lm, windows, fisher_windows=fisher, workers=shards, progress=False,
                      runner=runner)
    t1 = time.perf_counter()
    cache = WeightCache(lm, importance={s.name: calib.importance(s.name) for s in lm.quantizable})
    table = build_candidates(lm, calib, formats=formats, imatrix=True, cache=cache,
                             workers=shards, progress=False, runner=runner)
    t2 = time.perf_counter()
    return {"calib": calib, "table": table, "cache": cache, "calibration_s": t1 - t0,
            "candidates_s": t2 - t1, "load": [load0, os.getloadavg()[0]]}


def check_same(a: dict, b: dict, what: str) -> None:
    """Raise unless ``b``'s statistics, table and quantized bytes equal ``a``'s exactly."""
    ca, cb = a["calib"], b["calib"]
    for k, st in ca.sites.items():
        for f in ("h", "sq_mean", "abs_mean", "abs_max", "x4_mean"):
            if not np.array_equal(getattr(st, f), getattr(cb.sites[k], f)):
                raise AssertionError(f"{what}: calibration {k}.{f} differs")
    for k, g in ca.gains.items():
        if not np.array_equal(g, cb.gains[k]):
            raise AssertionError(f"{what}: Fisher gain of {k} differs")
    if a["table"].options != b["table"].options:
        raise AssertionError(f"{what}: candidate table differs")
    for name, opts in a["table"].options.items():
        for c in opts:
            if a["cache"].keeps(c.fmt) and not np.array_equal(
                    a["cache"].quantize(name, c.fmt), b["cache"].quantize(name, c.fmt)):
                raise AssertionError(f"{what}: quantized bytes of {name} {c.fmt} differ")


def on_ray(lm, windows, *, workers: int, shards: int, fisher: int, formats) -> dict:
    from autobits.cluster.runtime import ray_session
    from autobits.cluster.search import search_store_bytes
    from autobits.cluster.stages import RayStageRunner

    t0 = time.perf_counter()
    with ray_session(num_cpus=os.cpu_count(), object_store_memory=search_store_bytes(lm, formats)):
        t_ray = time.perf_counter() - t0
        with RayStageRunner(workers=workers) as runner:
            t = time.perf_counter()
            runner.warm_up(lm)
            t_actors = time.perf_counter() - t
            out = stages(lm, windows, shards=shards, fisher=fisher, formats=formats, runner=runner)
    out.update(ray_start_s=t_ray, actors_start_s=t_actors)
    return out


def main(argv=None) -> int:
    from autobits.specs import DEFAULT_CANDIDATES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-float")
    ap.add_argument("--text", default="stdlib")
    ap.add_argument("--windows", type=int, default=8, help="calibration windows (default 8)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--fisher", type=int, default=4, help="Fisher windows (default 4)")
    ap.add_argument("--shards", type=int, default=2, help="calibration shards (default 2)")
    ap.add_argument("--formats", default="default",
                    help="candidate formats, comma-separated ('default': every default one)")
    ap.add_argument("--order", default="local,ray1,ray2",
                    help="runs in order (local, ray1, ray2; repeat one to re-measure)")
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    from autobits.memory import peak_rss_bytes
    from autobits.model import load_model
    from autobits.text import load_text, make_windows

    formats = DEFAULT_CANDIDATES if args.formats == "default" else tuple(args.formats.split(","))
    lm = load_model(args.model)
    windows = make_windows(load_text(args.text), lm.tokenizer, ctx=args.ctx).split(
        calib=args.windows, eval=0).calib
    kw = {"shards": args.shards, "fisher": args.fisher, "formats": formats}
    runs: list[tuple[str, dict]] = []
    for name in args.order.split(","):
        log.info("run %s", name)
        if name == "local":
            r = stages(lm, windows, **kw)
        elif name in ("ray1", "ray2"):
            r = on_ray(lm, windows, workers=int(name[-1]), **kw)
        else:
            ap.error(f"--order: unknown run {name!r} (local, ray1, ray2)")
        runs.append((name, r))
    base = next((r for n, r in runs if n == "local"), runs[0][1])
    for name, r in runs:
        if r is not base:
            check_same(base, r, name)
    rows = [[n, f"{r['calibration_s']:.1f}", f"{r['candidates_s']:.1f}",
             f"{r['calibration_s'] + r['candidates_s']:.1f}",
             f"{r['actors_start_s']:.1f}" if "actors_start_s" in r else "-",
             f"{r['load'][0]:.1f} / {r['load'][1]:.1f}"] for n, r in runs]
    print()
    print(format_table(rows, ["run", "calibration s", "candidates s", "stages s",
                              "actors start s", "load before / after"]))
    med = {n: float(np.median([r["calibration_s"] + r["candidates_s"] for m, r in runs if m == n]))
           for n in {n for n, _ in runs}}
    print(f"\n{args.model}: {args.windows} windows x {args.ctx} tokens ({args.fisher} Fisher), "
          f"{len(formats)} formats, {args.shards} shards; every run bit-identical to the first "
          f"local one (statistics, table, quantized bytes); {os.cpu_count()} CPUs; driver peak "
          f"RSS {peak_rss_bytes() / 1e9:.2f} GB")
    if "ray1" in med and "ray2" in med:
        print(f"stages on 2 actors / 1 actor: {med['ray2'] / med['ray1']:.2f}x "
              f"({med['ray2']:.1f} s / {med['ray1']:.1f} s, medians; actor start-up excluded)")
    if args.json:
        write_json_atomic(args.json, {
            "model": args.model, "windows": args.windows, "ctx": args.ctx, "fisher": args.fisher,
            "shards": args.shards, "formats": list(formats), "cpus": os.cpu_count(),
            "runs": [{"run": n, **{k: v for k, v in r.items()
                                   if k not in ("calib", "table", "cache")}} for n, r in runs],
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
