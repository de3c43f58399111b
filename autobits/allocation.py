"""Allocations (tensor -> format) and size budgets, counted in exact bytes.

The size of an allocation is the sum of the exact bytes of every tensor in the file:
quantized weights in their allocated format, embeddings and output head included, and the
tensors that are always kept in float (norms, biases) in F32.  ``bpw`` is file-level:
``bytes * 8 / parameters`` over all tensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from autobits.errors import AllocationError, BudgetError, FormatError
from autobits.formats import get_format
from autobits.io import write_json_atomic
from autobits.specs import DEFAULT_CANDIDATES, TensorSpec

__all__ = [
    "ALLOCATION_VERSION",
    "Allocation",
    "Budget",
    "size_of",
    "feasible_range",
]

ALLOCATION_VERSION = 1
#: Storage of tensors the search does not allocate (norms, biases), as llama.cpp keeps them.
FLOAT_KEPT = "F32"
#: What llama.cpp's quantizer (llama-quant.cpp ``tensor_type_fallback``, in the llama.cpp
#: that judges our files) uses when a K-quant does not fit a row; F16 when that misfits too.
#: (Newer llama.cpp falls back from Q2_K/Q3_K to IQ4_NL.)
LLAMA_FALLBACK: dict[str, str] = {
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}


def _param_count(specs: Sequence[TensorSpec]) -> int:
    return sum(s.numel for s in specs)


def size_of(specs: Sequence[TensorSpec], tensors: Mapping[str, str]) -> int:
    """Exact tensor bytes of the whole file for the allocation ``tensors``."""
    total = 0
    for s in specs:
        fmt = tensors.get(s.name, FLOAT_KEPT) if s.quantizable else FLOAT_KEPT
        total += s.nbytes(fmt)
    return total


def feasible_range(
    specs: Sequence[TensorSpec], candidates: Sequence[str] = DEFAULT_CANDIDATES
) -> tuple[int, int]:
    """(smallest, largest) file bytes any allocation over ``candidates`` can have."""
    lo = hi = 0
    for s in specs:
        if not s.quantizable:
            lo += s.nbytes(FLOAT_KEPT)
            hi += s.nbytes(FLOAT_KEPT)
            continue
        valid = s.valid_formats(tuple(candidates))
        if not valid:
            raise AllocationError(
                f"tensor {s.name!r} (row length {s.row_length}) fits none of the candidate "
                f"formats {list(candidates)}"
            )
        sizes = [s.nbytes(f) for f in valid]
        lo += min(sizes)
        hi += max(sizes)
    return lo, hi


@dataclass(frozen=True)
class Allocation:
    """A format for every quantizable tensor of one model, with its exact size."""

    model: str
    tensors: dict[str, str]
    bytes: int
    params: int
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def bpw(self) -> float:
        return self.bytes * 8 / self.params

    @property
    def key(self) -> tuple[tuple[str, str], ...]:
        """The choice as sorted ``(tensor, format)`` pairs: hashable, equal for equal choices."""
        return tuple(sorted(self.tensors.items()))

    @classmethod
    def build(
        cls,
        model: str,
        specs: Sequence[TensorSpec],
        tensors: Mapping[str, str],
        *,
        meta: Mapping | None = None,
    ) -> "Allocation":
        """Validate ``tensors`` against ``specs`` and count the exact bytes.

        Every quantizable tensor must be named; an unknown tensor name, a non-quantizable
        tensor, an unknown format or a format whose block size does not divide the tensor's
        row length is an :class:`AllocationError`.
        """
        by_name = {s.name: s for s in specs}
        unknown = sorted(set(tensors) - set(by_name))
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise AllocationError(
                f"allocation names {len(unknown)} tensor(s) model {model!r} does not have: {shown}"
            )
        clean: dict[str, str] = {}
        for s in specs:
            if not s.quantizable:
                if s.name in tensors and tensors[s.name].upper() != FLOAT_KEPT:
                    raise AllocationError(
                        f"tensor {s.name!r} ({s.role}) is always kept in {FLOAT_KEPT}, "
                        f"got {tensors[s.name]!r}"
                    )
                continue
            if s.name not in tensors:
                raise AllocationError(f"allocation gives no format for tensor {s.name!r}")
            try:
                fmt = get_format(tensors[s.name])
            except FormatError as e:
                raise AllocationError(f"tensor {s.name!r}: {e}") from None
            if not fmt.fits(s.row_length):
                raise AllocationError(
                    f"tensor {s.name!r}: row length {s.row_length} is not a multiple of "
                    f"{fmt.name} block size {fmt.block_size}"
                )
            clean[s.name] = fmt.name
        return cls(
            model=model,
            tensors=clean,
            bytes=size_of(specs, clean),
            params=_param_count(specs),
            meta=dict(meta or {}),
        )

    @classmethod
    def uniform(
        cls, model: str, specs: Sequence[TensorSpec], fmt: str, *, fallback: bool = False
    ) -> "Allocation":
        """``fmt`` on every quantizable tensor.

        With ``fallback`` a tensor that ``fmt`` does not fit gets the type llama.cpp's
        quantizer falls back to for it (:data:`LLAMA_FALLBACK`, e.g. Q4_K -> Q5_0), and F16
        when that does not fit either; without it a misfit is an error.
        """
        f = get_format(fmt)
        tensors: dict[str, str] = {}
        for s in specs:
            if not s.quantizable:
                continue
            name = f.name
            if fallback and not f.fits(s.row_length):
                name = LLAMA_FALLBACK.get(name, "F16")
                if not get_format(name).fits(s.row_length):
                    name = "F16"
            tensors[s.name] = name
        return cls.build(model, specs, tensors, meta={"rule": f"uniform {f.name}"})

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict:
        return {
            "version": ALLOCATION_VERSION,
            "model": self.model,
            "bytes": self.bytes,
            "params": self.params,
            "bpw": round(self.bpw, 6),
            "tensors": dict(self.tensors),
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike, specs: Sequence[TensorSpec], model: str) -> "Allocation":
        """Read an allocation file and validate it against ``specs`` (sizes are recounted)."""
        payload = cls.read(path)
        return cls.build(model, specs, payload["tensors"], meta=payload["meta"])

    @staticmethod
    def read(path: str | os.PathLike) -> dict:
        """An allocation file's JSON, checked for everything that needs no model: that it
        parses, its schema version, format names as strings, ``meta`` an object (commands
        call it before loading the model, then :meth:`load`)."""
        p = Path(path)
        if not p.is_file():
            raise AllocationError(f"allocation file {str(p)!r} does not exist")
        try:
            payload = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AllocationError(f"allocation file {str(p)!r} is not valid JSON: {e}") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("tensors"), dict):
            raise AllocationError(
                f"allocation file {str(p)!r} must be a JSON object with a 'tensors' mapping"
            )
        version = payload.get("version")
        if version != ALLOCATION_VERSION:
            raise AllocationError(
                f"allocation file {str(p)!r} has version {version!r}, expected {ALLOCATION_VERSION}"
            )
        bad = [(t, f) for t, f in payload["tensors"].items() if not isinstance(f, str)]
        if bad:
            raise AllocationError(
                f"allocation file {str(p)!r}: tensor {bad[0][0]!r} has format {bad[0][1]!r}, "
                f"expected a format name (a string)"
            )
        meta = payload.setdefault("meta", {})
        if not isinstance(meta, dict):
            raise AllocationError(
                f"allocation file {str(p)!r}: 'meta' is a {type(meta).__name__}, expected an object"
            )
        return payload


@dataclass(frozen=True)
class Budget:
    """A size budget: a target file-level bits per weight, or a maximum of tensor bytes."""

    target_bpw: float | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.target_bpw is None) == (self.max_bytes is None):
            raise BudgetError(
                f"a budget needs exactly one of target_bpw or max_bytes, got "
                f"target_bpw={self.target_bpw}, max_bytes={self.max_bytes}"
            )
        if self.target_bpw is not None and not (0 < self.target_bpw <= 32):
            raise BudgetError(f"target bpw must be in (0, 32], got target_bpw={self.target_bpw}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise BudgetError(f"max bytes must be positive, got max_bytes={self.max_bytes}")

    def limit_bytes(self, specs: Sequence[TensorSpec]) -> int:
        """The budget in exact tensor bytes for this model."""
        if self.max_bytes is not None:
            return int(self.max_bytes)
        return int(self.target_bpw * _param_count(specs) // 8)

    def check_feasible(
        self, specs: Sequence[TensorSpec], candidates: Iterable[str] = DEFAULT_CANDIDATES
    ) -> int:
        """Return the byte limit, or raise :class:`BudgetError` stating the feasible range."""
        lo, hi = feasible_range(specs, tuple(candidates))
        limit = self.limit_bytes(specs)
        params = _param_count(specs)
        if limit < lo:
            raise BudgetError(
                f"budget of {limit} bytes ({limit * 8 / params:.3f} bpw) is below the smallest "
                f"possible file: feasible range is {lo}..{hi} bytes "
                f"({lo * 8 / params:.3f}..{hi * 8 / params:.3f} bpw)"
            )
        if limit > hi:
            raise BudgetError(
                f"budget of {limit} bytes ({limit * 8 / params:.3f} bpw) is above the largest "
                f"possible file: feasible range is {lo}..{hi} bytes "
                f"({lo * 8 / params:.3f}..{hi * 8 / params:.3f} bpw)"
            )
        return limit

    def describe(self) -> str:
        if self.target_bpw is not None:
            return f"{self.target_bpw:g} bpw"
        return f"{self.max_bytes} bytes"
