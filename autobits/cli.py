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
from autobits.errors import AutobitsError

__all__ = ["main", "build_parser"]

log = logging.getLogger("autobits")

EXIT_USAGE = 2


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="smollm2-135m",
        help="built-in name (smollm2-135m, gemma3-270m), GGUF file or Hugging Face folder "
        "(default: %(default)s)",
    )


def _add_text(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", default="stdlib",
                   help="stdlib (default), debian-handbook, or a path to a text file")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--windows", type=int, default=8,
                   help="held-out evaluation windows (default 8)")


def _fmt_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _add_budget(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--target-bpw", type=float, help="target file-level bits per weight")
    g.add_argument("--max-bytes", type=int, help="maximum tensor bytes of the file")


def _budget(args: argparse.Namespace):
    from autobits.allocation import Budget

    if getattr(args, "target_bpw", None) is None and getattr(args, "max_bytes", None) is None:
        return None
    return Budget(target_bpw=args.target_bpw, max_bytes=args.max_bytes)


# ------------------------------------------------------------------ inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    from autobits.allocation import feasible_range
    from autobits.model import load_model

    lm = load_model(args.model)
    rows = []
    for s in lm.specs:
        valid = ",".join(s.valid_formats()) if s.quantizable else "(kept F32)"
        rows.append([s.name, "x".join(map(str, s.shape)), s.role, s.source_type, valid])
    print(_fmt_table(rows, ["tensor", "shape", "role", "type", "valid formats"]))
    lo, hi = feasible_range(lm.specs)
    n = lm.n_params
    budget = _budget(args)
    if budget is not None:
        limit = budget.check_feasible(lm.specs)
        print(f"budget {budget.describe()} = {limit:,} bytes: feasible")
    print(
        f"\n{lm.name}: {lm.architecture}, {len(lm.specs)} tensors "
        f"({len(lm.quantizable)} quantizable), {n:,} parameters; "
        f"file size range {lo:,}..{hi:,} bytes ({lo * 8 / n:.3f}..{hi * 8 / n:.3f} bpw)"
    )
    if args.json:
        from autobits.allocation import write_json_atomic

        write_json_atomic(args.json, {
            "model": lm.name, "architecture": lm.architecture, "params": n,
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
    from autobits.allocation import Allocation, write_json_atomic
    from autobits.evaluate import Evaluator
    from autobits.model import load_model
    from autobits.text import load_text, make_windows

    if getattr(args, "packed", None):
        from autobits.exports.packed import eval_packed

        return eval_packed(args)
    if args.windows < 1:
        raise AutobitsError(f"--windows must be at least 1, got {args.windows}")
    lm = load_model(args.model or "smollm2-135m")
    if args.allocation:
        alloc = Allocation.load(args.allocation, lm.specs, lm.name)
    else:
        alloc = Allocation.uniform(lm.name, lm.specs, args.uniform or "F16", fallback=True)
    corpus = load_text(args.text)
    windows = make_windows(corpus, lm.tokenizer, ctx=args.ctx)
    split = windows.split(calib=args.calib_windows if args.fold else 0, eval=args.windows)
    if args.fold:
        from autobits.calibrate import calibrate
        from autobits.folding import fold

        report = fold(lm, calibrate(lm, split.calib, fisher_windows=0))
        log.info("Scale Folding: %d groups folded, calibration error %.4g -> %.4g",
                 report.folded, report.error_before, report.error_after)
    t0 = time.perf_counter()
    ev = Evaluator(lm, split.eval, llama_numerics=args.llama_numerics)
    ref_s = time.perf_counter() - t0
    m = ev.evaluate(alloc)
    label = Path(args.allocation).name if args.allocation else alloc.meta["rule"]
    print(_fmt_table(
        [[label, f"{m.kld:.6f}", f"{m.ppl:.4f}", f"{m.ref_ppl:.4f}", f"{m.top1:.4f}",
          f"{m.bytes:,}", f"{m.bpw:.4f}", f"{m.seconds:.1f}"]],
        ["allocation", "KLD", "PPL", "ref PPL", "top-1", "bytes", "bpw", "seconds"],
    ))
    print(f"\n{lm.name}, {m.windows} held-out windows x {args.ctx} tokens of {corpus.name} "
          f"(windows {split.eval_ids[0]}..{split.eval_ids[-1]}), reference pass {ref_s:.1f}s"
          + (", llama.cpp activation rounding" if args.llama_numerics else ""))
    if args.json:
        payload = {**m.to_json(), "model": lm.name, "allocation": label,
                   "llama_numerics": bool(args.llama_numerics), "text": split.to_json()}
        write_json_atomic(args.json, payload)
        print(f"metrics written to {args.json}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "inspect": cmd_inspect,
    "eval": cmd_eval,
}

#: Modules that add subcommands.  Each defines ``register(sub) -> dict[name, handler]``,
#: where ``sub`` is the argparse subparsers object; the shared option helpers of this module
#: (``add_model_args``, ``add_text_args``, ``add_budget_args``, ``budget_from_args``,
#: ``format_table``) are there for them to use.
COMMAND_MODULES: tuple[str, ...] = (
    "autobits.commands.features",
    "autobits.commands.search",
    "autobits.commands.export",
    "autobits.commands.agents",
    "autobits.commands.cluster",
)

# public names of the shared helpers for command modules
add_model_args = _add_model
add_text_args = _add_text
add_budget_args = _add_budget
budget_from_args = _budget
format_table = _fmt_table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autobits", description="Mixed-precision quantization search for language models."
    )
    parser.add_argument("--version", action="version", version=f"autobits {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list tensors, shapes, roles, types and valid formats")
    _add_model(p)
    _add_budget(p)
    p.add_argument("--json", help="write the tensor list as JSON here")

    p = sub.add_parser("eval", help="measure an allocation against the reference model")
    _add_model(p)
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
    _add_text(p)
    p.add_argument("--fold", action="store_true",
                   help="apply Scale Folding (calibrated on the start of the text) first")
    p.add_argument("--calib-windows", type=int, default=8,
                   help="calibration windows for --fold (default 8)")
    p.add_argument("--llama-numerics", action="store_true",
                   help="round activations as llama.cpp's CPU matmuls do (8-bit blocks per the "
                   "weight's format), to match `autobits judge --kv-type f32`")
    p.add_argument("--json", help="write the metrics as JSON here")

    import importlib

    for mod_name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name != mod_name:
                raise
            continue  # that command family is not built yet
        COMMANDS.update(mod.register(sub))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    try:
        return COMMANDS[args.command](args)
    except AutobitsError as e:
        print(f"autobits {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
