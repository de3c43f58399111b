"""Greedy equal-slope (Lagrangian) allocation on the proxy error.

Each tensor's candidates are points ``(bytes, error)``.  Only the points on the lower convex
hull can be optimal for some price per byte ``lambda`` (minimising ``error + lambda*bytes``),
so every tensor is reduced to its hull, ordered from most to fewest bytes; going down the
hull, the error added per byte saved (the slope) never decreases.  Starting from the top of
every hull, the solver takes the downgrade steps of all tensors in one global order of
increasing slope -- a single sort, so thousands of tensors cost milliseconds -- and stops at
the first prefix whose file fits the budget.  That prefix is exactly the Lagrangian optimum
for its own size (the equal-slope condition of rate-distortion theory, BAQ's allocation).

The last step usually overshoots, leaving budget unspent; a fill-up pass then repeatedly
applies the single move (to any candidate, on the hull or not) with the best error saved per
extra byte that still fits, until no move fits.
"""

from __future__ import annotations

import numpy as np

from autobits.candidates import CandidateTable
from autobits.solvers.problem import Packed, check_limit, pack
from autobits.solvers.projection import fill_up

__all__ = ["greedy", "lower_hull", "greedy_index"]


def lower_hull(nbytes: np.ndarray, error: np.ndarray) -> list[int]:
    """Indices of the candidates on the lower convex hull, from most to fewest bytes.

    Dominated candidates (another has no more bytes and no more error) are dropped, as are
    points above the hull; collinear points on the hull are kept, so the steps between
    successive hull points have non-decreasing slopes ``d error / d bytes saved``.
    """
    order = sorted(range(len(nbytes)), key=lambda i: (int(nbytes[i]), float(error[i])))
    pareto: list[int] = []
    best = np.inf
    for i in order:  # ascending bytes: keep a point only if it strictly lowers the error
        if not pareto or error[i] < best:
            pareto.append(i)
            best = float(error[i])
    hull: list[int] = []
    for i in pareto:  # monotone chain over (bytes ascending, error descending)
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (float(nbytes[b]) - float(nbytes[a])) * (float(error[i]) - float(error[a])) - (
                float(error[b]) - float(error[a])
            ) * (float(nbytes[i]) - float(nbytes[a]))
            if cross < 0:  # b lies above the segment a-i: not on the lower hull
                hull.pop()
            else:
                break
        hull.append(i)
    return hull[::-1]


def _downgrades(p: Packed, limit: int, *, rounds: int) -> list[np.ndarray]:
    """Equal-slope phase: Lagrangian prefixes of hull steps whose file fits.

    The first is the plain prefix.  Its last step (the "break item") may save far more than
    needed -- a big tensor's jump -- so each further round leaves the break item's tensor
    where it is and continues down the other tensors' steps instead; up to ``rounds``
    candidates are returned, each to be completed by the fill-up pass.
    """
    n = len(p.names)
    hulls = [lower_hull(p.bytes[i, : p.count[i]], p.error[i, : p.count[i]]) for i in range(n)]
    start = np.array([h[0] for h in hulls], dtype=np.int64)
    need = p.total_bytes(start) - limit
    if need <= 0:
        return [start]
    st_tensor, st_pos, st_slope, st_saved = [], [], [], []
    for i, h in enumerate(hulls):
        if len(h) < 2:
            continue
        b = p.bytes[i, h].astype(np.float64)
        e = p.error[i, h]
        saved = b[:-1] - b[1:]
        slope = np.maximum.accumulate((e[1:] - e[:-1]) / saved)  # guard float noise on collinear runs
        st_tensor.append(np.full(len(h) - 1, i))
        st_pos.append(np.arange(1, len(h)))
        st_slope.append(slope)
        st_saved.append(saved)
    tensor = np.concatenate(st_tensor)
    pos = np.concatenate(st_pos)
    slope = np.concatenate(st_slope)
    saved = np.concatenate(st_saved)
    order = np.lexsort((pos, tensor, slope))  # by slope; within a tensor, hull order
    tensor, pos, saved = tensor[order], pos[order], saved[order]
    active = np.ones(len(order), dtype=bool)
    step = np.arange(len(order))
    out: list[np.ndarray] = []
    for _ in range(max(1, rounds)):
        cum = np.cumsum(np.where(active, saved, 0.0))
        if cum[-1] < need - 0.5:  # the other tensors alone cannot meet the budget
            break
        k = int(np.searchsorted(cum, need - 0.5))  # first prefix saving >= need (integers)
        taken = active & (step <= k)
        depth = np.zeros(n, dtype=np.int64)
        np.maximum.at(depth, tensor[taken], pos[taken])
        out.append(np.array([h[d] for h, d in zip(hulls, depth)], dtype=np.int64))
        active &= ~((tensor == tensor[k]) & (step >= k))
    return out


def greedy_index(p: Packed, limit: int, *, rounds: int = 8) -> np.ndarray:
    """Greedy solution as one candidate index per row of ``p`` (no budget check)."""
    best, best_err = None, np.inf
    for index in _downgrades(p, limit, rounds=rounds):
        index = fill_up(p, index, limit)
        err = p.total_error(index)
        if err < best_err:
            best, best_err = index, err
    return best


def greedy(table: CandidateTable, limit_bytes: int) -> dict[str, str]:
    """Equal-slope allocation of ``table`` within ``limit_bytes`` file bytes, then fill-up.

    A limit outside ``[table.min_bytes(), table.max_bytes()]`` is a :class:`BudgetError`.
    """
    limit = check_limit(table, limit_bytes)
    p = pack(table)
    return p.choice(greedy_index(p, limit))
