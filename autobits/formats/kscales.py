"""The K-quant scale searches of ggml, vectorised over sub-blocks (bit-exact with the C code).

Every search here is a NumPy port of a ``static`` helper in llama.cpp's
``ggml/src/ggml-quants.c`` (the version vendored by llama-cpp-python 0.3.x, ggml-base
compiled for baseline x86-64, so no FMA contraction), vectorised over many independent
rows ("sub-blocks"):

* :func:`make_qx_quants`    <- ``make_qx_quants`` (symmetric, RMSE search over 18 scales;
  Q6_K, Q3_K with importance, and Q4_0/Q5_0 with importance)
* :func:`make_qkx2_quants`  <- ``make_qkx2_quants`` (scale + min, weighted search)
* :func:`make_qkx3_quants`  <- ``make_qkx3_quants`` (as qkx2, default weights ``x*x``)
* :func:`make_qp_quants`    <- ``make_qp_quants`` (positive values, imatrix-weighted,
  used to quantize the 6-bit sub-block scales)

(Q3_K's own ``make_q3_quants`` lives with Q3_K in :mod:`autobits.formats.kquants_low`.)

Bit-exactness rules followed throughout (the shared primitives are in
:mod:`autobits.formats.ggml`): all arithmetic is float32 (constants are wrapped in
``np.float32`` so nothing is promoted to float64), each C expression is evaluated in the
same association order (``w*x[i]*l`` is ``(w*x)*l``), and every running sum is accumulated
sequentially in C order (:func:`~autobits.formats.ggml.seqsum`), never pairwise.

Two calling conventions are offered:

* the public functions take ``x`` as ``(n, k)``: ``n`` independent rows of ``k`` values,
  exactly as the C routines see one sub-block, and return ``(n,)`` scales and ``(n, k)``
  integer levels;
* the ``*_t`` variants take the transposed ``(k, n)`` layout (position-major, each row of
  the array holds one position of every sub-block).  This is the layout the code works in
  internally (sequential sums become ``k`` contiguous vector adds), so callers that
  already hold transposed data should use them to skip two copies.

The search loops of make_qx/qkx2/qkx3 run chunk by chunk of columns with in-place scratch
buffers (:class:`_Levels`); chunks are independent, so ``AUTOBITS_QUANT_THREADS=N``
spreads them over a small thread pool (NumPy releases the GIL in its loops; default 1);
the bytes never depend on it.  Where ``nearest_int``'s argument is provably inside
``|v| < 2**22`` the float-only ``np.rint`` is used (it is the same rounding; see
:data:`~autobits.formats.ggml.FAST_ROUNDING`); otherwise the integer bit trick runs, so
out-of-range garbage is reproduced too.

make_qx and make_qkx2/qkx3 also exist in C (``_kscales_native.c``, built at install as an
optional extension, which also holds IQ4_NL's search, see :mod:`autobits.formats.iq4nl`): when it is importable, those searches run there, 16 sub-blocks side by
side with the GIL released, 2-4x faster than the NumPy loops (measured on 5,000 sub-blocks
of 32) and bit-identical to them
(tested against this NumPy code and, with the ``judge`` extra, against llama.cpp's own
quantizer).  :func:`native_available` says whether it is in use;
``AUTOBITS_NATIVE_QUANT=0`` turns it off (benchmarks compare both).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from autobits.formats import ggml
from autobits.formats.ggml import F32, GROUP_MAX_EPS, SAFE_ABS, nearest_int, rint_is_exact, seqsum

__all__ = [
    "native_available",
    "native_extension",
    "make_qx_quants",
    "make_qx_quants_t",
    "make_qkx2_quants",
    "make_qkx2_quants_t",
    "make_qkx3_quants",
    "make_qkx3_quants_t",
    "make_qp_quants",
    "make_qp_quants_t",
]

# ------------------------------------------------------------------- the C searches
try:
    from autobits.formats import _kscales_native as _native
except ImportError:  # no C compiler at install time: the NumPy searches below run
    _native = None

#: the C extension's limit on the sub-block length (its MAX_K)
_NATIVE_MAX_K = 4096


def native_available() -> bool:
    """True if the C searches are built and not turned off by ``AUTOBITS_NATIVE_QUANT=0``."""
    return _native is not None and os.environ.get("AUTOBITS_NATIVE_QUANT", "1") != "0"


def native_extension():
    """The C extension module when :func:`native_available`, else None (for the other
    formats whose searches it holds: IQ4_NL)."""
    return _native if native_available() else None


def _use_native(x: np.ndarray, rows: bool) -> bool:
    k = x.shape[1] if rows else x.shape[0]
    return x.ndim == 2 and 0 < k <= _NATIVE_MAX_K and x.size > 0 and native_available()


def _native_args(x, w, rows: bool):
    """``x`` and ``w`` (or None) as C-contiguous float32 of one shape, with ``k``, ``n``."""
    x = np.ascontiguousarray(x, dtype=F32)
    if w is not None:
        w = np.ascontiguousarray(w, dtype=F32)
        if w.shape != x.shape:
            raise ValueError(f"weights must have the shape of x, got {w.shape=}, {x.shape=}")
    k, n = (x.shape[1], x.shape[0]) if rows else x.shape
    return x, w, k, n


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

    if nthreads <= 1 or threading.current_thread().name.startswith("autobits-kscales"):
        for c in chunks:
            work(c)
        return
    key = (os.getpid(), nthreads)
    with _pool_lock:
        if _pool is None or _pool_key != key:
            if _pool is not None and _pool_key[0] == key[0]:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(nthreads, thread_name_prefix="autobits-kscales")
            _pool_key = key
        pool = _pool
    for f in [pool.submit(work, c) for c in chunks]:
        f.result()


def _map_chunks(
    fn: Callable[..., tuple], n_vectors: int, x: np.ndarray, w: np.ndarray | None, *,
    rows: bool,
) -> tuple:
    """``fn(xt, wt)`` over chunks of sub-blocks, assembled.

    ``x`` (and ``w``, or None) hold one sub-block per column, ``(k, n)``, or with ``rows``
    one per row, ``(n, k)``: each chunk is then transposed on its own (one copy, instead
    of a transposed copy of the whole input and a chunk copy of that).  ``fn`` gets
    C-contiguous float32 ``(k, m)`` chunks and returns ``n_vectors`` per-sub-block ``(m,)``
    vectors and the levels ``(k, m)``; returns the vectors ``(n,)`` and the levels int32 in
    ``x``'s layout.
    """
    x = np.asarray(x, dtype=F32)
    k, n = (x.shape[1], x.shape[0]) if rows else x.shape
    vectors = [np.empty(n, dtype=F32) for _ in range(n_vectors)]
    L = np.empty(x.shape, dtype=np.int32)

    def cut(a: np.ndarray, c: slice) -> np.ndarray:
        return np.ascontiguousarray((a[c].T if rows else a[:, c]), dtype=F32)

    def one(c: slice) -> None:
        *vs, lt = fn(cut(x, c), None if w is None else cut(w, c))
        for out, v in zip(vectors, vs):
            out[c] = v
        if rows:
            L[c] = lt.T
        else:
            L[:, c] = lt

    _run_chunks(one, _chunks(k, n))
    return (*vectors, L)


class _Levels:
    """Scratch buffers for ``lf = clip(nearest_int(v), lo, hi)`` computed in place."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.fb = np.empty(shape, dtype=F32)  # v goes here
        self.lf = np.empty(shape, dtype=F32)  # the levels, as float32
        self.tmp = np.empty(shape, dtype=F32)

    def round_clip(self, lo: int, hi: int, safe: bool) -> None:
        """Round ``self.fb`` like ``nearest_int``, clip to ``[lo, hi]``, store in ``self.lf``.

        ``safe`` says every ``|v|`` is below :data:`~autobits.formats.ggml.SAFE_ABS` (and
        finite): then ``nearest_int`` is exactly ``rint`` and everything stays in float32.
        Otherwise the integer bit trick reproduces ggml's out-of-range garbage.
        """
        if safe:  # in range the magic-number trick is exactly rint (half to even)
            np.rint(self.fb, out=self.lf)
            np.clip(self.lf, F32(lo), F32(hi), out=self.lf)
        else:
            self.lf[...] = np.clip(nearest_int(self.fb), lo, hi)


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(F32)


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
        buf.round_clip(lo, hi, ggml.FAST_ROUNDING)
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
        slx = seqsum(tmp)
        np.multiply(w, buf.lf, out=tmp)  # (w*l)*l
        tmp *= buf.lf
        return slx, seqsum(tmp)

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


def _qx(
    x: np.ndarray, w: np.ndarray | None, nmax: int, rmse_type: int, *, rows: bool
) -> tuple[np.ndarray, np.ndarray]:
    if _use_native(x, rows):
        x, w, k, n = _native_args(x, w, rows)
        scale, L = np.empty(n, dtype=F32), np.empty(x.shape, dtype=np.int32)
        _native.qx(x, w, scale, L, k, int(not rows), nmax, rmse_type)
        return scale, L
    return _map_chunks(lambda x, w: _qx_chunk(x, nmax, rmse_type, w), 1, x, w, rows=rows)


def make_qx_quants_t(
    xt: np.ndarray, nmax: int, rmse_type: int, qwt: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`make_qx_quants` on transposed ``(k, n)`` input; returns ``(scale (n,), L (k, n))``."""
    return _qx(xt, qwt, nmax, rmse_type, rows=False)


def make_qx_quants(
    x: np.ndarray, nmax: int, rmse_type: int, qw: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``make_qx_quants`` for each row of ``x (n, k)``.

    Symmetric quantization to ``[-nmax, nmax-1]``; returns ``(scale float32 (n,),
    L int32 (n, k))`` with ``L`` already offset by ``+nmax`` (``0 .. 2*nmax-1``).
    ``rmse_type`` selects the error weights when ``qw`` is None (1: ``x*x``, 2: 1,
    3: ``|x|``, 4: ``sqrt|x|``; negative: return early; 0: plain rounding).
    """
    return _qx(x, qw, nmax, rmse_type, rows=True)


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
    sum_w = seqsum(wt, from_zero=False)
    sum_x = seqsum(wx, from_zero=False)
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
        # SAFE_ABS covers the rounding.  NaN/inf (rng == 0) make the check fail.
        ratio = np.maximum(np.abs(xlo - xmin), np.abs(xhi - xmin)) / np.abs(rng)
        rmax = float(ratio[live].max()) if live.any() else 0.0
        return rng, rmax

    def levels(isc: np.ndarray, c: float, rmax: float) -> None:
        np.multiply(xm, isc, out=buf.fb)  # iscale*(x[i] - min)
        buf.round_clip(0, nmax, ggml.FAST_ROUNDING and abs(c) * rmax < SAFE_ABS)

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
        return seqsum(tmp)

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
            sum_l = seqsum(wl)
            np.multiply(wl, lf, out=tmp)
            sum_l2 = seqsum(tmp)
            np.multiply(wl, xt, out=tmp)
            sum_xl = seqsum(tmp)
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
        ok = rint_is_exact(isc_used * (xlo - xmin_used), isc_used * (xhi - xmin_used), flat)
        buf.round_clip(0, nmax, ok)
    L = lf.astype(np.int32)
    L[:, flat] = 0
    scale = np.where(flat, F32(0), scale)
    return scale, -xmin, L


def _qkx(
    x: np.ndarray,
    w: np.ndarray | None,
    nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool, *, rows: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if _use_native(x, rows):
        x, w, k, n = _native_args(x, w, rows)
        scale, the_min = np.empty(n, dtype=F32), np.empty(n, dtype=F32)
        L = np.empty(x.shape, dtype=np.int32)
        _native.qkx(x, w, scale, the_min, L, k, int(not rows), nmax, rmin, rdelta, nstep,
                    bool(use_mad))
        return scale, the_min, L

    def chunk(xt: np.ndarray, wt: np.ndarray | None):
        return _qkx_chunk(xt, xt * xt if wt is None else wt, nmax, rmin, rdelta, nstep, use_mad)

    return _map_chunks(chunk, 2, x, w, rows=rows)


def make_qkx2_quants_t(
    xt: np.ndarray,
    wt: np.ndarray,
    nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`make_qkx2_quants` on transposed ``(k, n)`` input; ``L`` is ``(k, n)``."""
    return _qkx(xt, np.asarray(wt, dtype=F32), nmax, rmin, rdelta, nstep, use_mad, rows=False)


def make_qkx3_quants_t(
    xt: np.ndarray,
    wt: np.ndarray | None,
    nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`make_qkx3_quants` on transposed ``(k, n)`` input (``wt=None``: ``x*x``)."""
    return _qkx(xt, wt, nmax, rmin, rdelta, nstep, use_mad, rows=False)


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
    return _qkx(x, np.asarray(weights, dtype=F32), nmax, rmin, rdelta, nstep, use_mad, rows=True)


def make_qkx3_quants(
    x: np.ndarray,
    weights: np.ndarray | None,
    nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml ``make_qkx3_quants``: as :func:`make_qkx2_quants`, weights default to ``x*x``."""
    return _qkx(x, weights, nmax, rmin, rdelta, nstep, use_mad, rows=True)


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
