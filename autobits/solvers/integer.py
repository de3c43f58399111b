"""Exact allocation by integer linear programming (HAWQ-V3 style), with ``scipy.optimize.milp``.

One binary ``x[t, k]`` per tensor ``t`` and candidate ``k``; ``sum_k x[t, k] = 1`` for every
tensor; ``sum bytes[t, k] x[t, k] <= limit - fixed bytes``; minimise ``sum error[t, k] x[t, k]``.
Dominated candidates (another of the same tensor has no more bytes and no more error) are
dropped first: they are never needed for an optimum.  For numerical robustness the model is
posed on offsets -- each tensor's smallest size and smallest error are subtracted
(constants) -- and the errors are divided by the greedy solution's offset error, so the
optimum is O(1) and HiGHS's absolute tolerances agree with its relative gap.  The solution is
recounted in exact integer bytes afterwards; if HiGHS's feasibility tolerance let it
overshoot by a few bytes, the program is solved again with the capacity tightened by the
overshoot.  The greedy solution doubles as a safety net: ilp never returns anything worse.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from autobits.candidates import CandidateTable
from autobits.errors import BudgetError
from autobits.solvers.problem import Packed, check_limit, pack
from autobits.solvers.lagrange import greedy_index

__all__ = ["ilp", "ilp_solve"]

log = logging.getLogger(__name__)

_STATUS = {
    0: "optimal",
    1: "limit reached",
    2: "infeasible",
    3: "unbounded",
    4: "other",
}


@contextlib.contextmanager
def _quiet_stdout():
    """Silence file descriptor 1 while HiGHS runs (it printf()s debug lines despite disp=False).

    Our callers may write machine-readable output on stdout; the redirect is process-wide
    for the duration of one solve.
    """
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no real fd 1 (embedded interpreters)
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _pareto_mask(p: Packed) -> np.ndarray:
    """Candidates no other candidate of the same tensor beats on both bytes and error.

    A dominated candidate can be swapped for its dominator at no cost, so dropping it keeps
    the optimum while shrinking the program.
    """
    keep = p.valid.copy()
    n, width = p.bytes.shape
    for k in range(width):
        for j in range(width):
            if j == k:
                continue
            dom = p.valid[:, j] & (p.bytes[:, j] <= p.bytes[:, k]) & (p.error[:, j] <= p.error[:, k]) & (
                (p.bytes[:, j] < p.bytes[:, k]) | (p.error[:, j] < p.error[:, k]) | (j < k)
            )
            keep[:, k] &= ~dom
    return keep


def _solve_once(p: Packed, keep: np.ndarray, cap: float, scale: float, *, time_limit: float,
                mip_rel_gap: float):
    n, width = p.bytes.shape
    rows, cols = np.nonzero(keep)  # row-major: tensor by tensor, candidates in order
    starts = np.searchsorted(rows, np.arange(n))
    nb = p.bytes[rows, cols]
    er = p.error[rows, cols]
    bmin = np.minimum.reduceat(nb, starts)
    emin = np.minimum.reduceat(er, starts)
    db = (nb - bmin[rows]).astype(np.float64)
    c = (er - emin[rows]) / scale
    m = len(rows)
    one_hot = csr_array((np.ones(m), (rows, np.arange(m))), shape=(n, m))
    cons = [
        LinearConstraint(one_hot, 1.0, 1.0),
        LinearConstraint(csr_array(db.reshape(1, -1)), -np.inf, cap - float(bmin.sum())),
    ]
    with _quiet_stdout():
        res = milp(
            c,
            constraints=cons,
            integrality=np.ones(m),
            bounds=Bounds(0.0, 1.0),
            options={"time_limit": float(time_limit), "mip_rel_gap": float(mip_rel_gap), "disp": False},
        )
    index = None
    if res.x is not None:
        score = np.full((n, width), -np.inf)
        score[rows, cols] = np.asarray(res.x)
        index = np.argmax(score, axis=1).astype(np.int64)
    return res, index


def ilp_solve(
    table: CandidateTable,
    limit_bytes: int,
    *,
    time_limit: float = 30.0,
    mip_rel_gap: float = 1e-6,
) -> tuple[dict[str, str], dict]:
    """:func:`ilp` returning ``(choice, info)``; ``info`` reports the solver's outcome.

    ``info`` has ``status`` (``"optimal"``, ``"limit reached"``, ...), ``message``, ``gap``
    (HiGHS's relative MIP gap), ``seconds``, ``tries``, ``variables`` (binaries after
    dropping dominated candidates) and ``source``: ``"milp"``, or ``"greedy"`` when the MILP
    found nothing in time or nothing better than the greedy solution (possible within the
    gap tolerance), which is then returned instead -- so ilp is never worse than greedy.
    """
    limit = check_limit(table, limit_bytes)
    if time_limit <= 0:
        raise ValueError(f"time_limit must be positive seconds, got time_limit={time_limit}")
    p = pack(table)
    t0 = time.perf_counter()
    keep = _pareto_mask(p)
    # objective scale: the greedy solution's error above each tensor's best, so that the
    # optimum is O(1) and HiGHS's absolute tolerances mean the same as its relative gap
    start = greedy_index(p, limit)
    emin = np.where(keep, p.error, np.inf).min(axis=1)
    scale = float((p.error[np.arange(len(p.names)), start] - emin).sum())
    if not scale > 0:
        scale = 1.0
    cap = float(limit - p.fixed_bytes)
    res = index = None
    tries = 0
    for tries in range(1, 4):
        remaining = max(0.1, time_limit - (time.perf_counter() - t0))
        res, index = _solve_once(p, keep, cap, scale, time_limit=remaining, mip_rel_gap=mip_rel_gap)
        if res.status == 2:
            raise BudgetError(
                f"integer program is infeasible for a budget of {limit} bytes "
                f"({limit * 8 / table.params:.3f} bpw); feasible range is "
                f"{table.min_bytes()}..{table.max_bytes()} bytes"
            )
        if index is None:
            break
        over = p.total_bytes(index) - limit
        if over <= 0:
            break
        log.debug("milp solution overshoots by %d bytes (tolerance); tightening", over)
        cap -= over
        index = None
    status = _STATUS.get(int(res.status), str(res.status)) if res is not None else "not run"
    info = {
        "status": status,
        "message": str(getattr(res, "message", "")),
        "gap": None if getattr(res, "mip_gap", None) is None else float(res.mip_gap),
        "tries": tries,
        "variables": int(keep.sum()),
        "source": "milp",
    }
    if index is None or p.total_error(start) < p.total_error(index):
        # no MILP solution in time, or one worse than greedy (within HiGHS's gap): keep the best
        index = start
        info["source"] = "greedy"
    if status != "optimal":
        log.warning("ilp: solver stopped with status %r (%s); returning the %s solution",
                    status, info["message"], info["source"])
    info["seconds"] = round(time.perf_counter() - t0, 4)
    return p.choice(index), info


def ilp(
    table: CandidateTable,
    limit_bytes: int,
    *,
    time_limit: float = 30.0,
    mip_rel_gap: float = 1e-6,
) -> dict[str, str]:
    """The minimum-error choice of ``table`` within ``limit_bytes`` file bytes (exact MILP).

    ``time_limit`` bounds HiGHS in seconds; ``mip_rel_gap`` is its relative optimality gap.
    A limit outside ``[table.min_bytes(), table.max_bytes()]`` or an infeasible program is a
    :class:`BudgetError`.  See :func:`ilp_solve` for the solver's status.
    """
    return ilp_solve(table, limit_bytes, time_limit=time_limit, mip_rel_gap=mip_rel_gap)[0]
