"""``make_q3_quants`` (Q3_K's sub-block search) vectorised over sub-blocks, bit-exact.

Split out of :mod:`autobits.formats.kquants_low`, which re-exports :func:`make_q3_quants` and
:func:`make_q3_quants_t`.  Layout and exactness rules are those of that module: sub-blocks
are the columns of ``(16, S)`` arrays, every step is float32 in C's order.
"""

from __future__ import annotations

import numpy as np

from autobits.formats._khelpers import nearest_int, seqsum
from autobits.formats._lanes import const

__all__ = ["make_q3_quants", "make_q3_quants_t"]

_GROUP_MAX_EPS = np.float32(1e-15)
_F0 = np.float32(0.0)
_SAFE_ABS = np.float32(4194000.0)  # below 2**22 with margin: rint == nearest_int
_SMALL_SWEEP = 8192
_EVENTS = 1024  # at most this many columns left: the remaining sweeps by _q3_events  # fewer columns than this: sweep without the candidate filter


# --------------------------------------------------------------------- make_q3_quants
def _signed_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``x (k, n)``: ``(amax, max)`` with ``max`` the value at the FIRST index of
    the largest ``|x|`` (C's ``if (ax > amax) { amax = ax; max = x[i]; }``).

    The winner is the column's largest or smallest value, whichever is larger in magnitude;
    only exact ties ``+a`` / ``-a`` need the position, and those few columns are resolved
    explicitly.
    """
    hi = x.max(axis=0)
    lo = x.min(axis=0)
    amax = np.maximum(hi, -lo)
    mx = np.where(hi >= -lo, hi, lo)
    tie = np.flatnonzero((hi == -lo) & (hi > _F0))
    if tie.size:
        sub = x[:, tie]
        first = np.argmax(np.abs(sub) == amax[tie], axis=0)
        mx[tie] = sub[first, np.arange(tie.size)]
    return amax, mx


def make_q3_quants_t(
    xt: np.ndarray, nmax: int, do_rmse: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised ``make_q3_quants`` on transposed input ``xt (k, n)`` (column = one sub-block).

    Symmetric codes in ``[-nmax, nmax-1]``.  Returns ``(scale float32 (n,), L int8 (k, n))``
    with ``L`` offset by ``+nmax`` (all-zero columns: scale 0 and ``L`` 0), as ggml.  With
    ``do_rmse`` the codes are refined by ggml's coordinate descent on the ``x**2``-weighted
    error in the same element order (see :func:`_q3_descent`).
    """
    xt = np.ascontiguousarray(xt, dtype=np.float32)
    scale, levels = _q3_search(xt, nmax, do_rmse)
    return scale, levels.codes(np.arange(xt.shape[1]))


class _Q3Levels:
    """The levels found by :func:`_q3_search`, resolved on demand.

    The quantizer needs them only for sub-blocks whose final scale is zero, so instead of
    writing every later sweep's levels back into the full array, each sweep's working set
    is kept (``history``: column indices, sorted, and their levels) and looked up here.
    """

    def __init__(self, n: int, nmax: int, live: np.ndarray, lf: np.ndarray, history: list):
        self.n, self.nmax, self.live, self.lf, self.history = n, nmax, live, lf, history

    def codes(self, cols: np.ndarray) -> np.ndarray:
        """Levels (offset by ``+nmax``) of columns ``cols``: int8 ``(k, len(cols))``."""
        cols = np.asarray(cols, dtype=np.intp)
        out = np.zeros((self.lf.shape[0], cols.size), dtype=np.int8)
        where = np.full(self.n, -1, dtype=np.intp)
        where[self.live] = np.arange(self.live.size)
        pos = where[cols]
        ok = pos >= 0  # all-zero columns keep L = 0
        p = pos[ok]
        vals = np.take(self.lf, p, axis=1)
        for act, la in self.history:  # nested working sets: the last hit wins
            j = np.minimum(np.searchsorted(act, p), act.size - 1)
            hit = act[j] == p
            if hit.any():
                vals[:, hit] = np.take(la, j[hit], axis=1)
        out[:, ok] = vals + np.float32(self.nmax)
        return out


def _q3_search(xt: np.ndarray, nmax: int, do_rmse: bool) -> tuple[np.ndarray, _Q3Levels]:
    """``make_q3_quants`` over the columns of ``xt (k, n)``: ``(scale (n,), levels)``."""
    k, n = xt.shape
    amax, mx = _signed_absmax(xt)
    live = np.flatnonzero(amax >= _GROUP_MAX_EPS)  # ggml: all-zero -> scale 0, L 0
    x = xt if live.size == n else np.take(xt, live, axis=1)
    mx = mx if live.size == n else mx[live]
    lf = np.empty(x.shape, dtype=np.float32)
    history: list = []
    with np.errstate(all="ignore"):
        iscale = np.float32(-nmax) / mx
        # |iscale * x| <= nmax (1 + 2 ulp) < 2**22: there rint is exactly nearest_int
        np.multiply(iscale, x, out=lf)
        np.rint(lf, out=lf)
        np.clip(lf, np.float32(-nmax), np.float32(nmax - 1), out=lf)
        if do_rmse:
            sc = _q3_descent(x, lf, nmax, history)
        else:
            sc = np.float32(1) / iscale
    scale = np.zeros(n, dtype=np.float32)
    scale[live] = sc
    return scale, _Q3Levels(n, nmax, live, lf, history)


def _q3_descent(x: np.ndarray, lf: np.ndarray, nmax: int, history: list) -> np.ndarray:
    """The ``do_rmse`` part of ``make_q3_quants``: up to 5 sweeps of coordinate descent.

    ``x (k, m)`` values, ``lf (k, m)`` initial levels (float32, no offset), refined in
    place by the first sweep.  A column whose sweep changes nothing is final (the next
    sweep would repeat it exactly), so each later sweep runs on the columns that changed
    in the previous one; their levels go to ``history`` (see :class:`_Q3Levels`).
    Returns the scales ``(m,)``.
    """
    k, m = x.shape
    w = x * x  # C: w = x[i]*x[i]
    wx = w * x
    sums = np.empty((2, m), dtype=np.float32)  # C's sumlx, suml2
    t = wx * lf  # C: sumlx += w*x[i]*l; suml2 += w*l*l (in order: seqsum)
    sums[0] = seqsum(t)
    np.multiply(w, lf, out=t)
    t *= lf
    sums[1] = seqsum(t)
    changed = np.zeros(m, dtype=bool)
    _q3_sweep(x, w, wx, lf, sums, changed, nmax)
    act = np.flatnonzero(changed)
    if act.size:
        xa, wa, wxa, la, sa = (np.take(v, act, axis=1) for v in (x, w, wx, lf, sums))
        for sweep in range(4):
            small = act.size <= _EVENTS
            if small:  # all the sweeps left at once (see _q3_events)
                _q3_events(xa, wa, wxa, la, sa, nmax, 4 - sweep)
            else:
                changed = np.zeros(act.size, dtype=bool)
                _q3_sweep(xa, wa, wxa, la, sa, changed, nmax)
            sums[0, act], sums[1, act] = sa
            history.append((act, la))
            if small:
                break
            keep = np.flatnonzero(changed)
            if keep.size == 0 or sweep == 3:
                break
            act = act[keep]
            xa, wa, wxa, la, sa = (np.take(v, keep, axis=1) for v in (xa, wa, wxa, la, sa))
    sumlx, suml2 = sums
    scale = sumlx / suml2
    scale[~(suml2 > _F0)] = 0
    return scale


def _q3_events(x, w, wx, lf, sums, nmax: int, sweeps: int) -> None:
    """Up to ``sweeps`` sweeps of :func:`_q3_descent` for every column, change by change.

    Within a sweep the sums stay put until a level changes, so testing every remaining
    position of a column at once against the current sums gives C's results up to and
    including its first change; that change is applied and the column goes on from the
    next position (or starts its next sweep, or stops).  Each step is vectorised over
    the positions and the columns still running: a few steps instead of 16 positions
    per sweep, which pays off once the columns are few (NumPy calls dominate).
    ``lf`` (levels) and ``sums`` (rows ``sumlx``, ``suml2``) are updated in place.
    """
    k = x.shape[0]
    lo, hi = np.float32(-nmax), np.float32(nmax - 1)
    cols = np.arange(x.shape[1])
    xa, wa, wxa, la = x, w, wx, lf
    slx, sl2 = sums[0].copy(), sums[1].copy()
    pos = np.zeros(cols.size, dtype=np.intp)  # next position of the current sweep
    left = np.full(cols.size, sweeps, dtype=np.intp)  # sweeps left, the current included
    chg = np.zeros(cols.size, dtype=bool)  # changed in the current sweep
    rows = np.arange(k)[:, None]
    fin: list = []  # (columns, levels, slx, sl2) of the finished columns
    while cols.size:
        t = wxa * la
        s0x = slx - t  # C: slx = sumlx - w*x[i]*L[i]
        np.multiply(wa, la, out=t)
        t *= la
        s0l = sl2 - t  # sl2 = suml2 - w*L[i]*L[i]
        v = xa * s0l
        v /= s0x
        nl = np.rint(v)
        if not np.abs(nl).max() < _SAFE_ABS:  # nearest_int's garbage beyond 2**22 (or NaN)
            nl = nearest_int(v).astype(np.float32)
        _clamp(nl, lo, hi)
        np.multiply(wxa, nl, out=t)
        n1x = s0x + t
        np.multiply(wa, nl, out=t)
        t *= nl
        n1l = s0l + t
        ok = (n1x * n1x) * sl2 > (slx * slx) * n1l
        ok &= np.minimum(s0x, n1l) > _F0  # C: slx > 0 before, sl2 > 0 after
        ok &= nl != la
        ok &= rows >= pos
        first = np.argmax(ok, axis=0)
        j = np.arange(cols.size)
        hit = ok[first, j]
        h = hit.nonzero()[0]
        if h.size:
            fh = first[h]
            la[fh, h] = nl[fh, h]
            slx[h] = n1x[fh, h]
            sl2[h] = n1l[fh, h]
            chg[h] = True
            pos[h] = fh + 1
        end = ~hit  # no change left in the current sweep
        left[end & chg] -= 1
        again = end & chg & (left > 0)
        pos[again] = 0
        chg[again] = False
        done = end & ~again
        if done.any():  # finished columns leave the working set (written back once)
            d = done.nonzero()[0]
            fin.append((cols[d], np.take(la, d, axis=1), slx[d], sl2[d]))
            keep = (~done).nonzero()[0]
            cols = cols[keep]
            xa, wa, wxa, la = (np.take(v, keep, axis=1) for v in (xa, wa, wxa, la))
            slx, sl2, pos, left, chg = (v[keep] for v in (slx, sl2, pos, left, chg))
    c, lv, sx, s2 = (np.concatenate(p, axis=-1) for p in zip(*fin))
    lf[:, c] = lv
    sums[0, c] = sx
    sums[1, c] = s2


def _clamp(a: np.ndarray, lo, hi) -> np.ndarray:
    """In-place ``MAX(lo, MIN(hi, a))`` (np.clip's wrapper costs more; NumPy's min/max are
    much faster against an array than against a scalar)."""
    if a.dtype == np.float32 and a.size > 4096:  # (small arrays: the lookup costs more)
        lo, hi = const(lo, a.shape), const(hi, a.shape)
    np.maximum(a, lo, out=a)
    return np.minimum(a, hi, out=a)


def _q3_sweep_small(x, w, wx, la, sums, changed, nmax) -> None:
    """:func:`_q3_sweep` for few columns: every column takes the full test (fewer NumPy
    calls than filtering candidates first, which matters when calls dominate)."""
    slx, sl2 = sums
    lo, hi = np.float32(-nmax), np.float32(nmax - 1)
    for i in range(x.shape[0]):
        xi, li, wi, wxi = x[i], la[i], w[i], wx[i]
        slx0 = slx - wxi * li  # slx = sumlx - w*x[i]*L[i]
        sl20 = sl2 - (wi * li) * li  # sl2 = suml2 - w*L[i]*L[i]
        v = (xi * sl20) / slx0
        nl = np.rint(v)
        if not np.abs(nl).max() < _SAFE_ABS:  # nearest_int's garbage beyond 2**22 (or NaN)
            nl = nearest_int(v).astype(np.float32)
        _clamp(nl, lo, hi)
        slx1 = slx0 + wxi * nl
        sl21 = sl20 + (wi * nl) * nl
        ok = (slx1 * slx1) * sl2 > (slx * slx) * sl21
        ok &= np.minimum(slx0, sl21) > _F0  # C: slx > 0 before, sl2 > 0 after
        ok &= nl != li
        np.copyto(li, nl, where=ok)
        np.copyto(slx, slx1, where=ok)
        np.copyto(sl2, sl21, where=ok)
        changed |= ok


def _q3_sweep(x, w, wx, la, sums, changed, nmax) -> None:
    """One sweep of ``make_q3_quants``'s coordinate descent over the columns given, in place.

    For each position ``i`` in order: drop ``L[i]`` from the sums, re-round
    ``x[i] * sl2 / slx`` and keep the new level if it raises ``slx**2 / sl2``.  ``la``
    (levels), ``sums`` (rows ``sumlx``, ``suml2``) and ``changed`` are updated in place;
    ``w = x*x`` and ``wx = w*x`` are given.
    """
    m = sums.shape[1]
    if m < _SMALL_SWEEP:
        return _q3_sweep_small(x, w, wx, la, sums, changed, nmax)
    slx, sl2 = sums
    lo, hi = np.float32(-nmax), np.float32(nmax - 1)
    # per row: w, w*x, sl20, slx0 (C's sl2 and slx without L[i]), v = x*sl2/slx, rint(v)
    buf = np.empty((6, m), dtype=np.float32)
    _, _, sl20, slx0, v, r = buf
    cand = np.empty(m, dtype=bool)
    for i in range(x.shape[0]):
        xi, li = x[i], la[i]
        buf[0] = w[i]
        np.multiply(wx[i], li, out=v)
        buf[1] = wx[i]
        np.subtract(slx, v, out=slx0)  # slx = sumlx - w*x[i]*L[i]
        np.multiply(buf[0], li, out=v)
        v *= li
        np.subtract(sl2, v, out=sl20)  # sl2 = suml2 - w*L[i]*L[i]
        np.multiply(xi, sl20, out=v)
        v /= slx0  # x[i] * sl2 / slx
        # rint(v) == L[i] implies nearest_int(v) == L[i] (no change); the other columns
        # (a few percent; NaN, inf and out-of-range v included) get the exact test
        np.rint(v, out=r)
        idx = np.not_equal(r, li, out=cand).nonzero()[0]
        if idx.size == 0:
            continue
        g = np.take(buf, idx, axis=1)  # (faster than buf[:, idx])
        if np.abs(g[5]).max() < _SAFE_ABS:  # |v| < 2**22: rint is nearest_int (NaN fails)
            nl = _clamp(g[5], lo, hi)
        else:
            nl = _clamp(nearest_int(g[4]), np.int32(lo), np.int32(hi)).astype(np.float32)
        s0 = g[3]
        g[0] *= nl  # w*l
        g[:2] *= nl  # [w*l*l, w*x*l]
        g[:2] += g[2:4]  # [sl2 + w*l*l, slx + w*x*l] = [sl21, slx1]
        sl21, slx1 = g[0], g[1]
        so = np.take(sums, idx, axis=1)
        ok = (slx1 * slx1) * so[1] > (so[0] * so[0]) * sl21
        ok &= np.minimum(s0, sl21) > _F0  # C: slx > 0 before, sl2 > 0 after
        ok &= nl != li.take(idx)
        sel = ok.nonzero()[0]
        if sel.size:
            idx = idx[sel]
            li[idx] = nl[sel]
            slx[idx] = slx1[sel]
            sl2[idx] = sl21[sel]
            changed[idx] = True


def make_q3_quants(x: np.ndarray, nmax: int, do_rmse: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``make_q3_quants`` for each row of ``x (n, k)``: returns ``(scale (n,), L int8
    (n, k))`` with ``L`` offset by ``+nmax`` (see :func:`make_q3_quants_t`)."""
    scale, L = make_q3_quants_t(np.asarray(x, dtype=np.float32).T, nmax, do_rmse)
    return scale, np.ascontiguousarray(L.T)
