"""``autobits imatrix``: autobits' own importance matrix, in llama.cpp's GGUF imatrix format.

    autobits imatrix --model M [--text T] [--ctx 512] [--calib-windows N] --out FILE.gguf

Calibrates the model on the first ``--calib-windows`` windows of ``--text`` exactly as
``autobits search --imatrix`` does (:func:`autobits.pipeline.prepare`) and writes the
squared-input sums and token counts per tensor (:func:`autobits.imatrix.write_imatrix`), a
file that ``llama-quantize --imatrix`` and ``autobits ... --imatrix FILE`` read.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from autobits.app.options import add_model_args, add_text_args
from autobits.imatrix import imatrix_from_calibration, write_imatrix
from autobits.io import check_output_folder
from autobits.pipeline import PrepareConfig, prepare

__all__ = ["register", "cmd_imatrix"]

log = logging.getLogger(__name__)


def cmd_imatrix(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_output_folder(out.parent)  # before the slow calibration
    cfg = PrepareConfig(model=args.model, text=args.text, ctx=args.ctx,
                        calib_windows=args.calib_windows, eval_windows=0,
                        reward_windows=1, reward_ctx=min(PrepareConfig.reward_ctx, args.ctx),
                        fisher_windows=0, imatrix=True)
    prepared = prepare(cfg, candidates=False)
    imx = imatrix_from_calibration(prepared.calib, prepared.lm.specs,
                                   dataset=prepared.split.corpus)
    path = write_imatrix(out, imx)
    print(f"imatrix of {prepared.lm.name} written to {path}: {len(imx.names)} tensors, "
          f"{imx.chunk_count} chunks x {imx.chunk_size} tokens of {prepared.split.corpus} "
          f"(llama.cpp's GGUF imatrix format; llama-quantize --imatrix {path})")
    return 0


def register(sub) -> dict:
    p = sub.add_parser("imatrix", help="write autobits' importance matrix as a llama.cpp "
                       "GGUF imatrix file")
    add_model_args(p)
    add_text_args(p, windows=False)
    p.add_argument("--calib-windows", type=int, default=PrepareConfig.calib_windows,
                   help="calibration windows from the start of the text "
                   f"(default {PrepareConfig.calib_windows})")
    p.add_argument("--out", required=True, help="output file (GGUF imatrix)")
    return {"imatrix": cmd_imatrix}
