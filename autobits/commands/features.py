"""``autobits features``: calibrate a model, build its candidate table and feature table.

    autobits features --model smollm2-135m --json feats.json --csv feats.csv
    autobits features --model M --calib-windows 16 --save-calibration calib.npz
    autobits features --model M --calibration calib.npz --candidates cands.json

The JSON holds ``{"model", "version", "feature_names", "tensors": [{"name", "features":
{feature: value}, "raw": {...}}], "calibration": {...}, "timing": {...}}``.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Callable

from autobits.calibrate import CalibrationError

__all__ = ["register", "cmd_features"]

log = logging.getLogger(__name__)

#: Columns of the printed summary: (header, feature or raw key, format).
_SUMMARY = (
    ("depth", "depth", "{:.2f}"),
    ("act kurt", "act_kurtosis", "{:+.2f}"),
    ("act outl", "act_outlier_frac", "{:.3f}"),
    ("w kurt", "w_kurtosis", "{:+.2f}"),
    ("hess z", "hess_trace", "{:+.2f}"),
    ("fisher z", "fisher_trace", "{:+.2f}"),
    ("err", "proxy_err", "{:+.2f}"),
    ("slope", "proxy_slope", "{:+.2f}"),
)


def register(sub) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``features`` to the CLI's subparsers."""
    from autobits.cli import add_model_args

    p = sub.add_parser("features", help="per-tensor sensitivity features and candidate table")
    add_model_args(p)
    p.add_argument("--text", default="stdlib",
                   help="calibration text: stdlib (default), debian-handbook, or a text file")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--calib-windows", type=int, default=8,
                   help="calibration windows, taken from the start of the text (default 8)")
    p.add_argument("--fisher-windows", type=int, default=4,
                   help="of those, windows that also measure the output Fisher by a backward "
                   "pass (default 4; 0: unweighted proxy)")
    p.add_argument("--imatrix", action="store_true",
                   help="quantize candidates with the calibration's importance vectors")
    p.add_argument("--workers", type=int, default=None,
                   help="threads quantizing candidates (default: CPU count)")
    p.add_argument("--calibration", metavar="NPZ", help="reuse a saved calibration")
    p.add_argument("--save-calibration", metavar="NPZ", help="save the calibration here")
    p.add_argument("--candidates", metavar="JSON", help="write the candidate table here")
    p.add_argument("--json", help="write the feature table as JSON here")
    p.add_argument("--csv", help="write the feature table as CSV here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return {"features": cmd_features}


def _check_args(args: argparse.Namespace) -> None:
    if args.ctx < 2:
        raise CalibrationError(f"--ctx must be at least 2 tokens, got {args.ctx}")
    if args.calib_windows < 1:
        raise CalibrationError(f"--calib-windows must be at least 1, got {args.calib_windows}")
    if args.fisher_windows < 0:
        raise CalibrationError(f"--fisher-windows must be 0 or more, got {args.fisher_windows}")
    if args.fisher_windows > args.calib_windows:
        raise CalibrationError(f"--fisher-windows ({args.fisher_windows}) exceeds "
                               f"--calib-windows ({args.calib_windows})")
    if args.workers is not None and args.workers < 1:
        raise CalibrationError(f"--workers must be at least 1, got {args.workers}")


def cmd_features(args: argparse.Namespace) -> int:
    from autobits.allocation import write_json_atomic
    from autobits.calibrate import Calibration, calibrate
    from autobits.cli import format_table
    from autobits.features import build_candidates, extract_features
    from autobits.model import load_model

    _check_args(args)
    progress = not args.no_progress
    lm = load_model(args.model)
    t0 = time.perf_counter()
    text_info = None
    if args.calibration:
        calib = Calibration.load(args.calibration, lm=lm)
    else:
        from autobits.text import load_text, make_windows

        corpus = load_text(args.text)
        split = make_windows(corpus, lm.tokenizer, ctx=args.ctx).split(
            calib=args.calib_windows, eval=0)
        text_info = split.to_json()
        calib = calibrate(lm, split.calib, fisher_windows=args.fisher_windows, progress=progress)
    if args.save_calibration:
        calib.save(args.save_calibration)
    t_calib = time.perf_counter() - t0
    t = time.perf_counter()
    table = build_candidates(lm, calib, imatrix=args.imatrix, workers=args.workers,
                             progress=progress)
    t_cand = time.perf_counter() - t
    t = time.perf_counter()
    feats = extract_features(lm, calib, table)
    t_feat = time.perf_counter() - t

    rows = []
    for name in feats.names:
        f, r = feats.row(name), feats.raw[name]
        rows.append([name, r["role"], *(fmt.format(f[k]) for _, k, fmt in _SUMMARY),
                     f"{r['err_ref']:.3g} @{r['ref_format']}"])
    print(format_table(rows, ["tensor", "role", *(h for h, _, _ in _SUMMARY), "proxy error"]))
    weighting = table.meta["weighting"]
    unit = "nats/token (Fisher-weighted KLD estimate)" if weighting == "fisher" else \
        "squared output error per token"
    print(f"\n{lm.name}: {len(feats)} tensors x {len(feats.feature_names)} features "
          f"(spec v{feats.version}); calibration {calib.n_windows} x {calib.ctx} tokens "
          f"({calib.fisher_tokens} with Fisher); proxy error in {unit}")
    print(f"time: calibration {t_calib:.1f}s, candidates {t_cand:.1f}s, features {t_feat:.1f}s")
    timing = {"calibration": t_calib, "candidates": t_cand, "features": t_feat}
    if args.json:
        payload = feats.to_json() | {
            "calibration": {"windows": calib.n_windows, "ctx": calib.ctx,
                            "fisher_tokens": calib.fisher_tokens, "text": text_info},
            "weighting": weighting, "timing": timing,
        }  # fmt: skip
        write_json_atomic(args.json, payload)
        print(f"features written to {args.json}")
    if args.csv:
        feats.to_csv(args.csv)
        print(f"features written to {args.csv}")
    if args.candidates:
        write_json_atomic(args.candidates, table.to_json())
        print(f"candidate table written to {args.candidates}")
    return 0
