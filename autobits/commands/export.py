"""``autobits export`` (allocation -> GGUF file) and ``autobits judge`` (llama.cpp's verdict).

    autobits export --model M --allocation FILE --gguf OUT.gguf [--imatrix] [--fold]
    autobits judge --gguf FILE [--reference REF.gguf] [--text SRC] [--ctx 512] [--windows N]

``--imatrix`` and ``--fold`` need the calibration module (``autobits.calibrate``) and Scale
Folding (``autobits.folding``); the calibration windows are the first ``--calib-windows`` of
``--text``.  With ``--fold`` the importance vectors are measured again on the folded model
(folding rescales the input channels the vectors describe).
"""

from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path
from typing import Callable

from autobits.errors import AutobitsError

__all__ = ["register", "cmd_export", "cmd_judge"]

log = logging.getLogger(__name__)


def _optional(module: str, attr: str, what: str):
    """``module.attr``, or an AutobitsError naming the missing piece."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and module.startswith(e.name):
            raise AutobitsError(f"{what} needs {module}, which is not available yet") from None
        raise
    fn = getattr(mod, attr, None)
    if fn is None:
        raise AutobitsError(f"{what} needs {module}.{attr}, which is not available yet")
    return fn


def _calibration(lm, args):
    from autobits.text import load_text, make_windows

    calibrate = _optional("autobits.calibrate", "calibrate", "--imatrix/--fold")
    if args.calib_windows < 1:
        raise AutobitsError(f"--calib-windows must be at least 1, got {args.calib_windows}")
    windows = make_windows(load_text(args.text), lm.tokenizer, ctx=args.ctx)
    split = windows.split(calib=args.calib_windows, eval=0)
    # only E[x^2] (and the folding statistics) are needed: no Fisher backward pass
    return calibrate(lm, split.calib, fisher_windows=0, progress=False)


def _dominant_format(lm, alloc) -> str:
    """The format holding most parameters of ``alloc`` (what folding is searched for)."""
    count: dict[str, int] = {}
    for s in lm.quantizable:
        count[alloc.tensors[s.name]] = count.get(alloc.tensors[s.name], 0) + s.numel
    return max(sorted(count), key=lambda f: count[f])


def cmd_export(args: argparse.Namespace) -> int:
    from autobits.allocation import Allocation
    from autobits.cli import format_table
    from autobits.model import load_model

    if args.gguf is None and args.packed is None:
        raise AutobitsError("give --gguf OUT.gguf (or --packed OUT_DIR)")
    out = Path(args.gguf or args.packed)
    if not out.parent.is_dir():  # before the slow model load
        raise AutobitsError(f"output folder {str(out.parent)!r} does not exist")
    lm = load_model(args.model)
    alloc = Allocation.load(args.allocation, lm.specs, lm.name)
    importance = None
    if args.imatrix or args.fold:
        calib = _calibration(lm, args)
        if args.fold:
            fold = _optional("autobits.folding", "fold", "--fold")
            fmt = _dominant_format(lm, alloc)
            report = fold(lm, calib, fmt=fmt, imatrix=bool(args.imatrix))  # folds lm in place
            log.info("folded for %s: %s", fmt, getattr(report, "folded", "?"))
            if args.imatrix:  # folding rescaled the input channels: measure them again
                calib = _calibration(lm, args)
        if args.imatrix:
            importance = {s.name: v for s in lm.quantizable
                          if (v := calib.importance(s.name)) is not None}
    if args.packed is not None:
        export_packed = _optional("autobits.exports.packed", "export_packed", "--packed")
        path = Path(export_packed(lm, alloc, out, importance=importance))
        print(f"packed checkpoint written to {path}")
        return 0
    from autobits.exports.gguf import export_gguf

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
    from autobits.allocation import write_json_atomic
    from autobits.cli import format_table
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
    from autobits.cli import add_model_args, add_text_args

    p = sub.add_parser("export", help="write an allocation as a GGUF file (or packed checkpoint)")
    add_model_args(p)
    p.add_argument("--allocation", required=True, help="allocation JSON file")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gguf", help="output GGUF file (its folder must exist)")
    g.add_argument("--packed", help="output folder of a packed checkpoint (INT*_G* formats)")
    p.add_argument("--imatrix", action="store_true",
                   help="round with calibration importance vectors (autobits.calibrate)")
    p.add_argument("--fold", action="store_true", help="apply Scale Folding first (autobits.folding)")
    p.add_argument("--text", default="stdlib", help="calibration text for --imatrix/--fold")
    p.add_argument("--ctx", type=int, default=512, help="calibration window length (default 512)")
    p.add_argument("--calib-windows", type=int, default=16,
                   help="calibration windows for --imatrix/--fold (default 16)")

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
