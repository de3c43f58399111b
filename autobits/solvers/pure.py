"""Uniform allocation: one format everywhere, as ``llama-quantize --pure`` writes it."""

from __future__ import annotations

from typing import Sequence

from autobits.candidates import CandidateTable
from autobits.errors import AllocationError, BudgetError
from autobits.formats import get_format
from autobits.solvers.presets import llama_fallback
from autobits.specs import DEFAULT_CANDIDATES

__all__ = ["uniform", "best_uniform", "pick_uniform"]


def uniform(table: CandidateTable, fmt: str) -> dict[str, str]:
    """``fmt`` on every quantizable tensor, with llama.cpp's shape fallback where it does not fit.

    A tensor whose row length is not a multiple of ``fmt``'s block size gets the type
    llama.cpp's quantizer falls back to (:func:`~autobits.solvers.presets.llama_fallback`:
    Q4_K -> Q5_0, Q6_K -> Q8_0, ..., then F16).  The resulting format must be one of the
    tensor's candidates in ``table``, else :class:`AllocationError`.
    """
    name = get_format(fmt).name
    choice: dict[str, str] = {}
    for s in table.specs:
        if not s.quantizable:
            continue
        f = llama_fallback(name, s.row_length)
        offered = [c.fmt for c in table.options[s.name]]
        if f not in offered:
            raise AllocationError(
                f"uniform {name}: tensor {s.name!r} (row length {s.row_length}) needs {f}, "
                f"which is not among its candidates {offered}"
            )
        choice[s.name] = f
    return choice


def best_uniform(
    table: CandidateTable,
    limit_bytes: int,
    *,
    formats: Sequence[str] = DEFAULT_CANDIDATES,
) -> dict[str, str]:
    """The uniform choice (with fallbacks) of largest file size that fits ``limit_bytes``.

    Formats the table cannot realise uniformly are skipped; a :class:`BudgetError` names the
    smallest uniform size when none fits.  :func:`pick_uniform` also returns the format.
    """
    return pick_uniform(table, limit_bytes, formats=formats)[1]


def pick_uniform(
    table: CandidateTable,
    limit_bytes: int,
    *,
    formats: Sequence[str] = DEFAULT_CANDIDATES,
) -> tuple[str, dict[str, str]]:
    """:func:`best_uniform` as ``(format, choice)``."""
    sized: list[tuple[int, str, dict[str, str]]] = []
    for f in formats:
        try:
            choice = uniform(table, f)
        except AllocationError:
            continue
        sized.append((table.choice_bytes(choice), get_format(f).name, choice))
    if not sized:
        raise AllocationError(f"no format of {list(formats)} can be used uniformly on this table")
    fitting = [x for x in sized if x[0] <= limit_bytes]
    if not fitting:
        small = min(sized, key=lambda x: x[0])
        raise BudgetError(
            f"no uniform format fits {int(limit_bytes)} bytes "
            f"({limit_bytes * 8 / table.params:.3f} bpw): the smallest, {small[1]}, needs "
            f"{small[0]} bytes ({small[0] * 8 / table.params:.3f} bpw)"
        )
    nbytes, f, choice = max(fitting, key=lambda x: x[0])
    return f, choice
