"""Paired comparison of two allocations measured on the same windows.

Windows differ in difficulty, and two allocations evaluated on the same windows share
those differences: their KLDs usually vary far more from window to window than from one
allocation to the other on the same window.  Comparing their mean KLDs as if they were
independent samples drowns a small difference in that spread; comparing them *window by
window* removes it.
:func:`paired_interval` takes the per-window mean KLDs of both (``Metrics.window_kld``, in
the same window order) and returns the mean of the differences ``b - a`` with a confidence
interval over windows:

* ``method="t"``: the paired t interval, ``mean(d) +- t_{n-1, (1+level)/2} * sd(d) / sqrt(n)``
  (``sd`` with ``n - 1`` degrees of freedom; exact for normal differences, and close for a
  handful of windows of hundreds of tokens each, whose means are near normal);
* ``method="bootstrap"``: the percentile interval of the mean difference over ``n_boot``
  resamples of the windows with replacement (``numpy.random.default_rng(seed)``: the same
  inputs and seed give the same interval), which assumes nothing about the differences'
  shape but is too narrow for very few windows.

An interval entirely below zero says that ``b`` has a lower KLD than ``a`` on the
population the windows were drawn from, at the stated level; one that contains zero says
the windows cannot tell them apart.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from autobits.errors import AutobitsError

__all__ = ["PairedDiff", "paired_interval", "PAIRED_METHODS", "DEFAULT_N_BOOT"]

log = logging.getLogger(__name__)

#: The interval methods :func:`paired_interval` knows.
PAIRED_METHODS = ("t", "bootstrap")
#: Bootstrap resamples by default.
DEFAULT_N_BOOT = 10_000
#: Resamples drawn at once (bounds the index array at about 64 MB for 1,000 windows).
_BOOT_CHUNK_ELEMENTS = 8_000_000


@dataclass(frozen=True)
class PairedDiff:
    """The paired difference ``b - a`` of two per-window measurements (e.g. KLD).

    ``diff``: mean of the per-window differences (= mean(b) - mean(a)); ``mean_a``: mean of
    ``a``; ``rel``: ``diff / mean_a`` (None when ``mean_a`` is 0); ``lo``, ``hi``: the
    ``level`` confidence interval of ``diff``; ``n``: the number of windows; ``method``:
    ``"t"`` or ``"bootstrap"``.
    """

    diff: float
    mean_a: float
    rel: float | None
    lo: float
    hi: float
    n: int
    method: str
    level: float

    @property
    def below_zero(self) -> bool:
        """True when the whole interval is below zero: ``b`` is significantly lower."""
        return self.hi < 0

    @property
    def rel_lo(self) -> float | None:
        """``lo`` relative to ``mean_a`` (None when ``mean_a`` is 0)."""
        return None if self.mean_a == 0 else self.lo / self.mean_a

    @property
    def rel_hi(self) -> float | None:
        """``hi`` relative to ``mean_a`` (None when ``mean_a`` is 0)."""
        return None if self.mean_a == 0 else self.hi / self.mean_a

    def describe(self) -> str:
        """One line, e.g. ``-1.52% (95% t interval -2.10% .. -0.94%, 8 windows)``."""
        span = (f"{self.lo:+.3g} .. {self.hi:+.3g} nats" if self.mean_a == 0 else
                f"{self.rel_lo * 100:+.2f}% .. {self.rel_hi * 100:+.2f}%")
        head = f"{self.diff:+.3g} nats" if self.rel is None else f"{self.rel * 100:+.2f}%"
        return (f"{head} ({self.level * 100:g}% {self.method} interval {span}, "
                f"{self.n} windows)")

    def to_json(self) -> dict:
        return asdict(self)


def _values(name: str, values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise AutobitsError(f"{name} must be a sequence of per-window values, got shape "
                            f"{arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise AutobitsError(f"{name} must be finite, got {arr[bad[0]]} at window {bad[0]} "
                            f"({bad.size} non-finite of {arr.size})")
    return arr


def _t_half_width(d: np.ndarray, level: float) -> float:
    from scipy.stats import t

    n = d.size
    return float(t.ppf((1 + level) / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))


def _bootstrap_bounds(d: np.ndarray, level: float, seed: int, n_boot: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    n = d.size
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // n)
    means = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = d[idx].mean(axis=1)
    alpha = 1 - level
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_interval(*, a: Sequence[float], b: Sequence[float], level: float = 0.95,
                    method: str = "t", seed: int = 0,
                    n_boot: int = DEFAULT_N_BOOT) -> PairedDiff:
    """The mean of ``b - a`` over paired windows and its ``level`` confidence interval.

    ``a`` and ``b`` are per-window values of the same windows in the same order (at least
    2); ``method`` is ``"t"`` (paired t interval) or ``"bootstrap"`` (percentile interval of
    ``n_boot`` resamples of the windows drawn with ``seed``).  Unequal lengths, fewer than 2
    windows, non-finite values, a ``level`` outside (0, 1), an unknown ``method`` or
    ``n_boot < 1`` raise :class:`~autobits.errors.AutobitsError`.
    """
    if method not in PAIRED_METHODS:
        raise AutobitsError(f"method must be one of {PAIRED_METHODS}, got {method=}")
    if not 0 < level < 1:
        raise AutobitsError(f"level must be in (0, 1), got {level=}")
    if method == "bootstrap" and int(n_boot) < 1:
        raise AutobitsError(f"n_boot must be >= 1, got {n_boot=}")
    if len(a) != len(b):
        raise AutobitsError(f"a and b must hold the same windows, got {len(a)=}, {len(b)=}")
    if len(a) < 2:
        raise AutobitsError(f"a paired interval needs at least 2 windows, got {len(a)=}, "
                            f"{len(b)=}")
    va, vb = _values("a", a), _values("b", b)
    d = vb - va
    diff = float(d.mean())
    if method == "t":
        half = _t_half_width(d, level)
        lo, hi = diff - half, diff + half
    else:
        lo, hi = _bootstrap_bounds(d, level, int(seed), int(n_boot))
    mean_a = float(va.mean())
    out = PairedDiff(diff=diff, mean_a=mean_a, rel=None if mean_a == 0 else diff / mean_a,
                     lo=lo, hi=hi, n=int(d.size), method=method, level=float(level))
    log.debug("paired %s interval over %d windows: %s", method, d.size, out.describe())
    return out
