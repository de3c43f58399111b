"""Command-line options and the one place they become the library's configs.

Every command and bench that takes these options adds them with the ``add_*`` functions
and turns them into typed configs with the ``*_from_args`` functions, so the defaults, the
help texts and the validation live once:

* :func:`add_prepare_args` / :func:`prepare_config_from_args` -> :class:`PrepareConfig`
  (model, text, windows, fold, imatrix);
* :func:`add_budget_args` / :func:`budget_from_args` -> :class:`Budget`;
* :func:`add_agent_args` / :func:`agent_config_from_args` -> the agent's config dataclass
  (:class:`~autobits.agents.OptunaConfig`, :class:`~autobits.agents.SACConfig`);
* :func:`add_ray_args` / :func:`ray_options_from_args` -> :class:`RayOptions`;
* :func:`search_config_from_args` -> the whole :class:`~autobits.app.workflow.SearchConfig`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from autobits.allocation import Budget
from autobits.cluster import RayOptions
from autobits.errors import AutobitsError
from autobits.pipeline import NUMERICS, PrepareConfig
from autobits.registry import DEFAULT_MODEL

__all__ = [
    "DEFAULT_MODEL",
    "add_model_args",
    "add_text_args",
    "add_budget_args",
    "budget_from_args",
    "add_prepare_args",
    "add_requantize_arg",
    "prepare_config_from_args",
    "add_agent_args",
    "agent_config_from_args",
    "add_ray_args",
    "ray_options_from_args",
    "search_config_from_args",
    "format_table",
]

_PREPARE_DEFAULTS = PrepareConfig()


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str], *,
                 right: bool = False) -> str:
    """A plain-text table: left-aligned columns (``right``: every column but the first
    right-aligned, for columns of numbers), a dashed rule under the header."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if right and i else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def add_model_args(p: argparse.ArgumentParser, *, default: str | None = DEFAULT_MODEL) -> None:
    p.add_argument(
        "--model", default=default,
        help="built-in name (smollm2-135m-float, gemma3-270m-float: float stand-ins; "
        "smollm2-135m, gemma3-270m: the packaged quantized files), GGUF file "
        "or Hugging Face folder "
        f"(default: {default or 'the one named by the input file'})",
    )


def add_text_args(p: argparse.ArgumentParser, *, windows: bool = True) -> None:
    """``--text``, ``--ctx`` and (``windows``) the held-out ``--windows``."""
    d = _PREPARE_DEFAULTS
    p.add_argument("--text", default=d.text,
                   help=f"{d.text} (default), debian-handbook, or a path to a text file")
    p.add_argument("--ctx", type=int, default=d.ctx,
                   help=f"window length in tokens (default {d.ctx})")
    if windows:
        p.add_argument("--windows", type=int, default=d.eval_windows,
                       help=f"held-out evaluation windows (default {d.eval_windows})")


def add_numerics_arg(p: argparse.ArgumentParser) -> None:
    """``--numerics``: how autobits computes held-out metrics (commands that report them)."""
    d = _PREPARE_DEFAULTS
    p.add_argument("--numerics", choices=tuple(NUMERICS), default=d.numerics,
                   help="held-out metrics: llama = activations rounded as llama.cpp's CPU "
                   "matmuls do (what llama.cpp measures, with an F32 KV cache), float = "
                   f"plain torch (default {d.numerics})")


def add_budget_args(p: argparse.ArgumentParser, *, required: bool = False,
                    default_bpw: float | None = None) -> None:
    """``--target-bpw`` / ``--max-bytes`` (one of them); ``default_bpw`` is the budget when
    neither is given (for benches; the commands ask for one)."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--target-bpw", type=float, help="target file-level bits per weight" + (
        "" if default_bpw is None else f" (default {default_bpw:g})"))
    g.add_argument("--max-bytes", type=int, help="maximum tensor bytes of the file")
    if default_bpw is not None:
        p.set_defaults(default_bpw=default_bpw)


def budget_from_args(args: argparse.Namespace) -> Budget | None:
    """The budget of ``--target-bpw`` / ``--max-bytes``; when neither was given, that of
    :func:`add_budget_args`'s ``default_bpw``, or None without one."""
    if args.target_bpw is None and args.max_bytes is None:
        default = getattr(args, "default_bpw", None)
        return None if default is None else Budget(target_bpw=default)
    return Budget(target_bpw=args.target_bpw, max_bytes=args.max_bytes)


def add_prepare_args(p: argparse.ArgumentParser, *, model: bool = True,
                     eval_windows: bool = True) -> None:
    """Model, text and measurement options (``model=False``: no ``--model``, for commands
    that name several; ``eval_windows=False``: no ``--windows``, for those that measure no
    held-out text)."""
    d = _PREPARE_DEFAULTS
    if model:
        add_model_args(p)
    add_text_args(p, windows=eval_windows)
    if eval_windows:
        add_numerics_arg(p)
    p.add_argument("--calib-windows", type=int, default=d.calib_windows,
                   help=f"calibration windows (from the start of the text; default {d.calib_windows})")
    p.add_argument("--reward-windows", type=int, default=d.reward_windows,
                   help=f"calibration windows the search reward is measured on (default {d.reward_windows})")
    p.add_argument("--reward-ctx", type=int, default=d.reward_ctx,
                   help=f"tokens of each reward window (default {d.reward_ctx})")
    p.add_argument("--select-windows", type=int, default=d.select_windows,
                   help="calibration windows (after the reward ones, full --ctx) on which an "
                        "agent's best allocations are re-measured before one is chosen; 0 "
                        f"trusts the reward slice alone (default {d.select_windows})")
    p.add_argument("--fold", action="store_true",
                   help=f"apply Scale Folding (searched for {d.fold_format}) before quantizing")
    p.add_argument("--imatrix", nargs="?", const=True, default=False, metavar="FILE",
                   help="quantize with importance vectors (llama.cpp's imatrix): alone, "
                   "autobits' own E[x^2] from the calibration windows; with FILE, those of a "
                   "llama.cpp imatrix file (GGUF or legacy .dat, e.g. from llama-imatrix or "
                   "`autobits imatrix`)")
    p.add_argument("--cache-gb", type=float, default=None,
                   help="memory for dequantized candidate weights kept between evaluations "
                   "(GB; default 0.5; the quantized bytes are always kept, metrics do not change)")



def add_requantize_arg(p: argparse.ArgumentParser) -> None:
    """``--allow-requantize`` (commands that quantize the model's weights: search, export)."""
    p.add_argument("--allow-requantize", action="store_true",
                   help="accept a source whose weights are already quantized (refused "
                   "otherwise: formats at or above the source's own reproduce it exactly, so "
                   "quality numbers are optimistic; llama-quantize's flag of the same name)")


def prepare_config_from_args(args: argparse.Namespace, *, model: str | None = None,
                             eval_windows: int | None = None) -> PrepareConfig:
    """The :class:`PrepareConfig` of :func:`add_prepare_args`'s options (``model`` and
    ``eval_windows`` override the options, for commands that measure several models or no
    held-out text)."""
    d = _PREPARE_DEFAULTS
    ctx = args.ctx
    windows = getattr(args, "windows", d.eval_windows) if eval_windows is None else eval_windows
    return PrepareConfig(
        model=model or args.model, text=args.text, ctx=ctx, calib_windows=args.calib_windows,
        eval_windows=windows, reward_windows=min(args.reward_windows, args.calib_windows),
        reward_ctx=min(args.reward_ctx, ctx), select_windows=args.select_windows,
        fold=args.fold, imatrix=bool(args.imatrix),
        imatrix_file=args.imatrix if isinstance(args.imatrix, str) else None,
        cache_bytes=None if getattr(args, "cache_gb", None) is None else int(args.cache_gb * 2**30),
        numerics=getattr(args, "numerics", d.numerics),
    )


def add_agent_args(p: argparse.ArgumentParser) -> None:
    """The agents' command-line hyperparameters (the rest keep their config defaults)."""
    from autobits.agents import OptunaConfig, SACConfig

    g = p.add_argument_group("agents")
    g.add_argument("--evals", type=int, default=300,
                   help="evaluations for the learning agents (default 300)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sampler", default=OptunaConfig.sampler,
                   choices=("tpe", "cmaes", "gp", "random"),
                   help=f"Optuna sampler (default {OptunaConfig.sampler})")
    g.add_argument("--space", default=OptunaConfig.space,
                   choices=("groups", "offsets", "categorical"),
                   help=f"Optuna search space (default {OptunaConfig.space})")
    g.add_argument("--sac-action", default=SACConfig.action,
                   choices=("absolute", "residual", "sensitivity"),
                   help=f"SAC action mapping (default {SACConfig.action})")
    g.add_argument("--pretrain-episodes", type=int, default=SACConfig.pretrain_episodes,
                   help=f"SAC episodes on the proxy reward first (default {SACConfig.pretrain_episodes})")


def agent_config_from_args(agent: str, args: argparse.Namespace):
    """The config of ``agent`` from :func:`add_agent_args`'s options (None for a solver)."""
    from autobits.agents import OptunaConfig, SACConfig

    if agent == "optuna":
        return OptunaConfig(sampler=args.sampler, space=args.space)
    if agent == "sac":
        return SACConfig(action=args.sac_action, pretrain_episodes=args.pretrain_episodes)
    return None


def add_ray_args(p: argparse.ArgumentParser) -> None:
    """``--address``, ``--workers`` and ``--worker-threads`` (a "Ray" argument group)."""
    g = p.add_argument_group("Ray (distributed calibration, candidates and evaluation)")
    g.add_argument("--address", default=None,
                   help="Ray cluster to run the calibration windows, the candidate table and "
                   "the agents' evaluations on (host:port of its head, or 'auto'); default: "
                   "$RAY_ADDRESS inside a Ray job; with only --workers N, an embedded local Ray "
                   "(no dashboard) that stops when the search ends")
    g.add_argument("--workers", type=int, default=None,
                   help="Ray actors per stage, and calibration shards (default with --address "
                   "or in a Ray job: the cluster's CPUs // --worker-threads; without: none, "
                   "everything runs in this process; 0: never Ray)")
    g.add_argument("--worker-threads", type=int, default=1,
                   help="torch threads (and Ray CPUs) per actor (default 1)")


def ray_options_from_args(args: argparse.Namespace) -> RayOptions:
    return RayOptions(address=args.address, workers=args.workers,
                      worker_threads=args.worker_threads)


def search_config_from_args(args: argparse.Namespace, *, allocator: str | None = None):
    """The :class:`~autobits.app.workflow.SearchConfig` of ``autobits search``'s options, or
    of the part of them a bench adds (:func:`add_prepare_args`, :func:`add_budget_args`,
    :func:`add_agent_args`): ``allocator`` stands for ``--agent``, and options the parser
    lacks keep the config's defaults (no ``--out``: write nothing; no ``--gguf``: no export;
    no Ray options: evaluate in this process)."""
    from autobits.app.workflow import SearchConfig

    allocator = args.agent if allocator is None else allocator
    budget = budget_from_args(args)
    if budget is None:
        raise AutobitsError("search needs a budget: --target-bpw B or --max-bytes N")
    gguf = getattr(args, "gguf", None)
    out = getattr(args, "out", None)
    return SearchConfig(
        prepare=prepare_config_from_args(args), budget=budget, allocator=allocator,
        agent=agent_config_from_args(allocator, args), evals=args.evals, seed=args.seed,
        out=None if out is None else Path(out),
        gguf=None if gguf is None else (Path(gguf) if gguf else True),
        resume=getattr(args, "resume", False), force=getattr(args, "force", False),
        ray=ray_options_from_args(args) if hasattr(args, "address") else RayOptions(),
        allow_requantize=getattr(args, "allow_requantize", False),
    )
