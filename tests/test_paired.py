"""Paired intervals of per-window differences (autobits.paired)."""

import json
import math

import numpy as np
import pytest

from autobits.errors import AutobitsError
from autobits.paired import PairedDiff, paired_interval

A = (0.10, 0.30, 0.20, 0.15, 0.25)


def test_t_interval_by_hand():
    b = (0.09, 0.28, 0.21, 0.13, 0.24)
    d = [-0.01, -0.02, 0.01, -0.02, -0.01]
    mean = sum(d) / 5  # -0.01
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)  # sqrt(0.0006 / 4)
    t975_4 = 2.7764451051977987  # Student t, 4 degrees of freedom, 97.5% quantile
    half = t975_4 * sd / math.sqrt(5)
    got = paired_interval(a=A, b=b)
    assert isinstance(got, PairedDiff)
    assert got.diff == pytest.approx(mean) and got.mean_a == pytest.approx(0.2)
    assert got.rel == pytest.approx(-0.05)
    assert got.lo == pytest.approx(mean - half) and got.hi == pytest.approx(mean + half)
    assert got.n == 5 and got.method == "t" and got.level == 0.95
    assert got.rel_lo == pytest.approx((mean - half) / 0.2)
    # a wider level, a wider interval
    wide = paired_interval(a=A, b=b, level=0.99)
    assert wide.lo < got.lo < got.hi < wide.hi
    # JSON-friendly
    assert json.loads(json.dumps(got.to_json()))["hi"] == pytest.approx(got.hi)
    assert "-5.00%" in got.describe() and "95% t interval" in got.describe()


def test_bootstrap_deterministic_and_contains_the_mean():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.01, 0.03, 12)
    b = a * (1 + rng.normal(0, 0.05, 12))
    one = paired_interval(a=a, b=b, method="bootstrap", seed=7, n_boot=2000)
    two = paired_interval(a=list(a), b=list(b), method="bootstrap", seed=7, n_boot=2000)
    assert one == two
    assert one.lo < one.diff < one.hi and one.method == "bootstrap" and one.n == 12
    other = paired_interval(a=a, b=b, method="bootstrap", seed=8, n_boot=2000)
    assert other != one and other.diff == one.diff
    # about as wide as the t interval for a dozen near-normal differences
    t = paired_interval(a=a, b=b)
    assert 0.5 < (one.hi - one.lo) / (t.hi - t.lo) < 1.5


@pytest.mark.parametrize("method", ["t", "bootstrap"])
def test_clearly_better_below_zero_noisy_straddles(method):
    better = [x * 0.97 for x in A]  # 3% lower on every window
    d = paired_interval(a=A, b=better, method=method)
    assert d.hi < 0 and d.below_zero and d.rel == pytest.approx(-0.03)
    noisy = [x * (1 + e) for x, e in zip(A, (0.05, -0.06, 0.04, -0.05, 0.01))]
    d = paired_interval(a=A, b=noisy, method=method)
    assert d.lo < 0 < d.hi and not d.below_zero


def test_identical_and_zero():
    d = paired_interval(a=A, b=A)
    assert d.diff == d.lo == d.hi == 0 and not d.below_zero
    d = paired_interval(a=(0.0, 0.0), b=(0.1, 0.2))
    assert d.rel is None and d.rel_lo is None and "nats" in d.describe()


def test_bad_input():
    with pytest.raises(AutobitsError, match=r"len\(a\)=3, len\(b\)=2"):
        paired_interval(a=(1, 2, 3), b=(1, 2))
    with pytest.raises(AutobitsError, match=r"at least 2 windows.*len\(a\)=1, len\(b\)=1"):
        paired_interval(a=(1,), b=(2,))
    with pytest.raises(AutobitsError, match="level"):
        paired_interval(a=A, b=A, level=95)
    with pytest.raises(AutobitsError, match="method"):
        paired_interval(a=A, b=A, method="wilcoxon")
    with pytest.raises(AutobitsError, match="n_boot"):
        paired_interval(a=A, b=A, method="bootstrap", n_boot=0)
    with pytest.raises(AutobitsError, match="finite"):
        paired_interval(a=A, b=(0.1, math.nan, 0.2, 0.1, 0.1))
    with pytest.raises(AutobitsError, match="shape"):
        paired_interval(a=[[1, 2], [3, 4]], b=[[1, 2], [3, 4]])
    with pytest.raises(TypeError):
        paired_interval(A, A)  # keyword-only
