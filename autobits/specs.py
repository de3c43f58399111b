"""TensorSpec: what the search needs to know of one weight tensor, and GGUF naming rules.

Names are GGUF names (``blk.3.ffn_down.weight``) whatever the source; ``hf_name`` is the
matching torch parameter of the loaded Hugging Face model.  Shapes are in numpy/torch order
``(rows, row_length)``: GGUF lists them reversed (``ne0`` is the row length), and every
storage format cuts a row into blocks along ``row_length``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from autobits.formats import get_format

__all__ = [
    "ROLES",
    "QUANTIZABLE_ROLES",
    "DEFAULT_CANDIDATES",
    "TensorSpec",
    "role_of",
    "block_of",
    "order_specs",
]

#: Roles of the 2-D weight tensors the search allocates.
QUANTIZABLE_ROLES: tuple[str, ...] = (
    "token_embd",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
    "output",
)
#: Every role, including the 1-D tensors that are always kept in F32 (norms, biases).
ROLES: tuple[str, ...] = QUANTIZABLE_ROLES + ("norm", "bias", "other")

#: Formats offered to the search by default, largest first; each tensor gets the subset
#: whose block size divides its row length.
DEFAULT_CANDIDATES: tuple[str, ...] = (
    "F16",
    "Q8_0",
    "Q6_K",
    "Q5_K",
    "Q5_1",
    "Q5_0",
    "Q4_K",
    "Q4_1",
    "IQ4_NL",
    "Q4_0",
    "Q3_K",
    "Q2_K",
)

_BLK = re.compile(r"^blk\.(\d+)\.")


def block_of(name: str) -> int | None:
    """Transformer block index of a GGUF tensor name, or None for global tensors."""
    m = _BLK.match(name)
    return int(m.group(1)) if m else None


def role_of(name: str) -> str:
    """Role of a GGUF tensor name (``blk.0.attn_q.weight`` -> ``attn_q``)."""
    base = _BLK.sub("", name)
    stem, _, kind = base.rpartition(".")
    if kind == "bias":
        return "bias"
    if stem in QUANTIZABLE_ROLES:
        return stem
    if stem.endswith("norm"):
        return "norm"
    return "other"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model file.

    ``quantizable`` tensors are the 2-D weights the search allocates; the others (norms,
    biases) are stored in F32, as llama.cpp does, and still count in the file size.
    """

    name: str
    shape: tuple[int, ...]
    role: str
    block: int | None
    hf_name: str | None = None
    source_type: str = "F32"
    quantizable: bool = False
    candidates: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.shape or any(int(s) <= 0 for s in self.shape):
            raise ValueError(f"tensor {self.name!r} has an invalid shape {self.shape}")
        if self.role not in ROLES:
            raise ValueError(f"tensor {self.name!r} has unknown role {self.role!r}")

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def row_length(self) -> int:
        return int(self.shape[-1])

    def fits(self, fmt: str) -> bool:
        """True when ``fmt``'s block size divides this tensor's row length."""
        return get_format(fmt).fits(self.row_length)

    def nbytes(self, fmt: str) -> int:
        """Exact bytes of this tensor stored as ``fmt`` (error if it does not fit)."""
        return get_format(fmt).nbytes(self.shape)

    def valid_formats(self, candidates: tuple[str, ...] = DEFAULT_CANDIDATES) -> tuple[str, ...]:
        """The candidates that fit this tensor, ordered from most to fewest bytes."""
        ok = [f for f in candidates if self.fits(f)]
        return tuple(sorted(ok, key=lambda f: -get_format(f).bits_per_weight))


_ROLE_ORDER = {r: i for i, r in enumerate(
    ("token_embd", "norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
     "ffn_down", "bias", "other", "output"))}


def order_specs(specs: Iterable[TensorSpec]) -> tuple[TensorSpec, ...]:
    """Model order: embeddings, then block by block (norms, attention, MLP), then the head."""

    def key(s: TensorSpec):
        if s.block is not None:
            group = s.block
        elif s.role == "token_embd":
            group = -1
        else:
            group = 10**6
        return (group, _ROLE_ORDER[s.role], s.name)

    return tuple(sorted(specs, key=key))
