"""Bit-exact primitives shared by the K-quant searches of :mod:`autobits.formats._kmath`.

NumPy ports of the small ``static`` helpers of llama.cpp's ``ggml/src/ggml-quants.c`` and
the machinery the vectorised searches run on:

* :func:`nearest_int`  <- ``nearest_int`` (the ``12582912.f`` magic-number rounding: round
  half to even for ``|x| < 2**22``; reproduced bit for bit for every finite input);
* :func:`seqsum`       the C loop ``s = 0; for (...) s += a[i];`` per column, in order;
* :func:`fp16_round`   ``GGML_FP32_TO_FP16`` then back;
* chunked execution (:func:`_chunks`, :func:`_run_chunks`) and the in-place rounding
  buffers (:class:`_Levels`) of the search loops;
* :func:`get_scale_min_k4` / :func:`pack_scale_min_k4` <- ``get_scale_min_k4`` and the
  inline packing of the 12-byte ``scales`` field of ``block_q4_K`` / ``block_q5_K``.

Everything is float32 in C's order (see :mod:`autobits.formats._kmath` for the rules);
``AUTOBITS_QUANT_THREADS=N`` spreads independent chunks over a small thread pool (NumPy
releases the GIL in its loops; default 1); the bytes never depend on it.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

__all__ = [
    "GROUP_MAX_EPS",
    "nearest_int",
    "seqsum",
    "fp16_round",
    "get_scale_min_k4",
    "pack_scale_min_k4",
]

F32 = np.float32
#: ``GROUP_MAX_EPS`` of ggml-quants.c: groups whose max |x| is below it are all-zero.
GROUP_MAX_EPS = F32(1e-15)
_MAGIC = F32(12582912.0)  # 1.5 * 2**23


# ---------------------------------------------------------------------------- primitives
def nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: ``float32`` -> ``int32``, reproduced bit for bit.

    Adds ``1.5 * 2**23`` in float32 and reads the low mantissa bits, which rounds half to
    even for ``|x| < 2**22``.  Outside that range (an ``assert`` in ggml, compiled out in
    release builds) the C function returns garbage; this port returns the same garbage.
    """
    v = np.add(np.asarray(x, dtype=F32), _MAGIC, dtype=F32)
    bits = np.asarray(v).view(np.int32)
    return (bits & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def _check_sequential_reduce() -> bool:
    """True if ``np.add.reduce(a, axis=0)`` adds the rows of a C-contiguous 2-D float32
    array strictly in order (NumPy only sums pairwise along the contiguous axis)."""
    rng = np.random.default_rng(1234)
    a = (rng.standard_normal((33, 4099)) * rng.random((33, 4099)) ** 12).astype(F32)
    a[0] = F32(1e8)
    acc = a[0] + F32(0)
    for j in range(1, a.shape[0]):
        acc += a[j]
    return bool(np.array_equal(np.add.reduce(a, axis=0), acc))


_REDUCE_IS_SEQUENTIAL = _check_sequential_reduce()


def seqsum(a: np.ndarray, from_zero: bool = True) -> np.ndarray:
    """Sum a ``(k, n)`` float32 array over axis 0 sequentially: ``((0 + a0) + a1) + ...``.

    This is the C loop ``float s = 0; for (i...) s += a[i];`` applied to every column.
    With ``from_zero=False`` the sum starts at ``a[0]`` (C: ``float s = a[0];``); the two
    differ only in the sign of an all-zero sum (``0 + -0 == +0``), hence the ``+ 0``.
    """
    # C order: a Fortran-ordered input would make axis 0 the fast (pairwise-summed) axis
    a = np.ascontiguousarray(a, dtype=F32)
    if _REDUCE_IS_SEQUENTIAL:
        acc = np.add.reduce(a, axis=0)
    else:  # pragma: no cover - only on a NumPy that reorders outer-axis reductions
        acc = a[0].copy()
        for j in range(1, a.shape[0]):
            acc += a[j]
    if from_zero:
        acc += F32(0)
    return acc


def fp16_round(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``GGML_FP32_TO_FP16`` then ``GGML_FP16_TO_FP32``: returns (fp16 array, float32 array).

    NumPy's float32 -> float16 cast rounds to nearest even with correct subnormals and
    overflow to inf, the same as ggml's software and F16C conversions.
    """
    h = np.asarray(x, dtype=F32).astype(np.float16)
    return h, h.astype(F32)


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(F32)


# ------------------------------------------------------------------- chunked execution
#: Columns are processed in chunks of about this many float32 values per (k, chunk)
#: array: the scratch arrays of the search loops stay cache-resident and are reused in
#: place, while each NumPy call still has enough work to hide its call overhead.
_CHUNK_VALUES = 131072


def _chunks(k: int, n: int) -> list[slice]:
    step = max(64, _CHUNK_VALUES // max(k, 1))
    return [slice(a, min(n, a + step)) for a in range(0, n, step)]


def _thread_count() -> int:
    """Worker threads for chunked searches: ``AUTOBITS_QUANT_THREADS`` (default 1).

    NumPy releases the GIL inside its loops, so chunks can run in parallel; results do
    not depend on the thread count (chunks are independent and written to disjoint
    slices).  The default is one thread: on a shared 2-core machine a second thread was
    measured slower, and callers usually parallelise over tensors or processes anyway.
    """
    env = os.environ.get("AUTOBITS_QUANT_THREADS", "").strip()
    return int(env) if env.isdigit() and int(env) > 0 else 1


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)  # (pid, size): a forked child must not reuse the pool


def _run_chunks(fn: Callable[[slice], None], chunks: list[slice]) -> None:
    """Run ``fn(chunk)`` for every chunk, in a small thread pool when it pays off."""
    global _pool, _pool_key
    nthreads = min(_thread_count(), len(chunks))

    def work(c: slice) -> None:
        with np.errstate(all="ignore"):  # errstate is per thread
            fn(c)

    if nthreads <= 1 or threading.current_thread().name.startswith("autobits-kmath"):
        for c in chunks:
            work(c)
        return
    key = (os.getpid(), nthreads)
    with _pool_lock:
        if _pool is None or _pool_key != key:
            if _pool is not None and _pool_key[0] == key[0]:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(nthreads, thread_name_prefix="autobits-kmath")
            _pool_key = key
        pool = _pool
    for f in [pool.submit(work, c) for c in chunks]:
        f.result()


def _sum0(a: np.ndarray) -> np.ndarray:
    """``seqsum`` for C-contiguous scratch arrays, starting from ``+0``."""
    acc = np.add.reduce(a, axis=0) if _REDUCE_IS_SEQUENTIAL else seqsum(a, from_zero=False)
    acc += F32(0)
    return acc


#: |v| below this keeps ``v + 1.5*2**23`` inside [2**23, 2**24), where the magic-number
#: rounding equals ``np.rint`` and the float-only fast path below is exact.
_SAFE_ABS = F32(4194000.0)


class _Levels:
    """Scratch buffers for ``lf = clip(nearest_int(v), lo, hi)`` computed in place."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.fb = np.empty(shape, dtype=F32)  # v goes here
        self.lf = np.empty(shape, dtype=F32)  # the levels, as float32
        self.tmp = np.empty(shape, dtype=F32)

    def round_clip(self, lo: int, hi: int, safe: bool) -> None:
        """Round ``self.fb`` like ``nearest_int``, clip to ``[lo, hi]``, store in ``self.lf``.

        ``safe`` says every ``|v|`` is below :data:`_SAFE_ABS` (and finite): then
        ``nearest_int`` is exactly ``rint`` and everything stays in float32.
        Otherwise the integer bit trick reproduces ggml's out-of-range garbage.
        """
        fb = self.fb
        if safe:  # in range the magic-number trick is exactly rint (half to even)
            np.rint(fb, out=self.lf)
            np.clip(self.lf, F32(lo), F32(hi), out=self.lf)
        else:
            fb += _MAGIC
            b = fb.view(np.int32)
            b &= np.int32(0x007FFFFF)
            b -= np.int32(0x00400000)
            np.clip(b, lo, hi, out=b)
            self.lf[...] = b


def _all_safe(lo_end: np.ndarray, hi_end: np.ndarray, ignore: np.ndarray) -> bool:
    """True if the extreme values of ``v`` of every column that matters are in range."""
    ok = (np.abs(lo_end) < _SAFE_ABS) & (np.abs(hi_end) < _SAFE_ABS)
    return bool((ok | ignore).all())


# --------------------------------------------------------------- 6-bit K scale packing
def pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Pack 8 scales and 8 mins (6-bit, ``(n, 8)``) into the 12-byte ``scales`` field of
    ``block_q4_K`` / ``block_q5_K``; inverse of :func:`get_scale_min_k4`.

    Reproduces the C byte arithmetic exactly, also for values above 63.
    """
    ls = np.asarray(ls).astype(np.int32)
    lm = np.asarray(lm).astype(np.int32)
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (ls[:, 0:4] | (((ls[:, 4:8] >> 4) << 6) & 0xFF)) & 0xFF
    out[:, 4:8] = (lm[:, 0:4] | (((lm[:, 4:8] >> 4) << 6) & 0xFF)) & 0xFF
    out[:, 8:12] = ((ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)) & 0xFF
    return out


def get_scale_min_k4(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte K ``scales`` field ``(n, 12)`` into (scales, mins), ``(n, 8)`` uint8."""
    q = np.asarray(q, dtype=np.uint8)
    sc = np.empty((q.shape[0], 8), dtype=np.uint8)
    mn = np.empty((q.shape[0], 8), dtype=np.uint8)
    sc[:, 0:4] = q[:, 0:4] & 63
    mn[:, 0:4] = q[:, 4:8] & 63
    sc[:, 4:8] = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    mn[:, 4:8] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return sc, mn
