"""Importance-matrix files, as llama.cpp's ``llama-imatrix`` writes them and ``llama-quantize``
reads them.

Two encodings of the same statistics (per weight tensor, the squared activations of its
input, summed over the tokens seen):

* **GGUF** (llama.cpp's default since 2025): metadata ``general.type = "imatrix"``,
  ``imatrix.datasets`` (strings), ``imatrix.chunk_count`` and ``imatrix.chunk_size``; per
  tensor ``<name>.in_sum2`` (F32, ``ne = [row_length, n_mat]``: the sums of ``x**2`` per input
  channel, one row per expert matrix) and ``<name>.counts`` (F32, ``ne = [n_mat]``: tokens
  summed per matrix).  ``llama-quantize`` hands the quantizer ``in_sum2 / counts`` (float32
  division; a matrix with no tokens gets ones).
* **legacy ``.dat``**: ``int32`` entry count, then per entry ``int32`` name length, the name,
  ``int32`` ``ncall``, ``int32`` value count and the ``float32`` values (already divided by
  the tokens and multiplied by ``ncall``); then optionally ``int32`` chunk count, ``int32``
  length and the dataset name.  ``llama-quantize`` hands over ``values / ncall`` (the values
  themselves when ``ncall`` is 0).

:func:`read_imatrix` reads either (by the GGUF magic), :func:`write_imatrix` writes GGUF,
:func:`imatrix_from_calibration` turns autobits' own calibration (E[x^2] per input channel)
into the same sums and counts, and :meth:`Imatrix.importance_for` matches a file to a model
by tensor name and row length: a file from another model is one :class:`ImatrixError` line
naming the file and the first mismatch.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from autobits.errors import AutobitsError
from autobits.io import atomic_path

__all__ = [
    "ImatrixError",
    "Imatrix",
    "read_imatrix",
    "write_imatrix",
    "imatrix_from_calibration",
]

log = logging.getLogger(__name__)

_GGUF_MAGIC = b"GGUF"
_SUM2 = ".in_sum2"
_COUNTS = ".counts"
_KEY_TYPE = "general.type"
_KEY_DATASETS = "imatrix.datasets"
_KEY_CHUNK_COUNT = "imatrix.chunk_count"
_KEY_CHUNK_SIZE = "imatrix.chunk_size"


class ImatrixError(AutobitsError):
    """An importance-matrix file that cannot be read, or that does not fit the model."""


@dataclass(frozen=True, eq=False)
class Imatrix:
    """Per-tensor sums of squared inputs and token counts, as in llama.cpp's imatrix files.

    ``sums[name]`` is float32 ``(n_mat * row_length,)`` and ``counts[name]`` float32
    ``(n_mat,)`` (GGUF), or ``(1,)`` holding ``ncall`` for a ``legacy`` ``.dat`` file, whose
    sums are llama.cpp's pre-divided values.  ``path`` is where it was read (for messages).
    """

    sums: Mapping[str, np.ndarray]
    counts: Mapping[str, np.ndarray]
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    path: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if set(self.sums) != set(self.counts):
            odd = sorted(set(self.sums) ^ set(self.counts))[0]
            raise ImatrixError(f"imatrix {self._label}: tensor {odd!r} has sums without counts "
                               f"or counts without sums")
        sums = {k: np.ascontiguousarray(v, dtype=np.float32).reshape(-1) for k, v in self.sums.items()}
        counts = {k: np.ascontiguousarray(v, dtype=np.float32).reshape(-1) for k, v in self.counts.items()}
        for name, c in counts.items():
            if c.size == 0 or sums[name].size == 0 or sums[name].size % c.size:
                raise ImatrixError(
                    f"imatrix {self._label}: tensor {name!r} has {sums[name].size} sums for "
                    f"{c.size} matrices, expected a whole row per matrix")
            if self.legacy and c.size != 1:
                raise ImatrixError(f"imatrix {self._label}: legacy entry {name!r} has {c.size} counts")
        object.__setattr__(self, "sums", sums)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "datasets", tuple(str(d) for d in self.datasets))

    @property
    def _label(self) -> str:
        return repr(self.path) if self.path else "(in memory)"

    @property
    def names(self) -> list[str]:
        return sorted(self.sums)

    def equals(self, other: Imatrix) -> bool:
        """Same tensors, bit-identical sums and counts, same metadata."""
        return (self.names == other.names and self.legacy == other.legacy
                and self.datasets == other.datasets and self.chunk_count == other.chunk_count
                and self.chunk_size == other.chunk_size
                and all(np.array_equal(self.sums[n], other.sums[n])
                        and np.array_equal(self.counts[n], other.counts[n]) for n in self.names))

    def vector(self, name: str) -> np.ndarray:
        """The importance vector ``llama-quantize`` hands its quantizer for ``name``: the mean
        squared input per channel (float32, ``(n_mat * row_length,)``)."""
        sums, counts = self.sums[name], self.counts[name]
        if self.legacy:
            ncall = counts[0]
            return sums / ncall if ncall > 0 else sums.copy()
        per = sums.reshape(counts.size, -1)
        safe = np.where(counts > 0, counts, np.float32(1))[:, None]
        out = np.where(counts[:, None] > 0, per / safe, np.float32(1))
        return out.astype(np.float32).reshape(-1)

    def importance_for(self, specs: Sequence, *, model: str = "") -> dict[str, np.ndarray]:
        """Importance vectors of the quantizable tensors in ``specs``, matched by GGUF name.

        Every entry of the file must be a tensor of the model with rows of the same length
        (one matrix per tensor); tensors of the model without an entry get none (llama.cpp
        then rounds them without importance, as it does).  Anything else -- an unknown
        tensor, another row length, no entry matching at all, a value that is not finite --
        is an :class:`ImatrixError` naming the file and the mismatch.
        """
        by_name = {s.name: s for s in specs}
        of = f" of model {model!r}" if model else ""
        out: dict[str, np.ndarray] = {}
        for name in self.names:
            spec = by_name.get(name)
            if spec is None:
                raise ImatrixError(
                    f"imatrix {self._label} has tensor {name!r}, which the model{of} does not "
                    f"have (a file from another model?)")
            vec = self.vector(name)
            row = int(spec.shape[-1])
            if vec.size != row:
                raise ImatrixError(
                    f"imatrix {self._label} has {vec.size} values for {name!r}, whose rows in "
                    f"the model{of} hold {row} (a file from another model?)")
            if not np.isfinite(vec).all():
                raise ImatrixError(f"imatrix {self._label} has non-finite values for {name!r}")
            if getattr(spec, "quantizable", True):
                out[name] = vec
        if not out:
            raise ImatrixError(f"imatrix {self._label} has no entry for any quantizable tensor "
                               f"of the model{of}")
        missing = [s.name for s in specs if getattr(s, "quantizable", True) and s.name not in out]
        if missing:
            log.info("imatrix %s has no entry for %d tensors (%s...): they are quantized without "
                     "importance, as llama.cpp does", self._label, len(missing), missing[0])
        return out


# ------------------------------------------------------------------------ reading
def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read a llama.cpp imatrix file: GGUF (by its magic) or the legacy ``.dat``."""
    p = Path(path)
    if not p.is_file():
        raise ImatrixError(f"imatrix file {str(p)!r} does not exist")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    return _read_gguf(p) if magic == _GGUF_MAGIC else _read_dat(p)


def _read_gguf(p: Path) -> Imatrix:
    import gguf

    try:
        reader = gguf.GGUFReader(p)
    except Exception as e:  # gguf-py raises ValueError/struct errors on a bad file
        raise ImatrixError(f"imatrix file {str(p)!r} is not a readable GGUF file: {e}") from None

    def field_value(key: str, default):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    kind = field_value(_KEY_TYPE, None)
    if kind != "imatrix":
        raise ImatrixError(f"{str(p)!r} is a GGUF file but not an imatrix "
                           f"(general.type={kind!r}, expected 'imatrix')")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ImatrixError(f"imatrix {str(p)!r}: tensor {t.name!r} is "
                               f"{t.tensor_type.name}, expected F32")
        data = np.array(t.data, dtype=np.float32).reshape(-1)
        if t.name.endswith(_SUM2):
            sums[t.name[: -len(_SUM2)]] = data
        elif t.name.endswith(_COUNTS):
            counts[t.name[: -len(_COUNTS)]] = data
        else:
            log.debug("imatrix %s: ignoring tensor %s", p, t.name)
    datasets = field_value(_KEY_DATASETS, [])
    return Imatrix(sums=sums, counts=counts, datasets=tuple(datasets or ()),
                   chunk_count=int(field_value(_KEY_CHUNK_COUNT, 0)),
                   chunk_size=int(field_value(_KEY_CHUNK_SIZE, 0)), path=str(p))


def _read_dat(p: Path) -> Imatrix:
    raw = p.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise ImatrixError(f"imatrix file {str(p)!r} is neither GGUF nor a complete legacy "
                               f".dat file (truncated at byte {pos})")
        out = struct.unpack_from(fmt, raw, pos)
        pos += size
        return out

    (n,) = take("<i")
    if n <= 0:
        raise ImatrixError(f"imatrix file {str(p)!r} is neither GGUF nor a legacy .dat file "
                           f"(entry count {n})")
    sums, counts = {}, {}
    for _ in range(n):
        (ln,) = take("<i")
        if not 0 < ln < 4096:
            raise ImatrixError(f"imatrix file {str(p)!r} is neither GGUF nor a legacy .dat "
                               f"file (name length {ln})")
        name = take(f"<{ln}s")[0].decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        if nval <= 0:
            raise ImatrixError(f"imatrix {str(p)!r}: entry {name!r} has {nval} values")
        vals = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        take(f"<{4 * nval}x")
        sums[name] = vals
        counts[name] = np.array([ncall], dtype=np.float32)
    chunk_count, datasets = 0, ()
    if pos + 4 <= len(raw):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(raw):
            (ln,) = take("<i")
            if 0 < ln <= len(raw) - pos:
                datasets = (take(f"<{ln}s")[0].decode("utf-8", errors="replace"),)
    return Imatrix(sums=sums, counts=counts, datasets=datasets, chunk_count=int(chunk_count),
                   legacy=True, path=str(p))


# ------------------------------------------------------------------------ writing
def write_imatrix(path: str | os.PathLike, imatrix: Imatrix) -> Path:
    """Write ``imatrix`` in llama.cpp's GGUF imatrix format (atomically); tensors in name order,
    as ``llama-imatrix`` writes them.  A legacy (pre-divided) imatrix cannot be written as
    GGUF sums: convert it first."""
    import gguf

    if imatrix.legacy:
        raise ImatrixError("a legacy .dat imatrix holds pre-divided values, not sums: it is "
                           "read, not written back as GGUF")
    p = Path(path)
    with atomic_path(p) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="", endianess=gguf.GGUFEndian.LITTLE)
        # GGUFWriter adds general.architecture; llama-imatrix writes general.type instead
        w.kv_data[0].pop("general.architecture", None)
        w.add_string(_KEY_TYPE, "imatrix")
        w.add_array(_KEY_DATASETS, list(imatrix.datasets))
        w.add_uint32(_KEY_CHUNK_COUNT, int(imatrix.chunk_count))
        w.add_uint32(_KEY_CHUNK_SIZE, int(imatrix.chunk_size))
        for name in imatrix.names:
            c = imatrix.counts[name]
            # ggml drops trailing dimensions of 1: one matrix is a 1-D tensor
            sums = imatrix.sums[name]
            w.add_tensor(name + _SUM2, sums if c.size == 1 else sums.reshape(c.size, -1))
            w.add_tensor(name + _COUNTS, c)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return p


def imatrix_from_calibration(calib, specs: Iterable, *, dataset: str = "") -> Imatrix:
    """autobits' own calibration as an imatrix: for every quantizable tensor with an
    importance vector (E[x^2] per input channel; a tied ``token_embd`` gets the head's, as
    ``llama-imatrix --process-output`` records it), sums ``E[x^2] * tokens`` and the tokens."""
    sums, counts = {}, {}
    for s in specs:
        if not getattr(s, "quantizable", True):
            continue
        vec = calib.importance(s.name)
        if vec is None:
            continue
        tokens = int(calib.site(s.name).n)
        sums[s.name] = (np.asarray(vec, dtype=np.float64) * tokens).astype(np.float32)
        counts[s.name] = np.array([tokens], dtype=np.float32)
    if not sums:
        raise ImatrixError("the calibration has no importance vector for any tensor")
    return Imatrix(sums=sums, counts=counts, datasets=(dataset,) if dataset else (),
                   chunk_count=int(calib.n_windows), chunk_size=int(calib.ctx))
