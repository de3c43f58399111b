"""A bounded pre-scan of a GGUF file's header, before gguf-py parses it.

gguf-py trusts every count in the header: a crafted file that claims a metadata array of
2**60 items, or a string of 2**40 bytes, makes it loop or allocate for as long as the
claim says.  :func:`scan_gguf_header` walks the same header -- magic, version, tensor
count, metadata count, each key/value (its type, string lengths, array item types and
counts) and each tensor's name, dimensions, type and offset -- checking every count
against the bytes left in the file and against sane limits *before* acting on it, so
each step consumes at least one byte of the file and a bad file fails in milliseconds
with a :class:`~autobits.errors.ModelLoadError` naming the file and the field.

It reads the file through ``mmap`` (slices are copied, the file never is) and keeps the
metadata's scalars and strings (an array is recorded as ``"<array of N>"``, its items
skipped); of each tensor its name, dimensions, type id and data offset
(:class:`GGUFTensorEntry`), which is all a reader of the weights needs to find them
(:mod:`autobits.light` memory-maps the data from these).  It is the only GGUF header parser
of the loaders: gguf-py's reader builds a NumPy view per vocabulary item (seconds per file,
tens of seconds for a 150k vocabulary).
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from autobits.errors import ModelLoadError

log = logging.getLogger(__name__)

__all__ = ["GGUFHeader", "GGUFSource", "GGUFTensor", "GGUFTensorEntry", "LIMITS",
           "scan_gguf_header", "tensor_table"]

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
#: struct format of each scalar value type (GGUF's GGUFValueType numbering), and its size.
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
               10: "<Q", 11: "<q", 12: "<d"}
_SCALAR_SIZE = {t: struct.calcsize(f) for t, f in _SCALAR_FMT.items()}
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32",
               6: "float32", 7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64",
               12: "float64"}

#: Sane upper bounds, far above any real model (checked besides the file size).
LIMITS = {
    "tensors": 1 << 20,        # tensor count
    "kv": 1 << 16,             # metadata key/value count
    "key_bytes": 1 << 16,      # length of a metadata key
    "string_bytes": 1 << 28,   # length of a string value
    "array_items": 1 << 28,    # items of one metadata array of numbers (skipped at once)
    "string_items": 1 << 22,   # items of an array of strings or arrays (read one by one;
                               # vocabularies have up to ~10**6)
    "array_depth": 4,          # arrays of arrays
    "dims": 8,                 # dimensions of a tensor (ggml has 4)
    "ggml_type": 1 << 10,      # tensor type id
}


@dataclass(frozen=True)
class GGUFTensorEntry:
    """One tensor info of the header: ``dims`` in ggml order (``dims[0]`` is the row length),
    ``offset`` relative to the start of the data section (:attr:`GGUFHeader.data_start`)."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass(frozen=True)
class GGUFHeader:
    """What the pre-scan read: counts, where the header ends, the architecture and the
    tensor infos."""

    version: int
    tensor_count: int
    kv_count: int
    header_bytes: int  # offset just after the last tensor info
    alignment: int
    architecture: str | None = None  # general.architecture (None when absent or not a string)
    tensors: tuple[GGUFTensorEntry, ...] = ()
    #: key -> scalar (int, float, bool), string, or ``"<array of N>"``
    metadata: dict = field(default_factory=dict, repr=False)

    @property
    def data_start(self) -> int:
        """Offset of the data section: the header's end rounded up to the alignment."""
        return -(-self.header_bytes // self.alignment) * self.alignment


class _Scan:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path
        self.item_type = None

    def fail(self, field: str, what: str) -> ModelLoadError:
        return ModelLoadError(f"{str(self.path)!r} is a corrupt GGUF file: {field}: {what} "
                              f"(at byte {self.pos} of {self.size:,})")

    @property
    def left(self) -> int:
        return self.size - self.pos

    def take(self, fmt: str, field: str) -> int:
        n = struct.calcsize(fmt)
        if n > self.left:
            raise self.fail(field, f"needs {n} bytes, the file ends {self.left} bytes later")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def count(self, field: str, n: int, *, item_bytes: int, limit: str) -> int:
        """Check a count read from the file: ``n`` items of at least ``item_bytes`` each."""
        if n > LIMITS[limit]:
            raise self.fail(field, f"count {n:,} exceeds the limit of {LIMITS[limit]:,}")
        if n * item_bytes > self.left:
            raise self.fail(field, f"count {n:,} needs at least {n * item_bytes:,} bytes, "
                                   f"{self.left:,} are left in the file")
        return n

    def string(self, field: str) -> bytes:
        """A key or tensor name (a string value is skipped by :meth:`value`)."""
        n = self.count(field, self.take("<Q", f"{field} length"), item_bytes=1, limit="key_bytes")
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def value(self, field: str, vtype: int, depth: int = 0, *, keep: bool = False,
              raw: bool = False):
        """Read one value of ``vtype``: a scalar, a string (decoded, invalid UTF-8
        replaced), or for an array ``"<array of N>"`` (its items checked and skipped); with
        ``keep`` an array of numbers is returned as a NumPy array, an array of strings as a
        list of str.  With ``raw`` strings stay bytes.  An array's item type is left in
        ``self.item_type``."""
        if vtype in _SCALAR_FMT:
            return self.take(_SCALAR_FMT[vtype], field)
        if vtype == _STRING:
            n = self.count(field, self.take("<Q", f"{field} length"), item_bytes=1,
                           limit="string_bytes")
            s = bytes(self.buf[self.pos:self.pos + n])
            self.pos += n
            return s if raw else s.decode("utf-8", "replace")
        if vtype != _ARRAY:
            raise self.fail(field, f"unknown value type {vtype}")
        if depth >= LIMITS["array_depth"]:
            raise self.fail(field, f"arrays nested deeper than {LIMITS['array_depth']}")
        itype = self.item_type = self.take("<I", f"{field} item type")
        if itype not in _TYPE_NAMES:
            raise self.fail(field, f"unknown array item type {itype}")
        least = _SCALAR_SIZE.get(itype, 8 if itype == _STRING else 12)  # array: type + count
        n = self.count(f"{field} ({_TYPE_NAMES[itype]} array)", self.take("<Q", f"{field} count"),
                       item_bytes=least,
                       limit="array_items" if itype in _SCALAR_SIZE else "string_items")
        if itype in _SCALAR_SIZE:
            at = self.pos
            self.pos += n * least
            if keep:
                return np.frombuffer(self.buf, dtype=_SCALAR_FMT[itype], count=n, offset=at).copy()
        elif itype == _STRING:  # vocabularies: the hot loop, kept lean
            buf, pos, size, cap = self.buf, self.pos, self.size, LIMITS["string_bytes"]
            kept: list[str] | None = [] if keep else None
            for i in range(n):
                if pos + 8 > size:
                    self.pos = pos
                    raise self.fail(f"{field}[{i}]", "the file ends inside its length")
                (k,) = _U64.unpack_from(buf, pos)
                pos += 8
                if k > cap or k > size - pos:
                    self.pos = pos
                    raise self.fail(f"{field}[{i}]", f"a string of {k:,} bytes, {size - pos:,} "
                                                     f"are left in the file (limit {cap:,})")
                if kept is not None:
                    kept.append(bytes(buf[pos:pos + k]) if raw
                                else str(buf[pos:pos + k], "utf-8", "replace"))
                pos += k
            self.pos = pos
            if kept is not None:
                return kept
        else:
            for i in range(n):
                self.value(f"{field}[{i}]", itype, depth + 1)
            self.item_type = itype  # the nested arrays' own types were left there meanwhile
        return f"<array of {n}>"


def scan_gguf_header(path: str | os.PathLike, *, arrays: Iterable[str] = ()) -> GGUFHeader:
    """Check a GGUF file's header against its size and :data:`LIMITS`; raise
    :class:`ModelLoadError` naming the file and the field at the first bad count.

    The metadata keys named in ``arrays`` keep their items (numbers as a NumPy array,
    strings as a list of str) instead of ``"<array of N>"``.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise ModelLoadError(f"{str(path)!r} is empty, expected a GGUF file")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _scan(mm, path, frozenset(arrays))
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {str(path)!r}: {e.strerror or e}") from None


def _scan(buf: mmap.mmap, path: Path, arrays: frozenset[str], kv: list | None = None
          ) -> GGUFHeader:
    """The scan; ``kv``, when a list, receives every key/value as ``(key, value, type,
    item type or None)`` with strings as bytes and arrays whole."""
    s = _Scan(buf, path)
    try:
        if bytes(buf[:4]) != _MAGIC:
            raise s.fail("magic", f"expected b'GGUF', got {bytes(buf[:4])!r}")
        s.pos = 4
        version = s.take("<I", "version")
        if version not in _VERSIONS:
            raise s.fail("version", f"{version}, expected 2 or 3")
        n_tensors = s.count("tensor count", s.take("<Q", "tensor count"), item_bytes=24,
                            limit="tensors")
        n_kv = s.count("metadata count", s.take("<Q", "metadata count"), item_bytes=13, limit="kv")
        alignment, architecture, tensors, metadata = 32, None, [], {}
        for i in range(n_kv):
            key = s.string(f"metadata key {i}").decode("utf-8", "replace")
            vtype = s.take("<I", f"metadata {key!r} type")
            keep = kv is not None or key in arrays
            v = s.value(f"metadata {key!r}", vtype, keep=keep, raw=kv is not None)
            if kv is not None:
                kv.append((key, v, vtype, s.item_type if vtype == _ARRAY else None))
                if vtype == _STRING:
                    v = v.decode("utf-8", "replace")
                elif vtype == _ARRAY and key not in arrays:
                    v = f"<array of {len(v)}>" if isinstance(v, (list, np.ndarray)) else v
            metadata[key] = v
            if key == "general.architecture" and vtype == _STRING:
                architecture = v
            if key == "general.alignment":
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v & (v - 1):
                    raise s.fail(f"metadata {key!r}", f"{v!r}, expected a power of two")
                alignment = v
        for i in range(n_tensors):
            name = s.string(f"tensor {i} name").decode("utf-8", "replace")
            n_dims = s.take("<I", f"tensor {name!r} dimension count")
            if not 0 < n_dims <= LIMITS["dims"]:
                raise s.fail(f"tensor {name!r}", f"{n_dims} dimensions, expected 1 to {LIMITS['dims']}")
            numel, dims = 1, []
            for d in range(n_dims):
                dims.append(s.take("<Q", f"tensor {name!r} dimension {d}"))
                numel *= dims[-1]
            if numel > s.size * 8:  # no ggml type packs more than 8 weights per byte
                raise s.fail(f"tensor {name!r}", f"{numel:,} elements cannot fit in the file")
            ttype = s.take("<I", f"tensor {name!r} type")
            if ttype >= LIMITS["ggml_type"]:
                raise s.fail(f"tensor {name!r}", f"type id {ttype} is not a ggml type")
            offset = s.take("<Q", f"tensor {name!r} offset")
            if offset >= s.size:
                raise s.fail(f"tensor {name!r}", f"data offset {offset:,} is past the file's end")
            tensors.append(GGUFTensorEntry(name=name, dims=tuple(dims), ggml_type=ttype,
                                           offset=offset))
    except ModelLoadError:
        raise
    except (struct.error, ValueError) as e:  # pragma: no cover - every read is bounds-checked
        raise s.fail("header", str(e)) from None
    return GGUFHeader(version=version, tensor_count=n_tensors, kv_count=n_kv,
                      header_bytes=s.pos, alignment=alignment, architecture=architecture,
                      tensors=tuple(tensors), metadata=metadata)


# ------------------------------------------------------------------ the tensor table
@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor's bytes lie in the file: ``shape`` in numpy order (rows last axis),
    ``start`` the absolute offset, ``nbytes`` its size."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    type_id: int
    start: int
    nbytes: int

    @property
    def row_length(self) -> int:
        return int(self.shape[-1])

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1


def _type_sizes(type_id: int, path: Path, name: str) -> tuple[str, int, int]:
    """(type name, values per block, bytes per block) of a ggml type id."""
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType(type_id)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise ModelLoadError(f"{str(path)!r} is a corrupt GGUF file: tensor {name!r} has ggml "
                             f"type id {type_id}, which gguf-py does not know") from None
    return qtype.name, int(block), int(size)


def tensor_table(path: str | os.PathLike, header: GGUFHeader) -> dict[str, GGUFTensor]:
    """The tensors of a scanned file, each checked: a known ggml type, rows that are whole
    blocks, bytes inside the file, a name listed once (else :class:`ModelLoadError`)."""
    path = Path(path)
    size = path.stat().st_size
    tensors: dict[str, GGUFTensor] = {}
    for e in header.tensors:
        type_name, block, type_size = _type_sizes(e.ggml_type, path, e.name)
        if e.dims[0] % block:
            raise ModelLoadError(f"{str(path)!r}: tensor {e.name!r} has rows of {e.dims[0]} values, "
                                 f"not a multiple of {type_name}'s blocks of {block}")
        start = header.data_start + e.offset
        nbytes = int(np.prod(e.dims, dtype=np.int64)) // block * type_size
        if start + nbytes > size:
            raise ModelLoadError(f"{str(path)!r} is truncated: tensor {e.name!r} ends at byte "
                                 f"{start + nbytes:,}, the file has {size:,} bytes")
        if e.name in tensors:
            raise ModelLoadError(f"{str(path)!r} lists tensor {e.name!r} twice")
        tensors[e.name] = GGUFTensor(name=e.name, shape=tuple(int(d) for d in reversed(e.dims)),
                                     type_name=type_name, type_id=e.ggml_type, start=start,
                                     nbytes=nbytes)
    return tensors


#: numpy item type of the unquantized ggml types (the others are shown as bytes)
_PLAIN_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8,
                 "I16": np.int16, "I32": np.int32, "I64": np.int64}


class SourceTensor:
    """One tensor of a :class:`GGUFSource`, with the attributes of gguf-py's
    ``ReaderTensor`` that the copying code reads: ``name``, ``tensor_type``, ``shape``
    (ggml order), ``n_bytes`` and ``data`` (a read-only view of the mapped file: typed for
    float and integer types, else ``uint8`` rows of bytes)."""

    def __init__(self, t: GGUFTensor, mapped: np.ndarray) -> None:
        import gguf

        self.name = t.name
        self.tensor_type = gguf.GGMLQuantizationType(t.type_id)
        self.shape = np.array(list(reversed(t.shape)), dtype=np.uint64)
        self.n_bytes = t.nbytes
        raw = mapped[t.start:t.start + t.nbytes]
        dtype = _PLAIN_DTYPES.get(t.type_name)
        if dtype is not None:
            self.data = raw.view(dtype).reshape(t.shape)
        else:
            self.data = raw.reshape(*t.shape[:-1], t.nbytes // max(1, t.n_rows))


class GGUFSource:
    """A GGUF file opened to be copied from (a stand-in's or an export's source): every
    key/value as ``(key, value, type, item type or None)`` with strings as bytes and arrays
    whole (:attr:`kv`), the architecture, and the tensors in file order, memory-mapped
    read-only (:attr:`tensors`).  One bounded scan; gguf-py's reader is not used."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.kv: list[tuple[str, object, int, int | None]] = []
        try:
            with self.path.open("rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    raise ModelLoadError(f"{str(self.path)!r} is empty, expected a GGUF file")
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    self.header = _scan(mm, self.path, frozenset(), self.kv)
        except OSError as e:
            raise ModelLoadError(f"cannot read model file {str(self.path)!r}: "
                                 f"{e.strerror or e}") from None
        self.architecture = self.header.architecture
        table = tensor_table(self.path, self.header)
        mapped = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.tensors = [SourceTensor(t, mapped) for t in table.values()]

    def copy_kv(self, writer, *, skip: frozenset[str] | set[str] = frozenset()) -> int:
        """Add every key/value of the source to a ``gguf.GGUFWriter`` but those in ``skip``,
        with its own type (strings as the bytes in the file); returns how many.  An empty
        array (which GGUFWriter cannot write) is left out with a warning; a nested array is
        a :class:`ModelLoadError`."""
        n = 0
        for key, value, vtype, sub in self.kv:
            if key in skip:
                continue
            if vtype == _ARRAY:
                if sub == _ARRAY:
                    raise ModelLoadError(f"{str(self.path)!r}: metadata {key!r} is a nested "
                                         f"array, which autobits does not copy")
                if len(value) == 0:
                    log.warning("%s: metadata %r is an empty array; GGUFWriter cannot write it",
                                self.path.name, key)
                    continue
                value = value if isinstance(value, list) else value.tolist()
            writer.add_key_value(key, value, vtype, sub_type=sub)
            n += 1
        return n
