"""Vectorised ports of ggml's k-quant helper routines (bit-exact with the C code).

Every routine here is a NumPy port of a ``static`` helper in llama.cpp's
``ggml/src/ggml-quants.c`` (the version vendored by llama-cpp-python 0.3.x, ggml-base
compiled for baseline x86-64, so no FMA contraction), vectorised over many independent
rows ("sub-blocks"):

* :func:`nearest_int`       <- ``nearest_int`` (the ``12582912.f`` magic-number rounding:
  round half to even for ``|x| < 2**22``; reproduced bit for bit for every finite input)
* :func:`make_qx_quants`    <- ``make_qx_quants`` (symmetric, RMSE search over 18 scales)
* :func:`make_qkx2_quants`  <- ``make_qkx2_quants`` (scale + min, weighted search)
* :func:`make_qkx3_quants`  <- ``make_qkx3_quants`` (as qkx2, default weights ``x*x``)
* :func:`make_qp_quants`    <- ``make_qp_quants`` (positive values, imatrix-weighted,
  used to quantize the 6-bit sub-block scales)
* :func:`get_scale_min_k4` / :func:`pack_scale_min_k4` <- ``get_scale_min_k4`` and the
  inline packing of the 12-byte ``scales`` field of ``block_q4_K`` / ``block_q5_K``.

Bit-exactness rules followed throughout: all arithmetic is float32 (constants are wrapped
in ``np.float32`` so nothing is promoted to float64), each C expression is evaluated in
the same association order (``w*x[i]*l`` is ``(w*x)*l``), and every running sum is
accumulated sequentially in C order (see :func:`seqsum`), never pairwise.

Two calling conventions are offered:

* the public functions take ``x`` as ``(n, k)``: ``n`` independent rows of ``k`` values,
  exactly as the C routines see one sub-block, and return ``(n,)`` scales and ``(n, k)``
  integer levels;
* the ``*_t`` variants take the transposed ``(k, n)`` layout (position-major, each row of
  the array holds one position of every sub-block).  This is the layout the code works in
  internally (sequential sums become ``k`` contiguous vector adds), so callers that
  already hold transposed data should use them to skip two copies.

The search loops of make_qx/qkx2/qkx3 run chunk by chunk of columns with in-place scratch
buffers; chunks are independent, so ``AUTOBITS_QUANT_THREADS=N`` spreads them over a
small thread pool (NumPy releases the GIL in its loops; default 1); the bytes never
depend on it.  Where ``nearest_int``'s argument is provably inside ``|v| < 2**22``
the float-only ``np.rint`` is used (it is the same rounding); otherwise the integer bit
trick runs, so out-of-range garbage is reproduced too.
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
    "make_qx_quants",
    "make_qx_quants_t",
    "make_qkx2_quants",
    "make_qkx2_quants_t",
    "make_qkx3_quants",
    "make_qkx3_quants_t",
    "make_qp_quants",
    "make_qp_quants_t",
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
#: Use the float-only rounding when it is provably exact (tests switch it off to check
#: that both paths give the same bytes).
_FAST_ROUNDING = True


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


# ------------------------------------------------------------------------ make_qx_quants
def _qx_chunk(
    xt: np.ndarray, nmax: int, rmse_type: int, w: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    k, n = xt.shape
    # C keeps the first x[i] of largest |x[i]| (`if (ax > amax)`); (arg)max along axis 0 is
    # slow in NumPy, so take the column max/min and resolve +a/-a ties explicitly
    hi, lo_x = xt.max(axis=0), xt.min(axis=0)
    amax = np.maximum(hi, -lo_x)
    xmax = np.where(hi >= -lo_x, hi, lo_x)
    tie = np.nonzero((hi == -lo_x) & (hi > 0))[0]
    if tie.size:
        first = np.argmax(np.abs(xt[:, tie]) == amax[tie], axis=0)
        xmax[tie] = xt[first, tie]
    zero = amax < GROUP_MAX_EPS
    iscale = F32(-nmax) / xmax
    lo, hi = -nmax, nmax - 1
    buf = _Levels((k, n))

    def levels(isc: np.ndarray) -> np.ndarray:
        # iscale = -(nmax + 0.1*is)/max with |max| the largest |x|, so |iscale*x[i]| <= 33
        # for every column that is not all-zero (those are discarded): always in range
        np.multiply(xt, isc, out=buf.fb)
        buf.round_clip(lo, hi, _FAST_ROUNDING)
        return buf.lf

    if rmse_type == 0:
        L = levels(iscale).astype(np.int32) + nmax
        L[:, zero] = 0
        return np.where(zero, F32(0), F32(1) / iscale).astype(F32), L
    return_early = rmse_type < 0
    rtype = -rmse_type if return_early else rmse_type
    if w is None:
        if rtype == 1:
            w = xt * xt
        elif rtype == 2:
            w = np.ones_like(xt)
        elif rtype == 3:
            w = np.abs(xt)
        else:
            w = np.sqrt(np.abs(xt))
    wx = w * xt

    def sums() -> tuple[np.ndarray, np.ndarray]:
        tmp = buf.tmp
        np.multiply(wx, buf.lf, out=tmp)  # (w*x)*l
        slx = _sum0(tmp)
        np.multiply(w, buf.lf, out=tmp)  # (w*l)*l
        tmp *= buf.lf
        return slx, _sum0(tmp)

    levels(iscale)
    best_isc = iscale  # L is recomputed from the winning iscale at the end
    sumlx, suml2 = sums()
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
    if return_early:
        inv = F32(1) / iscale
        scale = np.where(suml2 > 0, F32(0.5) * (scale + inv), inv).astype(F32)
    else:
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            isc = -(F32(nmax) + F32(0.1) * F32(step)) / xmax
            levels(isc)
            slx, sl2 = sums()
            better = (sl2 > 0) & (slx * slx > best * sl2)
            if better.any():
                best_isc = np.where(better, isc, best_isc).astype(F32)
                scale = np.where(better, slx / sl2, scale).astype(F32)
                best = np.where(better, scale * slx, best).astype(F32)
        levels(best_isc)
    L = buf.lf.astype(np.int32)
    L += nmax
    L[:, zero] = 0
    return np.where(zero, F32(0), scale).astype(F32), L


def make_qx_quants_t(
    xt: np.ndarray, nmax: int, rmse_type: int, qwt: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`make_qx_quants` on transposed ``(k, n)`` input; returns ``(scale (n,), L (k, n))``."""
    xt = np.asarray(xt, dtype=F32)
    k, n = xt.shape
    scale = np.empty(n, dtype=F32)
    L = np.empty((k, n), dtype=np.int32)

    def one(c: slice) -> None:
        w = None if qwt is None else np.ascontiguousarray(qwt[:, c], dtype=F32)
        scale[c], L[:, c] = _qx_chunk(np.ascontiguousarray(xt[:, c]), nmax, rmse_type, w)

    _run_chunks(one, _chunks(k, n))
    return scale, L


def make_qx_quants(
    x: np.ndarray, nmax: int, rmse_type: int, qw: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``make_qx_quants`` for each row of ``x (n, k)``.

    Symmetric quantization to ``[-nmax, nmax-1]``; returns ``(scale float32 (n,),
    L int32 (n, k))`` with ``L`` already offset by ``+nmax`` (``0 .. 2*nmax-1``).
    ``rmse_type`` selects the error weights when ``qw`` is None (1: ``x*x``, 2: 1,
    3: ``|x|``, 4: ``sqrt|x|``; negative: return early; 0: plain rounding).
    """
    qwt = None if qw is None else np.ascontiguousarray(np.asarray(qw, dtype=F32).T)
    xt = np.ascontiguousarray(np.asarray(x, dtype=F32).T)
    scale, L = make_qx_quants_t(xt, nmax, rmse_type, qwt)
    return scale, np.ascontiguousarray(L.T)


# -------------------------------------------------------------- make_qkx2 / qkx3_quants
def _qkx_chunk(
    xt: np.ndarray,
    wt: np.ndarray,
    nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared body of make_qkx2_quants / make_qkx3_quants (identical in the ggml version
    we match once the weights are fixed) on one C-contiguous ``(k, n)`` chunk."""
    k, n = xt.shape
    xlo = xt.min(axis=0)
    xhi = xt.max(axis=0)
    wx = wt * xt
    sum_w = np.add.reduce(wt, axis=0) if _REDUCE_IS_SEQUENTIAL else seqsum(wt, False)
    sum_x = np.add.reduce(wx, axis=0) if _REDUCE_IS_SEQUENTIAL else seqsum(wx, False)
    xmin = np.minimum(xlo, F32(0))
    flat = xhi <= xmin  # xmax >= xmin always, so this is C's `max == min`
    live = ~flat
    fnmax = F32(nmax)
    buf = _Levels((k, n))
    lf = buf.lf
    xm = np.empty_like(xt)  # x[i] - min for the current min

    def track_min() -> tuple[np.ndarray, float]:
        """Refresh x - min, max - min, and the bound on |iscale*(x - min)| / |c|."""
        np.subtract(xt, xmin, out=xm)
        rng = xhi - xmin
        # |fl(c/rng * (x - min))| <= |c| * max|x - min| / |rng| (1 + 3 ulp); the margin in
        # _SAFE_ABS covers the rounding.  NaN/inf (rng == 0) make the check fail.
        ratio = np.maximum(np.abs(xlo - xmin), np.abs(xhi - xmin)) / np.abs(rng)
        rmax = float(ratio[live].max()) if live.any() else 0.0
        return rng, rmax

    def levels(isc: np.ndarray, c: float, rmax: float) -> None:
        np.multiply(xm, isc, out=buf.fb)  # iscale*(x[i] - min)
        buf.round_clip(0, nmax, _FAST_ROUNDING and abs(c) * rmax < _SAFE_ABS)

    def error(scale: np.ndarray, mn: np.ndarray) -> np.ndarray:
        tmp = buf.tmp
        np.multiply(lf, scale, out=tmp)  # (scale*l + min) - x
        tmp += mn
        tmp -= xt
        if use_mad:
            np.abs(tmp, out=tmp)
        else:
            tmp *= tmp
        tmp *= wt
        return _sum0(tmp)

    rng, rmax = track_min()
    iscale = fnmax / rng
    scale = F32(1) / iscale
    levels(iscale, float(fnmax), rmax)
    best = error(scale, xmin)
    if nstep >= 1:
        # L is recomputed at the end from the winning (iscale, min used by that step)
        best_isc, best_xmin = iscale, xmin
        f_rmin, f_rdelta = F32(rmin), F32(rdelta)
        wl = np.empty_like(xt)
        tmp = buf.tmp
        for step in range(nstep + 1):
            c = f_rmin + f_rdelta * F32(step) + fnmax
            isc = c / rng
            levels(isc, float(c), rmax)
            np.multiply(wt, lf, out=wl)  # w*l
            sum_l = _sum0(wl)
            np.multiply(wl, lf, out=tmp)
            sum_l2 = _sum0(tmp)
            np.multiply(wl, xt, out=tmp)
            sum_xl = _sum0(tmp)
            D = sum_w * sum_l2
            D -= sum_l * sum_l
            this_scale = sum_w * sum_xl
            this_scale -= sum_x * sum_l
            this_scale /= D
            this_min = sum_l2 * sum_x
            this_min -= sum_l * sum_xl
            this_min /= D
            pos = this_min > 0
            if pos.any():
                this_min[pos] = 0
                this_scale[pos] = (sum_xl / sum_l2)[pos]
            cur = error(this_scale, this_min)
            better = cur < best
            better &= D > 0
            better &= live
            if better.any():
                best_isc = np.where(better, isc, best_isc)
                best_xmin = np.where(better, xmin, best_xmin)
                best = np.where(better, cur, best)
                scale = np.where(better, this_scale, scale)
                xmin = np.where(better, this_min, xmin)
                if step < nstep:
                    rng, rmax = track_min()
        xmin_used, isc_used = best_xmin, best_isc
        np.subtract(xt, xmin_used, out=xm)
        np.multiply(xm, isc_used, out=buf.fb)
        ok = _all_safe(isc_used * (xlo - xmin_used), isc_used * (xhi - xmin_used), flat)
        buf.round_clip(0, nmax, _FAST_ROUNDING and ok)
    L = lf.astype(np.int32)
    L[:, flat] = 0
    scale = np.where(flat, F32(0), scale)
    return scale, -xmin, L


def _qkx_t(
    xt: np.ndarray,
    wt: np.ndarray | None,
    nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xt = np.asarray(xt, dtype=F32)
    k, n = xt.shape
    scale = np.empty(n, dtype=F32)
    the_min = np.empty(n, dtype=F32)
    L = np.empty((k, n), dtype=np.int32)

    def one(c: slice) -> None:
        x = np.ascontiguousarray(xt[:, c])
        w = x * x if wt is None else np.ascontiguousarray(wt[:, c], dtype=F32)
        scale[c], the_min[c], L[:, c] = _qkx_chunk(x, w, nmax, rmin, rdelta, nstep, use_mad)

    _run_chunks(one, _chunks(k, n))
    return scale, the_min, L


def make_qkx2_quants_t(
    xt: np.ndarray,
    wt: np.ndarray,
    nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`make_qkx2_quants` on transposed ``(k, n)`` input; ``L`` is ``(k, n)``."""
    return _qkx_t(xt, np.asarray(wt, dtype=F32), nmax, rmin, rdelta, nstep, use_mad)


def make_qkx3_quants_t(
    xt: np.ndarray,
    wt: np.ndarray | None,
    nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`make_qkx3_quants` on transposed ``(k, n)`` input (``wt=None``: ``x*x``)."""
    return _qkx_t(xt, wt, nmax, rmin, rdelta, nstep, use_mad)


def make_qkx2_quants(
    x: np.ndarray,
    weights: np.ndarray,
    nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml ``make_qkx2_quants`` for each row of ``x (n, k)`` with ``weights (n, k)``.

    Asymmetric quantization ``x ~ scale * L - the_min`` with ``L`` in ``0 .. nmax``;
    returns ``(scale float32 (n,), the_min float32 (n,), L int32 (n, k))`` where
    ``the_min`` is the positive value ggml stores through ``*the_min = -min``.
    """
    xt = np.ascontiguousarray(np.asarray(x, dtype=F32).T)
    wt = np.ascontiguousarray(np.asarray(weights, dtype=F32).T)
    scale, the_min, L = make_qkx2_quants_t(xt, wt, nmax, rmin, rdelta, nstep, use_mad)
    return scale, the_min, np.ascontiguousarray(L.T)


def make_qkx3_quants(
    x: np.ndarray,
    weights: np.ndarray | None,
    nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml ``make_qkx3_quants``: as :func:`make_qkx2_quants`, weights default to ``x*x``."""
    xt = np.ascontiguousarray(np.asarray(x, dtype=F32).T)
    wt = None if weights is None else np.ascontiguousarray(np.asarray(weights, dtype=F32).T)
    scale, the_min, L = make_qkx3_quants_t(xt, wt, nmax, rmin, rdelta, nstep, use_mad)
    return scale, the_min, np.ascontiguousarray(L.T)


# ------------------------------------------------------------------------ make_qp_quants
def make_qp_quants_t(
    xt: np.ndarray, nmax: int, qwt: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`make_qp_quants` on transposed ``(k, n)`` input: ``(scale, L uint8 (k, n))``."""
    xt = np.asarray(xt, dtype=F32)
    w = np.asarray(qwt, dtype=F32)
    k, _ = xt.shape
    fnmax = F32(nmax)
    with np.errstate(all="ignore"):
        xmax = np.maximum(xt.max(axis=0), F32(0))
        zero = xmax < GROUP_MAX_EPS
        iscale = fnmax / xmax
        # L is uint8 in C: the first rounding is stored without clamping
        Lf = _f32(nearest_int(iscale * xt) & 0xFF)
        scale = F32(1) / iscale
        diff = xt - scale * Lf
        best = seqsum((w * diff) * diff)
        for step in range(-4, 5):
            if step == 0:
                continue
            isc = (F32(0.1) * F32(step) + fnmax) / xmax
            sc = F32(1) / isc
            lf = _f32(np.minimum(nearest_int(isc * xt), nmax))
            diff = xt - sc * lf
            mse = seqsum((w * diff) * diff)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, isc, iscale).astype(F32)
        l = np.minimum(nearest_int(iscale * xt), nmax)
        L = (l & 0xFF).astype(np.int32)  # uint8 storage, as int32 for arithmetic
        lf = _f32(l)
        wx = w * xt
        sumlx = seqsum(wx * lf)
        suml2 = seqsum((w * lf) * lf)
        for _ in range(5):
            changed = False
            for i in range(k):
                wi, xi, wxi = w[i], xt[i], wx[i]
                Li = _f32(L[i])
                slx = sumlx - wxi * Li
                sl2 = suml2 - (wi * Li) * Li
                new_l = np.minimum(nearest_int((xi * sl2) / slx), nmax)
                new_lf = _f32(new_l)
                slx_n = slx + wxi * new_lf
                sl2_n = sl2 + (wi * new_lf) * new_lf
                accept = (
                    (slx > 0) & (sl2 > 0) & (new_l != L[i])
                    & ((slx_n * slx_n) * suml2 > (sumlx * sumlx) * sl2_n)
                )
                if accept.any():
                    changed = True
                    L[i] = np.where(accept, new_l & 0xFF, L[i])
                    sumlx = np.where(accept, slx_n, sumlx)
                    suml2 = np.where(accept, sl2_n, suml2)
            if not changed:  # a pass without changes is a fixed point for every row
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    L[:, zero] = 0
    scale = np.where(zero, F32(0), scale).astype(F32)
    return scale, L.astype(np.uint8)


def make_qp_quants(
    x: np.ndarray, nmax: int, quant_weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``make_qp_quants`` for each row of ``x (n, k)`` (values expected >= 0).

    Quantizes to ``0 .. nmax`` with the imatrix-weighted search and 5 rounds of
    coordinate descent; returns ``(scale float32 (n,), L uint8 (n, k))``.
    """
    xt = np.ascontiguousarray(np.asarray(x, dtype=F32).T)
    wt = np.ascontiguousarray(np.asarray(quant_weights, dtype=F32).T)
    scale, L = make_qp_quants_t(xt, nmax, wt)
    return scale, np.ascontiguousarray(L.T)


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
