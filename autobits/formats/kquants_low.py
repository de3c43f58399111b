"""The 2- and 3-bit k-quants, Q2_K and Q3_K, byte-identical to llama.cpp.

Both store super-blocks of 256 values cut into 16 sub-blocks of 16 values.

Q2_K (84 bytes, 2.625 bits per weight)::

    uint8 scales[16]   low nibble: sub-block scale, high nibble: sub-block min
    uint8 qs[64]       2-bit codes, four per byte (see :func:`_pack_2bit`)
    fp16  d, dmin      super-block multipliers of the 4-bit scales and mins

    value = d * (scales[j] & 15) * q - dmin * (scales[j] >> 4)

Q3_K (110 bytes, 3.4375 bits per weight)::

    uint8 hmask[32]    third (high) bit of every code
    uint8 qs[64]       low 2 bits of every code
    uint8 scales[12]   sixteen 6-bit signed sub-block scales (offset by 32)
    fp16  d            super-block multiplier of the scales

    value = d * (scale[j] - 32) * (q - 4)      with q = low | high << 2 in 0..7

This is a port of ``ggml/src/ggml-quants.c``: without an importance vector the bytes equal
``quantize_row_q2_K_ref`` / ``quantize_row_q3_K_ref``; with one they equal what
``quantize_q2_K`` / ``quantize_q3_K`` write for that ``quant_weights``
(``quantize_row_q{2,3}_K_impl``).  To be bit-exact every step is float32 as in C (constants
are wrapped in ``np.float32``), ``nearest_int`` rounds half to even, and every sum is
accumulated in C's order by looping over the small within-block axis in Python while each
step is vectorised over all blocks of the tensor.  The helpers shared with the other
k-quants (``make_qx_quants``, ``make_qkx2_quants``, ...) live in :mod:`autobits.formats.kscales`,
the rounding, sums and fp16 conversions in :mod:`autobits.formats.ggml`; ``make_q3_quants``,
Q3_K's own scale search and coordinate descent, is ported here with the format that uses it.
"""

from __future__ import annotations

import numpy as np

from autobits.errors import FormatError
from autobits.formats import ggml
from autobits.formats.base import Format
from autobits.formats.ggml import (
    GROUP_MAX_EPS,
    QK_K,
    SAFE_ABS,
    const,
    fp16_round,
    half_bytes,
    nearest_int,
    seqsum,
)
from autobits.formats.kscales import (
    make_qkx2_quants_t,
    make_qkx3_quants_t,
    make_qp_quants,
    make_qx_quants,
    make_qx_quants_t,
)

__all__ = ["Q2_K", "Q3_K", "make_q3_quants", "make_q3_quants_t"]

_SUB = 16  # values per sub-block
_NSUB = QK_K // _SUB  # sub-blocks per super-block
_F0 = np.float32(0.0)
_SHIFT2 = np.array([0, 2, 4, 6], dtype=np.uint8)
#: super-blocks quantized at a time (bounds the memory of big tensors)
_BLOCK_CHUNK = 8192
#: super-blocks per chunk of the final requantization (temporaries stay in cache)
_REQ_CHUNK = 512
#: from this many columns on, a descent sweep first filters the candidates for a change
_SMALL_SWEEP = 8192
#: at most this many columns left: the remaining sweeps run change by change (_q3_events)
_EVENTS = 1024


# --------------------------------------------------------------------------- helpers
# Work layout: a tensor's sub-blocks are the columns of ``xt (16, S)`` (S = 16 * blocks),
# ``xt[i, s]`` = value ``i`` of sub-block ``s``.  Each row is contiguous, so the loops over
# the 16 positions that keep C's summation order are 16 fast vector operations over all
# sub-blocks, and the temporaries stay one row long (in cache, no fresh memory to fault in).


def _to_columns(a: np.ndarray) -> np.ndarray:
    """``(nb, 256)`` super-blocks -> ``(16, 16 * nb)`` sub-block columns (contiguous copy)."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32).reshape(-1, _SUB).T)


def _block_sumsq(xt: np.ndarray) -> np.ndarray:
    """C's ``for (j = 0; j < 256; ++j) sumx2 += x[j]*x[j];`` per super-block, from columns."""
    v = xt.reshape(_SUB, -1, _NSUB)  # [position, block, sub-block]
    acc = np.zeros(v.shape[1], dtype=np.float32)
    for j in range(_NSUB):
        for i in range(_SUB):
            col = v[i, :, j]
            acc += col * col
    return acc


def _sigma_weights(
    xt: np.ndarray, qwt: np.ndarray, sigma_mul: int
) -> tuple[np.ndarray, np.ndarray]:
    """imatrix weights ``qw * sqrtf(sigma2 + x*x)`` (columns) and their per-sub-block sums.

    ``sigma2 = sigma_mul * sumx2 / 256`` per super-block (Q2_K: 1, Q3_K: 2).  Returns
    ``(wt (16, S), sw (S,))`` with ``sw`` summed in C's order.
    """
    sumx2 = _block_sumsq(xt)
    if sigma_mul != 1:
        sumx2 = np.float32(sigma_mul) * sumx2
    sigma2 = np.repeat(sumx2 / np.float32(QK_K), _NSUB)  # per sub-block column
    wt = np.empty_like(xt)
    for i in range(_SUB):
        np.sqrt(sigma2 + xt[i] * xt[i], out=wt[i])
        wt[i] *= qwt[i]
    return wt, seqsum(wt)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """Pack 2-bit codes ``(n, 256)`` as ggml: ``qs[32h + l] = sum_s L[128h + 32s + l] << 2s``.

    Eight codes per uint64 word (NumPy's uint8 shifts are not vectorised); masked codes
    shifted by at most 6 stay inside their byte."""
    q = np.ascontiguousarray(L, dtype=np.uint8).reshape(-1, 2, 4, 32).view(np.uint64)
    m = np.uint64(0x0303030303030303)
    out = q[:, :, 0] & m
    for s in (1, 2, 3):
        out |= (q[:, :, s] & m) << np.uint64(2 * s)
    return out.view(np.uint8).reshape(-1, 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_2bit`: uint8 ``(n, 64)`` -> codes uint8 ``(n, 256)`` in 0..3."""
    q = (qs.reshape(-1, 2, 1, 32) >> _SHIFT2.reshape(1, 1, 4, 1)) & np.uint8(3)
    return q.reshape(-1, QK_K)


def _pack_q3_scales(ls: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit codes ``(n, 16)`` in 0..63 -> Q3_K's 12 scale bytes ``(n, 12)``.

    Bytes 0..7 hold the low nibbles (sub-block j in byte j % 8, high nibble for j >= 8);
    bytes 8..11 hold the top two bits, sub-block j at bits ``2 * (j // 4)`` of byte ``8 + j % 4``.
    """
    ls = np.asarray(ls).astype(np.uint8)
    low = ls & np.uint8(0xF)
    high = (ls >> np.uint8(4)).reshape(-1, 4, 4)  # [j // 4, j % 4]
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, :8] = low[:, :8] | (low[:, 8:] << np.uint8(4))
    out[:, 8:] = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    return out


def _unpack_q3_scales(sc: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_q3_scales`: ``(n, 12)`` -> 6-bit codes uint8 ``(n, 16)``."""
    low = np.concatenate([sc[:, :8] & np.uint8(0xF), sc[:, :8] >> np.uint8(4)], axis=1)
    high = (sc[:, None, 8:12] >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)) & np.uint8(3)
    return low | (high.reshape(-1, 16) << np.uint8(4))


def _pack_q3_codes(L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3-bit codes ``(n, 256)`` in 0..7 -> (hmask ``(n, 32)``, qs ``(n, 64)``).

    The high bit of value ``j`` goes to bit ``j // 32`` of ``hmask[j % 32]``.
    """
    q = np.ascontiguousarray(L, dtype=np.uint8).reshape(-1, 8, 32).view(np.uint64)
    hi = (q >> np.uint64(2)) & np.uint64(0x0101010101010101)  # (as _pack_2bit, per word)
    hmask = hi[:, 0].copy()
    for b in range(1, 8):
        hmask |= hi[:, b] << np.uint64(b)
    hmask = hmask.view(np.uint8).reshape(-1, 32)
    return hmask, _pack_2bit(L)


def _clamp(a: np.ndarray, lo, hi) -> np.ndarray:
    """In-place ``MAX(lo, MIN(hi, a))`` (np.clip's wrapper costs more; NumPy's min/max are
    much faster against an array than against a scalar)."""
    if a.dtype == np.float32 and a.size > 4096:  # (small arrays: the lookup costs more)
        lo, hi = const(lo, a.shape), const(hi, a.shape)
    np.maximum(a, lo, out=a)
    return np.minimum(a, hi, out=a)


def _requantize(blocks, xt, d, m, lo, hi, offset, search_codes) -> np.ndarray:
    """Final codes ``clamp(nearest_int((x + m) / d), lo, hi) + offset`` of every value.

    ``blocks (nb, 256)`` values (``xt`` the same as columns), ``d``, ``m`` ``(nb, 16)`` the
    effective (fp16-rounded) scale and min of each sub-block (``m`` None: no min).
    Sub-blocks with ``d == 0`` keep the search's codes, ``search_codes(columns) -> (16, n)``
    (C's ``if (!d) continue;``).  When ``|(x + m) / d|`` is provably below ``2**22`` everywhere
    (the usual case) ``rint`` gives exactly ggml's rounding; otherwise the bit-exact
    ``nearest_int`` is used.  Returns uint8 ``(nb, 256)``.
    """
    nb = blocks.shape[0]
    out = np.empty((nb, QK_K), dtype=np.uint8)
    live = d != _F0
    amax = np.maximum(xt.max(axis=0), -xt.min(axis=0)).reshape(nb, _NSUB)
    # |fl(fl(x + m) / d)| <= bound * (1 + 4 ulp) < 2**22 when bound < SAFE_ABS
    bound = (amax if m is None else amax + np.abs(m)) / np.abs(d)
    fast = ggml.FAST_ROUNDING and bool(np.all(bound[live] < SAFE_ABS))  # NaN fails
    flo, fhi = np.float32(lo), np.float32(hi)
    for a in range(0, nb, _REQ_CHUNK):
        b = min(nb, a + _REQ_CHUNK)
        v = blocks[a:b].reshape(-1, _NSUB, _SUB)
        if m is not None:
            v = v + m[a:b, :, None]
        v = v / d[a:b, :, None]
        if fast:
            np.rint(v, out=v)
            np.clip(v, flo, fhi, out=v)  # (np.maximum with a scalar is not vectorised)
            if offset:
                v += np.float32(offset)
            out[a:b] = v.reshape(-1, QK_K)
        else:
            li = _clamp(nearest_int(v), np.int32(lo), np.int32(hi))
            li += offset
            out[a:b] = li.reshape(-1, QK_K)
    if not live.all():
        bi, sj = np.nonzero(~live)
        out.reshape(nb, _NSUB, _SUB)[bi, sj, :] = search_codes(bi * _NSUB + sj).T
    return out


# ------------------------------------------------------------------ make_q3_quants
# Q3_K's sub-block search (without importance): ggml's ``make_q3_quants``, the symmetric
# first guess refined by up to 5 sweeps of coordinate descent on the ``x**2``-weighted error.
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
    live = np.flatnonzero(amax >= GROUP_MAX_EPS)  # ggml: all-zero -> scale 0, L 0
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
        if do_rmse and live.size:  # (no live sub-block: nothing to refine)
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
        if not (ggml.FAST_ROUNDING and np.abs(nl).max() < SAFE_ABS):  # beyond 2**22 or NaN
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
        if not (ggml.FAST_ROUNDING and np.abs(nl).max() < SAFE_ABS):  # beyond 2**22 or NaN
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
        if ggml.FAST_ROUNDING and np.abs(g[5]).max() < SAFE_ABS:  # rint is nearest_int
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


# ----------------------------------------------------------------------------- Q2_K
def _finish_q2(blocks, xt, scale_bytes, dm, mm, search_codes) -> np.ndarray:
    """Q2_K bytes from the 4-bit scale/min bytes ``(nb, 16)``, the super-block multipliers
    ``dm``, ``mm`` (before fp16 rounding) and the search's codes ``(16, S)``."""
    nb = scale_bytes.shape[0]
    dh, d16 = fp16_round(dm)
    mh, m16 = fp16_round(mm)
    d = d16[:, None] * (scale_bytes & np.uint8(0xF)).astype(np.float32)
    m = m16[:, None] * (scale_bytes >> np.uint8(4)).astype(np.float32)
    codes = _requantize(blocks, xt, d, m, 0, 3, 0, search_codes)
    out = np.empty((nb, 84), dtype=np.uint8)
    out[:, :16] = scale_bytes
    out[:, 16:80] = _pack_2bit(codes)
    out[:, 80:82] = half_bytes(dh)
    out[:, 82:84] = half_bytes(mh)
    return out


def _quantize_q2_ref(blocks: np.ndarray) -> np.ndarray:
    """``quantize_row_q2_K_ref`` over ``(nb, 256)`` blocks."""
    nb = blocks.shape[0]
    xt = _to_columns(blocks)
    scales, mins, L = make_qkx2_quants_t(
        xt, np.abs(xt), 3, np.float32(-0.5), np.float32(0.1), 15, True
    )
    scales = np.asarray(scales, dtype=np.float32).reshape(nb, _NSUB)
    mins = np.asarray(mins, dtype=np.float32).reshape(nb, _NSUB)
    q4 = np.float32(15)
    max_scale = np.maximum(scales.max(axis=1), _F0)
    max_min = np.maximum(mins.max(axis=1), _F0)
    has_s, has_m = max_scale > _F0, max_min > _F0
    with np.errstate(all="ignore"):
        ls = nearest_int((q4 / max_scale)[:, None] * scales)
        lm = nearest_int((q4 / max_min)[:, None] * mins)
    # C stores the int into uint8 (wraps), then ORs the min code shifted by 4
    ls = np.where(has_s[:, None], ls, 0) & 0xFF
    lm = np.where(has_m[:, None], lm, 0)
    scale_bytes = ((ls | (lm << 4)) & 0xFF).astype(np.uint8)
    dm = np.where(has_s, max_scale / q4, _F0)
    mm = np.where(has_m, max_min / q4, _F0)
    return _finish_q2(blocks, xt, scale_bytes, dm, mm, lambda c: L[:, c])


def _quantize_q2_imatrix(blocks: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """``quantize_row_q2_K_impl`` (llama.cpp's ``quantize_q2_K`` with quant_weights)."""
    nb = blocks.shape[0]
    xt = _to_columns(blocks)
    wt, sw = _sigma_weights(xt, _to_columns(importance), 1)
    scales, mins, L = make_qkx3_quants_t(
        xt, wt, 3, np.float32(-0.9), np.float32(0.05), 36, False
    )
    sw = sw.reshape(nb, _NSUB)
    dm, Ls = make_qp_quants(np.asarray(scales, dtype=np.float32).reshape(nb, _NSUB), 15, sw)
    mm, Lm = make_qp_quants(np.asarray(mins, dtype=np.float32).reshape(nb, _NSUB), 15, sw)
    # uint8 Ls[j] | (Lm[j] << 4), stored into a uint8
    Ls = np.asarray(Ls).astype(np.int32) & 0xFF
    Lm = np.asarray(Lm).astype(np.int32) & 0xFF
    scale_bytes = ((Ls | (Lm << 4)) & 0xFF).astype(np.uint8)
    return _finish_q2(blocks, xt, scale_bytes, dm, mm, lambda c: L[:, c])


# ----------------------------------------------------------------------------- Q3_K
def _finish_q3(blocks, xt, ls, d_value, search_codes) -> np.ndarray:
    """Q3_K bytes from 6-bit scale codes ``ls (nb, 16)`` (offset by 32; all 0 when the block
    scale is 0), the super-block scale before fp16 rounding and the search's codes
    ``(16, S)`` (offset by +4)."""
    nb = ls.shape[0]
    dh, d16 = fp16_round(d_value)
    d = d16[:, None] * (ls.astype(np.float32) - np.float32(32))  # fp16 d * (int8) sc
    codes = _requantize(blocks, xt, d, None, -4, 3, 4, search_codes)
    hmask, qs = _pack_q3_codes(codes)
    out = np.empty((nb, 110), dtype=np.uint8)
    out[:, :32] = hmask
    out[:, 32:96] = qs
    out[:, 96:108] = _pack_q3_scales(ls)
    out[:, 108:110] = half_bytes(dh)
    return out


def _quantize_q3_ref(blocks: np.ndarray) -> np.ndarray:
    """``quantize_row_q3_K_ref`` over ``(nb, 256)`` blocks."""
    nb = blocks.shape[0]
    xt = _to_columns(blocks)
    scales, levels = _q3_search(xt, 4, True)
    scales = scales.reshape(nb, _NSUB)
    # first sub-block scale of largest magnitude (C: `if (fabsf(s) > amax)`), signed
    max_scale = _signed_absmax(np.ascontiguousarray(scales.T))[1]
    has = max_scale != _F0
    with np.errstate(all="ignore"):
        iscale = np.float32(-32) / max_scale
        ls = nearest_int(iscale[:, None] * scales)
        d_value = np.where(has, np.float32(1) / iscale, _F0)
    np.clip(ls, -32, 31, out=ls)
    ls += 32
    ls[~has] = 0  # C leaves the scale bytes zeroed
    return _finish_q3(blocks, xt, ls, d_value, levels.codes)


def _quantize_q3_imatrix(blocks: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """``quantize_row_q3_K_impl`` (llama.cpp's ``quantize_q3_K`` with quant_weights)."""
    nb = blocks.shape[0]
    xt = _to_columns(blocks)
    wt, sw = _sigma_weights(xt, _to_columns(importance), 2)
    scales, L = make_qx_quants_t(xt, 4, 1, wt)
    scales = np.asarray(scales, dtype=np.float32).reshape(nb, _NSUB)
    d_block, Ls = make_qx_quants(scales, 32, 1, sw.reshape(nb, _NSUB))
    # C keeps Ls (0..63, offset by 32) as int8 and packs (l & 0xF) and (l >> 4)
    d_block = np.asarray(d_block, np.float32)
    return _finish_q3(blocks, xt, np.asarray(Ls).astype(np.int32), d_block, lambda c: L[:, c])


# -------------------------------------------------------------------------- formats
def _check_blocks(fmt: Format, blocks: np.ndarray, importance: np.ndarray | None) -> None:
    if blocks.ndim != 2 or blocks.shape[1] != fmt.block_size:
        raise FormatError(
            f"{fmt.name} quantizes blocks of {fmt.block_size} values, got block shape "
            f"{tuple(blocks.shape)} (last axis {blocks.shape[-1] if blocks.ndim else 0})"
        )
    if importance is not None and importance.shape != blocks.shape:
        raise FormatError(
            f"{fmt.name} importance has shape {tuple(importance.shape)}, expected "
            f"{tuple(blocks.shape)}"
        )


def _check_data(fmt: Format, data: np.ndarray) -> np.ndarray:
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != fmt.type_size:
        raise FormatError(
            f"{fmt.name} blocks are {fmt.type_size} bytes, got data of shape {tuple(data.shape)} "
            f"({data.shape[-1] if data.ndim else 0} bytes per block)"
        )
    return data


def _quantize_chunked(fmt: Format, blocks, importance, ref, imatrix) -> np.ndarray:
    """Run ``ref(x)`` or ``imatrix(x, importance)`` over chunks of super-blocks.

    Chunks bound the working memory of big tensors (every chunk is independent, as C
    quantizes super-block by super-block); a (576, 1536) tensor is a single chunk.
    """
    _check_blocks(fmt, blocks, importance)
    x = np.ascontiguousarray(blocks, dtype=np.float32)
    imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    out = np.empty((x.shape[0], fmt.type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):  # inf/NaN intermediates are masked exactly as in C
        for a in range(0, x.shape[0], _BLOCK_CHUNK):
            b = min(x.shape[0], a + _BLOCK_CHUNK)
            out[a:b] = ref(x[a:b]) if imp is None else imatrix(x[a:b], imp[a:b])
    return out


class Q2_K(Format):
    """2-bit k-quant: 16 sub-blocks of 16 with 4-bit scale and min, 2.625 bits per weight."""

    name = "Q2_K"
    uses_importance = True

    def _quantize_blocks(
        self, blocks: np.ndarray, importance: np.ndarray | None, *, row_length: int
    ) -> np.ndarray:
        return _quantize_chunked(self, blocks, importance, _quantize_q2_ref, _quantize_q2_imatrix)

    def _dequantize_blocks(self, data: np.ndarray) -> np.ndarray:
        data = _check_data(self, data)
        nb = data.shape[0]
        sc = data[:, :16]
        q = _unpack_2bit(data[:, 16:80]).reshape(nb, _NSUB, _SUB).astype(np.float32)
        d = data[:, 80:82].copy().view("<f2").astype(np.float32)
        dmin = data[:, 82:84].copy().view("<f2").astype(np.float32)
        dl = (d * (sc & np.uint8(0xF)).astype(np.float32))[..., None]
        ml = (dmin * (sc >> np.uint8(4)).astype(np.float32))[..., None]
        return (dl * q - ml).reshape(nb, QK_K)


class Q3_K(Format):
    """3-bit k-quant: 16 sub-blocks of 16 with signed 6-bit scales, 3.4375 bits per weight."""

    name = "Q3_K"
    uses_importance = True

    def _quantize_blocks(
        self, blocks: np.ndarray, importance: np.ndarray | None, *, row_length: int
    ) -> np.ndarray:
        return _quantize_chunked(self, blocks, importance, _quantize_q3_ref, _quantize_q3_imatrix)

    def _dequantize_blocks(self, data: np.ndarray) -> np.ndarray:
        data = _check_data(self, data)
        nb = data.shape[0]
        low = _unpack_2bit(data[:, 32:96]).reshape(nb, 8, 32).astype(np.int8)
        hbit = (data[:, None, :32] >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
        q = (low - np.int8(4) * (np.int8(1) - hbit.astype(np.int8))).reshape(nb, _NSUB, _SUB)
        sc = _unpack_q3_scales(data[:, 96:108]).astype(np.int32) - 32
        d = data[:, 108:110].copy().view("<f2").astype(np.float32)
        dl = (d * sc.astype(np.float32))[..., None]
        return (dl * q.astype(np.float32)).reshape(nb, QK_K)
