"""Shared helpers of the solvers: budget checks and the candidate table as padded arrays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from autobits.candidates import CandidateTable
from autobits.errors import BudgetError

__all__ = ["check_limit", "Packed", "pack", "describe_bytes", "choice_summary"]


def describe_bytes(table: CandidateTable, nbytes: int) -> str:
    """``"123 bytes (4.567 bpw)"`` with bpw counted over every parameter of the file."""
    return f"{int(nbytes)} bytes ({nbytes * 8 / table.params:.3f} bpw)"


def check_limit(table: CandidateTable, limit_bytes: int) -> int:
    """Return ``limit_bytes`` as an int, or raise :class:`BudgetError` stating the feasible range.

    The feasible range is ``[table.min_bytes(), table.max_bytes()]`` in exact file bytes
    (quantized tensors plus the tensors kept in F32); bpw is ``bytes * 8 / table.params``.
    """
    try:
        limit = int(limit_bytes)
    except (TypeError, ValueError):
        raise BudgetError(f"limit_bytes must be an integer number of bytes, got {limit_bytes!r}") from None
    if limit != limit_bytes:
        raise BudgetError(f"limit_bytes must be an integer number of bytes, got {limit_bytes!r}")
    lo, hi = table.min_bytes(), table.max_bytes()
    if lo <= limit <= hi:
        return limit
    where = "below the smallest" if limit < lo else "above the largest"
    raise BudgetError(
        f"budget of {describe_bytes(table, limit)} is {where} possible file of model "
        f"{table.model!r}: feasible range is {lo}..{hi} bytes "
        f"({lo * 8 / table.params:.3f}..{hi * 8 / table.params:.3f} bpw)"
    )


@dataclass(frozen=True)
class Packed:
    """The candidate table as ``(n_tensors, max_candidates)`` arrays, padded past each row's end.

    Padding has ``bytes = 0``, ``error = +inf`` and ``valid = False``; candidates keep the
    table's order (largest first).
    """

    names: tuple[str, ...]
    fmts: tuple[tuple[str, ...], ...]
    bytes: np.ndarray  # int64 (n, K)
    error: np.ndarray  # float64 (n, K)
    valid: np.ndarray  # bool (n, K)
    count: np.ndarray  # int64 (n,)
    fixed_bytes: int

    def choice(self, index: np.ndarray) -> dict[str, str]:
        """Tensor -> format of one candidate index per tensor."""
        return {n: self.fmts[i][int(k)] for i, (n, k) in enumerate(zip(self.names, index))}

    def total_bytes(self, index: np.ndarray) -> int:
        rows = np.arange(len(self.names))
        return int(self.fixed_bytes + self.bytes[rows, index].sum())

    def total_error(self, index: np.ndarray) -> float:
        rows = np.arange(len(self.names))
        return float(self.error[rows, index].sum())


def pack(table: CandidateTable) -> Packed:
    """Lay the candidates of ``table`` out as padded numpy arrays (one row per tensor)."""
    names = table.tensors
    opts = [table.options[n] for n in names]
    width = max(len(o) for o in opts)
    n = len(names)
    nbytes = np.zeros((n, width), dtype=np.int64)
    error = np.full((n, width), np.inf, dtype=np.float64)
    valid = np.zeros((n, width), dtype=bool)
    for i, o in enumerate(opts):
        bad = [c for c in o if not np.isfinite(c.error)]
        if bad:
            raise ValueError(
                f"tensor {names[i]!r}: candidate {bad[0].fmt} has error={bad[0].error}; "
                f"solvers need finite errors"
            )
        k = len(o)
        nbytes[i, :k] = [c.bytes for c in o]
        error[i, :k] = [c.error for c in o]
        valid[i, :k] = True
    return Packed(
        names=names,
        fmts=tuple(tuple(c.fmt for c in o) for o in opts),
        bytes=nbytes,
        error=error,
        valid=valid,
        count=np.array([len(o) for o in opts], dtype=np.int64),
        fixed_bytes=table.fixed_bytes,
    )


def choice_summary(table: CandidateTable, choice: Mapping[str, str]) -> dict:
    """Bytes, bpw and summed proxy error of a choice (for an allocation's meta)."""
    nbytes = table.choice_bytes(choice)
    return {
        "bytes": nbytes,
        "bpw": round(nbytes * 8 / table.params, 6),
        "predicted_error": table.choice_error(choice),
    }
