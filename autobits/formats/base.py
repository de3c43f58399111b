"""The format registry: one small class per storage format, sizes from one table.

A format stores a 2-D (or N-D) float tensor row by row; each row is cut into blocks of
``block_size`` consecutive values along the last axis and each block is stored in
``type_size`` bytes.  The bytes of a tensor are therefore
``rows * (row_length // block_size) * type_size``, exactly, and a format whose block size
does not divide a tensor's row length is never valid for that tensor.

Subclasses implement two vectorised hooks over a whole tensor at once:

* ``_quantize_blocks(blocks, importance, *, row_length)``: ``blocks`` is
  ``float32 (n_blocks, block_size)``, the tensor's rows cut into blocks in order;
  ``importance`` is ``None`` or ``float32 (n_blocks, block_size)`` (the per-input-channel
  importance vector broadcast over rows, as llama.cpp's imatrix); ``row_length`` is the
  tensor's row length (a multiple of ``block_size``), for formats whose blocks depend on
  statistics of their whole row.  Returns ``uint8 (n_blocks, type_size)``.
* ``_dequantize_blocks(data)``: ``uint8 (n_blocks, type_size)`` -> ``float32 (n_blocks, block_size)``.

Subclassing registers the format under its ``name`` (like gguf-py's ``quants.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from autobits.errors import FormatError

__all__ = [
    "FormatSpec",
    "FORMAT_TABLE",
    "Format",
    "get_format",
    "format_names",
    "quantize",
    "dequantize",
]


@dataclass(frozen=True)
class FormatSpec:
    """Size facts of one format: values per block, bytes per block, ggml type id (or None)."""

    block_size: int
    type_size: int
    ggml_type: int | None  # gguf.GGMLQuantizationType value; None for autobits-only formats

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size


def _packed_spec(bits: int, group: int) -> FormatSpec:
    # codes packed densely (group * bits / 8 bytes) after an fp16 scale and an fp16 zero
    return FormatSpec(block_size=group, type_size=4 + group * bits // 8, ggml_type=None)


# The one table of sizes.  ggml type ids follow ggml.h / gguf.GGMLQuantizationType.
FORMAT_TABLE: dict[str, FormatSpec] = {
    "F32": FormatSpec(1, 4, 0),
    "F16": FormatSpec(1, 2, 1),
    "BF16": FormatSpec(1, 2, 30),
    "Q8_0": FormatSpec(32, 2 + 32, 8),
    "Q6_K": FormatSpec(256, 2 + 256 // 2 + 256 // 4 + 256 // 16, 14),
    "Q5_K": FormatSpec(256, 2 + 2 + 12 + 256 // 8 + 256 // 2, 13),
    "Q5_1": FormatSpec(32, 2 + 2 + 4 + 32 // 2, 7),
    "Q5_0": FormatSpec(32, 2 + 4 + 32 // 2, 6),
    "Q4_K": FormatSpec(256, 2 + 2 + 12 + 256 // 2, 12),
    "Q4_1": FormatSpec(32, 2 + 2 + 32 // 2, 3),
    "Q4_0": FormatSpec(32, 2 + 32 // 2, 2),
    "IQ4_NL": FormatSpec(32, 2 + 32 // 2, 20),
    "Q3_K": FormatSpec(256, 256 // 8 + 256 // 4 + 12 + 2, 11),
    "Q2_K": FormatSpec(256, 256 // 16 + 256 // 4 + 2 + 2, 10),
}
for _bits in (2, 3, 4, 5, 6, 8):
    for _group in (32, 64, 128):
        FORMAT_TABLE[f"INT{_bits}_G{_group}"] = _packed_spec(_bits, _group)
del _bits, _group

_REGISTRY: dict[str, "Format"] = {}


class NonFiniteInput(FormatError):
    """Raised by a format's ``_quantize_blocks`` that checks finiteness itself (see
    :attr:`Format.checks_finite`); :meth:`Format.quantize` turns it into its usual error."""


def _all_finite(x: np.ndarray) -> bool:
    """``np.isfinite(x).all()`` without a full boolean temporary in the common case.

    ``x . x`` is finite only if every value is finite (NaN and inf propagate; a sum of
    squares never cancels); a huge but finite tensor may overflow it, then the exact
    check decides.
    """
    flat = np.asarray(x).reshape(-1)
    if flat.dtype == np.float32 and flat.size:
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.dot(flat, flat)):
                return True
    return bool(np.isfinite(flat).all())


class Format:
    """One storage format.  Subclass with ``name = "Q4_K"`` to register it."""

    name: ClassVar[str]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    ggml_type: ClassVar[int | None]
    #: True when an importance vector changes the bytes (imatrix-aware rounding).
    uses_importance: ClassVar[bool] = False
    #: True when ``_quantize_blocks`` without importance raises :class:`NonFiniteInput` on
    #: NaN/Inf input itself (from its own per-block reductions), sparing a pass over the data.
    checks_finite: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:  # abstract intermediate class
            return
        if name not in FORMAT_TABLE:
            raise TypeError(f"format {name!r} has no entry in FORMAT_TABLE")
        spec = FORMAT_TABLE[name]
        cls.block_size = spec.block_size
        cls.type_size = spec.type_size
        cls.ggml_type = spec.ggml_type
        _REGISTRY[name] = cls()

    # ----------------------------------------------------------------- sizes
    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size

    def fits(self, row_length: int) -> bool:
        return row_length > 0 and row_length % self.block_size == 0

    def check_fits(self, shape: tuple[int, ...], tensor: str | None = None) -> None:
        row = int(shape[-1]) if len(shape) else 0
        if not self.fits(row):
            what = f"tensor {tensor!r}: " if tensor else ""
            raise FormatError(
                f"{what}row size {row} is not a multiple of {self.name} block size {self.block_size}"
            )

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Exact bytes of a tensor of ``shape`` in this format."""
        self.check_fits(tuple(shape))
        n = int(np.prod(shape, dtype=np.int64))
        return n // self.block_size * self.type_size

    # ------------------------------------------------------------ whole tensors
    def quantize(
        self, array: np.ndarray, importance: np.ndarray | None = None, *, tensor: str | None = None
    ) -> np.ndarray:
        """Quantize ``array`` (rows along the last axis) to ``uint8 (*shape[:-1], row_bytes)``."""
        x = np.ascontiguousarray(array, dtype=np.float32)
        if x.ndim == 0:
            raise FormatError(f"{self.name} needs at least one axis, got a scalar")
        row = x.shape[-1]
        if not self.fits(row):
            self.check_fits(x.shape, tensor)  # raises, naming both numbers
        with_imp = importance is not None and self.uses_importance
        if (with_imp or not self.checks_finite) and not _all_finite(x):
            raise FormatError(self._not_finite(tensor))
        blocks = x.reshape(-1, self.block_size)
        imp = None
        if with_imp:
            imp = np.ascontiguousarray(importance, dtype=np.float32)
            if imp.shape != (row,):
                raise FormatError(
                    f"importance vector has shape {imp.shape}, expected ({row},) "
                    f"(one value per input channel)"
                )
            if not np.isfinite(imp).all() or (imp < 0).any():
                raise FormatError("importance vector must be finite and non-negative")
            nrows = blocks.shape[0] * self.block_size // row
            imp = np.broadcast_to(imp, (nrows, row)).reshape(-1, self.block_size)
        try:
            out = self._quantize_blocks(blocks, imp, row_length=row)
        except NonFiniteInput:
            raise FormatError(self._not_finite(tensor)) from None
        return out.reshape(x.shape[:-1] + (row // self.block_size * self.type_size,))

    def _not_finite(self, tensor: str | None) -> str:
        what = f"tensor {tensor!r}" if tensor else "input tensor"
        return f"{what} contains NaN or Inf; cannot quantize to {self.name}"

    def dequantize(self, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of :meth:`quantize`: bytes -> ``float32`` array of ``shape``."""
        shape = tuple(int(s) for s in shape)
        need = self.nbytes(shape)
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if raw.size != need:
            raise FormatError(
                f"{self.name} data for shape {shape} must be {need} bytes, got {raw.size}"
            )
        blocks = raw.reshape(-1, self.type_size)
        return self._dequantize_blocks(blocks).reshape(shape)

    # ------------------------------------------------------------------ hooks
    def _quantize_blocks(
        self, blocks: np.ndarray, importance: np.ndarray | None, *, row_length: int
    ) -> np.ndarray:
        raise NotImplementedError

    def _dequantize_blocks(self, data: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Format {self.name}: {self.block_size} values in {self.type_size} bytes>"


def get_format(name: str) -> Format:
    """The registered format called ``name`` (case-insensitive)."""
    key = str(name).upper()
    if key not in _REGISTRY:
        raise FormatError(f"unknown format {name!r}; expected one of {', '.join(format_names())}")
    return _REGISTRY[key]


def format_names() -> list[str]:
    """Names of every registered format, in table order."""
    return [n for n in FORMAT_TABLE if n in _REGISTRY]


def quantize(array: np.ndarray, fmt: str, importance: np.ndarray | None = None) -> np.ndarray:
    """Quantize a float array to ``fmt`` (e.g. ``"Q4_K"``); returns the raw bytes as uint8."""
    return get_format(fmt).quantize(array, importance)


def dequantize(data: np.ndarray, fmt: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode bytes produced by :func:`quantize` (or read from a GGUF file) to float32."""
    return get_format(fmt).dequantize(data, shape)
