"""``autobits features``: calibrate a model, build its candidate table and feature table.

    autobits features --model smollm2-135m --json feats.json --csv feats.csv
    autobits features --model M --calib-windows 16 --save-calibration calib.npz
    autobits features --model M --calibration calib.npz --candidates cands.json

The JSON holds ``{"model", "version", "feature_names", "tensors": [{"name", "features":
{feature: value}, "raw": {...}}], "calibration": {...}, "timing": {...}}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Callable

from autobits.app.options import add_prepare_args, format_table, prepare_config_from_args
from autobits.calibrate import CalibrationError
from autobits.io import write_json_atomic
from autobits.pipeline import PrepareConfig, prepare

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
    p = sub.add_parser("features", help="per-tensor sensitivity features and candidate table")
    add_prepare_args(p, eval_windows=False)
    p.add_argument("--fisher-windows", type=int, default=PrepareConfig.fisher_windows,
                   help="of the calibration windows, those that also measure the output Fisher "
                   f"by a backward pass (default {PrepareConfig.fisher_windows}; 0: unweighted proxy)")
    p.add_argument("--workers", type=int, default=None,
                   help="threads quantizing candidates (default: CPU count)")
    p.add_argument("--calibration", metavar="NPZ", help="reuse a saved calibration")
    p.add_argument("--save-calibration", metavar="NPZ", help="save the calibration here")
    p.add_argument("--candidates", metavar="JSON", help="write the candidate table here")
    p.add_argument("--json", help="write the feature table as JSON here")
    p.add_argument("--csv", help="write the feature table as CSV here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return {"features": cmd_features}


def cmd_features(args: argparse.Namespace) -> int:
    from autobits.calibrate import Calibration
    from autobits.model import load_model

    if args.workers is not None and args.workers < 1:
        raise CalibrationError(f"--workers must be at least 1, got {args.workers}")
    cfg = dataclasses.replace(prepare_config_from_args(args, eval_windows=0),
                              fisher_windows=args.fisher_windows)
    lm = load_model(args.model)
    calib = Calibration.load(args.calibration, lm=lm) if args.calibration else None
    prep = prepare(cfg, lm=lm, calibration=calib, progress=not args.no_progress,
                   workers=args.workers)
    calib, table, feats = prep.calib, prep.table, prep.features
    if args.save_calibration:
        calib.save(args.save_calibration)
    t_calib, t_cand, t_feat = (prep.timings.get(k, 0.0) for k in ("calibrate", "candidates", "features"))
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
        text_info = None if args.calibration else prep.split.to_json()
        payload = feats.to_json() | {
            "calibration": {"windows": calib.n_windows, "ctx": calib.ctx,
                            "fisher_tokens": calib.fisher_tokens, "text": text_info},
            "weighting": weighting,
            "timing": timing,
        }
        write_json_atomic(args.json, payload)
        print(f"features written to {args.json}")
    if args.csv:
        feats.to_csv(args.csv)
        print(f"features written to {args.csv}")
    if args.candidates:
        write_json_atomic(args.candidates, table.to_json())
        print(f"candidate table written to {args.candidates}")
    return 0
