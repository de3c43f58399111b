"""Selection: a search's best allocations re-measured on a larger slice before one is chosen."""

import pytest

from autobits.agents import Evaluation, SearchResult
from autobits.agents.selection import select
from autobits.allocation import Allocation
from autobits.evaluate import Metrics


#: How hard each selection window is (mean 1): both allocations of a pair share it.
DIFFICULTY = (0.5, 1.5, 0.8, 1.2)


def _m(a: Allocation, kld: float, window_kld: tuple[float, ...] | None = None) -> Metrics:
    """Metrics of ``a``: per-window KLDs ``window_kld`` (mean ``kld``), by default ``kld``
    times :data:`DIFFICULTY`."""
    if window_kld is None:
        window_kld = tuple(kld * f for f in DIFFICULTY)
    else:
        kld = sum(window_kld) / len(window_kld)
    return Metrics(kld=kld, ppl=10.0, top1=0.9, bytes=a.bytes, bpw=a.bpw, seconds=0.1,
                   tokens=256 * len(window_kld), windows=len(window_kld), ref_ppl=9.0,
                   window_kld=window_kld)


@pytest.fixture()
def allocs(tiny_lm):
    return {f: Allocation.uniform(tiny_lm.name, tiny_lm.specs, f) for f in ("Q8_0", "Q5_0", "Q4_0")}


def _result(allocs, reward: dict[str, float]) -> SearchResult:
    ranked = sorted(reward, key=reward.get)
    cands = [(allocs[f], _m(allocs[f], reward[f])) for f in ranked]
    hist = [Evaluation(index=i, kld=reward[f], bytes=allocs[f].bytes, bpw=allocs[f].bpw,
                       feasible=True, seconds=0.1) for i, f in enumerate(ranked)]
    return SearchResult(agent="optuna", best=cands[0][0], best_metrics=cands[0][1], history=hist,
                        meta={"evals": 3}, candidates=cands)


def test_selection_overrules_an_overfitted_reward(allocs):
    # the reward slice ranks Q4_0 first; the selection slice disagrees (Q5_0 best)
    result = _result(allocs, {"Q4_0": 0.01, "Q5_0": 0.02, "Q8_0": 0.03})
    truth = {allocs["Q4_0"].bytes: 0.5, allocs["Q5_0"].bytes: 0.1, allocs["Q8_0"].bytes: 0.2}
    calls = []

    def measure(a):
        calls.append(a.bytes)
        return _m(a, truth[a.bytes])

    out = select(result, measure=measure, warm_start=allocs["Q8_0"], top_k=2)
    assert out.best is allocs["Q5_0"] and out.best_metrics.kld == 0.02  # the reward number
    sel = out.meta["selection"]
    assert sel["chosen"] == "optuna #2" and sel["selection_kld"] == 0.1
    assert [r["label"] for r in sel["rows"]] == ["optuna #1", "optuna #2", "warm start"]
    assert sel["rows"][2]["reward_kld"] == 0.03  # the warm start's reward is looked up
    assert len(calls) == 3 and out.history == result.history and result.best is allocs["Q4_0"]


def test_warm_start_wins_when_nothing_holds_up(allocs):
    result = _result(allocs, {"Q4_0": 0.01, "Q5_0": 0.02, "Q8_0": 0.03})
    out = select(result, measure=lambda a: _m(a, 1.0 / a.bytes), warm_start=allocs["Q8_0"],
                 top_k=1)
    assert out.best is allocs["Q8_0"] and out.meta["selection"]["chosen"] == "warm start"


def test_top_k_zero_and_bad_top_k(allocs):
    result = _result(allocs, {"Q4_0": 0.01, "Q5_0": 0.02})
    assert select(result, measure=lambda a: 1 / 0, top_k=0) is result
    with pytest.raises(ValueError, match="top_k"):
        select(result, measure=lambda a: None, top_k=-1)


# per-window selection KLDs of the warm start (greedy): windows differ 3x in difficulty
WARM = (0.010, 0.030, 0.020, 0.015, 0.025, 0.012, 0.028, 0.018)


def _decide(allocs, warm_windows, cand_windows, **kw):
    """select() with the warm start Q8_0 and the search's only candidate Q4_0."""
    result = _result(allocs, {"Q4_0": 0.01, "Q8_0": 0.03})
    windows = {allocs["Q8_0"].bytes: warm_windows, allocs["Q4_0"].bytes: cand_windows}
    return select(result, measure=lambda a: _m(a, 0.0, windows[a.bytes]),
                  warm_start=allocs["Q8_0"], top_k=1, **kw)


def test_noisy_small_advantage_keeps_the_warm_start(allocs):
    # 0.1% lower mean KLD, but window by window +-5%: not significant
    noise = (0.05, -0.05, 0.04, -0.04, 0.05, -0.05, 0.03, -0.03)
    cand = tuple(w * (1 + e) for w, e in zip(WARM, noise))
    cand = tuple(c - (sum(cand) - 0.999 * sum(WARM)) / len(cand) for c in cand)
    assert sum(cand) / sum(WARM) == pytest.approx(0.999)
    out = _decide(allocs, WARM, cand)
    sel = out.meta["selection"]
    assert out.best is allocs["Q8_0"] and sel["chosen"] == "warm start"
    assert "not significant" in sel["reason"] and "95%" in sel["reason"]
    assert out.best_metrics.kld == 0.03  # the warm start's reward number
    assert sel["level"] == 0.95 and sel["method"] == "t"
    cand_row, warm_row = sel["rows"]
    assert warm_row["warm_start"] and warm_row["vs_warm_start"] is None
    d = cand_row["vs_warm_start"]
    assert d["rel"] == pytest.approx(-0.001) and d["lo"] < 0 < d["hi"] and d["n"] == 8
    assert d["method"] == "t" and d["level"] == 0.95


def test_consistent_advantage_replaces_the_warm_start(allocs):
    # 2% lower on every window, give or take 0.2%: significant
    cand = tuple(w * (0.98 + 0.002 * (-1) ** i) for i, w in enumerate(WARM))
    for kw in ({}, {"method": "bootstrap"}, {"level": 0.99}):
        out = _decide(allocs, WARM, cand, **kw)
        sel = out.meta["selection"]
        assert out.best is allocs["Q4_0"] and sel["chosen"] == "optuna #1", kw
        d = sel["rows"][0]["vs_warm_start"]
        assert d["hi"] < 0 and d["rel"] == pytest.approx(-0.02, abs=1e-3)
        assert "entirely below zero" in sel["reason"]
        assert d["method"] == sel["method"] == kw.get("method", "t")
        assert d["level"] == sel["level"] == kw.get("level", 0.95)


def test_no_interval_keeps_the_warm_start(allocs):
    # one selection window cannot show an advantage, however large
    out = _decide(allocs, (0.02,), (0.01,))
    assert out.best is allocs["Q8_0"]
    assert "at least 2 windows" in out.meta["selection"]["reason"]
    assert out.meta["selection"]["rows"][0]["vs_warm_start"] is None


def test_without_a_warm_start_the_lowest_kld_wins(allocs):
    result = _result(allocs, {"Q4_0": 0.01, "Q5_0": 0.02})
    truth = {allocs["Q4_0"].bytes: 0.0101, allocs["Q5_0"].bytes: 0.01}
    out = select(result, measure=lambda a: _m(a, truth[a.bytes]), top_k=2)
    sel = out.meta["selection"]
    assert out.best is allocs["Q5_0"] and sel["chosen"] == "optuna #2"
    assert all(r["vs_warm_start"] is None and not r["warm_start"] for r in sel["rows"])


def test_warm_start_among_the_candidates(allocs):
    # the search's own #1 is the warm start: it is compared against, not with itself
    result = _result(allocs, {"Q8_0": 0.01, "Q4_0": 0.02})
    out = select(result, measure=lambda a: _m(a, 1.0 / a.bytes), warm_start=allocs["Q8_0"],
                 top_k=2)
    sel = out.meta["selection"]
    assert [r["label"] for r in sel["rows"]] == ["optuna #1 (warm start)", "optuna #2"]
    assert out.best is allocs["Q8_0"] and sel["chosen"] == "optuna #1 (warm start)"
    assert sel["rows"][1]["vs_warm_start"]["diff"] > 0


def test_bad_level_and_method(allocs):
    result = _result(allocs, {"Q4_0": 0.01})
    with pytest.raises(ValueError, match="level"):
        select(result, measure=lambda a: None, level=1.0)
    with pytest.raises(ValueError, match="method"):
        select(result, measure=lambda a: None, method="z")
