"""The budget projection: make any candidate choice fit a byte limit, then spend what is left.

Every allocator that proposes choices the budget may not admit (the Optuna agent's trials,
the environment's actions, the greedy solver's last overshooting step) ends here, so that all
of them break ties and fail the same way.

* Over the limit: repeatedly apply the downgrade (any tensor, to any smaller candidate) that
  adds the least proxy error per byte saved; among equal costs the move that saves more
  bytes (fewer moves).  Every tensor can reach its smallest candidate, so a limit at or above
  the table's minimum always fits; anything else is an :class:`AllocationError`.
* Under it (``fill``): repeatedly apply the upgrade with the largest proxy error saved per
  extra byte that still fits, until no move fits (the greedy solver's fill-up).
"""

from __future__ import annotations

import numpy as np

from autobits.errors import AllocationError
from autobits.solvers.problem import Packed

__all__ = ["project", "fill_up"]


def fill_up(p: Packed, index: np.ndarray, limit: int, *, max_moves: int | None = None) -> np.ndarray:
    """Spend leftover bytes: apply the fitting upgrade with the best error saved per byte until
    none fits (at most ``max_moves`` moves, default four per candidate cell)."""
    index = np.asarray(index, dtype=np.int64).copy()
    rows = np.arange(len(p.names))
    left = limit - p.total_bytes(index)
    moves = 0
    cap = max_moves if max_moves is not None else 4 * p.bytes.size
    while left > 0 and moves < cap:
        cur_b = p.bytes[rows, index][:, None]
        cur_e = p.error[rows, index][:, None]
        extra = p.bytes - cur_b
        gain = cur_e - p.error
        ok = p.valid & (gain > 0) & (extra <= left)
        if not ok.any():
            break
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(ok, np.where(extra > 0, gain / np.maximum(extra, 1), np.inf), -np.inf)
        t, k = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        left -= int(extra[t, k])
        index[t] = k
        moves += 1
    return index


def project(p: Packed, index: np.ndarray, limit: int, *, fill: bool = True) -> np.ndarray:
    """``index`` (one candidate per row of ``p``) made to fit ``limit`` bytes, then filled up.

    Raises :class:`AllocationError` when no sequence of downgrades fits (``limit`` below the
    table's minimum; callers check the budget first, see
    :func:`autobits.solvers.problem.check_limit`).
    """
    index = np.asarray(index, dtype=np.int64).copy()
    rows = np.arange(len(p.names))
    total = p.total_bytes(index)
    while total > limit:
        cur_b = p.bytes[rows, index][:, None]
        cur_e = p.error[rows, index][:, None]
        saved = cur_b - p.bytes
        ok = p.valid & (saved > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            cost = np.where(ok, (p.error - cur_e) / np.maximum(saved, 1), np.inf)
        t, k = np.unravel_index(int(np.lexsort((-saved.ravel(), cost.ravel()))[0]), cost.shape)
        if not np.isfinite(cost[t, k]):
            raise AllocationError(
                f"cannot fit the limit: {total} bytes after every downgrade, limit={limit}"
            )
        index[t] = k
        total -= int(saved[t, k])
    return fill_up(p, index, limit) if fill else index
