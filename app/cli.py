"""The ``autobits`` command line.

Every subcommand prints a readable table and, with ``--json OUT``, writes the same result
as machine-readable JSON.  A bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from autobits import __version__
from autobits.app.commands import agents, cluster, export, features, imatrix, light, search
from autobits.app.options import (
    add_budget_args,
    DEFAULT_MODEL,
    add_model_args,
    add_text_args,
    add_numerics_arg,
    budget_from_args,
    format_table,
)
from autobits.errors import AutobitsError
from autobits.io import write_json_atomic
from autobits.memory import format_bytes, peak_rss_bytes
from autobits.pipeline import NUMERICS, PrepareConfig

__all__ = ["main", "build_parser"]

log = logging.getLogger("autobits")

EXIT_USAGE = 2


# ------------------------------------------------------------------ inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    from autobits.allocation import feasible_range
    from autobits.model import load_model

    lm = load_model(args.model)
    rows = []
    for s in lm.specs:
        valid = ",".join(s.valid_formats()) if s.quantizable else "(kept F32)"
        rows.append([s.name, "x".join(map(str, s.shape)), s.role, s.source_type, valid])
    print(format_table(rows, ["tensor", "shape", "role", "type", "valid formats"]))
    lo, hi = feasible_range(lm.specs)
    n = lm.n_params
    budget = budget_from_args(args)
    if budget is not None:
        limit = budget.check_feasible(lm.specs)
        print(f"budget {budget.describe()} = {limit:,} bytes: feasible")
    print(
        f"\n{lm.name} ({lm.path}): {lm.architecture}, {len(lm.specs)} tensors "
        f"({len(lm.quantizable)} quantizable), {n:,} parameters; "
        f"file size range {lo:,}..{hi:,} bytes ({lo * 8 / n:.3f}..{hi * 8 / n:.3f} bpw)"
    )
    if args.json:
        write_json_atomic(args.json, {
            "model": lm.name, "path": str(lm.path), "architecture": lm.architecture, "params": n,
            "tensors": [
                {"name": s.name, "shape": list(s.shape), "role": s.role, "block": s.block,
                 "type": s.source_type, "quantizable": s.quantizable,
                 "valid_formats": list(s.valid_formats()) if s.quantizable else []}
                for s in lm.specs
            ],
        })
    return 0


# --------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from autobits.allocation import Allocation
    from autobits.evaluate import Evaluator, WeightCache
    from autobits.formats import get_format
    from autobits.model import load_model
    from autobits.pipeline import prepare
    from autobits.text import load_text, make_windows

    if args.packed:
        if args.imatrix is not None:
            raise AutobitsError("--imatrix rounds ggml formats; a packed checkpoint is "
                                "already quantized")
        return _eval_packed(args)
    if args.windows < 1:
        raise AutobitsError(f"--windows must be at least 1, got {args.windows}")
    if args.uniform:  # a bad input fails before the model loads
        get_format(args.uniform)
    if args.allocation:
        Allocation.read(args.allocation)
    imx = None
    if args.imatrix is not None:
        from autobits.imatrix import read_imatrix

        if args.fold:
            raise AutobitsError(f"imatrix file {args.imatrix!r} describes the unfolded model's "
                                f"inputs and --fold changes them")
        imx = read_imatrix(args.imatrix)
    corpus = load_text(args.text)
    lm = load_model(args.model or DEFAULT_MODEL)
    lm.check_context(args.ctx)
    cache = None
    if imx is not None:  # rounded as llama-quantize --imatrix FILE rounds
        cache = WeightCache(lm, importance=imx.importance_for(lm.specs, model=lm.name))
    if args.allocation:
        alloc = Allocation.load(args.allocation, lm.specs, lm.name)
    else:
        alloc = Allocation.uniform(lm.name, lm.specs, args.uniform or "F16", fallback=True)
    if args.fold:  # folded as a search or an export folds it (one prepare, one fold rule)
        cfg = PrepareConfig(model=lm.name, text=args.text, ctx=args.ctx,
                            calib_windows=args.calib_windows, eval_windows=args.windows,
                            reward_windows=1, reward_ctx=min(PrepareConfig.reward_ctx, args.ctx),
                            fold=True)
        split = prepare(cfg, lm=lm, candidates=False).split
    else:
        split = make_windows(corpus, lm.tokenizer, ctx=args.ctx).split(calib=0, eval=args.windows)
    t0 = time.perf_counter()
    ev = Evaluator(lm, split.eval, cache=cache, llama_numerics=args.numerics == "llama")
    ref_s = time.perf_counter() - t0
    m = ev.evaluate(alloc)
    label = Path(args.allocation).name if args.allocation else alloc.meta["rule"]
    print(format_table(
        [[label, f"{m.kld:.6f}", f"{m.ppl:.4f}", f"{m.ref_ppl:.4f}", f"{m.top1:.4f}",
          f"{m.bytes:,}", f"{m.bpw:.4f}", f"{m.seconds:.1f}"]],
        ["allocation", "KLD", "PPL", "ref PPL", "top-1", "bytes", "bpw", "seconds"],
    ))
    print(f"\n{lm.name}, {m.windows} held-out windows x {args.ctx} tokens of {split.corpus} "
          f"(windows {split.eval_ids[0]}..{split.eval_ids[-1]}), reference pass {ref_s:.1f}s"
          + f", numerics: {NUMERICS[args.numerics]}"
          + (f", rounded with imatrix {args.imatrix}" if imx is not None else ""))
    if args.json:
        payload = {**m.to_json(), "model": lm.name, "allocation": label,
                   "numerics": args.numerics, "imatrix": args.imatrix, "text": split.to_json()}
        write_json_atomic(args.json, payload)
        print(f"metrics written to {args.json}")
    return 0


def _eval_packed(args: argparse.Namespace) -> int:
    """``eval --packed DIR``: the checkpoint through the kernels (``--backend`` None: triton on
    a CUDA machine, the torch reference otherwise; ``--model`` None: the manifest's model)."""
    import torch

    from autobits.app.packed_eval import evaluate_packed

    backend = args.backend
    if backend is None:
        backend = "triton" if torch.cuda.is_available() else "torch"
        log.info("--backend not given: using %s", backend)
    m, split, lm = evaluate_packed(args.packed, backend=backend, model=args.model,
                                   text=args.text, ctx=args.ctx, windows=args.windows)
    label = f"{Path(args.packed).name} ({backend})"
    print(format_table(
        [[label, f"{m.kld:.6f}", f"{m.ppl:.4f}", f"{m.ref_ppl:.4f}", f"{m.top1:.4f}",
          f"{m.bytes:,}", f"{m.bpw:.4f}", f"{m.seconds:.1f}"]],
        ["checkpoint", "KLD", "PPL", "ref PPL", "top-1", "bytes", "bpw", "seconds"],
    ))
    print(f"\n{lm.name}, {m.windows} held-out windows x {args.ctx} tokens "
          f"(windows {split.eval_ids[0]}..{split.eval_ids[-1]}), packed checkpoint {args.packed}")
    if args.json:
        write_json_atomic(args.json, {**m.to_json(), "model": lm.name, "packed": str(args.packed),
                                      "backend": backend, "text": split.to_json()})
        print(f"metrics written to {args.json}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "inspect": cmd_inspect,
    "eval": cmd_eval,
}

#: Modules that add subcommands: each defines ``register(sub) -> dict[name, handler]``.
COMMAND_MODULES = (features, search, light, export, imatrix, agents, cluster)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autobits", description="Mixed-precision quantization search for language models."
    )
    parser.add_argument("--version", action="version", version=f"autobits {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list tensors, shapes, roles, types and valid formats")
    add_model_args(p)
    add_budget_args(p)
    p.add_argument("--json", help="write the tensor list as JSON here")

    p = sub.add_parser("eval", help="measure an allocation against the reference model")
    add_model_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--allocation", help="allocation JSON file")
    g.add_argument("--uniform", metavar="FORMAT",
                   help="one format on every tensor (nearest fitting format where it does not fit)")
    g.add_argument("--packed", metavar="DIR",
                   help="evaluate a packed checkpoint folder (autobits export --packed)")
    p.add_argument("--backend", choices=("triton", "torch"), default=None,
                   help="for --packed: Triton kernels (interpreter mode without a GPU) or the "
                   "torch reference (default: triton on a GPU, torch otherwise)")
    p.set_defaults(model=None)  # with --packed: the model named in the checkpoint's manifest
    add_text_args(p)
    p.add_argument("--fold", action="store_true",
                   help="apply Scale Folding (calibrated on the start of the text) first")
    p.add_argument("--calib-windows", type=int, default=PrepareConfig.calib_windows,
                   help=f"calibration windows for --fold (default {PrepareConfig.calib_windows})")
    add_numerics_arg(p)
    p.add_argument("--imatrix", metavar="FILE",
                   help="round with this llama.cpp imatrix file's vectors (GGUF or legacy "
                   ".dat), as llama-quantize --imatrix FILE does (not with --packed or --fold)")
    p.add_argument("--json", help="write the metrics as JSON here")

    for mod in COMMAND_MODULES:
        COMMANDS.update(mod.register(sub))
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error shape: one line on stderr, exit code 2 (no usage
    dump); ``--help`` still prints the usage."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)}\n")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _os_message(e: OSError) -> str:
    """``'path': reason`` for a failed read or write (unwritable folder, full disk...)."""
    where = e.filename if e.filename is not None else None
    reason = e.strerror or type(e).__name__
    if where is None:
        return _one_line(f"{reason}: {e}")
    return _one_line(f"{str(where)!r}: {reason}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # autobits' own progress at INFO; the libraries under it (gguf's writer, Ray, ...) only
    # when they warn, unless --verbose asks for everything
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    if not args.verbose:
        log.setLevel(logging.INFO)
    try:
        code = COMMANDS[args.command](args)
        print(f"peak memory {format_bytes(peak_rss_bytes())} (resident)")
        return code
    except AutobitsError as e:
        message = _one_line(e)
    except OSError as e:  # what the user's paths and disk cause: never a traceback
        message = _os_message(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"autobits {args.command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
