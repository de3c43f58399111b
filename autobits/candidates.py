"""CandidateTable: per tensor x valid format, the exact bytes and the proxy error.

This is the whole decision problem the solvers and agents see: choose one candidate per
tensor so that the summed bytes (plus the fixed bytes of the tensors kept in float) meet
the budget and the summed error is small.  The proxy error of a candidate is the
GPTQ/HAWQ quadratic form ``tr(dW H dW^T)`` of quantizing that tensor to that format, with
``H`` the second moment of the tensor's input on calibration text (see
:mod:`autobits.calibrate`); any other additive error (e.g. measured KLD) fits too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from autobits.allocation import FLOAT_KEPT, Allocation
from autobits.errors import AllocationError
from autobits.specs import TensorSpec

__all__ = ["Candidate", "CandidateTable"]


@dataclass(frozen=True)
class Candidate:
    """One way to store one tensor."""

    fmt: str
    bytes: int
    error: float

    def __post_init__(self) -> None:
        if self.bytes <= 0:
            raise ValueError(f"candidate {self.fmt} has non-positive size, got bytes={self.bytes}")
        if not self.error >= 0:  # also rejects NaN
            raise ValueError(f"candidate {self.fmt} has invalid error, got error={self.error}")


@dataclass(frozen=True)
class CandidateTable:
    """Candidates of every quantizable tensor of one model, largest format first."""

    model: str
    specs: tuple[TensorSpec, ...]
    options: Mapping[str, tuple[Candidate, ...]]
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        names = [s.name for s in self.specs if s.quantizable]
        missing = [n for n in names if not self.options.get(n)]
        if missing:
            raise AllocationError(f"candidate table has no candidates for {missing[:5]}")
        extra = sorted(set(self.options) - set(names))
        if extra:
            raise AllocationError(f"candidate table names unknown tensors {extra[:5]}")
        for n in names:
            opts = self.options[n]
            if any(a.bytes < b.bytes for a, b in zip(opts, opts[1:])):
                raise ValueError(f"candidates of {n!r} must be ordered by bytes, largest first")

    @property
    def tensors(self) -> tuple[str, ...]:
        """Quantizable tensor names in model order."""
        return tuple(s.name for s in self.specs if s.quantizable)

    @property
    def params(self) -> int:
        return sum(s.numel for s in self.specs)

    @property
    def fixed_bytes(self) -> int:
        """Bytes of the tensors the search does not allocate (kept in F32)."""
        return sum(s.nbytes(FLOAT_KEPT) for s in self.specs if not s.quantizable)

    def min_bytes(self) -> int:
        return self.fixed_bytes + sum(min(c.bytes for c in self.options[t]) for t in self.tensors)

    def max_bytes(self) -> int:
        return self.fixed_bytes + sum(max(c.bytes for c in self.options[t]) for t in self.tensors)

    def choice_bytes(self, choice: Mapping[str, str]) -> int:
        """Total file bytes of a tensor -> format mapping."""
        total = self.fixed_bytes
        for t in self.tensors:
            total += self._get(t, choice[t]).bytes
        return total

    def choice_error(self, choice: Mapping[str, str]) -> float:
        return float(sum(self._get(t, choice[t]).error for t in self.tensors))

    def _get(self, tensor: str, fmt: str) -> Candidate:
        for c in self.options[tensor]:
            if c.fmt == fmt:
                return c
        raise AllocationError(
            f"format {fmt!r} is not a candidate for tensor {tensor!r}; candidates: "
            f"{[c.fmt for c in self.options[tensor]]}"
        )

    def allocation(self, choice: Mapping[str, str], *, meta: Mapping | None = None) -> Allocation:
        """Turn a choice into a validated :class:`Allocation` (bytes recounted exactly)."""
        return Allocation.build(self.model, self.specs, dict(choice), meta=meta)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "fixed_bytes": self.fixed_bytes,
            "params": self.params,
            "tensors": [
                {"name": t, "candidates": [{"format": c.fmt, "bytes": c.bytes, "error": c.error}
                                           for c in self.options[t]]}
                for t in self.tensors
            ],
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, payload: Mapping, specs: Sequence[TensorSpec]) -> "CandidateTable":
        options = {
            row["name"]: tuple(Candidate(c["format"], int(c["bytes"]), float(c["error"]))
                               for c in row["candidates"])
            for row in payload["tensors"]
        }
        return cls(model=payload["model"], specs=tuple(specs), options=options,
                   meta=dict(payload.get("meta") or {}))

    def dumps(self) -> str:
        return json.dumps(self.to_json())
