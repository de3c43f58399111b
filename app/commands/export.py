"""``autobits export`` (allocation -> GGUF file) and ``autobits judge`` (llama.cpp's verdict).

    autobits export --model M --allocation FILE --gguf OUT.gguf [--imatrix [FILE]] [--fold]
                    [--recipe RECIPE] [--allow-requantize]
    autobits judge --gguf FILE [--reference REF.gguf] [--text SRC] [--ctx 512] [--windows N]

``--imatrix`` and ``--fold`` measure the model with :func:`autobits.pipeline.prepare` on the
first ``--calib-windows`` of ``--text``, with the options and defaults of ``autobits search``
(Scale Folding searched for :attr:`PrepareConfig.fold_format`; the importance vectors of a
folded model are the calibration's rescaled by the folding scales), so ``search --fold
--imatrix --gguf`` and ``export --fold --imatrix`` of the same allocation write the same file.
``--imatrix FILE`` uses a llama.cpp imatrix file's vectors instead (:mod:`autobits.imatrix`).
``--recipe`` writes the allocation for llama.cpp's own quantizer
(:mod:`autobits.exports.recipe`).  A source whose weights are already quantized is refused
without ``--allow-requantize`` (:mod:`autobits.requantize`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable

from autobits.app.options import (
    add_prepare_args,
    add_requantize_arg,
    add_text_args,
    format_table,
    prepare_config_from_args,
)
from autobits.errors import AutobitsError
from autobits.exports.gguf import export_gguf
from autobits.exports.packed import export_packed
from autobits.exports.recipe import BASE_TYPE, write_recipe
from autobits.io import check_output_folder, write_json_atomic
from autobits.pipeline import prepare
from autobits.requantize import check_requantize

__all__ = ["register", "cmd_export", "cmd_judge"]

log = logging.getLogger(__name__)


def cmd_export(args: argparse.Namespace) -> int:
    from autobits.allocation import Allocation
    from autobits.model import load_model

    if args.gguf is None and args.packed is None and args.recipe is None:
        raise AutobitsError("give --gguf OUT.gguf, --packed OUT_DIR or --recipe FILE")
    for out in (args.gguf, args.packed, args.recipe):
        if out is not None:  # before the slow model load
            check_output_folder(Path(out).parent)
    Allocation.read(args.allocation)
    lm = load_model(args.model)
    check_requantize(lm.specs, model=lm.name, allow=args.allow_requantize)
    alloc = Allocation.load(args.allocation, lm.specs, lm.name)
    if args.recipe is not None:
        recipe, flags = write_recipe(alloc, lm.specs, args.recipe)
        imx = f" --imatrix {args.imatrix}" if isinstance(args.imatrix, str) else (
            " --imatrix IMATRIX.gguf" if args.imatrix else "")
        print(f"llama-quantize recipe written to {recipe} ({len(alloc.tensors)} tensors), "
              f"flags in {flags}:\n  llama-quantize $(cat {flags}){imx} SOURCE-F32.gguf "
              f"OUT.gguf {BASE_TYPE}")
        if args.gguf is None and args.packed is None:
            return 0
    out = Path(args.gguf or args.packed)
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
    imx = f"imatrix {args.imatrix}" if isinstance(args.imatrix, str) else "imatrix"
    extras = [x for x, on in ((imx, args.imatrix), ("folded", args.fold)) if on]
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
    p.add_argument("--recipe", metavar="FILE",
                   help="also (or only) write the allocation as a llama-quantize "
                   "--tensor-type-file recipe, with the flags it needs in FILE.args")
    # --imatrix/--fold measure the model on the calibration windows exactly as a search does
    add_prepare_args(p, eval_windows=False)
    add_requantize_arg(p)

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
