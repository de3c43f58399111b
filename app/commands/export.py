"""``autobits export`` (allocation -> GGUF file) and ``autobits judge`` (llama.cpp's verdict).

    autobits export --model M --allocation FILE --gguf OUT.gguf [--imatrix] [--fold]
    autobits judge --gguf FILE [--reference REF.gguf] [--text SRC] [--ctx 512] [--windows N]

``--imatrix`` and ``--fold`` measure the model with :func:`autobits.pipeline.prepare` on the
first ``--calib-windows`` of ``--text``, with the options and defaults of ``autobits search``
(Scale Folding searched for :attr:`PrepareConfig.fold_format`; the importance vectors of a
folded model are the calibration's rescaled by the folding scales), so ``search --fold
--imatrix --gguf`` and ``export --fold --imatrix`` of the same allocation write the same file.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable

from autobits.app.options import (
    add_prepare_args,
    add_text_args,
    format_table,
    prepare_config_from_args,
)
from autobits.errors import AutobitsError
from autobits.exports.gguf import export_gguf
from autobits.exports.packed import export_packed
from autobits.io import write_json_atomic
from autobits.pipeline import prepare

__all__ = ["register", "cmd_export", "cmd_judge"]

log = logging.getLogger(__name__)


def cmd_export(args: argparse.Namespace) -> int:
    from autobits.allocation import Allocation
    from autobits.model import load_model

    if args.gguf is None and args.packed is None:
        raise AutobitsError("give --gguf OUT.gguf (or --packed OUT_DIR)")
    out = Path(args.gguf or args.packed)
    if not out.parent.is_dir():  # before the slow model load
        raise AutobitsError(f"output folder {str(out.parent)!r} does not exist")
    Allocation.read(args.allocation)
    lm = load_model(args.model)
    alloc = Allocation.load(args.allocation, lm.specs, lm.name)
    importance = None
    if args.imatrix or args.fold:
        # the same measurement and fold rule as `autobits search` (so both write one file)
        cfg = prepare_config_from_args(args, eval_windows=0)
        importance = prepare(cfg, lm=lm, candidates=False).importance()
    if args.packed is not None:
        path = Path(export_packed(lm, alloc, out, importance=importance))
        print(f"packed checkpoint written to {path}")
        return 0
    path = export_gguf(lm, alloc, out, importance=importance)
    size = path.stat().st_size
    print(format_table(
        [[str(path), f"{size:,}", f"{alloc.bytes:,}", f"{alloc.bpw:.4f}", f"{size * 8 / alloc.params:.4f}"]],
        ["file", "file bytes", "tensor bytes", "bpw (tensors)", "bpw (file)"],
    ))
    extras = [x for x, on in (("imatrix", args.imatrix), ("folded", args.fold)) if on]
    print(f"\n{lm.name}: {len(alloc.tensors)} quantized tensors"
          + (f" ({', '.join(extras)})" if extras else ""))
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    from autobits.exports.judge import judge, llama_windows, open_llama

    if args.windows < 1:
        raise AutobitsError(f"--windows must be at least 1, got {args.windows}")
    llm = open_llama(args.gguf, ctx=args.ctx, flash_attn=args.flash_attn, kv_type=args.kv_type)
    split = llama_windows(llm, args.text, ctx=args.ctx, n=args.windows)
    res = judge(args.gguf, windows=split.eval, reference=args.reference,
                flash_attn=args.flash_attn, llm=llm, kv_type=args.kv_type)

    def f(x, spec):
        return "-" if x is None else format(x, spec)

    print(format_table(
        [[Path(args.gguf).name, f"{res.ppl:.4f}", f(res.ref_ppl, ".4f"), f(res.kld, ".6f"),
          f(res.top1, ".4f"), f"{res.seconds:.1f}"]],
        ["file", "PPL", "ref PPL", "KLD", "top-1", "seconds"],
    ))
    print(f"\nllama.cpp, {res.windows} held-out windows x {res.ctx} tokens of {split.corpus} "
          f"(windows {split.eval_ids[0]}..{split.eval_ids[-1]}), flash attention "
          f"{'on' if res.flash_attn else 'off'}, KV cache {res.kv_type}")
    if args.json:
        write_json_atomic(args.json, {**res.to_json(), "text": split.to_json()})
        print(f"results written to {args.json}")
    return 0


def register(sub) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``export`` and ``judge`` to the CLI's subparsers."""
    p = sub.add_parser("export", help="write an allocation as a GGUF file (or packed checkpoint)")
    p.add_argument("--allocation", required=True, help="allocation JSON file")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gguf", help="output GGUF file (its folder must exist)")
    g.add_argument("--packed", help="output folder of a packed checkpoint (INT*_G* formats)")
    # --imatrix/--fold measure the model on the calibration windows exactly as a search does
    add_prepare_args(p, eval_windows=False)

    p = sub.add_parser("judge", help="perplexity / KLD / top-1 of a GGUF file in llama.cpp")
    p.add_argument("--gguf", required=True, help="GGUF file to judge")
    p.add_argument("--reference", help="reference GGUF file for KLD and top-1 agreement")
    add_text_args(p)
    p.add_argument("--flash-attn", action="store_true",
                   help="flash attention on (both files); llama-perplexity's default is on")
    p.add_argument("--kv-type", choices=("f16", "f32", "q8_0"), default="f16",
                   help="KV cache type (default f16, llama.cpp's; f32 to compare with autobits eval)")
    p.add_argument("--json", help="write the results as JSON here")
    return {"export": cmd_export, "judge": cmd_judge}
