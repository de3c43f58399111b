"""The independent oracle: llama.cpp's own C quantizer, called through ctypes.

``llama-cpp-python`` (the ``judge`` extra) ships ``libggml-base`` next to its Python
files (``site-packages/llama_cpp/lib/``).  That library exports::

    size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst,
                               int64_t start, int64_t nrows, int64_t n_per_row,
                               const float * imatrix);
    void   ggml_quantize_init(enum ggml_type type);
    bool   ggml_quantize_requires_imatrix(enum ggml_type type);
    int64_t ggml_blck_size(enum ggml_type type);
    size_t ggml_row_size(enum ggml_type type, int64_t ne);

which is exactly what ``llama-quantize`` calls, so bytes from :func:`ggml_quantize` are the
bytes llama.cpp would write.  The library is located without importing ``llama_cpp`` (that
would load the whole of ``libllama``); set ``AUTOBITS_GGML_LIB`` to a path to use another build.

Usage::

    from autobits.formats.oracle import oracle_available, ggml_quantize
    if oracle_available():
        q = ggml_quantize(weights, 2)          # GGML_TYPE_Q4_0, uint8 (rows, row_bytes)
        q = ggml_quantize(weights, 2, imatrix) # imatrix: float32 (row_len,)

When the library is missing, :func:`ggml_quantize` raises :class:`OracleUnavailableError`
(both an :class:`~autobits.errors.AutobitsError` and an :class:`ImportError`).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import logging
import os
import threading

import numpy as np

from autobits.errors import AutobitsError

__all__ = [
    "OracleUnavailableError",
    "oracle_available",
    "oracle_library_path",
    "oracle_unavailable_reason",
    "ggml_quantize",
    "ggml_block_size",
    "ggml_row_size",
    "ggml_requires_imatrix",
]

log = logging.getLogger(__name__)

_INSTALL_HINT = "install the judge extra: pip install -e '.[judge]'"
_ENV_VAR = "AUTOBITS_GGML_LIB"


class OracleUnavailableError(AutobitsError, ImportError):
    """llama.cpp's ggml library (from llama-cpp-python) cannot be found or loaded."""


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_path: str | None = None
_error: str | None = None
_loaded = False


def _candidate_paths() -> list[str]:
    """Possible locations of libggml-base, best first."""
    paths: list[str] = []
    env = os.environ.get(_ENV_VAR)
    if env:
        paths.append(env)
    try:
        spec = importlib.util.find_spec("llama_cpp")  # does not import the package
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for pkg_dir in spec.submodule_search_locations:
            for sub in ("lib", ""):
                d = os.path.join(pkg_dir, sub)
                for pattern in ("libggml-base.so", "libggml-base.so*", "libggml-base*.dylib",
                                "ggml-base*.dll", "libggml.so", "libggml*.so*"):
                    for p in sorted(glob.glob(os.path.join(d, pattern))):
                        if p not in paths:
                            paths.append(p)
    return paths


def _declare(lib: ctypes.CDLL) -> None:
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p


def _load() -> ctypes.CDLL | None:
    global _lib, _lib_path, _error, _loaded
    with _lock:
        if _loaded:
            return _lib
        _loaded = True
        paths = _candidate_paths()
        if not paths:
            _error = f"llama-cpp-python's libggml-base was not found; {_INSTALL_HINT}"
            return None
        problems = []
        for p in paths:
            try:
                lib = ctypes.CDLL(p)
                _declare(lib)
            except (OSError, AttributeError) as e:
                problems.append(f"{p}: {e}")
                continue
            _lib, _lib_path = lib, p
            log.debug("ggml oracle loaded from %s", p)
            return lib
        _error = "could not load ggml from llama-cpp-python (" + "; ".join(problems) + f"); {_INSTALL_HINT}"
        return None


def oracle_available() -> bool:
    """True when llama.cpp's C quantizer can be called."""
    return _load() is not None


def oracle_unavailable_reason() -> str | None:
    """Why the oracle is unavailable (for pytest skip reasons), or None when it is available."""
    return None if _load() is not None else _error


def oracle_library_path() -> str | None:
    """Path of the loaded ggml library, or None."""
    _load()
    return _lib_path


def _require() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise OracleUnavailableError(_error or f"ggml oracle unavailable; {_INSTALL_HINT}")
    return lib


def _type_count() -> int:
    """Number of ggml type ids (indexing past it would read outside ggml's type table)."""
    try:
        import gguf

        return max(int(v) for v in gguf.GGMLQuantizationType) + 1
    except Exception:  # pragma: no cover - gguf is a core dependency
        return 43


def _check_type(lib: ctypes.CDLL, ggml_type: int) -> int:
    t = int(ggml_type)
    if not 0 <= t < _type_count():
        raise AutobitsError(f"ggml type id {t} is out of range")
    bs = int(lib.ggml_blck_size(t))
    if bs <= 0 or int(lib.ggml_row_size(t, bs)) == 0:
        raise AutobitsError(f"ggml type id {t} is not a type this ggml build can quantize to")
    return t


def ggml_block_size(ggml_type: int) -> int:
    """Values per block of a ggml type, as the C library says."""
    lib = _require()
    return int(lib.ggml_blck_size(_check_type(lib, ggml_type)))


def ggml_row_size(ggml_type: int, row_length: int) -> int:
    """Bytes of one row of ``row_length`` values of a ggml type, as the C library says."""
    lib = _require()
    return int(lib.ggml_row_size(_check_type(lib, ggml_type), int(row_length)))


def ggml_requires_imatrix(ggml_type: int) -> bool:
    """True when llama.cpp refuses to quantize this type without an importance matrix."""
    lib = _require()
    return bool(lib.ggml_quantize_requires_imatrix(_check_type(lib, ggml_type)))


def ggml_quantize(
    array: np.ndarray, ggml_type: int, importance: np.ndarray | None = None
) -> np.ndarray:
    """Quantize ``array`` (rows, row_len) with llama.cpp's ``ggml_quantize_chunk``.

    ``importance`` is ``None`` or one non-negative value per input channel (``(row_len,)``),
    passed as llama.cpp's imatrix for every row.  Returns ``uint8 (rows, row_bytes)``.
    Raises :class:`OracleUnavailableError` when llama-cpp-python is not installed and
    :class:`~autobits.errors.AutobitsError` for shapes the C code would abort on.
    """
    lib = _require()
    t = _check_type(lib, ggml_type)
    x = np.ascontiguousarray(array, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise AutobitsError(f"ggml_quantize expects a 2-D (rows, row_len) array, got shape {x.shape}")
    nrows, n_per_row = (int(s) for s in x.shape)
    bs = int(lib.ggml_blck_size(t))
    if n_per_row <= 0 or n_per_row % bs:
        raise AutobitsError(
            f"row length {n_per_row} is not a multiple of ggml type {t} block size {bs}"
        )
    imat = None
    if importance is not None:
        imat = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if imat.size != n_per_row:
            raise AutobitsError(
                f"importance has {imat.size} values, expected {n_per_row} (one per input channel)"
            )
    elif lib.ggml_quantize_requires_imatrix(t):
        raise AutobitsError(f"ggml type {t} cannot be quantized without an importance vector")
    row_bytes = int(lib.ggml_row_size(t, n_per_row))
    out = np.zeros((nrows, row_bytes), dtype=np.uint8)
    if nrows == 0:
        return out
    lib.ggml_quantize_init(t)
    written = lib.ggml_quantize_chunk(
        t,
        x.ctypes.data,
        out.ctypes.data,
        0,
        nrows,
        n_per_row,
        None if imat is None else imat.ctypes.data,
    )
    if int(written) != out.nbytes:
        raise AutobitsError(f"ggml wrote {int(written)} bytes, expected {out.nbytes}")
    return out
