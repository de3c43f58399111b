"""Non-learned allocators: the baselines the agents must beat, and their warm starts.

* ``uniform``  -- the largest single format (with llama.cpp's shape fallbacks) that fits;
* ``llamacpp`` -- the largest ``llama-quantize`` preset (Q2_K ... Q8_0) that fits, with
  llama.cpp's per-tensor rules (:mod:`autobits.solvers.presets`);
* ``greedy``   -- equal-slope / Lagrangian allocation on the proxy error, then fill-up
  (:mod:`autobits.solvers.lagrange`);
* ``ilp``      -- the exact minimum of the summed proxy error (:mod:`autobits.solvers.integer`).

Use :func:`solve` for an :class:`~autobits.allocation.Allocation`::

    alloc = solve("greedy", table, limit_bytes=Budget(target_bpw=4.5).limit_bytes(specs))

Every method returns an allocation whose exact file bytes are ``<= limit_bytes``; a limit
outside ``[table.min_bytes(), table.max_bytes()]`` is a :class:`~autobits.errors.BudgetError`
that states the feasible range in bytes and bpw.
"""

from __future__ import annotations

import inspect
import time
from typing import Callable

from autobits.allocation import Allocation
from autobits.candidates import CandidateTable
from autobits.errors import BudgetError
from autobits.formats import get_format
from autobits.solvers.problem import check_limit, choice_summary, describe_bytes
from autobits.solvers.lagrange import greedy, lower_hull
from autobits.solvers.integer import ilp, ilp_solve
from autobits.solvers.presets import (
    FALLBACK,
    PRESETS,
    best_llamacpp,
    llama_fallback,
    llamacpp,
    pick_llamacpp,
    use_more_bits,
)
from autobits.solvers.projection import fill_up, project
from autobits.solvers.pure import best_uniform, pick_uniform, uniform

__all__ = [
    "SOLVERS",
    "solve",
    "project",
    "fill_up",
    "check_limit",
    "uniform",
    "best_uniform",
    "llamacpp",
    "best_llamacpp",
    "greedy",
    "ilp",
    "ilp_solve",
    "lower_hull",
    "llama_fallback",
    "use_more_bits",
    "PRESETS",
    "FALLBACK",
]

Solver = Callable[..., tuple[dict[str, str], dict]]


def _over(table: CandidateTable, what: str, choice: dict[str, str], limit: int) -> BudgetError:
    nbytes = table.choice_bytes(choice)
    return BudgetError(
        f"{what} needs {describe_bytes(table, nbytes)}, over the budget of "
        f"{describe_bytes(table, limit)}"
    )


def _run_uniform(table: CandidateTable, *, limit_bytes: int, fmt: str | None = None,
                 formats=None) -> tuple[dict[str, str], dict]:
    if fmt is not None:
        choice = uniform(table, fmt)
        if table.choice_bytes(choice) > limit_bytes:
            raise _over(table, f"uniform {get_format(fmt).name}", choice, limit_bytes)
        return choice, {"format": get_format(fmt).name}
    kw = {} if formats is None else {"formats": tuple(formats)}
    name, choice = pick_uniform(table, limit_bytes, **kw)
    return choice, {"format": name}


def _run_llamacpp(table: CandidateTable, *, limit_bytes: int, preset: str | None = None,
                  presets=None, n_layers: int | None = None, n_gqa: int | None = None,
                  arch: str = "llama", imatrix: bool = False) -> tuple[dict[str, str], dict]:
    kw = {"n_layers": n_layers, "n_gqa": n_gqa, "arch": arch, "imatrix": imatrix}
    if preset is not None:
        choice = llamacpp(table.specs, preset, **kw)
        if table.choice_bytes(choice) > limit_bytes:  # AllocationError if a format is missing
            raise _over(table, f"llama.cpp preset {preset.upper()}", choice, limit_bytes)
        return choice, {"preset": preset.upper()}
    name, choice = pick_llamacpp(table, limit_bytes, presets=presets, **kw)
    return choice, {"preset": name}


def _run_greedy(table: CandidateTable, *, limit_bytes: int) -> tuple[dict[str, str], dict]:
    return greedy(table, limit_bytes), {}


def _run_ilp(table: CandidateTable, *, limit_bytes: int, time_limit: float = 30.0,
             mip_rel_gap: float = 1e-6) -> tuple[dict[str, str], dict]:
    choice, info = ilp_solve(table, limit_bytes, time_limit=time_limit, mip_rel_gap=mip_rel_gap)
    return choice, {"solver": info}


#: Method name -> ``fn(table, *, limit_bytes, **options) -> (choice, extra meta)``.
#: Options: uniform ``fmt`` / ``formats``; llamacpp ``preset`` / ``presets``, ``n_layers``,
#: ``n_gqa``, ``arch``, ``imatrix``; ilp ``time_limit``, ``mip_rel_gap``; greedy none.
SOLVERS: dict[str, Solver] = {
    "uniform": _run_uniform,
    "llamacpp": _run_llamacpp,
    "greedy": _run_greedy,
    "ilp": _run_ilp,
}


def solve(method: str, table: CandidateTable, *, limit_bytes: int, **options) -> Allocation:
    """Allocate ``table`` within ``limit_bytes`` exact file bytes with solver ``method``.

    ``method`` is a key of :data:`SOLVERS`; ``options`` go to that solver.  The allocation's
    ``meta`` records ``method``, ``limit_bytes``, ``limit_bpw``, ``predicted_error`` (summed
    proxy error of the table), ``seconds`` and the solver's own details (chosen format or
    preset, ILP status).
    """
    key = str(method).lower()
    if key not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}; expected one of {', '.join(SOLVERS)}")
    limit = check_limit(table, limit_bytes)
    fn = SOLVERS[key]
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        allowed = [n for n in params if n not in ("table", "limit_bytes")]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"solver {key!r} has no option(s) {unknown}; its options are {allowed or 'none'}"
            )
    t0 = time.perf_counter()
    choice, extra = fn(table, limit_bytes=limit, **options)
    seconds = time.perf_counter() - t0
    summary = choice_summary(table, choice)
    if summary["bytes"] > limit:  # every solver guarantees this; keep the promise checked
        raise BudgetError(
            f"solver {key!r} returned {describe_bytes(table, summary['bytes'])}, over the "
            f"budget of {describe_bytes(table, limit)}"
        )
    meta = {
        "method": key,
        "limit_bytes": limit,
        "limit_bpw": round(limit * 8 / table.params, 6),
        "predicted_error": summary["predicted_error"],
        "seconds": round(seconds, 4),
        **extra,
    }
    return table.allocation(choice, meta=meta)
