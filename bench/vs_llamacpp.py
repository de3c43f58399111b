"""autobits against llama.cpp's own presets at the same file size, judged by llama.cpp.

    python -m bench.vs_llamacpp [--model smollm2-135m-float] [--windows 20] [--calib-windows 16]
                                [--presets Q4_K_M,Q3_K_M,Q2_K,Q4_0] [--solver greedy]
                                [--heldout stdlib,debian-handbook] [--imatrix-only]
                                [--out DIR] [--json OUT]
                                [--plot OUT.png] [--flash-attn] [--no-autobits]

1. The reference: the model's float weights exported as an F32 GGUF (for a GGUF source,
   its dequantized weights: the same reference our evaluator uses).
2. llama.cpp's presets: ``llama_model_quantize`` on that F32 file, without and with an
   importance matrix.  The imatrix is our calibration's ``E[x^2]`` per input channel (what
   ``llama-imatrix`` accumulates), handed to llama.cpp in memory through
   ``llama_model_quantize_params.imatrix`` (``llama_model_imatrix_data`` entries keyed by
   tensor name), so both sides round with the very same vectors; no imatrix file is needed.
3. autobits: the calibration's candidate table (``autobits.features.build_candidates``,
   without and with the imatrix) solved by ``--solver`` at each preset's exact tensor
   bytes, exported with autobits' GGUF writer; if our file (which also records the
   allocation in its metadata) comes out larger than the preset's, the limit is lowered by
   the difference and solved again, so every autobits file is at most the preset's size.
4. Every file is judged by llama.cpp on the same held-out windows (the last ``--windows``
   windows of each ``--heldout`` text under the GGUF's tokenizer; the calibration text's
   last windows, which calibration never reads, and texts of other domains): perplexity,
   and KLD / top-1 agreement against the F32 reference's logits (computed once per text).

Prints one table per held-out text; ``--json`` writes every number, ``--plot`` draws KLD
against file size (presets and autobits, one panel per held-out text).  Files stay in ``--out`` (reused on a
rerun when present, as are the calibration, the candidate tables and every finished
row: delete the folder to start over).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


from autobits.allocation import Allocation
from autobits.io import atomic_path, write_json_atomic
from autobits.app.options import format_table

log = logging.getLogger("bench.vs_llamacpp")


def tensor_bytes(path: Path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def autobits_file(lm, table, solver: str, limit: int, cap: int, out: Path,
                  importance) -> tuple[Path, Allocation]:
    """Solve at ``limit`` tensor bytes and export; shrink until the file is <= ``cap`` bytes."""
    from autobits.exports.gguf import export_gguf
    from autobits.solvers import solve

    for _ in range(4):
        alloc = solve(solver, table, limit_bytes=limit)
        path = export_gguf(lm, alloc, out, importance=importance)
        over = path.stat().st_size - cap
        if over <= 0:
            return path, alloc
        log.info("%s is %d bytes over the preset file; solving again", out.name, over)
        limit -= over
    raise RuntimeError(f"could not fit {out.name} under {cap} bytes")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-float")
    ap.add_argument("--text", default="stdlib", help="calibration text (its first windows)")
    ap.add_argument("--heldout", default="stdlib,debian-handbook",
                    help="held-out texts, comma-separated (the last --windows windows of each)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=20, help="held-out windows (from the end)")
    ap.add_argument("--calib-windows", type=int, default=16, help="calibration windows (from the start)")
    ap.add_argument("--presets", default="Q4_K_M,Q3_K_M,Q2_K,Q4_0")
    ap.add_argument("--solver", default="greedy", help="greedy or ilp")
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--no-autobits", action="store_true", help="presets only")
    ap.add_argument("--imatrix-only", action="store_true",
                    help="only the imatrix variants (presets with the imatrix, autobits with it)")
    ap.add_argument("--out", default="/tmp/autobits-vs-llamacpp")
    ap.add_argument("--json")
    ap.add_argument("--plot", help="KLD against file size, as a PNG")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("gguf").setLevel(logging.WARNING)

    from autobits.exports.gguf import export_gguf
    from autobits.exports.judge import (judge, llama_quantize, llama_windows, open_llama,
                                        reference_logits)
    from autobits.model import load_model
    from autobits.text import load_text, make_windows

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    presets = [p.strip().upper() for p in args.presets.split(",") if p.strip()]
    t_start = time.perf_counter()
    lm = load_model(args.model)
    params = lm.n_params

    ref_path = out / "reference-F32.gguf"
    if not ref_path.is_file():
        export_gguf(lm, Allocation.uniform(lm.name, lm.specs, "F32"), ref_path)
    texts = [t.strip() for t in args.heldout.split(",") if t.strip()]
    llm = open_llama(ref_path, ctx=args.ctx)
    splits = {t: llama_windows(llm, t, ctx=args.ctx, n=args.windows) for t in texts}
    del llm
    refs = {}
    for t, split in splits.items():
        refs[t] = reference_logits(ref_path, windows=split.eval, flash_attn=args.flash_attn)
        log.info("reference on %s: ppl %.4f on windows %d..%d (%.0fs)", t, refs[t].ppl,
                 split.eval_ids[0], split.eval_ids[-1], refs[t].seconds)

    from autobits.calibrate import Calibration, calibrate

    calib_split = make_windows(load_text(args.text), lm.tokenizer, ctx=args.ctx).split(
        calib=args.calib_windows, eval=0)
    if args.text in texts and calib_split.n_windows - args.calib_windows < args.windows:
        raise SystemExit("calibration and held-out windows would overlap")
    calib_path = out / f"calibration-{args.calib_windows}x{args.ctx}.npz"
    if calib_path.is_file():
        calib = Calibration.load(calib_path, lm=lm)
    else:
        calib = calibrate(lm, calib_split.calib, progress=False)
        calib.save(calib_path)
    importance = {s.name: v for s in lm.quantizable if (v := calib.importance(s.name)) is not None}

    rows: list[dict] = []
    done_path = out / "rows.json"  # finished rows, reused on a rerun with the same settings
    done = json.loads(done_path.read_text()) if done_path.is_file() else {}

    def record(name: str, path: Path, kind: str, alloc: Allocation | None = None) -> None:
        if (name in done and done[name]["file_bytes"] == path.stat().st_size
                and set(done[name]["heldout"]) == set(texts)
                and done[name].get("windows") == args.windows):
            rows.append(done[name])
            return
        heldout = {}
        for t, split in splits.items():
            res = judge(path, windows=split.eval, reference=refs[t], flash_attn=args.flash_attn)
            heldout[t] = {"ppl": res.ppl, "ppl_increase": res.ppl / refs[t].ppl - 1,
                          "kld": res.kld, "top1": res.top1, "seconds": res.seconds}
        tb = tensor_bytes(path)
        row = {"name": name, "kind": kind, "file": str(path), "file_bytes": path.stat().st_size,
               "tensor_bytes": tb, "bpw": tb * 8 / params, "windows": args.windows,
               "heldout": heldout}
        if alloc is not None:
            row["types"] = sorted(set(alloc.tensors.values()))
            row["meta"] = {k: v for k, v in alloc.meta.items() if k != "details"}
        rows.append(row)
        done[name] = row
        write_json_atomic(done_path, done)
        log.info("%s: %d bytes, %s", name, row["file_bytes"],
                 {t: (round(h["ppl"], 4), round(h["kld"], 5)) for t, h in heldout.items()})

    tables = {}
    variants = (True,) if args.imatrix_only else (False, True)
    if not args.no_autobits:
        from autobits.candidates import CandidateTable
        from autobits.features import build_candidates

        for im in variants:  # no weight cache: it would hold every candidate (~6 GB)
            tpath = out / f"candidates{'-imatrix' if im else ''}.json"
            if tpath.is_file():
                tables[im] = CandidateTable.from_json(json.loads(tpath.read_text()), lm.specs)
            else:
                tables[im] = build_candidates(lm, calib, imatrix=im, progress=False)
                write_json_atomic(tpath, tables[im].to_json())
    for preset in presets:
        for im in variants:
            tag = f"{preset}{'-imatrix' if im else ''}"
            p = out / f"llama-{tag}.gguf"
            if not p.is_file():
                llama_quantize(ref_path, p, preset=preset, importance=importance if im else None)
            record(f"llama.cpp {tag}", p, "preset")
            if args.no_autobits:
                continue
            limit = tensor_bytes(p)
            a_out = out / f"autobits-{tag}.gguf"
            name = f"autobits {args.solver} @{tag}"
            if (name in done and a_out.is_file() and done[name].get("windows") == args.windows
                    and set(done[name]["heldout"]) == set(texts)):
                rows.append(done[name])
                continue
            a_path, alloc = autobits_file(lm, tables[im], args.solver, limit, p.stat().st_size,
                                          a_out, importance if im else None)
            record(name, a_path, "autobits", alloc)
    header = ["file", "file bytes", "bpw", "PPL", "dPPL", "KLD", "top-1", "KLD / preset's"]
    by_name = {r["name"]: r for r in rows}
    for t, split in splits.items():
        table = []
        for r in rows:
            h = r["heldout"][t]
            ratio = ""
            if r["kind"] == "autobits":  # against the preset it was sized to
                preset = by_name.get("llama.cpp " + r["name"].split("@", 1)[1])
                if preset is not None and preset["heldout"][t]["kld"] > 0:
                    ratio = f"{h['kld'] / preset['heldout'][t]['kld']:.3f}x"
            table.append([r["name"], f"{r['file_bytes']:,}", f"{r['bpw']:.3f}", f"{h['ppl']:.4f}",
                          f"{100 * h['ppl_increase']:+.2f}%", f"{h['kld']:.5f}", f"{h['top1']:.4f}",
                          ratio])
        print(f"\nheld-out {t}: {args.windows} windows x {args.ctx} tokens (windows "
              f"{split.eval_ids[0]}..{split.eval_ids[-1]}), reference PPL {refs[t].ppl:.4f}")
        print(format_table(table, header))
    print(f"\n{lm.name}: judged by llama.cpp (llama-cpp-python), flash attention "
          f"{'on' if args.flash_attn else 'off'}; imatrix and autobits calibration: first "
          f"{args.calib_windows} windows of {args.text}; {time.perf_counter() - t_start:.0f}s")
    if args.json:
        write_json_atomic(args.json, {
            "model": lm.name, "heldout": {t: s.to_json() for t, s in splits.items()},
            "reference_ppl": {t: r.ppl for t, r in refs.items()}, "rows": rows,
            "solver": args.solver, "calib_text": args.text, "calib_windows": args.calib_windows})
    if args.plot:
        plot(rows, splits, lm.name, Path(args.plot))
    return 0


def plot(rows: list[dict], splits: dict, model: str, path: Path) -> None:
    """KLD against file size: presets (with and without imatrix) and autobits, per text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4.5), squeeze=False)
    styles = {"preset": ("o", "llama.cpp preset"), "autobits": ("s", "autobits")}
    for ax, t in zip(axes[0], splits):
        for kind, (marker, label) in styles.items():
            for im in (False, True):
                pts = sorted((r["file_bytes"] / 1e6, r["heldout"][t]["kld"]) for r in rows
                             if r["kind"] == kind and r["name"].endswith("-imatrix") == im)
                if pts:
                    ax.plot(*zip(*pts), marker=marker, linestyle="-" if im else ":",
                            label=f"{label}{' + imatrix' if im else ''}")
        ax.set_yscale("log")
        ax.set_xlabel("file size (MB)")
        ax.set_ylabel("KLD to the float model (nats/token)")
        ax.set_title(f"{model}: held-out {t}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
